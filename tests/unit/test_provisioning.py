"""The one decision about a claim (provisioning.plan_claim), as a table of named cases.

Each row is everything known about a claim (class, parameters, the directory they render, the
PVs that overlap it, what the export holds there) and what the reconciler is told to do. The
finer tables of each step stay with their rule: ``test_core`` (is it ours, now?),
``test_config`` (parameters), ``test_paths`` (rendering) and ``test_ownership`` (tenants).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Set
from typing import Any

import pytest

from provisioner import core, provisioning
from provisioner.journal import Owner
from provisioner.ownership import Inspection
from provisioner.provisioning import ClaimFacts, Verdict

NAME = "fuseim.pri/ifs"
CLUSTER = "cluster-1"
NOW = "2026-12-07T00:00:00Z"
CLASS = core.StorageClass(name="nfs", provisioner=NAME, parameters={})
CLAIM = core.claim_from(
    {
        "metadata": {
            "uid": "u1",
            "namespace": "team-a",
            "name": "data",
            "labels": {"app": "web"},
            "annotations": {},
        },
        "spec": {"storageClassName": "nfs", "accessModes": ["ReadWriteMany"]},
    }
)
DEFAULT_DIR = "team-a-data-pvc-u1"
OWN = Owner(cluster=CLUSTER, namespace="team-a", provisioner=NAME, volume="pvc-u1", since=NOW)
OTHER = Owner(cluster=CLUSTER, namespace="team-b", provisioner=NAME, volume="pvc-b")


def with_class(**parameters: str) -> core.StorageClass:
    return dataclasses.replace(CLASS, parameters=parameters)


def overlaps(*names: str) -> Any:
    def overlapping(_directory: str) -> Set[str]:
        return frozenset(names)

    return overlapping


def facts(**changes: Any) -> ClaimFacts:
    base = ClaimFacts(
        claim=CLAIM,
        storage_class=CLASS,
        provisioner_name=NAME,
        cluster=CLUSTER,
        provisioner_namespace="nfs-provisioner",
        now=NOW,
    )
    return dataclasses.replace(base, **changes)


NOTHING = Inspection(existing=0, depth=1)
LEFT_BY_US = Inspection(existing=1, depth=1, leaf_owner=OWN)
UNRECORDED = Inspection(existing=1, depth=1)
OTHERS = Inspection(existing=1, depth=1, leaf_owner=OTHER)
RELEASING = Inspection(existing=1, depth=1, operations=("archive of x by pvc-b",))


@pytest.mark.parametrize(
    ("changes", "verdict", "directory", "reason_has"),
    [
        pytest.param(
            {"claim": dataclasses.replace(CLAIM, volume_name="pv1")},
            Verdict.IGNORE,
            None,
            "already bound",
            id="bound-is-ignored",
        ),
        pytest.param(
            {"storage_class": None}, Verdict.WAIT, None, "does not exist", id="class-missing"
        ),
        pytest.param(
            {"claim": dataclasses.replace(CLAIM, has_selector=True)},
            Verdict.REFUSE,
            None,
            'claim "team-a/data" sets spec.selector',
            id="selector-refused",
        ),
        pytest.param(
            {"storage_class": with_class(onDelete="shred")},
            Verdict.REFUSE,
            None,
            'claim "team-a/data": ',
            id="bad-parameter-refused",
        ),
        pytest.param(
            {"storage_class": with_class(pathPattern="../${.PVC.name}")},
            Verdict.REFUSE,
            None,
            'claim "team-a/data": ',
            id="escaping-path-refused",
        ),
        pytest.param(
            {"overlapping": overlaps("pvc-b", "pvc-a")},
            Verdict.REFUSE,
            None,
            f'directory "{DEFAULT_DIR}" is already used by PersistentVolume pvc-a, pvc-b',
            id="overlap-refused-names-the-holders",
        ),
        pytest.param(
            {"overlapping": overlaps("pvc-u1")},
            Verdict.INSPECT,
            DEFAULT_DIR,
            "ours",
            id="its-own-pv-is-no-overlap",
        ),
        pytest.param({}, Verdict.INSPECT, DEFAULT_DIR, "ours", id="inspect-before-deciding"),
        pytest.param(
            {"storage_class": with_class(pathPattern="${.PVC.namespace}/${.PVC.labels.app}")},
            Verdict.INSPECT,
            "team-a/web",
            "ours",
            id="pattern-rendered",
        ),
        pytest.param(
            {"inspection": NOTHING}, Verdict.CREATE, DEFAULT_DIR, "does not exist", id="create"
        ),
        pytest.param(
            {"inspection": LEFT_BY_US},
            Verdict.REUSE,
            DEFAULT_DIR,
            "earlier attempt",
            id="reuse-own-leftover",
        ),
        pytest.param(
            {"inspection": UNRECORDED},
            Verdict.REUSE,
            DEFAULT_DIR,
            "confined to the claim's namespace",
            id="adopt-unrecorded-default-name",
        ),
        pytest.param(
            {"inspection": OTHERS},
            Verdict.REFUSE,
            None,
            f'claim "team-a/data": directory "{DEFAULT_DIR}" already exists and belongs to',
            id="another-namespace-refused",
        ),
        pytest.param(
            {"inspection": RELEASING},
            Verdict.REFUSE,
            None,
            "overlaps a release that has not finished",
            id="release-under-way-refused",
        ),
        pytest.param(
            {"inspection": NOTHING, "overlapping": overlaps("pvc-b")},
            Verdict.REFUSE,
            None,
            "is already used by PersistentVolume pvc-b",
            id="overlap-checked-again-with-the-inspection",
        ),
    ],
)
def test_plan_claim(
    changes: dict[str, Any], verdict: Verdict, directory: str | None, reason_has: str
) -> None:
    plan = provisioning.plan_claim(facts(**changes))
    assert plan.verdict is verdict, plan.reason
    assert reason_has in plan.reason
    if directory is not None:
        assert str(plan.directory) == directory


def test_create_and_reuse_carry_what_the_directory_and_the_pv_need() -> None:
    created = provisioning.plan_claim(
        facts(storage_class=with_class(onDelete="delete"), inspection=NOTHING)
    )
    assert created.tenant == OWN
    assert created.parameters is not None and created.parameters.on_delete.value == "delete"
    assert created.storage_class == with_class(onDelete="delete")
    assert not created.adopt
    adopted = provisioning.plan_claim(facts(inspection=UNRECORDED))
    assert adopted.adopt and adopted.tenant == OWN


def test_the_intent_names_claim_directory_and_us() -> None:
    plan = provisioning.plan_claim(facts(inspection=NOTHING))
    intent = provisioning.intent(CLAIM, plan)
    assert (intent.volume, intent.namespace, intent.claim, intent.claim_uid) == (
        "pvc-u1",
        "team-a",
        "data",
        "u1",
    )
    assert (intent.directory, intent.cluster, intent.provisioner, intent.since) == (
        DEFAULT_DIR,
        CLUSTER,
        NAME,
        NOW,
    )


def test_a_symlink_on_the_path_is_refused_naming_claim_and_directory() -> None:
    plan = provisioning.plan_claim(facts())
    assert plan.directory is not None
    message = provisioning.redirected(CLAIM, plan.directory, OSError("a symbolic link"))
    assert message == f'claim "team-a/data": directory "{DEFAULT_DIR}": a symbolic link'
