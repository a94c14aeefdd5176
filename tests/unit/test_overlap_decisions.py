"""Unit tests for the overlap refusals of ownership.decide and for the journal's name in paths.

SPEC §4: nothing is decided on a path where a release is under way (``Inspection.operations``),
an existing directory whose records could not all be scanned is never reused
(``below_complete``), and no claim ever gets the provisioner's own directory, whatever the
letter case (a case-insensitive NAS share makes ``.NFS-Provisioner`` the same directory).
Pure functions: hand-built inspections, no filesystem.
"""

from __future__ import annotations

import pytest

from provisioner.journal import Owner
from provisioner.ownership import Inspection, Plan, decide
from provisioner.paths import (
    JOURNAL_DIR,
    ClaimFields,
    RelativeDir,
    UnsafePathError,
    claim_dir,
    is_journal_name,
    parse_relative,
)

CLUSTER = "cluster-uid-1"
TENANT = Owner(cluster=CLUSTER, namespace="team-a", provisioner="nfs", volume="pvc-1")
SAME_TENANT = Owner(cluster=CLUSTER, namespace="team-a", provisioner="nfs", volume="pvc-old")
OTHER_NAMESPACE = Owner(cluster=CLUSTER, namespace="team-b", provisioner="nfs", volume="pvc-2")
PROVISIONER_NAMESPACE = "nfs-provisioner"
RELEASE = 'the archive of "team-a/app" as "team-a/archived-app" for PersistentVolume pvc-9'
DELETE = 'the delete of "team-a" for PersistentVolume pvc-8'
HANDOVER = "nfs-provisioner handover"


def decide_for(inspection: Inspection, directory: str, default_name: bool = False) -> Plan:
    return decide(
        inspection, parse_relative(directory), TENANT, default_name, PROVISIONER_NAMESPACE
    ).plan


# --- releases under way --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "inspection",
    [
        pytest.param(Inspection(existing=0, depth=2, operations=(RELEASE,)), id="missing"),
        pytest.param(Inspection(existing=1, depth=2, operations=(RELEASE,)), id="parent-exists"),
        pytest.param(
            Inspection(existing=2, depth=2, leaf_owner=SAME_TENANT, operations=(RELEASE,)),
            id="own-leftover",
        ),
        pytest.param(
            Inspection(existing=2, depth=2, operations=(RELEASE,)), id="unrecorded-in-namespace"
        ),
        pytest.param(
            Inspection(
                existing=2,
                depth=2,
                leaf_owner=TENANT,
                owners_above=(("team-a", SAME_TENANT),),
                operations=(RELEASE,),
            ),
            id="made-for-this-very-claim",
        ),
    ],
)
def test_a_release_under_way_refuses_what_would_otherwise_be_allowed(
    inspection: Inspection,
) -> None:
    allowed = Inspection(
        inspection.existing,
        inspection.depth,
        inspection.leaf_owner,
        inspection.owners_above,
        inspection.owners_below,
    )
    assert decide_for(allowed, "team-a/app") in (Plan.CREATE, Plan.REUSE)
    decision = decide(
        inspection, parse_relative("team-a/app"), TENANT, False, PROVISIONER_NAMESPACE
    )
    assert decision.plan is Plan.REFUSE
    assert decision.adopt is False
    assert '"team-a/app"' in decision.reason
    assert RELEASE in decision.reason
    assert "has not finished" in decision.reason


def test_a_release_under_way_is_named_before_any_other_refusal() -> None:
    inspection = Inspection(
        existing=2,
        depth=2,
        leaf_owner=OTHER_NAMESPACE,
        owners_above=(("team-a", OTHER_NAMESPACE),),
        below_complete=False,
        scan_limit=10,
        operations=(DELETE, RELEASE),
    )
    decision = decide(inspection, parse_relative("team-a/app"), TENANT, True, PROVISIONER_NAMESPACE)
    assert decision.plan is Plan.REFUSE
    assert DELETE in decision.reason
    assert "team-b" not in decision.reason
    assert "recorded directories" not in decision.reason


# --- the scan of the records inside stopped at its limit ----------------------------------------


@pytest.mark.parametrize(
    ("leaf_owner", "default_name", "directory"),
    [
        pytest.param(SAME_TENANT, False, "team-a/app", id="own-leftover"),
        pytest.param(TENANT, False, "team-a/app", id="made-for-this-very-claim"),
        pytest.param(None, False, "team-a/app", id="unrecorded-in-namespace"),
        pytest.param(None, True, "team-a-data-pvc-1", id="unrecorded-default-name"),
    ],
)
def test_an_incomplete_scan_of_an_existing_directory_refuses_even_the_same_tenant(
    leaf_owner: Owner | None, default_name: bool, directory: str
) -> None:
    depth = len(parse_relative(directory).parts)
    complete = Inspection(existing=depth, depth=depth, leaf_owner=leaf_owner, scan_limit=500)
    assert decide_for(complete, directory, default_name) is Plan.REUSE
    incomplete = Inspection(
        existing=depth, depth=depth, leaf_owner=leaf_owner, below_complete=False, scan_limit=500
    )
    decision = decide(
        incomplete, parse_relative(directory), TENANT, default_name, PROVISIONER_NAMESPACE
    )
    assert decision.plan is Plan.REFUSE
    assert decision.adopt is False
    assert f'"{directory}"' in decision.reason
    assert "more than 500 recorded directories" in decision.reason
    assert HANDOVER in decision.reason


def test_an_incomplete_scan_refuses_even_when_the_records_found_are_all_ours() -> None:
    inspection = Inspection(
        existing=1,
        depth=1,
        leaf_owner=SAME_TENANT,
        owners_below=(("team-a/x", SAME_TENANT), ("team-a/y", SAME_TENANT)),
        below_complete=False,
        scan_limit=2,
    )
    decision = decide(inspection, parse_relative("team-a"), TENANT, False, PROVISIONER_NAMESPACE)
    assert decision.plan is Plan.REFUSE
    assert "more than 2 recorded directories" in decision.reason


def test_another_namespaces_leaf_is_named_before_the_incomplete_scan() -> None:
    inspection = Inspection(
        existing=2, depth=2, leaf_owner=OTHER_NAMESPACE, below_complete=False, scan_limit=7
    )
    decision = decide(
        inspection, parse_relative("team-a/app"), TENANT, False, PROVISIONER_NAMESPACE
    )
    assert decision.plan is Plan.REFUSE
    assert "team-b" in decision.reason
    assert "recorded directories" not in decision.reason


@pytest.mark.parametrize("existing", [0, 1])
def test_create_is_unaffected_by_the_scan_flag_when_the_directory_does_not_exist(
    existing: int,
) -> None:
    inspection = Inspection(
        existing=existing,
        depth=2,
        owners_above=(("team-a", SAME_TENANT),) if existing else (),
        below_complete=False,
        scan_limit=3,
    )
    decision = decide(
        inspection, parse_relative("team-a/app"), TENANT, False, PROVISIONER_NAMESPACE
    )
    assert decision.plan is Plan.CREATE
    assert decision.adopt is False


def test_create_is_still_refused_under_another_namespaces_parent_with_an_incomplete_scan() -> None:
    inspection = Inspection(
        existing=1,
        depth=2,
        owners_above=(("shared", OTHER_NAMESPACE),),
        below_complete=False,
        scan_limit=3,
    )
    decision = decide(
        inspection, parse_relative("shared/app"), TENANT, False, PROVISIONER_NAMESPACE
    )
    assert decision.plan is Plan.REFUSE
    assert '"shared"' in decision.reason
    assert "recorded directories" not in decision.reason


def test_a_complete_scan_is_the_default_of_an_inspection() -> None:
    inspection = Inspection(existing=2, depth=2, leaf_owner=SAME_TENANT)
    assert inspection.below_complete is True
    assert inspection.operations == ()
    assert decide_for(inspection, "team-a/app") is Plan.REUSE


# --- the provisioner's own directory, in any letter case -----------------------------------------


CASES_OF_THE_JOURNAL = [
    ".nfs-provisioner",
    ".NFS-Provisioner",
    ".Nfs-provisioner",
    ".NFS-PROVISIONER",
    ".nfs-PROVISIONER",
]


@pytest.mark.parametrize("name", CASES_OF_THE_JOURNAL)
@pytest.mark.parametrize("tail", ["", "/x", "/owners/dteam-a"])
def test_parse_relative_refuses_the_journal_in_any_letter_case(name: str, tail: str) -> None:
    value = name + tail
    with pytest.raises(UnsafePathError) as caught:
        parse_relative(value)
    assert caught.value.rendered == value
    assert JOURNAL_DIR in caught.value.rule
    assert "any letter case" in caught.value.rule


@pytest.mark.parametrize("name", CASES_OF_THE_JOURNAL)
def test_relative_dir_refuses_the_journal_in_any_letter_case(name: str) -> None:
    for parts in ((name,), (name, "x")):
        with pytest.raises(UnsafePathError) as caught:
            RelativeDir(parts)
        assert caught.value.rendered == "/".join(parts)
        assert JOURNAL_DIR in caught.value.rule


def test_a_pattern_that_renders_the_journal_names_the_pattern() -> None:
    claim = ClaimFields(namespace="team-a", name="data", labels={"dir": ".NFS-Provisioner"})
    pattern = "${.PVC.labels.dir}/x"
    with pytest.raises(UnsafePathError) as caught:
        claim_dir(pattern, claim, "pvc-1")
    assert caught.value.rendered == ".NFS-Provisioner/x"
    assert caught.value.pattern == pattern
    assert pattern in str(caught.value)


@pytest.mark.parametrize(
    "value",
    [
        "team-a/.nfs-provisioner",
        "team-a/.NFS-Provisioner/x",
        ".nfs-provisioner-old",
        ".nfs-provisioners",
        "nfs-provisioner",
        "x.nfs-provisioner",
        ".nfs-provisioner2/x",
    ],
)
def test_names_that_only_resemble_the_journal_or_lie_deeper_are_plain_paths(value: str) -> None:
    assert str(parse_relative(value)) == value
    assert str(RelativeDir(tuple(value.split("/")))) == value


def test_is_journal_name_is_about_one_whole_component() -> None:
    assert is_journal_name(".nfs-provisioner")
    assert is_journal_name(".nFs-PrOvIsIoNeR")
    assert not is_journal_name(".nfs-provisioner/x")
    assert not is_journal_name(" .nfs-provisioner")
    assert not is_journal_name("")


def test_a_name_that_upper_cases_to_the_journal_is_refused() -> None:
    spelled = ".nfs-prov\u0131s\u0131oner"
    assert spelled.upper() == JOURNAL_DIR.upper()
    with pytest.raises(UnsafePathError):
        parse_relative(spelled)
