"""Unit tests for provisioner.journal: intents and owner records under ``.nfs-provisioner/``.

Every test runs on a real export in tmp_path through a ``safefs.Tree`` with the real
``LocalSyscalls``, and checks the files on disk as an admin would find them. The naming of the
mirror tree has its own property tests in test_properties.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from provisioner import journal
from provisioner.journal import (
    RECORD,
    UNREADABLE,
    Intent,
    Owner,
    component_of,
    mirror_name,
    mirror_of,
)
from provisioner.paths import JOURNAL_DIR
from provisioner.safefs import LocalSyscalls, Tree

OWNER = Owner(cluster="c1", namespace="team-a", provisioner="nfs", volume="pvc-1", since="t0")
OTHER = Owner(cluster="c1", namespace="team-b", provisioner="nfs", volume="pvc-2", since="t1")
INTENT = Intent(
    volume="pvc-1",
    namespace="team-a",
    claim="data",
    claim_uid="uid-1",
    directory="team-a/data",
    cluster="c1",
    provisioner="nfs",
    since="t0",
)
LONG = "x" * 255


@pytest.fixture
def export(tmp_path: Path) -> Path:
    root = tmp_path / "export"
    root.mkdir()
    return root


@pytest.fixture
def tree(export: Path) -> Iterator[Tree]:
    with Tree(export, LocalSyscalls()) as opened:
        yield opened


def files_under(root: Path) -> list[str]:
    return sorted(str(path.relative_to(root)) for path in root.rglob("*") if path.is_file())


@pytest.mark.parametrize(
    ("component", "mirror"),
    [
        pytest.param("team-a", "dteam-a", id="plain"),
        pytest.param("owner.json", "downer.json", id="the-record-name-itself"),
        pytest.param("tmp-0123", "dtmp-0123", id="a-temporary-files-name"),
        pytest.param("d", "dd", id="starts-with-d"),
        pytest.param("x" * 254, "d" + "x" * 254, id="254-bytes-still-fits"),
        pytest.param("é" * 127, "d" + "é" * 127, id="multibyte-254-bytes-fits"),
    ],
)
def test_mirror_name_prefixes_short_components(component: str, mirror: str) -> None:
    assert mirror_name(component) == mirror
    assert component_of(mirror) == component


@pytest.mark.parametrize(
    "component",
    [
        pytest.param("x" * 255, id="255-bytes"),
        pytest.param("é" * 128, id="multibyte-256-bytes"),
    ],
)
def test_mirror_name_hashes_components_that_would_not_fit(component: str) -> None:
    mirror = mirror_name(component)
    assert mirror.startswith("h")
    assert len(mirror) == 65
    assert component_of(mirror) is None


def test_mirror_of_lives_under_owners() -> None:
    assert mirror_of(("team-a", "data")) == (JOURNAL_DIR, "owners", "dteam-a", "ddata")
    assert mirror_of(()) == (JOURNAL_DIR, "owners")


def test_owner_record_round_trip_on_disk(tree: Tree, export: Path) -> None:
    journal.write_owner(tree, ("team-a", "data"), OWNER)
    record = export / JOURNAL_DIR / "owners" / "dteam-a" / "ddata" / RECORD
    assert json.loads(record.read_text()) == {
        "version": 1,
        "cluster": "c1",
        "namespace": "team-a",
        "provisioner": "nfs",
        "volume": "pvc-1",
        "since": "t0",
    }
    assert journal.read_owner(tree, ("team-a", "data")) == OWNER
    assert journal.read_owner(tree, ("team-a",)) is None, "no record for the parent was written"
    assert journal.read_owner(tree, ("elsewhere",)) is None
    assert files_under(export) == [f"{JOURNAL_DIR}/owners/dteam-a/ddata/{RECORD}"]


def test_write_owner_replaces_and_leaves_no_temporary_file(tree: Tree, export: Path) -> None:
    journal.write_owner(tree, ("team-a",), OWNER)
    journal.write_owner(tree, ("team-a",), OTHER)
    assert journal.read_owner(tree, ("team-a",)) == OTHER
    assert files_under(export) == [f"{JOURNAL_DIR}/owners/dteam-a/{RECORD}"]


def test_a_long_component_gets_a_hashed_mirror(tree: Tree) -> None:
    journal.write_owner(tree, ("team-a", LONG), OWNER)
    assert journal.read_owner(tree, ("team-a", LONG)) == OWNER
    assert journal.owners_below(tree, ("team-a",)) == [("team-a/<long name>", OWNER)]


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"{", id="not-json"),
        pytest.param(b"\xff\xfe", id="not-utf8"),
        pytest.param(b"[]", id="a-list"),
        pytest.param(b'"team-a"', id="a-string"),
        pytest.param(b"null", id="null"),
        pytest.param(b'{"cluster": "c1"}', id="no-namespace"),
        pytest.param(b'{"namespace": "team-a"}', id="no-cluster"),
        pytest.param(b"", id="empty"),
    ],
)
def test_an_unparsable_owner_record_is_unreadable(tree: Tree, export: Path, content: bytes) -> None:
    journal.write_owner(tree, ("team-a",), OWNER)
    (export / JOURNAL_DIR / "owners" / "dteam-a" / RECORD).write_bytes(content)
    owner = journal.read_owner(tree, ("team-a",))
    assert owner == UNREADABLE
    assert not owner.same_tenant(OWNER)


def test_owners_above_is_outermost_first_and_skips_levels_without_records(tree: Tree) -> None:
    journal.write_owner(tree, ("a",), OWNER)
    journal.write_owner(tree, ("a", "b", "c"), OTHER)
    journal.write_owner(tree, ("a", "b", "c", "d"), OWNER)  # the directory itself: not above
    assert journal.owners_above(tree, ("a", "b", "c", "d")) == [("a", OWNER), ("a/b/c", OTHER)]
    assert journal.owners_above(tree, ("a",)) == []
    assert journal.owners_above(tree, ("z", "y")) == []


def test_owners_below_finds_every_record_strictly_inside(tree: Tree) -> None:
    journal.write_owner(tree, ("a",), OWNER)  # the directory itself: not below
    journal.write_owner(tree, ("a", "b"), OWNER)
    journal.write_owner(tree, ("a", "b", "c", "d"), OTHER)
    journal.write_owner(tree, ("a", "x"), OTHER)
    journal.write_owner(tree, ("ab",), OTHER)  # a sibling sharing a prefix: not inside
    assert sorted(journal.owners_below(tree, ("a",))) == [
        ("a/b", OWNER),
        ("a/b/c/d", OTHER),
        ("a/x", OTHER),
    ]
    assert journal.owners_below(tree, ("missing",)) == []


def test_owners_below_returns_at_most_limit_records(tree: Tree) -> None:
    # Two records side by side in one mirror directory: the limit must still hold.
    journal.write_owner(tree, ("a", "b"), OWNER)
    journal.write_owner(tree, ("a", "c"), OTHER)
    assert len(journal.owners_below(tree, ("a",), limit=2)) == 2
    assert len(journal.owners_below(tree, ("a",), limit=1)) == 1


def test_remove_owners_forgets_the_directory_and_everything_below(tree: Tree, export: Path) -> None:
    journal.write_owner(tree, ("a",), OWNER)
    journal.write_owner(tree, ("a", "b"), OWNER)
    journal.write_owner(tree, ("a", "b", "c"), OTHER)
    journal.write_owner(tree, ("a", "bb"), OTHER)
    journal.remove_owners(tree, ("a", "b"))
    assert files_under(export) == [
        f"{JOURNAL_DIR}/owners/da/dbb/{RECORD}",
        f"{JOURNAL_DIR}/owners/da/{RECORD}",
    ]
    journal.remove_owners(tree, ("a", "b"))  # already gone: fine
    journal.remove_owners(tree, ("z", "y"))  # never recorded, parent mirror missing: fine


def test_move_owners_follows_a_rename_with_everything_below(tree: Tree) -> None:
    journal.write_owner(tree, ("ns", "app"), OWNER)
    journal.write_owner(tree, ("ns", "app", "inner"), OTHER)
    journal.move_owners(tree, ("ns", "app"), ("ns", "archived-app"))
    assert journal.read_owner(tree, ("ns", "app")) is None
    assert journal.read_owner(tree, ("ns", "archived-app")) == OWNER
    assert journal.read_owner(tree, ("ns", "archived-app", "inner")) == OTHER


def test_move_owners_replaces_a_stale_record_at_the_new_name(tree: Tree) -> None:
    journal.write_owner(tree, ("ns", "archived-app"), OTHER)
    journal.write_owner(tree, ("ns", "archived-app", "stale"), OTHER)
    journal.write_owner(tree, ("ns", "app"), OWNER)
    journal.move_owners(tree, ("ns", "app"), ("ns", "archived-app"))
    assert journal.read_owner(tree, ("ns", "archived-app")) == OWNER
    assert journal.read_owner(tree, ("ns", "archived-app", "stale")) is None


@pytest.mark.parametrize(
    "recorded",
    [
        pytest.param((), id="nothing-recorded-at-all"),
        pytest.param(("ns",), id="only-the-parent-recorded"),
    ],
)
def test_move_owners_without_a_record_moves_nothing(
    tree: Tree, export: Path, recorded: tuple[str, ...]
) -> None:
    if recorded:
        journal.write_owner(tree, recorded, OWNER)
    before = files_under(export)
    journal.move_owners(tree, ("ns", "app"), ("ns", "archived-app"))
    assert files_under(export) == before


def test_intents_round_trip_and_clear(tree: Tree, export: Path) -> None:
    assert journal.read_intents(tree) == ([], [])
    second = replace(INTENT, volume="pvc-2", directory="team-a/other")
    journal.write_intent(tree, INTENT)
    journal.write_intent(tree, second)
    assert files_under(export) == [
        f"{JOURNAL_DIR}/intents/pvc-1.json",
        f"{JOURNAL_DIR}/intents/pvc-2.json",
    ]
    intents, unreadable = journal.read_intents(tree)
    assert sorted(intents, key=lambda intent: intent.volume) == [INTENT, second]
    assert unreadable == []
    assert journal.clear_intent(tree, "pvc-1") is True
    assert journal.clear_intent(tree, "pvc-1") is False
    assert journal.read_intents(tree) == ([second], [])


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"{", id="not-json"),
        pytest.param(b"\xff", id="not-utf8"),
        pytest.param(b"[]", id="a-list"),
        pytest.param(b"7", id="a-number"),
        pytest.param(b'"volume"', id="a-string"),
        pytest.param(b'{"volume": "pvc-9"}', id="fields-missing"),
    ],
)
def test_unparsable_intents_are_named_not_raised(tree: Tree, export: Path, content: bytes) -> None:
    journal.write_intent(tree, INTENT)
    (export / JOURNAL_DIR / "intents" / "pvc-9.json").write_bytes(content)
    assert journal.read_intents(tree) == ([INTENT], ["pvc-9.json"])


def test_read_intents_ignores_other_files_and_directories(tree: Tree, export: Path) -> None:
    journal.write_intent(tree, INTENT)
    intents = export / JOURNAL_DIR / "intents"
    (intents / "notes.txt").write_text("not an intent")
    (intents / "dir.json").mkdir()
    (intents / "link.json").symlink_to("pvc-1.json")
    assert journal.read_intents(tree) == ([INTENT], [])


def test_an_intent_keeps_unknown_fields_out_and_defaults_since(tree: Tree, export: Path) -> None:
    journal.write_intent(tree, INTENT)
    record = export / JOURNAL_DIR / "intents" / "pvc-1.json"
    data = json.loads(record.read_text())
    del data["since"]
    data["added-by-a-later-version"] = "x"
    record.write_text(json.dumps(data))
    intents, unreadable = journal.read_intents(tree)
    assert (intents, unreadable) == ([replace(INTENT, since="")], [])


def test_owner_describe_names_namespace_and_cluster() -> None:
    assert OWNER.describe() == 'namespace "team-a" (cluster c1)'
    assert Owner(cluster="", namespace="x").describe() == 'namespace "x" (cluster unknown)'


class _Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, not even the cleanup of the temporary file."""


class KilledBeforeRename(LocalSyscalls):
    def rename(
        self, parent: int, src: str, dst_parent: int, dst: str, where: str, replace: bool
    ) -> None:
        raise _Killed(where)

    def unlink(self, parent: int, name: str, where: str) -> None:
        if name.startswith("tmp-"):
            raise _Killed(where)
        super().unlink(parent, name, where)


@pytest.mark.parametrize(
    "write",
    [
        pytest.param(lambda tree: journal.write_intent(tree, INTENT), id="intent"),
        pytest.param(lambda tree: journal.write_owner(tree, ("team-a", "data"), OWNER), id="owner"),
        pytest.param(
            lambda tree: journal.create_owner(tree, ("team-a", "data"), OWNER), id="new-owner"
        ),
    ],
)
def test_a_write_killed_before_its_rename_leaves_only_a_temporary_the_sweep_removes(
    export: Path, write: Callable[[Tree], object]
) -> None:
    with Tree(export, KilledBeforeRename()) as dying, pytest.raises(_Killed):
        write(dying)
    scratch = export.joinpath(*journal.SCRATCH)
    ours = journal.writer_prefix("c1", "nfs")
    left = [path.name for path in scratch.iterdir()]
    assert len(left) == 1 and left[0].startswith(ours)
    assert [p for p in files_under(export) if not p.startswith(f"{JOURNAL_DIR}/tmp/")] == []
    # Another writer sharing the export (a second cluster) has a write in flight: not ours.
    theirs = journal.writer_prefix("c2", "nfs") + "0123456789abcdef"
    (scratch / theirs).write_bytes(b"{}")
    (scratch / "notes.txt").write_bytes(b"an admin's file")
    with Tree(export, LocalSyscalls()) as tree:
        assert journal.remove_temporaries(tree, "c1", "nfs") == left
        assert journal.remove_temporaries(tree, "c1", "nfs") == []
    assert sorted(path.name for path in scratch.iterdir()) == sorted([theirs, "notes.txt"])


def test_writer_prefixes_differ_by_cluster_and_provisioner() -> None:
    prefixes = {
        journal.writer_prefix(cluster, name)
        for cluster, name in [("c1", "nfs"), ("c2", "nfs"), ("c1", "nfs2"), ("c1nfs", "")]
    }
    assert len(prefixes) == 4
    assert all(p.startswith("tmp-") and p.endswith("-") for p in prefixes)
