"""The cache: its collision index (a directory is never shared, nested in, or wrapped around) and
the merge of complete lists with watch events (newer wins, tombstones, pruning after gaps)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from provisioner.cache import Cache, Tombstones, at_or_before, newer, plan_merge
from provisioner.core import Claim, Export, StorageClass, Volume, dirs_overlap

EXPORT = Export("nas.example", "/exports")


def volume(
    name: str,
    directory: str | None = None,
    export: str = "/exports",
    *,
    server: str | None = None,
    nfs_path: str | None = None,
    version: str = "",
    uid: str = "",
) -> Volume:
    return Volume(
        name=name,
        provisioned_by="a.io/b",
        phase="Bound",
        reclaim_policy="Delete",
        deleting=False,
        finalizers=(),
        claim_uid=None,
        claim_namespace=None,
        claim_name=None,
        storage_class="nfs",
        directory=directory,
        export_path=export if directory is not None else None,
        on_delete="delete",
        resource_version=version,
        uid=uid,
        nfs_path=nfs_path,
        nfs_server=server,
    )


def claim(uid: str, version: str = "", class_name: str = "nfs") -> Claim:
    return Claim(uid=uid, namespace="ns", name=uid, class_name=class_name, resource_version=version)


@pytest.fixture
def cache() -> Cache:
    c = Cache(EXPORT)
    c.put_volume(volume("pv-a", "ns/app"))
    c.put_volume(volume("pv-b", "other", export="/elsewhere"))
    c.put_volume(volume("pv-hand", server="NAS.example", nfs_path="/exports/hand/made/"))
    c.put_volume(volume("pv-twin", server="twin.example", nfs_path="/exports/twin"))
    return c


@pytest.mark.parametrize(
    ("directory", "expected"),
    [
        pytest.param("ns/app", {"pv-a"}, id="same"),
        pytest.param("ns/app/sub", {"pv-a"}, id="inside"),
        pytest.param("ns", {"pv-a"}, id="around"),
        pytest.param("ns/application", set(), id="sibling-with-common-prefix"),
        pytest.param("ns/db", set(), id="sibling"),
        pytest.param("other", set(), id="other-export"),
        pytest.param("hand/made", {"pv-hand"}, id="spec-nfs-only"),
        pytest.param("hand", {"pv-hand"}, id="around-spec-nfs"),
        pytest.param("hand/made/x", {"pv-hand"}, id="inside-spec-nfs"),
        pytest.param("twin", set(), id="same-path-other-server"),
    ],
)
def test_volumes_overlapping(cache: Cache, directory: str, expected: set[str]) -> None:
    assert cache.volumes_overlapping(directory) == expected


def test_dropped_volume_frees_its_directory(cache: Cache) -> None:
    cache.drop_volume("pv-a")
    cache.drop_volume("pv-hand")
    assert cache.volumes_overlapping("ns/app") == set()
    assert cache.volumes_overlapping("hand/made") == set()


def test_replaced_volume_is_indexed_by_its_new_directory(cache: Cache) -> None:
    cache.put_volume(volume("pv-a", "ns/moved"))
    assert cache.volumes_overlapping("ns/app") == set()
    assert cache.volumes_overlapping("ns/moved") == {"pv-a"}


_DIRS = st.lists(st.sampled_from(["a", "b", "ab", "a.b"]), min_size=1, max_size=3).map("/".join)
_STEPS = st.lists(
    st.tuples(st.sampled_from(["put", "drop"]), st.sampled_from(["p1", "p2", "p3", "p4"]), _DIRS),
    max_size=25,
)


@given(steps=_STEPS, probe=_DIRS)
def test_volumes_overlapping_agrees_with_a_scan_of_every_pv(
    steps: list[tuple[str, str, str]], probe: str
) -> None:
    """The ancestor index answers what comparing the probe with every recorded directory does,
    whatever sequence of puts, moves and drops built it (names and nesting share prefixes)."""
    c = Cache(EXPORT)
    recorded: dict[str, str] = {}
    for action, name, directory in steps:
        if action == "put":
            c.put_volume(volume(name, directory))
            recorded[name] = directory
        else:
            c.drop_volume(name)
            recorded.pop(name, None)
    expected = {name for name, d in recorded.items() if dirs_overlap(d, probe)}
    assert c.volumes_overlapping(probe) == expected


# --- resourceVersions ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("candidate", "current", "expected"),
    [
        pytest.param("10", "9", True, id="integers-compared-as-integers"),
        pytest.param("9", "10", False, id="older"),
        pytest.param("9", "9", False, id="same"),
        pytest.param("abc", "9", False, id="unparseable-candidate-keeps-held"),
        pytest.param("10", "", False, id="unparseable-held-is-kept"),
    ],
)
def test_newer(candidate: str, current: str, expected: bool) -> None:
    assert newer(candidate, current) is expected


@pytest.mark.parametrize(
    ("version", "list_version", "expected"),
    [
        pytest.param("5", "9", True, id="before"),
        pytest.param("9", "9", True, id="at"),
        pytest.param("10", "9", False, id="after"),
        pytest.param("", "9", False, id="unknown-version"),
        pytest.param("5", "", False, id="unknown-list-version"),
    ],
)
def test_at_or_before(version: str, list_version: str, expected: bool) -> None:
    assert at_or_before(version, list_version) is expected


# --- the merge of a complete list --------------------------------------------------------------


@pytest.mark.parametrize(
    ("held", "listed", "tombstones", "put", "drop"),
    [
        pytest.param({}, {"a": "5"}, {}, ("a",), (), id="new-object-stored"),
        pytest.param({"a": "5"}, {"a": "7"}, {}, ("a",), (), id="newer-listed-replaces"),
        pytest.param({"a": "8"}, {"a": "7"}, {}, (), (), id="newer-event-kept"),
        pytest.param({"a": "7"}, {"a": "7"}, {}, (), (), id="same-version-untouched"),
        pytest.param({"a": "x"}, {"a": "7"}, {}, (), (), id="unparseable-held-preferred"),
        pytest.param({}, {"a": "7"}, {"a": "8"}, (), (), id="deleted-after-list-not-resurrected"),
        pytest.param({}, {"a": "7"}, {"a": "7"}, (), (), id="deleted-at-list-not-resurrected"),
        pytest.param({}, {"a": "9"}, {"a": "8"}, ("a",), (), id="re-created-after-deletion"),
        pytest.param({}, {"a": "9"}, {"a": "?"}, (), (), id="unparseable-tombstone-wins"),
        pytest.param({"a": "5"}, {}, {}, (), ("a",), id="gone-during-gap-dropped"),
        pytest.param({"a": "10"}, {}, {}, (), (), id="created-after-list-kept"),
        pytest.param({"a": "9"}, {}, {}, (), ("a",), id="held-at-list-version-dropped"),
        pytest.param({"a": ""}, {}, {}, (), (), id="unknown-version-kept"),
    ],
)
def test_plan_merge(
    held: dict[str, str],
    listed: dict[str, str],
    tombstones: dict[str, str],
    put: tuple[str, ...],
    drop: tuple[str, ...],
) -> None:
    plan = plan_merge(held, listed, "9", tombstones)
    assert plan.put == put
    assert plan.drop == drop


def test_plan_merge_with_unparseable_list_version_drops_nothing() -> None:
    assert plan_merge({"a": "5"}, {}, "", {}).drop == ()


def test_tombstones_are_bounded_and_expire_with_a_merged_list() -> None:
    tombstones = Tombstones(limit=2)
    tombstones.add("a", "5")
    tombstones.add("b", "6")
    tombstones.add("c", "12")
    assert dict(tombstones.view()) == {"b": "6", "c": "12"}  # the oldest went first
    tombstones.expire("10")
    assert dict(tombstones.view()) == {"c": "12"}


def test_merge_claims_prunes_gone_and_keeps_newer_events() -> None:
    c = Cache(EXPORT)
    c.put_claim(claim("gone", "5"))
    c.put_claim(claim("fresh", "12"))  # a watch event newer than the list
    c.put_claim(claim("stale", "3"))
    c.claim_deleted(claim("deleted", "11"))  # the watch saw it go after the list was taken
    merged = c.merge_claims(
        [claim("fresh", "8"), claim("stale", "7"), claim("deleted", "6"), claim("new", "4")], "10"
    )
    assert merged.dropped == ("gone",)
    assert (merged.listed, merged.stored) == (4, 2)  # stale (newer) and new
    assert c.claim("gone") is None
    assert c.claim("deleted") is None
    fresh, stale = c.claim("fresh"), c.claim("stale")
    assert fresh is not None and fresh.resource_version == "12"
    assert stale is not None and stale.resource_version == "7"
    assert c.claims_of_class("nfs") == ["fresh", "new", "stale"]


def test_merge_volumes_frees_the_directory_of_a_pv_gone_during_a_gap() -> None:
    c = Cache(EXPORT)
    c.put_volume(volume("pv-gone", "ns/app", version="5"))
    merged = c.merge_volumes([volume("pv-kept", "ns/db", version="6")], "9")
    assert merged.dropped == ("pv-gone",)
    assert c.volumes_overlapping("ns/app") == set()
    assert c.volumes_overlapping("ns/db") == {"pv-kept"}


def test_volume_deleted_keeps_a_newer_pv_of_the_same_name() -> None:
    c = Cache(EXPORT)
    c.put_volume(volume("pv", "ns/new", version="20", uid="new"))
    assert not c.volume_deleted(volume("pv", "ns/old", version="15", uid="old"))
    assert c.volumes_overlapping("ns/new") == {"pv"}
    assert c.volume_deleted(volume("pv", "ns/new", version="21", uid="new"))
    assert c.volume("pv") is None
    # The tombstone keeps an older list from resurrecting it; a re-created one comes back.
    c.merge_volumes([volume("pv", "ns/new", version="20", uid="new")], "20")
    assert c.volume("pv") is None
    c.merge_volumes([volume("pv", "ns/again", version="30", uid="again")], "30")
    assert c.volumes_overlapping("ns/again") == {"pv"}


def test_merge_classes_keeps_versions_and_tombstones() -> None:
    c = Cache(EXPORT)
    nfs = StorageClass(name="nfs", provisioner="a.io/b", parameters={})
    old = StorageClass(name="old", provisioner="a.io/b", parameters={})
    c.put_class(old, "3")
    c.class_deleted("gone", "8")
    merged = c.merge_classes(
        [(nfs, "4"), (StorageClass(name="gone", provisioner="x", parameters={}), "7")], "9"
    )
    assert merged.dropped == ("old",)
    assert c.storage_class("nfs") == nfs
    assert c.storage_class("gone") is None
    assert c.storage_class("old") is None
