"""Kubernetes' own storage tests against our StorageClass, on the real node (``make e2e-storage``).

``e2e.test`` (Kubernetes v1.36.4's end-to-end suite, built from its Go module) runs the External
Storage tests for the driver file ``tests/storage_suite/testdriver.yaml``: the StorageClass the
shipped manifests install, with the capabilities an NFS sub-directory volume really has. The
provisioner runs as shipped (``seeds_provisioner``); the suite's test images are packed here
and imported into the node (controlplane/suite.py). Every test the focus selects must pass or
be skipped by the suite itself with its reason; the summary is printed (docs/e2e-storage.md
records it). Not part of ``make e2e``: it takes longer than the whole of CI may.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from controlplane import suite
from controlplane.binaries import kubectl_binary, resolve_paths
from tests.e2e.cluster import REPO, E2ECluster

pytestmark = pytest.mark.e2e

DRIVER = REPO / "tests" / "storage_suite" / "testdriver.yaml"
FOCUS = (
    r"External Storage .*\[Testpattern: (Dynamic PV \((default fs|filesystem volmode)\)"
    r"|Generic Ephemeral-volume \(default fs\))"
)
# Each with the reason it cannot apply here (docs/e2e-storage.md repeats them).
SKIPPED = {
    r"\[Disruptive\]": "restarts or stops the kubelet over SSH; the e2e node has no SSH",
    r"\[Feature:|\[FeatureGate:": "optional features a sub-directory volume lacks (snapshots, "
    "VolumeAttributesClass, SELinux mounts)",
    r"should provision storage with any volume data source": "needs the hello-populator and "
    "volume-data-source-validator images (kubernetes-csi), not built here",
    r"should provision storage with mount options": "checks the options in the pod's `mount` "
    "output; the user-space NFS client here (FUSE) shows fuse's options, not NFS's",
    r"should not mount / map unused volumes in a pod": "looks for the pod's volumes under "
    "/var/lib/kubelet on the node; this node's kubelet keeps them under its state directory",
}
SKIP = "|".join(SKIPPED)
SUITE_TIMEOUT = 3 * 3600
# What `make e2e` (and so CI) runs of it: data written and read back, exec, a subPath, two pods
# on one volume, a generic ephemeral volume.
SMOKE = (
    r"External Storage .*\[Testpattern: (Dynamic PV \(default fs\)\] volumes should "
    r"(store data|allow exec of files on the volume)"
    r"|Dynamic PV \(default fs\)\] subPath should support existing directory$"
    r"|Dynamic PV \(filesystem volmode\)\] multiVolume \[Slow\] should concurrently access the "
    r"single volume from pods on the same node"
    r"|Generic Ephemeral-volume \(default fs\) \(late-binding\)\] ephemeral should create "
    r"read/write inline ephemeral volume)"
)
SMOKE_COUNT = 5


def run_suite(cluster: E2ECluster, scratch: Path, focus: str) -> suite.Summary:
    """The test images imported, then ``e2e.test`` with ``focus`` and SKIP; its summary."""
    # Built by make e2e / make e2e-storage; missing, the error names the build.sh command.
    binaries = resolve_paths(["e2e.test", "agnhost"], build=False)
    suite.import_test_images(cluster.node, binaries["agnhost"], scratch)
    reports = scratch / "reports"
    reports.mkdir()
    argv = suite.suite_argv(
        binaries["e2e.test"],
        kubeconfig=cluster.kubeconfig,
        kubectl=kubectl_binary(),
        driver=DRIVER,
        focus=focus,
        skip=SKIP,
        report_dir=reports,
        timeout=f"{SUITE_TIMEOUT}s",
    )
    summary = suite.run(argv, reports, scratch / "e2e.test.log", timeout=SUITE_TIMEOUT + 120)
    print(summary.render())
    return summary


@pytest.mark.timeout(900)
def test_kubernetes_storage_tests_smoke(seeds_provisioner: E2ECluster, tmp_path: Path) -> None:
    """Part of `make e2e` (CI): five of the suite's tests, about three minutes."""
    summary = run_suite(seeds_provisioner, tmp_path, SMOKE)
    assert not summary.failed, summary.render()
    assert len(summary.passed) == SMOKE_COUNT, summary.render()


@pytest.mark.storage_suite
@pytest.mark.timeout(SUITE_TIMEOUT + 300)
def test_external_storage_suite(seeds_provisioner: E2ECluster, tmp_path: Path) -> None:
    """`make e2e-storage`: every dynamic-PV and generic-ephemeral test that applies."""
    summary = run_suite(seeds_provisioner, tmp_path, FOCUS)
    assert not summary.failed, summary.render()
    assert summary.passed, "the focus selected no test that ran"
