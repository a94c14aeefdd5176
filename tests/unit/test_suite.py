"""controlplane.suite without a cluster: the agnhost image, the command line, the report read.

The run itself is ``tests/e2e/test_storage_suite.py`` (``make e2e-storage``); these check the
pure parts it relies on, so that a report with a failure can never read as a pass.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

from controlplane import suite
from controlplane.ocipack import Image, write_images_archive


def spec(leaf: str, state: str, message: str = "", kind: str = "It") -> dict[str, Any]:
    report: dict[str, Any] = {
        "ContainerHierarchyTexts": [
            "[sig-storage] External Storage [Driver: example.com/nfs]",
            "[Testpattern: Dynamic PV (default fs)] volumes",
        ],
        "LeafNodeText": leaf,
        "LeafNodeType": kind,
        "State": state,
    }
    if message:
        report["Failure"] = {"Message": message}
    return report


def test_summarize_counts_what_ran_and_why_the_rest_was_skipped() -> None:
    report = [
        {
            "RunTime": 90_000_000_000,
            "SpecReports": [
                spec("should store data", "passed"),
                spec("should allow exec of files on the volume", "passed"),
                spec("multi-node", "skipped", "Requires at least 2 nodes (not 1)\ndetails"),
                spec("not selected", "skipped"),  # left out by the focus: not counted
                spec("", "passed", kind="SynchronizedBeforeSuite"),
                spec("broken", "failed", "timed out waiting for the pod"),
                spec("timed out", "timedout", "spec timeout"),
            ],
        }
    ]
    summary = suite.summarize(report)
    assert summary.passed == [
        "[Testpattern: Dynamic PV (default fs)] volumes should store data",
        "[Testpattern: Dynamic PV (default fs)] volumes should allow exec of files on the volume",
    ]
    assert summary.skipped == [
        (
            "[Testpattern: Dynamic PV (default fs)] volumes multi-node",
            "Requires at least 2 nodes (not 1)",
        )
    ]
    assert [name for name, _ in summary.failed] == [
        "[Testpattern: Dynamic PV (default fs)] volumes broken",
        "[Testpattern: Dynamic PV (default fs)] volumes timed out",
    ]
    assert summary.failed[1][1] == "timedout: spec timeout"
    assert summary.seconds == 90
    rendered = summary.render()
    assert rendered.startswith(
        "e2e.test External Storage: 2 passed, 2 failed, 1 skipped at run time, in 90 s"
    )
    assert "FAILED  [Testpattern: Dynamic PV (default fs)] volumes broken" in rendered


def test_the_command_line_names_the_driver_focus_skip_and_report(tmp_path: Path) -> None:
    argv = suite.suite_argv(
        Path("/cache/e2e.test"),
        kubeconfig=Path("/k/admin.conf"),
        kubectl=Path("/venv/bin/kubectl"),
        driver=Path("/repo/driver.yaml"),
        focus="External Storage",
        skip=r"\[Disruptive\]",
        report_dir=tmp_path,
        timeout="3600s",
    )
    assert argv[0] == "/cache/e2e.test"
    assert "-storage.testdriver=/repo/driver.yaml" in argv
    assert "-ginkgo.focus=External Storage" in argv
    assert r"-ginkgo.skip=\[Disruptive\]" in argv
    assert f"-ginkgo.json-report={tmp_path / 'report.json'}" in argv
    assert "-kubectl-path=/venv/bin/kubectl" in argv


def test_agnhost_is_layered_on_busybox_with_its_entrypoint(tmp_path: Path) -> None:
    binary = tmp_path / "agnhost"
    binary.write_bytes(b"\x7fELF agnhost")
    layer = suite.agnhost_layer(binary)
    with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
        (member,) = tar.getmembers()
        assert (member.name, member.mode) == ("agnhost", 0o755)
    archive = write_images_archive(
        tmp_path / "images.tar",
        {
            suite.BUSYBOX: Image((b"busybox layer",), cmd=("sh",)),
            suite.AGNHOST: Image((b"busybox layer", layer), entrypoint=("/agnhost",)),
        },
    )
    with tarfile.open(archive) as tar:
        blobs = {
            name.removeprefix("blobs/sha256/"): tar.extractfile(name).read()  # type: ignore[union-attr]
            for name in tar.getnames()
            if name.startswith("blobs/")
        }
        index = json.load(io.BytesIO(tar.extractfile("index.json").read()))  # type: ignore[union-attr]
    assert len(blobs) == 6  # the busybox layer once, agnhost's, two configs, two manifests
    names = {
        entry["annotations"]["io.containerd.image.name"]: entry for entry in index["manifests"]
    }
    assert set(names) == {suite.BUSYBOX, suite.AGNHOST}
    manifest = json.loads(blobs[names[suite.AGNHOST]["digest"].removeprefix("sha256:")])
    config = json.loads(blobs[manifest["config"]["digest"].removeprefix("sha256:")])
    assert config["config"]["Entrypoint"] == ["/agnhost"]
    assert len(config["rootfs"]["diff_ids"]) == 2
