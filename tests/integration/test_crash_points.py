"""A crash at every point of provision and release converges (SPEC §11, crash row).

Each case holds a real provisioner at one call - every filesystem operation it makes on the
export and every API call of the reconciler, for provisioning, archiving and deleting - through
the fault seam (``tests/faults.py``: a hang, announced in the ``.held`` file), SIGKILLs it there,
restarts it without faults and checks the end state: exactly one directory and one PV for the
claim (or, after release, exactly one archive or nothing), owner records that match the
directories, no intent left, no orphan, and no burst of Events from the second run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest

from provisioner.paths import JOURNAL_DIR
from tests.faults import FaultRule, held_file, write_fault_rules
from tests.integration.conftest import StartProvisioner, StorageClasses
from tests.integration.harness import Kube, claim, entries, wait_for

pytestmark = pytest.mark.integration

Phase = Literal["provision", "archive", "delete"]


@dataclass(frozen=True)
class Point:
    """Hold the provisioner at ``op`` where ``match`` applies (``{ns}`` and ``{pv}`` are
    filled in: the claim's namespace and its PV's name)."""

    phase: Phase
    op: str
    match: str

    @property
    def id(self) -> str:
        where = self.match.replace("{ns}", "").replace("{pv}", "pv").strip("^$-/")
        return f"{self.phase}-{self.op}-{where or 'any'}"


OWNER = ".nfs-provisioner/owners/d{ns}-crash-"
# In the order the provisioner meets them (see storage._create, _archive, _remove and
# reconciler.provision/reconcile_volume); together they cover every Syscalls operation and every
# API call the reconciler makes while provisioning and releasing a claim the watch delivers
# (such a claim needs no confirming GET; test_ownership's watch-gap test covers that one).
# Events are posted by their own task: their points hold that task, not the reconcile.
POINTS = [
    Point("provision", "post_event", "^crash/Provisioning$"),
    Point("provision", "open", "^{ns}-crash-"),
    Point("provision", "mkdir", "^.nfs-provisioner/intents"),
    Point("provision", "open", "^.nfs-provisioner/intents/pvc-"),
    Point("provision", "write", "^.nfs-provisioner/intents/pvc-"),
    Point("provision", "fsync", "^.nfs-provisioner/intents/pvc-"),
    Point("provision", "rename", "^.nfs-provisioner/intents/pvc-"),
    Point("provision", "mkdir", f"^{OWNER}"),
    Point("provision", "write", f"^{OWNER}"),
    Point("provision", "fsync", f"^{OWNER}"),
    Point("provision", "rename", f"^{OWNER}"),
    Point("provision", "mkdir", "^{ns}-crash-"),
    Point("provision", "chmod", "^{ns}-crash-"),
    Point("provision", "chown", "^{ns}-crash-"),
    Point("provision", "create_volume", "^pvc-"),
    Point("provision", "unlink", "^.nfs-provisioner/intents/pvc-"),
    Point("provision", "post_event", "^crash/ProvisioningSucceeded$"),
    Point("archive", "stat", "^{ns}-crash-"),
    Point("archive", "rename", "^{ns}-crash-"),
    Point("archive", "stat", f"^{OWNER}"),
    Point("archive", "rename", f"^{OWNER}"),
    Point("archive", "post_event", "^{pv}/VolumeArchived$"),
    Point("archive", "delete_volume", "^{pv}$"),
    Point("archive", "remove_volume_finalizer", "^{pv}$"),
    Point("delete", "listdir", "^{ns}-crash-"),
    Point("delete", "unlink", "^{ns}-crash-"),
    Point("delete", "rmdir", "^{ns}-crash-"),
    Point("delete", "unlink", f"^{OWNER}"),
    Point("delete", "rmdir", f"^{OWNER}"),
    Point("delete", "post_event", "^{pv}/VolumeDeleted$"),
    Point("delete", "delete_volume", "^{pv}$"),
    Point("delete", "remove_volume_finalizer", "^{pv}$"),
]

PARAMETERS: dict[Phase, dict[str, str]] = {
    # uid/gid make the provisioner chown the directory, so that chown is a point too.
    "provision": {"uid": "1000", "gid": "1000"},
    "archive": {"onDelete": "archive"},
    "delete": {"onDelete": "delete"},
}


def owner_records(export: Path) -> dict[str, str]:
    """Directory (export-relative) -> namespace, for every owner record on the export."""
    root = export / JOURNAL_DIR / "owners"
    records = {}
    for path in root.rglob("owner.json") if root.exists() else []:
        mirror = path.parent.relative_to(root).parts
        directory = "/".join(part.removeprefix("d") for part in mirror)
        records[directory] = json.loads(path.read_text())["namespace"]
    return records


def intents(export: Path) -> list[str]:
    root = export / JOURNAL_DIR / "intents"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def event_counts(admin: Kube, namespace: str | None, name: str) -> dict[str, int]:
    """Reason -> how many times it was recorded (Event objects and their counts)."""
    counts: dict[str, int] = {}
    for event in admin.events(namespace, name):
        reason = str(event.get("reason"))
        counts[reason] = counts.get(reason, 0) + int(event.get("count") or 1)
    return counts


def hold(faults: Path, rule: FaultRule) -> None:
    write_fault_rules(faults, [rule])


def wait_held(faults: Path, point: Point) -> str:
    def probe() -> str | None:
        held = held_file(faults)
        return held.read_text() if held.exists() else None

    line = wait_for(f"the provisioner to be held at {point.op} {point.match}", probe, timeout=60)
    assert line.startswith(f"{point.op} "), line
    return line


@pytest.mark.parametrize("point", POINTS, ids=[p.id for p in POINTS])
def test_crash_at_every_point_converges(
    admin: Kube,
    provisioner: StartProvisioner,
    namespace: str,
    storage_classes: StorageClasses,
    tmp_path: Path,
    point: Point,
) -> None:
    faults = tmp_path / "faults.json"
    write_fault_rules(faults, [])
    first = provisioner(NFS_PROVISIONER_UNSAFE_FAULTS_FILE=str(faults))
    export = first.export
    class_name = storage_classes(first.name, PARAMETERS[point.phase], prefix="crash")
    match = point.match.replace("{ns}", namespace)
    rule = FaultRule(op=point.op, match=match, effect="hang")
    if point.phase == "provision":
        hold(faults, rule)
    admin.apply(claim("crash", namespace, class_name))
    pvc = admin.get("pvc", "crash", namespace)
    assert pvc is not None
    volume = f"pvc-{pvc['metadata']['uid']}"
    directory = f"{namespace}-crash-{volume}"

    if point.phase != "provision":
        admin.wait_phase("pvc", "crash", "Bound", namespace)
        (export / directory / "data.txt").write_text("the tenant's data")
        hold(faults, FaultRule(op=point.op, match=match.replace("{pv}", volume), effect="hang"))
        admin.run("delete", "pvc", "crash", "-n", namespace, "--wait=false")
    wait_held(faults, point)
    first.kill()
    write_fault_rules(faults, [])

    second = provisioner(
        name=first.name, export=export, NFS_PROVISIONER_UNSAFE_FAULTS_FILE=str(faults)
    )
    if point.phase == "provision":
        assert_provisioned_once(admin, namespace, volume, directory, export)
    else:
        admin.wait_gone("pv", volume, timeout=60)
        assert_released_once(admin, point.phase, namespace, volume, directory, export)
    assert "Traceback" not in second.logs(), second.logs()[-3000:]


def assert_provisioned_once(
    admin: Kube, namespace: str, volume: str, directory: str, export: Path
) -> None:
    pvc = admin.wait_phase("pvc", "crash", "Bound", namespace, timeout=60)
    assert pvc["spec"]["volumeName"] == volume
    ours = [
        pv["metadata"]["name"]
        for pv in admin.items("pv")
        if pv["spec"].get("claimRef", {}).get("uid") == pvc["metadata"]["uid"]
    ]
    assert ours == [volume]
    assert [p.name for p in entries(export)] == [directory]
    stat = (export / directory).stat()
    assert (stat.st_uid, stat.st_gid) == (1000, 1000)
    wait_for("the intent to be cleared", lambda: intents(export) == [], timeout=30)
    assert owner_records(export) == {directory: namespace}
    counts = event_counts(admin, namespace, "crash")
    attempts = [
        e
        for e in admin.events(namespace, "crash")
        if e["message"].startswith("External provisioner is provisioning")
    ]
    # At most one attempt per process; nothing failed, so no warning at all.
    assert sum(int(e.get("count") or 1) for e in attempts) <= 2, attempts
    assert counts.get("ProvisioningSucceeded", 0) <= 1, counts
    assert set(counts) <= {"Provisioning", "ProvisioningSucceeded", "ExternalProvisioning"}, counts


def assert_released_once(
    admin: Kube, phase: Phase, namespace: str, volume: str, directory: str, export: Path
) -> None:
    left = [p.name for p in entries(export)]
    if phase == "archive":
        archive = f"archived-{directory}"
        assert left == [archive]
        assert (export / archive / "data.txt").read_text() == "the tenant's data"
        assert owner_records(export) == {archive: namespace}
    else:
        assert left == []
        assert owner_records(export) == {}
    assert intents(export) == []
    counts: dict[str, Any] = event_counts(admin, None, volume)
    reason = "VolumeArchived" if phase == "archive" else "VolumeDeleted"
    assert counts.get(reason, 0) <= 2, counts
    assert set(counts) <= {reason}, counts
