"""`make demo`: the whole product on a laptop, one line per step, exit 0, nothing left running.

Starts the local control plane, uses a temporary directory as the NFS export, runs the
provisioner under the ServiceAccount from rbac/, applies the default-class StorageClass and the
seeds' test-claim from manifests/, shows the bound claim and its directory, writes SUCCESS as the
seeds' test-pod would, deletes the claim and shows the archive. KEEP=1 leaves the control plane
up in .dev/ for exploring (stop it with `make dev-cluster-down`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import yaml

from controlplane.binaries import kubectl_binary, resolve_binaries
from controlplane.runner import ControlPlane

REPO = Path(__file__).resolve().parents[1]
T = TypeVar("T")


def step(message: str) -> None:
    print(f"==> {message}", flush=True)


def wait(what: str, probe: Callable[[], T | None], timeout: float = 120) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.25)
    raise SystemExit(f"demo: timed out waiting for {what}")


class Demo:
    def __init__(self, plane: ControlPlane, export: Path, work: Path) -> None:
        self.plane = plane
        self.export = export
        self.work = work
        self.provisioner: subprocess.Popen[bytes] | None = None

    def kubectl(self, *args: str, stdin: str | None = None, show: bool = False) -> str:
        argv = [str(kubectl_binary()), f"--kubeconfig={self.plane.admin_kubeconfig}", *args]
        result = subprocess.run(
            argv, input=stdin, capture_output=True, text=True, check=False, timeout=120
        )
        if result.returncode != 0:
            raise SystemExit(f"demo: kubectl {' '.join(args)} failed:\n{result.stderr}")
        if show:
            print(result.stdout.rstrip(), flush=True)
        return result.stdout

    def start_provisioner(self, name: str) -> None:
        kubeconfig = self.plane.service_account_kubeconfig(
            "nfs-provisioner", "nfs-provisioner", self.work / "sa.kubeconfig"
        )
        env = {
            **os.environ,
            "KUBECONFIG": str(kubeconfig),
            "PROVISIONER_NAME": name,
            "NFS_SERVER": "nfs.demo.local",
            "NFS_PATH": "/exports",
            "NFS_MOUNT_PATH": str(self.export),
            "POD_NAMESPACE": "nfs-provisioner",
            "HTTP_ADDRESS": "127.0.0.1:0",
        }
        log = (self.work / "provisioner.log").open("wb")
        self.provisioner = subprocess.Popen(
            [sys.executable, "-m", "provisioner"], cwd=REPO, env=env, stdout=log, stderr=log
        )
        log.close()
        wait(
            "the provisioner to become leader",
            lambda: (
                "became leader" in (self.work / "provisioner.log").read_text()
                or self._check_alive()
            ),
        )

    def _check_alive(self) -> bool:
        if self.provisioner is not None and self.provisioner.poll() is not None:
            log = (self.work / "provisioner.log").read_text()
            raise SystemExit(f"demo: the provisioner exited:\n{log[-3000:]}")
        return False

    def stop_provisioner(self) -> None:
        if self.provisioner is not None and self.provisioner.poll() is None:
            self.provisioner.terminate()
            self.provisioner.wait(timeout=30)

    def run(self) -> None:
        step(f"control plane up: {self.plane.server} (kube-apiserver, etcd, controller-manager)")
        self.kubectl("apply", "-k", str(REPO / "rbac"))
        step("applied rbac/ (ServiceAccount nfs-provisioner and its roles)")
        storage_class_file = REPO / "manifests" / "storageclass-default.yaml"
        storage_class = yaml.safe_load(storage_class_file.read_text())
        self.kubectl("apply", "-f", str(storage_class_file))
        name = storage_class["provisioner"]
        step(f"applied default StorageClass {storage_class['metadata']['name']} ({name})")
        self.start_provisioner(name)
        step(f"provisioner running as the ServiceAccount, export = {self.export}")
        self.kubectl("apply", "-n", "default", "-f", str(REPO / "manifests" / "test-claim.yaml"))
        step("applied manifests/test-claim.yaml; waiting for it to be Bound")
        wait(
            "test-claim to be Bound",
            lambda: (
                json.loads(self.kubectl("get", "pvc", "test-claim", "-o", "json"))
                .get("status", {})
                .get("phase")
                == "Bound"
            ),
        )
        self.kubectl("get", "pv,pvc", "-n", "default", show=True)
        directories = sorted(p.name for p in self.export.iterdir() if not p.name.startswith("."))
        step(f"directory on the export: {', '.join(directories)}")
        (self.export / directories[0] / "SUCCESS").write_text("")
        step(f"wrote SUCCESS into {directories[0]} (what the seeds' test-pod does)")
        self.kubectl("delete", "pvc", "test-claim", "-n", "default", "--wait=false")
        step("deleted test-claim; waiting for its volume to be released")
        wait("the volume to be released", lambda: not self.kubectl("get", "pv", "-o", "name"))
        archived = sorted(p.name for p in self.export.iterdir() if not p.name.startswith("."))
        step(f'export now holds: {", ".join(archived)} (archiveOnDelete: "true")')
        contents = sorted(p.name for p in (self.export / archived[0]).iterdir())
        step(f"{archived[0]} contains: {', '.join(contents)}")


def main() -> int:
    keep = os.environ.get("KEEP", "") not in ("", "0", "false")
    binaries = resolve_binaries(build=True)
    with tempfile.TemporaryDirectory(prefix="nfs-demo-") as tmp:
        work = Path(tmp)
        state = REPO / ".dev" if keep else work / "controlplane"
        plane = ControlPlane(state, binaries, detach=keep)
        export = work / "export"
        export.mkdir()
        step("starting the local control plane (binaries cached in ~/.cache/nfs-provisioner)")
        plane.start()
        demo = Demo(plane, export, work)
        try:
            demo.run()
        finally:
            demo.stop_provisioner()
            if not keep:
                plane.stop()
        if keep:
            step(f"control plane kept running: export KUBECONFIG={plane.admin_kubeconfig}")
            step("stop it with: make dev-cluster-down")
        else:
            step("stopped everything the demo started")
    return 0


if __name__ == "__main__":
    sys.exit(main())
