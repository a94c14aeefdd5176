"""Permissions, for real: the Deployment as shipped on both kinds of export users have.

Two exports of one nfs-ganesha (``controlplane.nfs_server``): the seeds' root-owned 0755 export
with no_root_squash (the Aliyun NAS of the tutorials, and most guides), and a root_squash export
whose root belongs to the anonymous uid 65534. On each, the shipped Deployment (root with only
CHOWN, DAC_OVERRIDE and FOWNER) must pass ``nfs-provisioner check`` inside its pod, provision,
let the workload write its volume, and release by archive and by delete. The documented
non-root variant (uid 65534, no capabilities) is then shown to work where it can: on the
root_squash export, where root is 65534 on the server anyway.

The installation is moved to the export under test through the same overlay every user writes
(server and path), and back to the seeds' export at the end, so other modules see it as shipped.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controlplane.nfs_server import Export
from tests.e2e.cluster import E2ECluster
from tests.e2e.conftest import PROVISIONER_NAMESPACE, install

pytestmark = pytest.mark.e2e

DELETE_CLASS = "nfs-delete"
NON_ROOT = {
    "spec": {
        "template": {
            "spec": {
                "securityContext": {"runAsNonRoot": True, "runAsUser": 65534, "runAsGroup": 65534},
                "containers": [
                    {
                        "name": "nfs-provisioner",
                        "securityContext": {"capabilities": {"drop": ["ALL"], "add": None}},
                    }
                ],
            }
        }
    }
}


@pytest.fixture(scope="module", params=["seeds", "squash"])
def on_export(request: pytest.FixtureRequest, seeds_provisioner: E2ECluster) -> Iterator[Export]:
    """The shipped installation, pointed at the export under test; a class that deletes."""
    cluster = seeds_provisioner
    export: Export = getattr(cluster.nfs, request.param)
    install(cluster, export)
    cluster.kubectl(
        "apply",
        "-f",
        "-",
        input=json.dumps(
            {
                "apiVersion": "storage.k8s.io/v1",
                "kind": "StorageClass",
                "metadata": {"name": DELETE_CLASS},
                "provisioner": "example.com/nfs",
                "parameters": {"onDelete": "delete"},
                "reclaimPolicy": "Delete",
            }
        ),
    )
    try:
        yield export
    finally:
        cluster.kubectl("delete", "storageclass", DELETE_CLASS, "--ignore-not-found")
        install(cluster, cluster.nfs.seeds)


def owner(path: Path) -> tuple[int, int]:
    info = path.stat()
    return info.st_uid, info.st_gid


def writer_pod(name: str, claim: str, script: str) -> dict[str, Any]:
    """A busybox pod (root, as the seeds' test-pod) that runs ``script`` on the volume."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "writer",
                    "image": "busybox:1.36",
                    "command": ["/bin/sh", "-c", script],
                    "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                }
            ],
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": claim}}],
        },
    }


def claim_doc(name: str, storage_class: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name},
        "spec": {
            "storageClassName": storage_class,
            "accessModes": ["ReadWriteMany"],
            "resources": {"requests": {"storage": "1Mi"}},
        },
    }


def provisioned(
    cluster: E2ECluster, export: Export, namespace: str, name: str, storage_class: str
) -> tuple[str, Path]:
    """Create the claim; wait Bound; its PV name and directory on the server's disk."""
    cluster.kubectl(
        "apply", "-n", namespace, "-f", "-", input=json.dumps(claim_doc(name, storage_class))
    )

    def bound() -> dict[str, Any] | None:
        found = cluster.get("pvc", name, "-n", namespace)
        return found if found and found.get("status", {}).get("phase") == "Bound" else None

    volume = cluster.wait(f"claim {namespace}/{name} Bound", bound)["spec"]["volumeName"]
    return volume, export.host_dir / f"{namespace}-{name}-{volume}"


def run_pod(cluster: E2ECluster, namespace: str, pod: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(pod))
    name = pod["metadata"]["name"]

    def done() -> str | None:
        found = cluster.get("pod", name, "-n", namespace)
        phase = None if found is None else found.get("status", {}).get("phase")
        return phase if phase in ("Succeeded", "Failed") else None

    phase = cluster.wait(f"pod {namespace}/{name} to finish", done)
    logs = cluster.kubectl("logs", "-n", namespace, name, check=False)
    assert phase == "Succeeded", f"pod {name} failed: {logs}"
    cluster.kubectl("delete", "-n", namespace, "pod", name, "--wait=true")


def released(cluster: E2ECluster, namespace: str, claim: str, volume: str) -> None:
    cluster.kubectl("delete", "-n", namespace, "pvc", claim, "--wait=true")
    cluster.wait(f"PV {volume} released and deleted", lambda: cluster.get("pv", volume) is None)


def test_check_passes_inside_the_shipped_pod(
    on_export: Export, seeds_provisioner: E2ECluster
) -> None:
    out = seeds_provisioner.kubectl(
        "exec",
        "-n",
        PROVISIONER_NAMESPACE,
        "deploy/nfs-provisioner",
        "--",
        "nfs-provisioner",
        "check",
    )
    assert "export mount /persistentvolumes is a writable directory" in out, out
    assert "every RBAC permission the provisioner needs is granted" in out, out


def test_provision_write_and_archive(on_export: Export, seeds_provisioner: E2ECluster) -> None:
    cluster = seeds_provisioner
    namespace = f"perm-archive{on_export.pseudo.replace('/', '-')}"
    cluster.kubectl("create", "namespace", namespace)
    volume, directory = provisioned(cluster, on_export, namespace, "data", "nfs-client")
    # Root on a no_root_squash export; the anonymous uid where root is squashed.
    expected = (0, 0) if on_export is seeds_provisioner.nfs.seeds else (65534, 65534)
    assert owner(directory) == expected
    assert directory.stat().st_mode & 0o7777 == 0o777
    run_pod(cluster, namespace, writer_pod("writer", "data", "echo hello > /data/file"))
    assert (directory / "file").read_text() == "hello\n"
    assert owner(directory / "file") == expected
    released(cluster, namespace, "data", volume)
    assert not directory.exists()
    assert (directory.parent / f"archived-{directory.name}" / "file").read_text() == "hello\n"
    cluster.kubectl("delete", "namespace", namespace, "--wait=false")


def test_provision_write_and_delete(on_export: Export, seeds_provisioner: E2ECluster) -> None:
    """What the workload leaves - files, a sub-directory it made 0755 - is removed by the
    release: root needs DAC_OVERRIDE for a directory a non-root workload owns."""
    cluster = seeds_provisioner
    namespace = f"perm-delete{on_export.pseudo.replace('/', '-')}"
    cluster.kubectl("create", "namespace", namespace)
    volume, directory = provisioned(cluster, on_export, namespace, "data", DELETE_CLASS)
    script = "mkdir -m 0755 /data/sub && echo x > /data/sub/f && echo y > /data/g"
    run_pod(cluster, namespace, writer_pod("writer", "data", script))
    assert (directory / "sub" / "f").is_file()
    released(cluster, namespace, "data", volume)
    assert not directory.exists()
    assert not (directory.parent / f"archived-{directory.name}").exists()
    cluster.kubectl("delete", "namespace", namespace, "--wait=false")


def test_the_documented_non_root_variant_works_on_a_root_squash_export(
    seeds_provisioner: E2ECluster,
) -> None:
    """deployment.yaml's non-root variant (uid 65534, no capabilities) on the export where
    that is who root would be anyway: provisions, the workload writes, the release archives."""
    cluster = seeds_provisioner
    export = cluster.nfs.squash
    install(cluster, export)
    cluster.kubectl(
        "patch",
        "-n",
        PROVISIONER_NAMESPACE,
        "deployment/nfs-provisioner",
        "--type=strategic",
        "-p",
        json.dumps(NON_ROOT),
    )
    cluster.kubectl(
        "rollout",
        "status",
        "-n",
        PROVISIONER_NAMESPACE,
        "deployment/nfs-provisioner",
        "--timeout=180s",
        timeout=200,
    )
    pod_spec = cluster.get("deployment", "nfs-provisioner", "-n", PROVISIONER_NAMESPACE)
    assert pod_spec is not None
    template = pod_spec["spec"]["template"]["spec"]
    assert template["securityContext"]["runAsUser"] == 65534
    assert template["containers"][0]["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    namespace = "perm-non-root"
    cluster.kubectl("create", "namespace", namespace)
    try:
        volume, directory = provisioned(cluster, export, namespace, "data", "nfs-client")
        assert owner(directory) == (65534, 65534)
        run_pod(cluster, namespace, writer_pod("writer", "data", "echo hi > /data/file"))
        released(cluster, namespace, "data", volume)
        assert (directory.parent / f"archived-{directory.name}" / "file").read_text() == "hi\n"
    finally:
        cluster.kubectl("delete", "namespace", namespace, "--wait=false")
        # The overlay does not carry the patch, so applying it would keep the variant: the
        # Deployment is made again from the overlay alone, exactly as shipped.
        cluster.kubectl(
            "delete", "-n", PROVISIONER_NAMESPACE, "deployment/nfs-provisioner", "--wait=true"
        )
        install(cluster, cluster.nfs.seeds)
