"""The leader's orphan sweep (SPEC §11, crash row): a directory created just before a crash, whose
claim is deleted while no provisioner runs, is removed when a provisioner next leads; nothing
with data, nothing a claim or PV still names, and nothing outside the default naming is touched.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from provisioner.storage import FaultRule, write_fault_rules
from tests.integration.conftest import StartProvisioner, StorageClasses
from tests.integration.harness import NFS_PATH, Kube, claim, unique, wait_for

pytestmark = pytest.mark.integration


def test_crash_after_mkdir_then_claim_deleted_leaves_no_orphan(
    admin: Kube,
    provisioner: StartProvisioner,
    namespace: str,
    storage_classes: StorageClasses,
    tmp_path: Path,
) -> None:
    export = tmp_path / "export"
    faults = tmp_path / "faults.json"
    # chmod follows mkdir: hanging it holds the provisioner between creating the directory and
    # saving the PV, where the kill lands.
    write_fault_rules(faults, [FaultRule(op="chmod", match=f"{namespace}-doomed-", effect="hang")])
    process = provisioner(NFS_PROVISIONER_UNSAFE_FAULTS_FILE=str(faults))
    class_name = storage_classes(process.name, prefix="orphan")
    admin.apply(claim("doomed", namespace, class_name))
    doomed = wait_for(
        "the doomed claim's directory",
        lambda: next(export.glob(f"{namespace}-doomed-pvc-*"), None),
        timeout=60,
    )
    process.kill()
    pvc = admin.get("pvc", "doomed", namespace)
    assert pvc is not None
    assert admin.get("pv", f"pvc-{pvc['metadata']['uid']}") is None, "the PV was saved"
    admin.run("delete", "pvc", "doomed", "-n", namespace)
    write_fault_rules(faults, [])

    restarted = provisioner(name=process.name, export=export)
    admin.apply(claim("after", namespace, class_name))
    after = admin.wait_phase("pvc", "after", "Bound", namespace)
    # The sweep runs before the work queue starts, so it is over once "after" is provisioned.
    assert not doomed.exists()
    assert [p.name for p in export.iterdir()] == [
        f"{namespace}-after-{after['spec']['volumeName']}"
    ]
    assert f"orphan sweep: removed empty directory {doomed.name}" in restarted.logs()


def test_sweep_touches_nothing_with_data_or_still_named(
    admin: Kube,
    provisioner: StartProvisioner,
    namespace: str,
    storage_classes: StorageClasses,
    tmp_path: Path,
) -> None:
    export = tmp_path / "export"
    export.mkdir()

    def leftover(name: str) -> Path:
        path = export / name
        path.mkdir()
        return path

    orphan = leftover(f"{namespace}-gone-pvc-{uuid.uuid4()}")
    with_data = leftover(f"{namespace}-kept-pvc-{uuid.uuid4()}")
    (with_data / "data.txt").write_text("precious")
    archived = leftover(f"archived-{namespace}-old-pvc-{uuid.uuid4()}")
    custom = leftover(f"{namespace}-custom")
    # A claim that exists (another provisioner's class, so it stays Pending) names this one.
    admin.apply(claim("pending", namespace, unique("nobodys-class")))
    pending = admin.get("pvc", "pending", namespace)
    assert pending is not None
    live = leftover(f"{namespace}-pending-pvc-{pending['metadata']['uid']}")
    # A PV made by hand points at this one.
    by_hand = leftover(f"{namespace}-static-pvc-{uuid.uuid4()}")
    static_pv = unique("static")
    admin.apply(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "PersistentVolume",
                "metadata": {"name": static_pv},
                "spec": {
                    "capacity": {"storage": "1Mi"},
                    "accessModes": ["ReadWriteMany"],
                    "persistentVolumeReclaimPolicy": "Retain",
                    "storageClassName": "",
                    "nfs": {"server": "nfs.example.test", "path": f"{NFS_PATH}/{by_hand.name}"},
                },
            }
        )
    )
    try:
        process = provisioner(export=export)
        class_name = storage_classes(process.name, prefix="sweep")
        admin.apply(claim("fresh", namespace, class_name))
        fresh = admin.wait_phase("pvc", "fresh", "Bound", namespace)
        assert not orphan.exists()
        assert {p.name for p in export.iterdir()} == {
            with_data.name,
            archived.name,
            custom.name,
            live.name,
            by_hand.name,
            f"{namespace}-fresh-{fresh['spec']['volumeName']}",
        }
        assert (with_data / "data.txt").read_text() == "precious"
    finally:
        admin.run("delete", "pv", static_pv, "--wait=false")
