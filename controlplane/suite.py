"""Kubernetes' own storage tests (``e2e.test``, "External Storage") against our StorageClass.

What: the test images the selected tests run, packed here with no registry
(``registry.k8s.io/e2e-test-images/busybox`` from Debian's busybox-static, as the node's own
images, also standing in for the two images the tests only run shell commands in; ``agnhost``
from its Go module, built by ``build.sh agnhost``, on top of it) and imported
into the node's containerd under the names the suite asks for; the run of ``e2e.test`` (built by
``build.sh e2e.test``) with our driver definition, a focus and a skip; and its JSON report read
back into counts and the reason of every test that did not run.

Why: the storage projects of this field (csi-driver-host-path, ceph-csi, the cloud drivers) prove
themselves with this suite; ``make e2e-storage`` runs it on the e2e node
(``tests/e2e/test_storage_suite.py``), and docs/e2e-storage.md records what it covered.

The image names and versions are those of ``test/utils/image/manifest.go`` at the control
plane's Kubernetes version (controlplane/go.mod): a new version may move them, and the run
then fails pulling an image that is not there (ErrImageNeverPull is not used: the suite's pods
say IfNotPresent), which names the image to add here.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controlplane.node import Node
from controlplane.ocipack import Image, busybox_layer, write_images_archive

BUSYBOX = "registry.k8s.io/e2e-test-images/busybox:1.37.0-1"
AGNHOST = "registry.k8s.io/e2e-test-images/agnhost:2.63.0"
STAND_INS = (
    "registry.k8s.io/e2e-test-images/glibc-dns-testing:2.0.0",
    "registry.k8s.io/e2e-test-images/nginx:1.15-4",
)
"""Images the storage tests use only to run shell commands in (the multiVolume pods, the exec
test): busybox under their names. Upstream's are Debian with dnsutils, and nginx."""


def agnhost_layer(binary: Path) -> bytes:
    """A layer holding ``/agnhost``, as the image's Dockerfile puts it (on busybox here, where
    upstream's base is alpine: the tests call agnhost's subcommands and POSIX shell tools)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        data = binary.read_bytes()
        info = tarfile.TarInfo("agnhost")
        info.mode, info.mtime, info.size = 0o755, 0, len(data)
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def pack_test_images(path: Path, agnhost: Path) -> Path:
    """The OCI archive of both test images; busybox's layer is stored once."""
    base = busybox_layer()
    shell = Image((base,), cmd=("sh",))
    return write_images_archive(
        path,
        {
            BUSYBOX: shell,
            **dict.fromkeys(STAND_INS, shell),
            AGNHOST: Image((base, agnhost_layer(agnhost)), entrypoint=("/agnhost",)),
        },
    )


def import_test_images(node: Node, agnhost: Path, scratch: Path) -> None:
    archive = pack_test_images(scratch / "e2e-test-images.tar", agnhost)
    result = node.ctr("images", "import", str(archive))
    if result.returncode != 0:
        raise RuntimeError(f"ctr images import of the test images failed: {result.stderr}")


# --------------------------------------------------------------------------- the run


def suite_argv(
    e2e_test: Path,
    *,
    kubeconfig: Path,
    kubectl: Path,
    driver: Path,
    focus: str,
    skip: str,
    report_dir: Path,
    timeout: str,
) -> list[str]:
    """The ``e2e.test`` command line: our driver's tests, one at a time, a JSON report."""
    return [
        str(e2e_test),
        f"-kubeconfig={kubeconfig}",
        f"-kubectl-path={kubectl}",
        f"-storage.testdriver={driver}",
        f"-ginkgo.focus={focus}",
        f"-ginkgo.skip={skip}",
        f"-ginkgo.timeout={timeout}",
        "-ginkgo.no-color",
        "-ginkgo.v",
        f"-ginkgo.json-report={_report(report_dir)}",
        f"-report-dir={report_dir}",
        "-provider=skeleton",
        "-node-os-distro=debian",
    ]


def _report(report_dir: Path) -> Path:
    return report_dir / "report.json"


@dataclass
class Summary:
    """What one run of the suite did, from its JSON report."""

    passed: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (test, failure message)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (test, why), at run time
    seconds: float = 0.0

    def render(self) -> str:
        lines = [
            f"e2e.test External Storage: {len(self.passed)} passed, {len(self.failed)} failed, "
            f"{len(self.skipped)} skipped at run time, in {self.seconds:.0f} s"
        ]
        lines += [f"  PASSED  {name}" for name in self.passed]
        lines += [f"  SKIPPED {name}: {why}" for name, why in self.skipped]
        lines += [f"  FAILED  {name}: {why}" for name, why in self.failed]
        return "\n".join(lines)


_DRIVER_PREFIX = re.compile(r"^(\[sig-storage\] )?External Storage \[Driver: [^\]]*\] ")


def spec_name(spec: dict[str, Any]) -> str:
    texts = [*(spec.get("ContainerHierarchyTexts") or []), spec.get("LeafNodeText", "")]
    return _DRIVER_PREFIX.sub("", " ".join(text for text in texts if text))


def summarize(report: Sequence[dict[str, Any]]) -> Summary:
    """Ginkgo's JSON report (one entry per suite) as a Summary. Specs the focus or skip left
    out ("skipped" with no failure message, never started) are not counted; a spec skipped while
    it ran (the driver lacks a capability, the cluster a second node) is, with its reason."""
    summary = Summary()
    for suite in report:
        summary.seconds += float(suite.get("RunTime", 0)) / 1e9
        for spec in suite.get("SpecReports") or []:
            if spec.get("LeafNodeType") != "It":
                continue
            state = spec.get("State")
            message = str((spec.get("Failure") or {}).get("Message", "")).strip()
            name = spec_name(spec)
            if state == "passed":
                summary.passed.append(name)
            elif state == "skipped":
                if message:
                    summary.skipped.append((name, message.splitlines()[0]))
            else:
                summary.failed.append((name, f"{state}: {message}"[:2000]))
    return summary


def run(argv: Sequence[str], report_dir: Path, log: Path, timeout: float) -> Summary:
    """Run the suite (its output to ``log``) and read its report from ``report_dir`` (the one
    given to ``suite_argv``); the exit code is not trusted alone: a run with no report (it could
    not start) raises with the log's tail."""
    report = _report(report_dir)
    with log.open("wb") as out:
        subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, check=False)
    if not report.is_file():
        tail = log.read_text(errors="replace")[-5000:]
        raise RuntimeError(f"e2e.test wrote no report ({report}); its log ends:\n{tail}")
    return summarize(json.loads(report.read_text()))
