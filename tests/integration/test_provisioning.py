"""Provisioning against the real control plane, driven with kubectl as a user would (SPEC §3-§5).

The provisioner runs as a subprocess under the ServiceAccount from rbac/; a temp directory is
the export. Each test uses its own provisioner name, so provisioners of other tests ignore it;
most start it with a StorageClass of it through the ``install`` fixture.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.conftest import Install, StartProvisioner
from tests.integration.harness import (
    NFS_PATH,
    NFS_SERVER,
    Kube,
    claim,
    entries,
    storage_class,
    unique,
    wait_for,
)

pytestmark = pytest.mark.integration

OUR_ANNOTATION_PREFIXES = ("nfs.provisioner.dev/", "kopf.zalando.org/")
FINALIZER = "external-provisioner.volume.kubernetes.io/finalizer"


def seeds_manifests(class_name: str) -> str:
    """The StorageClass and test-claim of the seeds' tutorial (shared/seeds/000_*), verbatim
    but for the class name, which is made unique so that the test can be repeated."""
    return f"""
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: {class_name}
mountOptions:
- vers=4
- minorversion=0
- noresvport
provisioner: fuseim.pri/ifs
parameters:
  archiveOnDelete: "false"
---
kind: PersistentVolumeClaim
apiVersion: v1
metadata:
  name: test-claim
  annotations:
    volume.beta.kubernetes.io/storage-class: "{class_name}"
spec:
  accessModes:
    - ReadWriteMany
  resources:
    requests:
      storage: 2Gi
"""


def test_seeds_flow_binds_and_writes_the_expected_volume(
    admin: Kube, provisioner: StartProvisioner, tmp_path: Path
) -> None:
    export = tmp_path / "export"
    provisioner(name="fuseim.pri/ifs", export=export)
    class_name = unique("yiruike-nfs-storage")
    admin.run("apply", "-n", "default", "-f", "-", input=seeds_manifests(class_name))
    try:
        pvc = admin.wait_phase("pvc", "test-claim", "Bound", "default")
        uid = pvc["metadata"]["uid"]
        pv_name = f"pvc-{uid}"
        assert pvc["spec"]["volumeName"] == pv_name
        directory = export / f"default-test-claim-{pv_name}"
        assert directory.is_dir()
        assert directory.stat().st_mode & 0o7777 == 0o777

        pv = admin.get("pv", pv_name)
        assert pv is not None
        spec = pv["spec"]
        assert pv["metadata"]["annotations"]["pv.kubernetes.io/provisioned-by"] == "fuseim.pri/ifs"
        assert spec["nfs"] == {"server": NFS_SERVER, "path": f"{NFS_PATH}/{directory.name}"}
        assert spec["capacity"] == {"storage": "2Gi"}
        assert spec["accessModes"] == ["ReadWriteMany"]
        assert spec["mountOptions"] == ["vers=4", "minorversion=0", "noresvport"]
        assert spec["persistentVolumeReclaimPolicy"] == "Delete"
        assert spec["storageClassName"] == class_name
        assert spec["volumeMode"] == "Filesystem"
        assert spec["claimRef"]["uid"] == uid
        assert FINALIZER in pv["metadata"]["finalizers"]
        annotations = pv["metadata"]["annotations"]
        assert annotations["nfs.provisioner.dev/directory"] == directory.name
        assert annotations["nfs.provisioner.dev/export-path"] == NFS_PATH
        assert annotations["nfs.provisioner.dev/on-delete"] == "delete"

        message = admin.wait_event("default", "test-claim", "ProvisioningSucceeded")
        assert message == f"Successfully provisioned volume {pv_name}"
        assert "provisioning volume for claim" in admin.wait_event(
            "default", "test-claim", "Provisioning"
        )
        # Nothing of ours on the user's claim: no annotations, no finalizers.
        current = admin.get("pvc", "test-claim", "default")
        assert current is not None
        for key in current["metadata"].get("annotations", {}):
            assert not key.startswith(OUR_ANNOTATION_PREFIXES), key
        assert current["metadata"].get("finalizers", []) == ["kubernetes.io/pvc-protection"]
    finally:
        admin.run("delete", "pvc", "test-claim", "-n", "default", "--wait=false", check=False)
        admin.run("delete", "storageclass", class_name, check=False)


def test_claim_without_class_gets_the_default_class(
    admin: Kube, install: Install, namespace: str
) -> None:
    _, class_name = install(prefix="default-nfs", default=True)
    admin.apply(claim("no-class", namespace, None))
    pvc = admin.wait_phase("pvc", "no-class", "Bound", namespace)
    assert pvc["spec"]["storageClassName"] == class_name
    assert (install.export / f"{namespace}-no-class-{pvc['spec']['volumeName']}").is_dir()


def test_path_pattern_with_labels_and_annotations_nests_directories(
    admin: Kube, install: Install, namespace: str
) -> None:
    pattern = "${.PVC.namespace}/${.PVC.labels.app}/${.PVC.annotations.nfs.io/storage-path}"
    _, class_name = install({"pathPattern": pattern}, prefix="pattern")
    admin.apply(
        claim(
            "data",
            namespace,
            class_name,
            labels={"app": "web"},
            annotations={"nfs.io/storage-path": "db_v1"},
        )
    )
    pvc = admin.wait_phase("pvc", "data", "Bound", namespace)
    directory = install.export / namespace / "web" / "db_v1"
    assert directory.is_dir()
    pv = admin.get("pv", pvc["spec"]["volumeName"])
    assert pv is not None
    assert pv["spec"]["nfs"]["path"] == f"{NFS_PATH}/{namespace}/web/db_v1"
    assert pv["metadata"]["annotations"]["nfs.provisioner.dev/directory"] == (
        f"{namespace}/web/db_v1"
    )


def test_twenty_claims_at_once_bind_to_distinct_directories(
    admin: Kube, install: Install, namespace: str
) -> None:
    _, class_name = install(prefix="many")
    names = [f"c{i:02d}" for i in range(20)]
    admin.apply("\n---\n".join(claim(n, namespace, class_name) for n in names))

    def all_bound() -> list[dict[str, object]] | None:
        claims = admin.items("pvc", namespace)
        bound = [c for c in claims if c.get("status", {}).get("phase") == "Bound"]
        return bound if len(bound) == len(names) else None

    bound = wait_for("20 claims to be Bound", all_bound, timeout=120)
    volumes = {c["spec"]["volumeName"] for c in bound}  # type: ignore[index]
    assert len(volumes) == 20
    dirs = sorted(p.name for p in entries(install.export))
    assert dirs == sorted(
        f"{namespace}-{c['metadata']['name']}-{c['spec']['volumeName']}"  # type: ignore[index]
        for c in bound
    )


def test_leftover_directory_is_reused_and_the_event_says_so(
    admin: Kube, install: Install, namespace: str
) -> None:
    """A directory made by hand (no owner record) under the claim's own namespace is reused;
    test_tenants.py has the foreign-namespace and recorded cases."""
    _, class_name = install({"pathPattern": "${.PVC.namespace}/${.PVC.name}"}, prefix="stable")
    leftover = install.export / namespace / "db"
    leftover.mkdir(parents=True)
    (leftover / "data.txt").write_text("kept")
    admin.apply(claim("db", namespace, class_name))
    admin.wait_phase("pvc", "db", "Bound", namespace)
    assert (leftover / "data.txt").read_text() == "kept"
    messages = [e["message"] for e in admin.events(namespace, "db")]
    assert any(f'Reusing existing directory "{namespace}/db"' in m for m in messages), messages


def test_missing_class_is_waited_for(
    admin: Kube, provisioner: StartProvisioner, namespace: str
) -> None:
    process = provisioner()
    class_name = unique("later")
    admin.apply(claim("early", namespace, class_name))
    # The provisioner saw the claim and decided to wait for its class (not: not yet looked).
    waiting = f'claim {namespace}/early: waiting: StorageClass "{class_name}" does not exist'
    wait_for("the provisioner to wait for the class", lambda: waiting in process.logs())
    assert admin.phase("pvc", "early", namespace) == "Pending"
    admin.apply(storage_class(class_name, process.name))
    admin.wait_phase("pvc", "early", "Bound", namespace)


def test_crash_mid_batch_converges_to_one_directory_and_one_volume_per_claim(
    admin: Kube, install: Install, namespace: str
) -> None:
    export = install.export
    # Slow enough (2 workers, 5 API requests/s) that the kill lands in the middle of the batch.
    process, class_name = install(prefix="crash", WORKERS="2", KUBE_API_QPS="5", KUBE_API_BURST="5")
    names = [f"k{i:02d}" for i in range(30)]
    admin.apply("\n---\n".join(claim(n, namespace, class_name) for n in names))
    wait_for("the first directory", lambda: any(entries(export)), timeout=60, interval=0.02)
    process.kill()
    volumes_at_kill = [
        pv
        for pv in admin.items("pv")
        if pv["metadata"].get("annotations", {}).get("pv.kubernetes.io/provisioned-by")
        == process.name
    ]
    assert len(volumes_at_kill) < len(names), "the kill came after the batch; nothing was tested"
    restarted = install.start(name=process.name, export=export)

    def all_bound() -> list[dict[str, object]] | None:
        claims = admin.items("pvc", namespace)
        bound = [c for c in claims if c.get("status", {}).get("phase") == "Bound"]
        return claims if len(bound) == len(names) else None

    claims = wait_for("30 claims Bound after the restart", all_bound, timeout=120)
    expected = {
        f"{namespace}-{c['metadata']['name']}-pvc-{c['metadata']['uid']}"  # type: ignore[index]
        for c in claims
    }
    assert {p.name for p in entries(export)} == expected  # one each, no orphans
    ours = [
        pv
        for pv in admin.items("pv")
        if pv["metadata"].get("annotations", {}).get("pv.kubernetes.io/provisioned-by")
        == restarted.name
    ]
    assert sorted(pv["metadata"]["name"] for pv in ours) == sorted(
        f"pvc-{c['metadata']['uid']}"  # type: ignore[index]
        for c in claims
    )
