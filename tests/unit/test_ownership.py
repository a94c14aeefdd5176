"""Unit tests for provisioner.ownership.decide: may a claim create, reuse or not have a directory.

A table of named cases over hand-built ``Inspection`` values (what storage found on the export);
the decision is pure, so no filesystem is involved. SPEC §4: reuse never crosses a tenant
boundary, and a refusal says how an admin can hand the directory over.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from provisioner.journal import UNREADABLE, Owner
from provisioner.ownership import Decision, Inspection, Plan, decide, handover_hint
from provisioner.paths import parse_relative

CLUSTER = "cluster-uid-1"
TENANT = Owner(cluster=CLUSTER, namespace="team-a", provisioner="nfs", volume="pvc-1")
SAME_TENANT = Owner(cluster=CLUSTER, namespace="team-a", provisioner="nfs", volume="pvc-old")
OTHER_NAMESPACE = Owner(cluster=CLUSTER, namespace="team-b", volume="pvc-2")
OTHER_CLUSTER = Owner(cluster="cluster-uid-2", namespace="team-a", volume="pvc-3")
PROVISIONER_NAMESPACE = "nfs-provisioner"


def exists(
    depth: int,
    leaf_owner: Owner | None = None,
    owners_above: tuple[tuple[str, Owner], ...] = (),
    owners_below: tuple[tuple[str, Owner], ...] = (),
) -> Inspection:
    """An inspection of a directory that exists, all ``depth`` levels of it."""
    return Inspection(depth, depth, leaf_owner, owners_above, owners_below)


@dataclass(frozen=True)
class Case:
    inspection: Inspection
    directory: str
    plan: Plan
    adopt: bool = False
    default_name: bool = False
    reason_has: tuple[str, ...] = ()


CASES = {
    "create-nothing-exists": Case(Inspection(existing=0, depth=2), "team-a/app", Plan.CREATE),
    "create-under-own-parent": Case(
        Inspection(existing=1, depth=2, owners_above=(("team-a", SAME_TENANT),)),
        "team-a/app",
        Plan.CREATE,
    ),
    "create-under-unrecorded-parent": Case(
        Inspection(existing=1, depth=2), "shared/app", Plan.CREATE
    ),
    "refuse-parent-owned-by-another-namespace": Case(
        Inspection(existing=1, depth=2, owners_above=(("shared", OTHER_NAMESPACE),)),
        "shared/app",
        Plan.REFUSE,
        reason_has=(
            f'would be inside "shared", which belongs to namespace "team-b" (cluster {CLUSTER})',
            "Change the pathPattern inputs",
        ),
    ),
    "refuse-existing-inside-parent-of-another-namespace": Case(
        exists(2, leaf_owner=SAME_TENANT, owners_above=(("shared", OTHER_NAMESPACE),)),
        "shared/app",
        Plan.REFUSE,
        reason_has=('inside "shared"',),
    ),
    "refuse-grandparent-of-another-cluster": Case(
        Inspection(
            existing=2,
            depth=3,
            owners_above=(("team-a", OTHER_CLUSTER), ("team-a/x", SAME_TENANT)),
        ),
        "team-a/x/app",
        Plan.REFUSE,
        reason_has=('inside "team-a"', "cluster cluster-uid-2"),
    ),
    "reuse-leftover-with-own-record": Case(
        exists(1, leaf_owner=SAME_TENANT),
        "anything",
        Plan.REUSE,
        reason_has=('left by a claim of namespace "team-a"',),
    ),
    "reuse-made-for-this-claim-before-a-crash": Case(
        exists(1, leaf_owner=TENANT),
        "team-a-app-pvc-1",
        Plan.REUSE,
        default_name=True,
        reason_has=("made for this very claim by an earlier attempt",),
    ),
    "reuse-own-record-with-own-records-inside": Case(
        exists(1, leaf_owner=SAME_TENANT, owners_below=(("data/inner", SAME_TENANT),)),
        "data",
        Plan.REUSE,
    ),
    "refuse-leftover-with-foreign-record": Case(
        exists(1, leaf_owner=OTHER_NAMESPACE),
        "team-a",
        Plan.REFUSE,
        reason_has=(
            'directory "team-a" already exists and belongs to namespace "team-b"',
            "only reused by a claim of its own namespace",
        ),
    ),
    "refuse-foreign-cluster-same-namespace-name": Case(
        exists(2, leaf_owner=OTHER_CLUSTER),
        "team-a/app",
        Plan.REFUSE,
        reason_has=('belongs to namespace "team-a" (cluster cluster-uid-2)',),
    ),
    "refuse-foreign-record-even-for-the-default-name": Case(
        exists(1, leaf_owner=OTHER_NAMESPACE),
        "team-a-data-pvc-1",
        Plan.REFUSE,
        default_name=True,
    ),
    "refuse-unreadable-record": Case(
        exists(2, leaf_owner=UNREADABLE),
        "team-a/app",
        Plan.REFUSE,
        reason_has=("<unreadable owner record>",),
    ),
    "refuse-unreadable-record-above": Case(
        Inspection(existing=1, depth=2, owners_above=(("team-a", UNREADABLE),)),
        "team-a/app",
        Plan.REFUSE,
    ),
    "refuse-unreadable-record-inside": Case(
        exists(2, leaf_owner=SAME_TENANT, owners_below=(("team-a/app/x", UNREADABLE),)),
        "team-a/app",
        Plan.REFUSE,
    ),
    "reuse-unrecorded-confined-adopts": Case(
        exists(2), "team-a/app", Plan.REUSE, adopt=True, reason_has=("no owner record",)
    ),
    "reuse-unrecorded-namespace-dir-itself-adopts": Case(
        exists(1), "team-a", Plan.REUSE, adopt=True
    ),
    "reuse-unrecorded-default-name-adopts": Case(
        exists(1), "team-a-data-pvc-1", Plan.REUSE, adopt=True, default_name=True
    ),
    "refuse-unrecorded-not-confined": Case(
        exists(2),
        "shared/app",
        Plan.REFUSE,
        reason_has=(
            'directory "shared/app" already exists but has no owner record',
            'the first component is not "team-a"',
            "so it may hold another tenant's data",
        ),
    ),
    "refuse-unrecorded-prefix-is-not-confinement": Case(
        # "team-a-x" starts like the namespace but is not its component: team-a-x is another name.
        exists(1),
        "team-a-x",
        Plan.REFUSE,
    ),
    "refuse-unrecorded-namespace-deeper-is-not-confinement": Case(
        exists(2), "shared/team-a", Plan.REFUSE
    ),
    "refuse-own-record-holding-another-namespaces-dir": Case(
        exists(1, leaf_owner=SAME_TENANT, owners_below=(("team-a/x", OTHER_NAMESPACE),)),
        "team-a",
        Plan.REFUSE,
        reason_has=('holds "team-a/x", which belongs to namespace "team-b"',),
    ),
    "refuse-unrecorded-confined-holding-another-namespaces-dir": Case(
        exists(1, owners_below=(("team-a/x/y", OTHER_NAMESPACE),)),
        "team-a",
        Plan.REFUSE,
        reason_has=('holds "team-a/x/y"',),
    ),
    "refuse-default-name-holding-another-clusters-dir": Case(
        exists(1, owners_below=(("team-a-data-pvc-1/<long name>", OTHER_CLUSTER),)),
        "team-a-data-pvc-1",
        Plan.REFUSE,
        default_name=True,
    ),
}


@pytest.mark.parametrize("case", [pytest.param(case, id=name) for name, case in CASES.items()])
def test_decide(case: Case) -> None:
    decision = decide(
        case.inspection,
        parse_relative(case.directory),
        TENANT,
        default_name=case.default_name,
        provisioner_namespace=PROVISIONER_NAMESPACE,
    )
    assert (decision.plan, decision.adopt) == (case.plan, case.adopt), decision.reason
    for text in case.reason_has:
        assert text in decision.reason


@pytest.mark.parametrize("name", [name for name, case in CASES.items() if case.plan is Plan.REFUSE])
def test_every_refusal_says_how_to_hand_the_directory_over(name: str) -> None:
    case = CASES[name]
    decision = decide(
        case.inspection,
        parse_relative(case.directory),
        TENANT,
        default_name=case.default_name,
        provisioner_namespace=PROVISIONER_NAMESPACE,
    )
    assert decision.reason.endswith(handover_hint(case.directory, "team-a", PROVISIONER_NAMESPACE))


def test_handover_hint_is_a_command_an_admin_can_paste() -> None:
    assert handover_hint('odd "dir"/x', "team-a", "ops") == (
        "If the data really is meant for this namespace, a cluster admin can hand the directory "
        "over: kubectl -n ops exec deploy/nfs-provisioner -- nfs-provisioner handover "
        '--directory "odd \\"dir\\"/x" --namespace "team-a"'
    )


def test_creation_and_reuse_never_carry_the_hint() -> None:
    for inspection, expected in (
        (
            Inspection(existing=0, depth=1),
            Decision(Plan.CREATE, "the directory does not exist yet"),
        ),
        (
            exists(1, leaf_owner=SAME_TENANT),
            Decision(Plan.REUSE, 'left by a claim of namespace "team-a"'),
        ),
    ):
        assert (
            decide(inspection, parse_relative("team-a"), TENANT, False, PROVISIONER_NAMESPACE)
            == expected
        )


@pytest.mark.parametrize(
    ("inspection", "exists_"),
    [
        pytest.param(Inspection(existing=0, depth=1), False, id="nothing"),
        pytest.param(Inspection(existing=2, depth=3), False, id="parents-only"),
        pytest.param(Inspection(existing=3, depth=3), True, id="all-levels"),
    ],
)
def test_inspection_exists_only_when_every_level_does(
    inspection: Inspection, exists_: bool
) -> None:
    assert inspection.exists is exists_


@pytest.mark.parametrize(
    ("first", "second", "same"),
    [
        pytest.param(TENANT, SAME_TENANT, True, id="same-cluster-and-namespace"),
        pytest.param(TENANT, OTHER_NAMESPACE, False, id="other-namespace"),
        pytest.param(TENANT, OTHER_CLUSTER, False, id="other-cluster"),
        pytest.param(TENANT, UNREADABLE, False, id="unreadable-matches-no-tenant"),
    ],
)
def test_same_tenant_compares_cluster_and_namespace_only(
    first: Owner, second: Owner, same: bool
) -> None:
    assert first.same_tenant(second) is same
    assert second.same_tenant(first) is same
