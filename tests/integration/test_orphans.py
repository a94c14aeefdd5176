"""The leader's orphan sweep (SPEC §11, crash row), driven by provisioning intents.

A provisioner writes an intent to ``.nfs-provisioner/intents/`` before it creates a claim's
directory and clears it once the PV is saved. Killed in between, with the claim deleted before
any provisioner runs again, it leaves a directory nothing names; the next leader removes it
(rmdir only) - whatever pathPattern made it. It acts on its own intents only: a directory with
data is kept, and directories with no intent, or with another cluster's or another
provisioner's intent, are not touched.

Each case crashes a real provisioner at the worst moment: its chmod after mkdir hangs (fault
injection), then it is SIGKILLed. The sweep runs before the restarted provisioner reconciles
anything, so it is over once a new claim is Bound.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from provisioner.paths import JOURNAL_DIR
from tests.faults import FaultRule, write_fault_rules
from tests.integration.conftest import StartProvisioner, StorageClasses
from tests.integration.harness import (
    Kube,
    ProvisionerProcess,
    claim,
    entries,
    provision,
    wait_for,
)

pytestmark = pytest.mark.integration

CUSTOM = "${.PVC.namespace}/${.PVC.name}"


@dataclass(frozen=True)
class Crash:
    """A provisioner killed between creating claim ``doomed``'s directory and saving its PV;
    usually the claim was deleted afterwards."""

    name: str
    """The provisioner's name, to restart it."""
    export: Path
    class_name: str
    rel: str
    volume: str

    @property
    def directory(self) -> Path:
        return self.export / self.rel

    @property
    def intent(self) -> Path:
        return intents_dir(self.export) / f"{self.volume}.json"

    @property
    def owner_record(self) -> Path:
        mirror = "/".join(f"d{part}" for part in self.rel.split("/"))
        return self.export / JOURNAL_DIR / "owners" / mirror / "owner.json"


def intents_dir(export: Path) -> Path:
    return export / JOURNAL_DIR / "intents"


@dataclass(frozen=True)
class Orphans:
    """The fixtures every case needs, and the two steps they share: crash mid-provision, then
    restart the provisioner."""

    admin: Kube
    provisioner: StartProvisioner
    namespace: str
    storage_classes: StorageClasses
    tmp_path: Path

    def crash(
        self, pattern: str | None = None, on_delete: str | None = None, delete_claim: bool = True
    ) -> Crash:
        admin, namespace = self.admin, self.namespace
        export = self.tmp_path / "export"
        faults = self.tmp_path / "faults.json"
        # chmod follows mkdir: hanging it holds the provisioner between creating the directory
        # and saving the PV, where the kill lands.
        write_fault_rules(faults, [FaultRule(op="chmod", match="doomed", effect="hang")])
        process = self.provisioner(NFS_PROVISIONER_UNSAFE_FAULTS_FILE=str(faults))
        parameters = {"pathPattern": pattern} if pattern else {}
        if on_delete:
            parameters["onDelete"] = on_delete
        class_name = self.storage_classes(process.name, parameters, prefix="orphan")
        admin.apply(claim("doomed", namespace, class_name))
        pvc = admin.get("pvc", "doomed", namespace)
        assert pvc is not None
        volume = f"pvc-{pvc['metadata']['uid']}"
        rel = f"{namespace}/doomed" if pattern else f"{namespace}-doomed-{volume}"
        crash = Crash(process.name, export, class_name, rel, volume)
        wait_for("the doomed claim's directory", crash.directory.is_dir, timeout=60)
        process.kill()
        assert admin.get("pv", volume) is None, "the PV was saved; the kill came too late"
        assert crash.intent.is_file(), "no intent was written before the directory"
        intent = json.loads(crash.intent.read_text())
        assert (intent["volume"], intent["directory"]) == (volume, rel)
        if delete_claim:
            admin.run("delete", "pvc", "doomed", "-n", namespace)
        write_fault_rules(faults, [])
        return crash

    def restart_and_provision(self, crash: Crash) -> tuple[ProvisionerProcess, str]:
        """Restart the provisioner and wait until a new claim is Bound; (process, the directory
        its PV records)."""
        restarted = self.provisioner(name=crash.name, export=crash.export)
        after = provision(self.admin, self.namespace, crash.class_name, crash.export, "after")
        return restarted, after.recorded


@pytest.fixture
def orphans(
    admin: Kube,
    provisioner: StartProvisioner,
    namespace: str,
    storage_classes: StorageClasses,
    tmp_path: Path,
) -> Orphans:
    return Orphans(admin, provisioner, namespace, storage_classes, tmp_path)


@pytest.mark.parametrize("pattern", [None, CUSTOM], ids=["default-name", "custom-pattern"])
def test_crash_after_mkdir_then_claim_deleted_leaves_no_orphan(
    orphans: Orphans, pattern: str | None
) -> None:
    namespace = orphans.namespace
    crash = orphans.crash(pattern)
    assert crash.owner_record.is_file()

    restarted, after = orphans.restart_and_provision(crash)
    assert not crash.directory.exists()
    assert not crash.intent.exists()
    assert not crash.owner_record.exists()
    assert f"orphan sweep: removed empty directory {crash.rel}: claim {namespace}/doomed" in (
        restarted.logs()
    )
    if pattern:
        # Parents are never removed; the namespace's directory holds the new claim only.
        assert [p.name for p in (crash.export / namespace).iterdir()] == ["after"]
    else:
        assert [p.name for p in entries(crash.export)] == [after]
    assert list(intents_dir(crash.export).iterdir()) == []


def test_crash_leftover_with_data_is_kept(orphans: Orphans) -> None:
    namespace = orphans.namespace
    crash = orphans.crash()
    (crash.directory / "data.txt").write_text("written before the crash")

    restarted, _ = orphans.restart_and_provision(crash)
    assert (crash.directory / "data.txt").read_text() == "written before the crash"
    assert not crash.intent.exists()
    # Still a leftover of its namespace: the owner record stays with the directory.
    assert json.loads(crash.owner_record.read_text())["namespace"] == namespace
    assert f"orphan sweep: kept {crash.rel}: claim {namespace}/doomed (uid " in restarted.logs()
    assert "orphan sweep: removed" not in restarted.logs()


def plant_intent(export: Path, namespace: str, cluster: str, provisioner_name: str) -> Path:
    """An empty default-looking directory and an intent for it, written by another party."""
    claim_uid = str(uuid.uuid4())
    volume = f"pvc-{claim_uid}"
    directory = f"{namespace}-elsewhere-{volume}"
    (export / directory).mkdir()
    intent = {
        "version": 1,
        "volume": volume,
        "namespace": namespace,
        "claim": "elsewhere",
        "claim_uid": claim_uid,
        "directory": directory,
        "cluster": cluster,
        "provisioner": provisioner_name,
        "since": "2026-01-01T00:00:00Z",
    }
    path = intents_dir(export) / f"{volume}.json"
    path.write_text(json.dumps(intent, sort_keys=True) + "\n")
    return path


def test_sweep_acts_only_on_its_own_intents(orphans: Orphans) -> None:
    """Next to a real orphan (which proves the sweep ran), nothing else is touched: empty
    default-looking and archived directories with no intent, and empty directories whose
    intents are another cluster's or another provisioner's on a shared export."""
    namespace = orphans.namespace
    crash = orphans.crash()
    export = crash.export
    kube_system = orphans.admin.get("namespace", "kube-system")
    assert kube_system is not None
    cluster = kube_system["metadata"]["uid"]
    no_intent = [
        export / f"{namespace}-handmade-pvc-{uuid.uuid4()}",
        export / f"archived-{namespace}-old-pvc-{uuid.uuid4()}",
    ]
    for directory in no_intent:
        directory.mkdir()
    foreign = [
        plant_intent(export, namespace, "another-clusters-kube-system-uid", crash.name),
        plant_intent(export, namespace, cluster, "other.example.com/nfs"),
    ]
    foreign_content = {path: path.read_text() for path in foreign}
    foreign_dirs = [export / json.loads(text)["directory"] for text in foreign_content.values()]

    restarted, after = orphans.restart_and_provision(crash)
    assert not crash.directory.exists()
    assert {p.name for p in entries(export)} == {
        after,
        *(d.name for d in no_intent),
        *(d.name for d in foreign_dirs),
    }
    assert {path: path.read_text() for path in foreign} == foreign_content
    assert sorted(intents_dir(export).iterdir()) == sorted(foreign)
    sweep_lines = [line for line in restarted.logs().splitlines() if "orphan sweep" in line]
    assert len(sweep_lines) == 1, sweep_lines
    assert crash.rel in sweep_lines[0]


def test_crash_with_the_claim_alive_converges_and_leaves_no_stale_intent(orphans: Orphans) -> None:
    """The restarted provisioner finishes the claim in the directory the crash left, and
    settles its intent: otherwise a later sweep, after the claim was released with
    ``onDelete: retain``, would remove the directory the user asked to keep."""
    admin, namespace = orphans.admin, orphans.namespace
    crash = orphans.crash(on_delete="retain", delete_claim=False)
    restarted = orphans.provisioner(name=crash.name, export=crash.export)
    pvc = admin.wait_phase("pvc", "doomed", "Bound", namespace)
    assert pvc["spec"]["volumeName"] == crash.volume
    assert crash.directory.is_dir()
    wait_for("the intent to be cleared", lambda: not crash.intent.exists(), timeout=30)

    admin.run("delete", "pvc", "doomed", "-n", namespace, "--wait=false")
    admin.wait_gone("pv", crash.volume)
    assert crash.directory.is_dir(), "onDelete: retain"
    restarted.stop()
    again, _ = orphans.restart_and_provision(crash)
    assert crash.directory.is_dir(), "the sweep removed a retained directory"
    assert "orphan sweep" not in again.logs()
