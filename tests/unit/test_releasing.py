"""The one decision about a PersistentVolume (releasing.plan_release), as a table of named cases.

Each row is a PV as the reconciler sees it (ours, the old provisioner's, adopted), its class as
it is now and the PVs that overlap its directory, and the step the reconciler is told to take.
The rules are chosen once per PV (``rules_for``): ours follow the recorded policy, adopted ones
the old provisioner's. The finer tables stay with their rule: ``test_core`` (when a PV is
cleaned) and ``test_adoption`` (the old provisioner's rules).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Set
from typing import Any

import pytest

from provisioner import core, releasing
from provisioner.paths import RelativeDir
from provisioner.releasing import Step, VolumeFacts

NAME = "fuseim.pri/ifs"
EXPORT = core.Export("nfs.example.test", "/exports")
OLD = core.volume_from(
    {
        "metadata": {
            "name": "pvc-0a1b",
            "uid": "pv-uid",
            "annotations": {core.ANN_PROVISIONED_BY: NAME},
        },
        "spec": {
            "persistentVolumeReclaimPolicy": "Delete",
            "nfs": {"server": "nfs.example.test", "path": "/exports/default-data-pvc-0a1b"},
            "claimRef": {"namespace": "default", "name": "data", "uid": "0a1b"},
            "storageClassName": "nfs-client",
        },
        "status": {"phase": "Released"},
    }
)
OURS = dataclasses.replace(
    OLD, directory="default-data-pvc-0a1b", export_path="/exports", on_delete="delete"
)
ADOPTED = dataclasses.replace(OURS, on_delete=None, adopted="2026-12-07T00:00:00Z")
CLASS = core.StorageClass(name="nfs-client", provisioner=NAME, parameters={})


def overlaps(*names: str) -> Any:
    def overlapping(_directory: str) -> Set[str]:
        return frozenset(names)

    return overlapping


def facts(volume: core.Volume, **changes: Any) -> VolumeFacts:
    base = VolumeFacts(volume=volume, provisioner_name=NAME, export=EXPORT, storage_class=CLASS)
    return dataclasses.replace(base, **changes)


@pytest.mark.parametrize(
    ("volume", "changes", "step", "reason_has"),
    [
        pytest.param(
            dataclasses.replace(OURS, provisioned_by="example.com/other"),
            {},
            Step.IGNORE,
            "not provisioned by us",
            id="another-provisioners",
        ),
        pytest.param(OLD, {}, Step.ADOPT, "previous provisioner", id="old-pv-adopted-first"),
        pytest.param(
            dataclasses.replace(OLD, nfs_server="other.example.test"),
            {},
            Step.REFUSE_ADOPTION,
            "is not this provisioner's NFS_SERVER",
            id="old-pv-elsewhere-refused",
        ),
        pytest.param(
            dataclasses.replace(OLD, not_adopted="why"),
            {},
            Step.IGNORE,
            "not adopted: why",
            id="refused-once-left-alone",
        ),
        pytest.param(
            dataclasses.replace(OURS, phase="Bound"), {}, Step.IGNORE, "phase Bound", id="bound"
        ),
        pytest.param(
            dataclasses.replace(OURS, reclaim_policy="Retain", finalizers=(core.FINALIZER,)),
            {},
            Step.DROP_FINALIZER,
            "Reclaim policy is Retain",
            id="retain-drops-the-finalizer",
        ),
        pytest.param(OURS, {}, Step.DELETE, "released", id="ours-delete"),
        pytest.param(
            dataclasses.replace(OURS, on_delete="archive"), {}, Step.ARCHIVE, "", id="ours-archive"
        ),
        pytest.param(
            dataclasses.replace(OURS, on_delete="retain"), {}, Step.RETAIN, "", id="ours-retain"
        ),
        pytest.param(
            dataclasses.replace(OURS, on_delete="shred"),
            {},
            Step.REFUSE,
            'records on-delete policy "shred"',
            id="ours-unknown-policy-refused",
        ),
        pytest.param(
            dataclasses.replace(OURS, directory=None),
            {},
            Step.REFUSE,
            "does not record its directory",
            id="ours-without-directory-refused",
        ),
        pytest.param(
            dataclasses.replace(OURS, directory="../etc"),
            {},
            Step.REFUSE,
            "nothing was removed or renamed",
            id="ours-edited-directory-refused",
        ),
        pytest.param(
            OURS,
            {"overlapping": overlaps("pvc-inner")},
            Step.DELETE,
            "",
            id="ours-never-overlap-so-not-asked",
        ),
        pytest.param(
            ADOPTED,
            {},
            Step.RECORD_POLICY,
            'StorageClass "nfs-client": archiveOnDelete not set, so archive',
            id="adopted-policy-recorded-first",
        ),
        pytest.param(
            dataclasses.replace(ADOPTED, directory=None),
            {},
            Step.REFUSE,
            "does not record its directory",
            id="adopted-directory-checked-before-the-policy",
        ),
        pytest.param(
            dataclasses.replace(ADOPTED, on_delete="delete"),
            {"overlapping": overlaps("pvc-0a1b", "pvc-inner")},
            Step.REFUSE,
            "PersistentVolume pvc-inner",
            id="adopted-nested-waits",
        ),
        pytest.param(
            dataclasses.replace(ADOPTED, on_delete="retain"),
            {"overlapping": overlaps("pvc-inner")},
            Step.RETAIN,
            "",
            id="adopted-retain-needs-no-overlap-check",
        ),
    ],
)
def test_plan_release(
    volume: core.Volume, changes: dict[str, Any], step: Step, reason_has: str
) -> None:
    plan = releasing.plan_release(facts(volume, **changes))
    assert plan.step is step, plan.reason
    assert reason_has in plan.reason


def test_the_rules_are_chosen_once_by_whether_the_pv_was_adopted() -> None:
    assert releasing.rules_for(OURS) is releasing.OWN
    assert releasing.rules_for(ADOPTED) is releasing.LEGACY
    assert releasing.rules_for(dataclasses.replace(ADOPTED, on_delete="delete")) is releasing.LEGACY


def test_the_legacy_policy_follows_the_class_as_it_is_at_release() -> None:
    deleting = dataclasses.replace(CLASS, parameters={"archiveOnDelete": "false"})
    plan = releasing.plan_release(facts(ADOPTED, storage_class=deleting))
    assert plan.policy is not None and plan.policy.on_delete.value == "delete"
    gone = releasing.plan_release(facts(ADOPTED, storage_class=None))
    assert gone.policy is not None and gone.policy.on_delete.value == "retain"
    assert gone.policy.caution


@pytest.mark.parametrize(
    ("volume", "outcome", "expected"),
    [
        pytest.param(
            dataclasses.replace(OURS, on_delete="retain"),
            None,
            ("VolumeRetained", 'Directory "default-data-pvc-0a1b" kept (onDelete: retain)'),
            id="retained",
        ),
        pytest.param(
            OURS,
            True,
            ("VolumeDeleted", 'Directory "default-data-pvc-0a1b" deleted'),
            id="deleted",
        ),
        pytest.param(
            OURS,
            False,
            (
                "VolumeDeleted",
                'Directory "default-data-pvc-0a1b" was already missing; nothing to delete',
            ),
            id="delete-missing",
        ),
        pytest.param(
            dataclasses.replace(OURS, on_delete="archive"),
            RelativeDir(("archived-default-data-pvc-0a1b",)),
            (
                "VolumeArchived",
                'Directory "default-data-pvc-0a1b" archived as "archived-default-data-pvc-0a1b"',
            ),
            id="archived",
        ),
        pytest.param(
            dataclasses.replace(OURS, on_delete="archive"),
            None,
            (
                "VolumeArchived",
                'Directory "default-data-pvc-0a1b" was already missing; nothing to archive',
            ),
            id="archive-missing",
        ),
    ],
)
def test_outcomes_are_worded_for_the_event(
    volume: core.Volume, outcome: Any, expected: tuple[str, str]
) -> None:
    plan = releasing.plan_release(facts(volume))
    if plan.step is Step.RETAIN:
        result = releasing.retained(plan)
    elif plan.step is Step.DELETE:
        result = releasing.deleted(plan, outcome)
    else:
        result = releasing.archived(plan, outcome)
    assert (result.reason, result.message, result.event_type) == (*expected, "Normal")


def test_an_adopted_release_says_which_rule_applied_and_warns_when_it_should() -> None:
    basis = 'Warning: StorageClass "nfs-client" no longer exists; kept'
    volume = dataclasses.replace(ADOPTED, on_delete="retain", on_delete_basis=basis)
    plan = releasing.plan_release(facts(volume))
    result = releasing.retained(plan)
    assert result.event_type == "Warning"
    assert result.message.endswith(
        '. Adopted volume: StorageClass "nfs-client" no longer exists; kept'
    )
