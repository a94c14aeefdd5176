"""Run the virtualenv's kubectl (v1.36, matching the test server) the way a user would."""

from __future__ import annotations

import subprocess
from pathlib import Path

from controlplane.binaries import kubectl_binary


class KubectlError(subprocess.CalledProcessError):
    """A failed kubectl call; its message carries kubectl's own stderr."""

    def __str__(self) -> str:
        return f"{super().__str__()}\nstdout: {self.stdout}\nstderr: {self.stderr}"


def kubectl(
    *args: str,
    kubeconfig: Path | str,
    input: str | None = None,  # same name as subprocess.run's
    check: bool = True,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """``kubectl --kubeconfig=<kubeconfig> <args>``; raises KubectlError on failure if ``check``."""
    argv = [str(kubectl_binary()), f"--kubeconfig={kubeconfig}", *args]
    result = subprocess.run(
        argv, input=input, capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise KubectlError(result.returncode, argv, result.stdout, result.stderr)
    return result
