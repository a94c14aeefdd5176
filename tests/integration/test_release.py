"""Releasing volumes against the real control plane (SPEC §6 and the delete rows of §11).

Each case provisions a claim, writes `SUCCESS` into its directory as the seeds' test-pod would,
deletes the claim with kubectl, and checks the directory's fate, the archive's contents, that
the PV is gone (or kept) and that no finalizer of ours is left behind. Those shared steps are
``Volumes`` (the ``volumes`` fixture); cases that differ only by StorageClass parameters or
input are parametrised tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.faults import FaultRule, write_fault_rules
from tests.integration.conftest import StartProvisioner, StorageClasses
from tests.integration.harness import (
    Kube,
    Provisioned,
    ProvisionerProcess,
    claim,
    delete_claim,
    entries,
    provision,
    release,
    snapshot,
    wait_for,
)

pytestmark = pytest.mark.integration

FINALIZER = "external-provisioner.volume.kubernetes.io/finalizer"


@dataclass
class Volumes:
    """What every case starts from: a running provisioner with its export, the test's namespace
    and the admin's kubectl, with the provision and delete steps the cases share."""

    admin: Kube
    namespace: str
    process: ProvisionerProcess
    export: Path
    storage_classes: StorageClasses

    def storage_class(self, parameters: dict[str, str], prefix: str, **kw: Any) -> str:
        """A StorageClass of this provisioner (``storage_classes``' keywords)."""
        return self.storage_classes(self.process.name, parameters, prefix=prefix, **kw)

    def provision(self, class_name: str, name: str = "data", **kw: Any) -> Provisioned:
        """A Bound claim whose directory holds ``SUCCESS``, as the seeds' test-pod leaves it."""
        p = provision(self.admin, self.namespace, class_name, self.export, name, **kw)
        assert p.directory.is_dir()
        (p.directory / "SUCCESS").write_text(f"{self.namespace}/{name}")
        return p

    def delete_claim(self, p: Provisioned) -> None:
        delete_claim(self.admin, p)

    def release(self, p: Provisioned) -> None:
        """Delete the claim and wait until its PV is gone."""
        release(self.admin, p)

    def event(self, p: Provisioned, reason: str) -> str:
        """The message of the first Event ``reason`` on the claim's PV."""
        return self.admin.wait_event(None, p.volume, reason)


@pytest.fixture
def volumes(
    admin: Kube,
    provisioner: StartProvisioner,
    namespace: str,
    storage_classes: StorageClasses,
    tmp_path: Path,
) -> Volumes:
    """``Volumes`` with a provisioner of the default environment."""
    return Volumes(admin, namespace, provisioner(), tmp_path / "export", storage_classes)


@pytest.mark.parametrize(
    ("parameters", "fate"),
    [
        pytest.param({"onDelete": "delete"}, "removed", id="onDelete-delete"),
        pytest.param({"onDelete": "retain"}, "kept", id="onDelete-retain"),
        pytest.param({"onDelete": "archive"}, "archived", id="onDelete-archive"),
        pytest.param({"archiveOnDelete": "false"}, "removed", id="archiveOnDelete-false"),
        pytest.param({"archiveOnDelete": "true"}, "archived", id="archiveOnDelete-true"),
        pytest.param({}, "archived", id="archiveOnDelete-absent"),
        pytest.param(
            {"onDelete": "Delete", "archiveOnDelete": "true"}, "removed", id="onDelete-wins"
        ),
    ],
)
def test_on_delete_table(volumes: Volumes, parameters: dict[str, str], fate: str) -> None:
    p = volumes.provision(volumes.storage_class(parameters, prefix="release"))
    volumes.release(p)
    archive = p.directory.parent / f"archived-{p.directory.name}"
    if fate == "removed":
        assert not p.directory.exists()
        assert not archive.exists()
        assert "deleted" in volumes.event(p, "VolumeDeleted")
    elif fate == "kept":
        assert (p.directory / "SUCCESS").read_text() == f"{p.namespace}/data"
        assert "kept" in volumes.event(p, "VolumeRetained")
    else:
        assert not p.directory.exists()
        assert (archive / "SUCCESS").read_text() == f"{p.namespace}/data"
        assert f'archived as "{archive.name}"' in volumes.event(p, "VolumeArchived")
    assert entries(volumes.export) == sorted(
        {"removed": [], "kept": [p.directory], "archived": [archive]}[fate]
    )


def test_pv_deleted_first_is_cleaned_when_its_claim_lets_go(volumes: Volumes) -> None:
    admin = volumes.admin
    p = volumes.provision(volumes.storage_class({"onDelete": "delete"}, prefix="pvfirst"))
    admin.run("delete", "pv", p.volume, "--wait=false")
    pv = wait_for(
        "the PV to be Terminating",
        lambda: (o := admin.get("pv", p.volume)) and o["metadata"].get("deletionTimestamp") and o,
    )
    assert FINALIZER in pv["metadata"]["finalizers"]
    # Bound: a pod may still write to it, so the directory stays until the claim goes.
    assert (p.directory / "SUCCESS").exists()
    volumes.release(p)
    assert not p.directory.exists()


def test_retain_touches_nothing_and_leaves_no_finalizer(volumes: Volumes) -> None:
    admin = volumes.admin
    class_name = volumes.storage_class(
        {"onDelete": "delete"}, prefix="retain", reclaim_policy="Retain"
    )
    p = volumes.provision(class_name)
    volumes.delete_claim(p)
    pv = admin.wait_phase("pv", p.volume, "Released")
    assert FINALIZER not in pv["metadata"].get("finalizers", [])
    assert (p.directory / "SUCCESS").exists()
    admin.run("delete", "pv", p.volume)  # the admin deletes it by hand
    admin.wait_gone("pv", p.volume)
    assert (p.directory / "SUCCESS").exists()


def test_admin_switching_a_pv_to_retain_wins_over_the_recorded_policy(volumes: Volumes) -> None:
    admin = volumes.admin
    p = volumes.provision(volumes.storage_class({"onDelete": "delete"}, prefix="switch"))
    admin.run("patch", "pv", p.volume, "-p", '{"spec":{"persistentVolumeReclaimPolicy":"Retain"}}')
    volumes.delete_claim(p)
    admin.wait_phase("pv", p.volume, "Released")
    assert "Reclaim policy is Retain" in volumes.event(p, "VolumeRetained")
    wait_for(
        "our finalizer to be removed",
        lambda: (
            FINALIZER not in (admin.get("pv", p.volume) or {})["metadata"].get("finalizers", [])
        ),
    )
    assert (p.directory / "SUCCESS").exists()
    admin.run("delete", "pv", p.volume)
    admin.wait_gone("pv", p.volume)


def test_archive_name_collision_gets_a_suffix(volumes: Volumes) -> None:
    namespace, export = volumes.namespace, volumes.export
    class_name = volumes.storage_class(
        {"pathPattern": "${.PVC.namespace}-${.PVC.name}"}, prefix="gen"
    )
    for generation in (1, 2):
        p = volumes.provision(class_name, name="gen")
        (p.directory / "generation").write_text(str(generation))
        volumes.release(p)
        volumes.admin.wait_gone("pvc", "gen", namespace)
    first = export / f"archived-{namespace}-gen"
    second = export / f"archived-{namespace}-gen-2"
    assert (first / "generation").read_text() == "1"
    assert (second / "generation").read_text() == "2"
    assert not (export / f"{namespace}-gen").exists()


@pytest.mark.parametrize("policy", ["delete", "archive"])
def test_nested_path_pattern_is_released_in_place_and_parents_stay(
    volumes: Volumes, policy: str
) -> None:
    namespace, export = volumes.namespace, volumes.export
    class_name = volumes.storage_class(
        {"pathPattern": "${.PVC.namespace}/${.PVC.name}", "onDelete": policy}, prefix="nested"
    )
    p = volumes.provision(class_name)
    assert p.directory == export / namespace / "data"
    volumes.release(p)
    assert not p.directory.exists()
    expected = ["archived-data"] if policy == "archive" else []
    assert sorted(x.name for x in (export / namespace).iterdir()) == expected


@pytest.mark.parametrize("recorded", ["../..", ".", "/etc"])
def test_edited_pv_annotation_is_refused_and_nothing_moves(volumes: Volumes, recorded: str) -> None:
    admin, export = volumes.admin, volumes.export
    p = volumes.provision(volumes.storage_class({"onDelete": "delete"}, prefix="tamper"))
    admin.run(
        "annotate", "pv", p.volume, "--overwrite", f"nfs.provisioner.dev/directory={recorded}"
    )
    before = snapshot(export)
    volumes.delete_claim(p)
    message = volumes.event(p, "VolumeFailedDelete")
    assert f'recorded directory "{recorded}" is unsafe' in message
    assert p.volume in message
    assert snapshot(export) == before
    assert admin.get("pv", p.volume) is not None
    # Repairing the record lets the retry (with backoff) finish the release.
    admin.run(
        "annotate",
        "pv",
        p.volume,
        "--overwrite",
        f"nfs.provisioner.dev/directory={p.directory.name}",
    )
    admin.wait_gone("pv", p.volume)
    assert not p.directory.exists()


def test_deleted_storage_class_still_gets_the_recorded_policy(volumes: Volumes) -> None:
    class_name = volumes.storage_class({"onDelete": "delete"}, prefix="gone")
    p = volumes.provision(class_name)
    volumes.admin.run("delete", "storageclass", class_name)
    volumes.release(p)
    assert not p.directory.exists()
    assert not any(entries(volumes.export))


def test_missing_directory_is_success_with_a_warning(volumes: Volumes) -> None:
    p = volumes.provision(volumes.storage_class({"onDelete": "archive"}, prefix="vanished"))
    (p.directory / "SUCCESS").unlink()
    p.directory.rmdir()
    volumes.release(p)
    assert "already missing" in volumes.event(p, "VolumeArchived")
    assert not any(entries(volumes.export))
    assert "was already missing" in volumes.process.logs()


@pytest.mark.parametrize(
    ("effect", "expected"),
    [
        pytest.param("error", "root_squash", id="failing"),
        pytest.param("hang", "the NFS mount may be hung", id="hanging"),
    ],
)
def test_failing_remove_reports_and_other_volumes_complete(
    admin: Kube,
    provisioner: StartProvisioner,
    namespace: str,
    storage_classes: StorageClasses,
    tmp_path: Path,
    effect: str,
    expected: str,
) -> None:
    faults = tmp_path / "faults.json"
    write_fault_rules(
        faults,
        [FaultRule(op="unlink", match="-blocked-", effect=effect, errno="EACCES")],  # type: ignore[arg-type]
    )
    process = provisioner(NFS_PROVISIONER_UNSAFE_FAULTS_FILE=str(faults), FS_TIMEOUT="1")
    volumes = Volumes(admin, namespace, process, tmp_path / "export", storage_classes)
    class_name = volumes.storage_class({"onDelete": "delete"}, prefix="faulty")
    blocked = volumes.provision(class_name, name="blocked")
    fine = volumes.provision(class_name, name="fine")
    volumes.delete_claim(blocked)
    volumes.delete_claim(fine)
    assert expected in volumes.event(blocked, "VolumeFailedDelete")
    admin.wait_gone("pv", fine.volume)
    assert not fine.directory.exists()
    assert (blocked.directory / "SUCCESS").exists()
    assert admin.get("pv", blocked.volume) is not None
    write_fault_rules(faults, [])  # the export recovers; the retry finishes the job
    admin.wait_gone("pv", blocked.volume, timeout=120)
    assert not blocked.directory.exists()


def test_statefulset_style_claims_are_created_and_released(volumes: Volumes) -> None:
    namespace = volumes.namespace
    class_name = volumes.storage_class({"archiveOnDelete": "false"}, prefix="sts")
    claims = [
        volumes.provision(class_name, name=f"data-web-{i}", labels={"app": "web"}) for i in range(2)
    ]
    assert sorted(c.directory.name for c in claims) == sorted(
        f"{namespace}-data-web-{i}-{c.volume}" for i, c in enumerate(claims)
    )
    volumes.admin.run("delete", "pvc", "-l", "app=web", "-n", namespace, "--wait=false")
    for c in claims:
        volumes.admin.wait_gone("pv", c.volume)
    assert not any(entries(volumes.export))


def test_crash_mid_batch_of_releases_converges(
    volumes: Volumes, provisioner: StartProvisioner
) -> None:
    admin, namespace, export = volumes.admin, volumes.namespace, volumes.export
    process = volumes.process
    delete_class = volumes.storage_class({"onDelete": "delete"}, prefix="crash-del")
    archive_class = volumes.storage_class({"onDelete": "archive"}, prefix="crash-arc")
    names = [f"r{i:02d}" for i in range(20)]
    admin.apply(
        "\n---\n".join(
            claim(n, namespace, delete_class if i % 2 else archive_class)
            for i, n in enumerate(names)
        )
    )

    def all_bound() -> list[dict[str, Any]] | None:
        items = admin.items("pvc", namespace)
        bound = [c for c in items if c.get("status", {}).get("phase") == "Bound"]
        return bound if len(bound) == len(names) else None

    bound = wait_for("claims Bound", all_bound, timeout=120)
    process.stop()
    # Slow the next run down so that the kill lands in the middle of the releases.
    slow = provisioner(
        name=process.name, export=export, WORKERS="1", KUBE_API_QPS="4", KUBE_API_BURST="4"
    )
    admin.run("delete", "pvc", "--all", "-n", namespace, "--wait=false")
    wait_for(
        "the first release",
        lambda: (
            any(p.name.startswith("archived-") for p in entries(export))
            or len(list(entries(export))) < len(names)
        ),
        timeout=60,
        interval=0.02,
    )
    slow.kill()
    remaining = [
        pv
        for pv in admin.items("pv")
        if pv["spec"].get("storageClassName") in (delete_class, archive_class)
    ]
    assert remaining, "the kill came after every release; nothing was tested"
    provisioner(name=process.name, export=export)
    for c in bound:
        admin.wait_gone("pv", c["spec"]["volumeName"], timeout=120)
    expected = sorted(
        f"archived-{namespace}-{c['metadata']['name']}-{c['spec']['volumeName']}"
        for c in bound
        if c["spec"]["storageClassName"] == archive_class
    )
    assert sorted(p.name for p in entries(export)) == expected
