"""Property-based tests (hypothesis) of the filesystem layer over random trees with symlinks.

SPEC §4 and §11: a workload owns everything inside its volume, symlinks included, and may pick
its claim's path; no operation may follow a symlink or change anything outside the volume's own
directory. Hypothesis builds real trees on a temporary export — directories, files and symlinks
(relative, absolute, dangling, looping, to the export root, to a sibling volume, to a directory
outside the export holding a marker file) planted anywhere, the components of claims' paths and
their ``archived-*`` names included — then runs random sequences of Storage operations on random
claim directories. After every operation it checks, against real ``lstat`` snapshots:

1. nothing outside the target's own directory changed (only what the operation may touch: the
   target's subtree, the parents create_dir makes, the archive it renames to, the records);
2. every open used O_NOFOLLOW, and every call acted on the entry its export-relative path
   names: the directory descriptor it went through is, by /proc, that very directory;
3. an operation on a path with a symlink (or a file) in a parent or the leaf was refused with
   Redirected (naming the link), and changed nothing at all, records included;
4. remove_dir removed nothing reached through a symlink.

Pure properties of naming and path parsing close the file. Examples are kept moderate so the
unit suite stays fast; failures print the tree and the operations, shrunk.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import posixpath
import stat
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from provisioner import journal
from provisioner.journal import RECORD, Intent, Owner, component_of, mirror_name
from provisioner.paths import (
    JOURNAL_DIR,
    MAX_NAME_BYTES,
    RelativeDir,
    UnsafePathError,
    archive_name,
    parse_relative,
)
from provisioner.safefs import SYMLINK, LocalSyscalls, Redirected
from provisioner.storage import DirOwner, Storage, StorageError
from tests.scaffolding import is_scaffolding

PROPERTIES = settings(
    max_examples=200,
    deadline=None,
    database=None,  # nothing written into the work tree; a failure prints its reproduction
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
TREE_PROPERTIES = settings(PROPERTIES, max_examples=100)
"""For the costlier examples: real trees with Storage jobs (about 10 ms each), long names."""

COMPONENTS = ("ns", "app", "db")
ARCHIVES = ("archived-app", "archived-db", "archived-ns", "archived-app-2")
LINKS = (
    "outside",  # absolute, to a directory outside the export with a marker file in it
    "outside-file",  # absolute, to the marker file itself
    "root",  # absolute, to the export root
    "root-relative",  # relative, ../.. up to the export root
    "up",  # ".."
    "sibling-volume",  # absolute, to another claim's directory
    "sibling-relative",  # relative, to a name beside it
    "dangling",
    "loop",  # to itself
    "journal",  # to the provisioner's own records
)
KINDS = ("dir", "dir", "file", *LINKS)
MARKER = b"outside the export: never touched"
CLUSTER = "c1"

Parts = tuple[str, ...]
Entry = tuple[Parts, str]

claim_paths = st.lists(st.sampled_from(COMPONENTS), min_size=1, max_size=3).map(tuple)
planted_paths = st.lists(st.sampled_from(COMPONENTS + ARCHIVES), min_size=1, max_size=3).map(tuple)
entries = st.lists(st.tuples(planted_paths, st.sampled_from(KINDS)), max_size=8)
OPERATIONS = ("create", "reuse", "archive", "remove", "discard", "record", "retain")
WEIGHTED = (*OPERATIONS, "archive", "remove")  # the destructive ones, a little more often
MODES = (0o777, 0o750, 0o2770)
Operation = tuple[str, Parts, int]


@st.composite
def worlds(draw: st.DrawFn) -> tuple[list[Entry], list[Operation]]:
    """A random tree and operations on a few claim directories. Some claims' directories are
    made after the random entries (a symlink there may have taken a component first), so that
    operations meet existing volumes as often as missing or redirected ones."""
    claims = draw(st.lists(claim_paths, min_size=1, max_size=3, unique=True))
    made = [(claim, "dir") for claim in claims if draw(st.integers(0, 2)) > 0]
    # A symlink or a file on some claims' paths, planted before anything else.
    traps = [
        (
            claim[: draw(st.integers(min_value=1, max_value=len(claim)))],
            draw(st.sampled_from(KINDS)),
        )
        for claim in claims
        if draw(st.integers(min_value=0, max_value=3)) == 0
    ]
    # Content for the volumes: entries below a claim's directory, at any depth.
    inside = draw(
        st.lists(
            st.tuples(
                st.tuples(st.sampled_from(claims), planted_paths).map(
                    lambda pair: pair[0] + pair[1]
                ),
                st.sampled_from(KINDS),
            ),
            max_size=5,
        )
    )
    tree = traps + draw(entries) + made + inside
    ops = draw(
        st.lists(
            st.tuples(st.sampled_from(WEIGHTED), st.sampled_from(claims), st.sampled_from(MODES)),
            min_size=1,
            max_size=5,
        )
    )
    return tree, ops


# --- the tree -------------------------------------------------------------------------------------


def link_target(kind: str, export: Path, outside: Path, parts: Parts) -> str:
    return {
        "outside": str(outside),
        "outside-file": str(outside / "marker"),
        "root": str(export),
        "root-relative": "/".join([".."] * (len(parts) - 1)) or ".",
        "up": "..",
        "sibling-volume": str(export / "ns" / "app"),
        "sibling-relative": "db" if parts[-1] != "db" else "app",
        "dangling": "nowhere",
        "loop": parts[-1],
        "journal": str(export / JOURNAL_DIR),
    }[kind]


def plant(export: Path, outside: Path, entry: Entry, serial: int) -> None:
    """Make ``entry`` lexically, with plain directories for missing parents; an entry whose
    parent is a symlink or a file is skipped (the builder never follows one either)."""
    parts, kind = entry
    current = export
    for name in parts[:-1]:
        current = current / name
        try:
            info = os.lstat(current)
        except FileNotFoundError:
            os.mkdir(current)
            continue
        if not stat.S_ISDIR(info.st_mode):
            return
    leaf = current / parts[-1]
    if os.path.lexists(leaf):
        return
    if kind == "dir":
        os.mkdir(leaf)
    elif kind == "file":
        leaf.write_bytes(f"data {serial}".encode())
    else:
        os.symlink(link_target(kind, export, outside, parts), leaf)


class Node(NamedTuple):
    """One entry of a snapshot; ``detail`` is a link's target or a file's content hash."""

    mode: int
    inode: int
    uid: int
    gid: int
    detail: str | None


Snapshot = dict[str, Node]


def snapshot(root: Path) -> Snapshot:
    """Every entry under ``root``, keyed by its path relative to ``root``; links are never
    followed. Equal snapshots mean nothing was made, removed, replaced, chmod'ed or written."""
    found: Snapshot = {}
    pending = [("", str(root))]
    while pending:
        prefix, directory = pending.pop()
        with os.scandir(directory) as listing:
            for entry in listing:
                info = entry.stat(follow_symlinks=False)
                key = prefix + entry.name
                detail = None
                if stat.S_ISLNK(info.st_mode):
                    detail = os.readlink(entry.path)
                elif stat.S_ISREG(info.st_mode):
                    detail = hashlib.sha256(Path(entry.path).read_bytes()).hexdigest()
                elif stat.S_ISDIR(info.st_mode):
                    pending.append((key + "/", entry.path))
                found[key] = Node(info.st_mode, info.st_ino, info.st_uid, info.st_gid, detail)
    return {key: node for key, node in found.items() if not is_scaffolding(key)}


def under(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + "/")


def outside_of(snap: Snapshot, *prefixes: str) -> Snapshot:
    """The entries of ``snap`` that are in none of ``prefixes``' subtrees."""
    return {key: value for key, value in snap.items() if not any(under(key, p) for p in prefixes)}


def inside(snap: Snapshot, prefix: str) -> Snapshot:
    """The entries strictly inside ``prefix``, keyed relative to it."""
    return {key: node for key, node in subtree(snap, prefix).items() if key}


def subtree(snap: Snapshot, prefix: str) -> Snapshot:
    """The entries of ``prefix``'s subtree, keyed relative to it ("" for itself)."""
    return {
        key[len(prefix) :]: value
        for key, value in snap.items()
        if under(key, prefix)  # keys keep their leading "/" below the top: unambiguous
    }


@dataclass(frozen=True)
class Lexical:
    """What an admin's ``ls`` finds along a claim's path, never following anything."""

    state: str  # "exists", "missing" or "blocked"
    index: int = 0  # the first missing or blocking component
    link: bool = False  # the blocking component is a symlink (else a file)


def classify(export: Path, parts: Parts) -> Lexical:
    current = export
    for index, name in enumerate(parts):
        current = current / name
        try:
            info = os.lstat(current)
        except FileNotFoundError:
            return Lexical("missing", index)
        if not stat.S_ISDIR(info.st_mode):
            return Lexical("blocked", index, stat.S_ISLNK(info.st_mode))
    return Lexical("exists", len(parts))


# --- the watchdog -----------------------------------------------------------------------------


class Watchdog(LocalSyscalls):
    """LocalSyscalls that checks each call before making it: every open is O_NOFOLLOW, every
    name is one plain component, and the descriptor it goes through is (by /proc) exactly the
    directory that the call's export-relative ``where`` names — so nothing was reached through
    a symlink. Violations are collected (raising would be mistaken for a refusal)."""

    def __init__(self, export: Path) -> None:
        self.root = os.path.realpath(export)
        self.scratch = self._at("/".join(journal.SCRATCH))
        self.violations: list[str] = []

    def _real(self, fd: int) -> str:
        return os.readlink(f"/proc/self/fd/{fd}")

    def _at(self, where: str) -> str:
        return f"{self.root}/{where}" if where else self.root

    def _named(self, op: str, parent: int, name: str, where: str) -> None:
        # The delete's walk goes back up by opening ".." (always O_NOFOLLOW | O_DIRECTORY), and
        # only uses it after checking it is the directory it came from.
        upward = op == "open" and name == ".." and where.endswith("/..")
        if "/" in name or name in ("", ".") or (name == ".." and not upward):
            self.violations.append(f"{op} {where!r}: name {name!r} is not one component")
        expected = self._at(posixpath.dirname(where))
        actual = self._real(parent)
        # A record is written as a temporary file in the journal's scratch directory first
        # (its calls name the record they are writing), then renamed into place.
        temporary = name.startswith("tmp-") and actual == self.scratch
        if actual != expected and not temporary:
            self.violations.append(f"{op} {where!r} went through {actual!r}, not {expected!r}")

    def _on(self, op: str, fd: int, where: str, exact: bool) -> None:
        actual = self._real(fd)
        expected = self._at(where)
        if actual == expected:
            return
        # A record's temporary file, or the directory a record is synced in.
        near = posixpath.dirname(actual) in (posixpath.dirname(expected), self.scratch) or (
            actual == posixpath.dirname(expected)
        )
        if exact or not near:
            self.violations.append(f"{op} {where!r} acted on {actual!r}")

    def open(self, parent: int, name: str, flags: int, where: str) -> int:
        if not flags & os.O_NOFOLLOW:
            self.violations.append(f"open {where!r} without O_NOFOLLOW")
        self._named("open", parent, name, where)
        return super().open(parent, name, flags, where)

    def stat(self, parent: int, name: str, where: str) -> os.stat_result:
        self._named("stat", parent, name, where)
        return super().stat(parent, name, where)

    def mkdir(self, parent: int, name: str, where: str) -> None:
        self._named("mkdir", parent, name, where)
        super().mkdir(parent, name, where)

    def chmod(self, fd: int, mode: int, where: str) -> None:
        self._on("chmod", fd, where, exact=True)
        super().chmod(fd, mode, where)

    def chown(self, fd: int, uid: int, gid: int, where: str) -> None:
        self._on("chown", fd, where, exact=True)
        super().chown(fd, uid, gid, where)

    def rename(
        self, parent: int, src: str, dst_parent: int, dst: str, where: str, replace: bool
    ) -> None:
        self._named("rename", parent, src, where)
        self._named("rename", dst_parent, dst, where)
        super().rename(parent, src, dst_parent, dst, where, replace)

    def unlink(self, parent: int, name: str, where: str) -> None:
        self._named("unlink", parent, name, where)
        super().unlink(parent, name, where)

    def rmdir(self, parent: int, name: str, where: str) -> None:
        self._named("rmdir", parent, name, where)
        super().rmdir(parent, name, where)

    def listdir(self, fd: int, where: str) -> list[str]:
        self._on("listdir", fd, where, exact=True)
        return super().listdir(fd, where)

    def write(self, fd: int, data: bytes, where: str) -> None:
        self._on("write", fd, where, exact=False)
        super().write(fd, data, where)

    def fsync(self, fd: int, where: str) -> None:
        self._on("fsync", fd, where, exact=False)
        super().fsync(fd, where)


# --- one operation and what it may change -------------------------------------------------------


@dataclass
class World:
    root: Path  # holds export/ and outside/
    export: Path
    outside: Path
    storage: Storage
    watchdog: Watchdog


def owner_of(parts: Parts) -> Owner:
    return Owner(cluster=CLUSTER, namespace=parts[0], provisioner="nfs", volume=volume_of(parts))


def volume_of(parts: Parts) -> str:
    return "pvc-" + "-".join(parts)


def intent_of(parts: Parts) -> Intent:
    return Intent(
        volume=volume_of(parts),
        namespace=parts[0],
        claim="claim",
        claim_uid="uid",
        directory="/".join(parts),
        cluster=CLUSTER,
        provisioner="nfs",
    )


async def perform(world: World, op: str, parts: Parts, mode: int) -> object:
    """Run ``op`` the way the reconciler or the sweep would; returns its result or error."""
    rel = RelativeDir(parts)
    storage = world.storage
    try:
        if op == "create":
            inspection = await storage.inspect(rel)
            # Also when it exists: create_dir must then refuse and change nothing.
            await storage.create_dir(rel, DirOwner(mode=mode), owner_of(parts), intent_of(parts))
            return inspection
        if op == "reuse":
            await storage.reuse_dir(rel, DirOwner(mode=mode), owner_of(parts))
            return None
        if op == "archive":
            return await storage.archive_dir(rel)
        if op == "remove":
            return await storage.remove_dir(rel)
        if op == "discard":
            return await storage.discard_created_dir(rel, volume_of(parts))
        if op == "record":
            await storage.record_owner(rel, owner_of(parts))
            return None
        return None  # retain: nothing is touched
    except (Redirected, StorageError) as error:
        return error


@dataclass(frozen=True)
class Step:
    """One operation as performed: what it met on disk and what it returned, for the checks."""

    op: str
    parts: Parts
    mode: int
    found: Lexical
    result: object

    @property
    def target(self) -> str:
        return "export/" + "/".join(self.parts)

    def __str__(self) -> str:
        return f"{self.op} {'/'.join(self.parts)} ({self.found}) -> {self.result!r}"


RECORDS = f"export/{JOURNAL_DIR}"


def check(world: World, step: Step, before: Snapshot) -> None:
    after = snapshot(world.root)
    assert world.watchdog.violations == [], str(step)
    assert (world.outside / "marker").read_bytes() == MARKER, str(step)
    if step.op == "retain":
        assert after == before, str(step)
    elif step.found.state == "blocked":
        check_blocked(step, before, after)
    elif step.found.state == "missing":
        check_missing(step, before, after)
    else:
        check_existing(step, before, after)


def check_blocked(step: Step, before: Snapshot, after: Snapshot) -> None:
    """(3) refused, nothing changed at all, records included. Every symlink is a Redirected;
    a file at the leaf meets discard's rmdir as ENOTDIR."""
    allowed: tuple[type[Exception], ...] = (Redirected,)
    if not step.found.link and step.op == "discard" and step.found.index == len(step.parts) - 1:
        allowed = (Redirected, StorageError)
    assert isinstance(step.result, allowed), str(step)
    assert after == before, str(step)


def check_missing(step: Step, before: Snapshot, after: Snapshot) -> None:
    """Only create changes the tree (it makes the missing levels); nothing else is touched."""
    op, parts, result = step.op, step.parts, step.result
    if op == "create":
        assert not isinstance(result, Exception), str(step)
        made = {
            "export/" + "/".join(parts[:depth])
            for depth in range(step.found.index + 1, len(parts) + 1)
        }
        assert outside_of(after, RECORDS, *made) == outside_of(before, RECORDS), str(step)
        assert subtree(after, step.target).keys() == {""}, str(step)
        assert stat.S_ISDIR(after[step.target].mode), str(step)
        assert stat.S_IMODE(after[step.target].mode) == step.mode, str(step)
        assert record_of(parts) in after, f"{step}: the owner record is written"
        return
    if op in ("reuse", "record"):
        assert isinstance(result, StorageError), str(step)
        assert after == before, str(step)
        return
    if op == "archive":
        assert result is None, str(step)
    elif op == "remove":
        assert result is False, str(step)
    else:  # discard: see test_storage's test of a directory never made
        assert result == "missing", str(step)
    assert outside_of(after, RECORDS) == outside_of(before, RECORDS), str(step)


def check_existing(step: Step, before: Snapshot, after: Snapshot) -> None:
    """(1) and (4): each operation changes its own directory, as it documents, and nothing else
    but the records."""
    op, parts, result, target = step.op, step.parts, step.result, step.target
    if op == "create":
        assert isinstance(result, StorageError), str(step)
        assert "appeared" in result.cause, str(step)
        assert after == before, str(step)
    elif op == "reuse":
        assert result is None, str(step)
        assert outside_of(after, RECORDS, target) == outside_of(before, RECORDS, target), str(step)
        assert inside(after, target) == inside(before, target), str(step)
        assert after[target]._replace(mode=before[target].mode) == before[target], str(step)
        assert stat.S_IMODE(after[target].mode) == step.mode, str(step)
    elif op == "record":
        assert result is None, str(step)
        assert outside_of(after, RECORDS) == outside_of(before, RECORDS), str(step)
        assert record_of(parts) in after, str(step)
    elif op == "remove":
        # The whole subtree goes (symlinks in it unlinked, never followed), and nothing else.
        assert result is True, str(step)
        assert outside_of(after, RECORDS) == outside_of(before, RECORDS, target), str(step)
        assert record_of(parts) not in after, f"{step}: the owner record goes with it"
    elif op == "discard":
        empty = not inside(before, target)
        assert result == ("removed" if empty else "kept"), str(step)
        expected = outside_of(before, RECORDS, target) if empty else outside_of(before, RECORDS)
        assert outside_of(after, RECORDS) == expected, str(step)
    elif op == "archive":
        check_archived(step, before, after)


def check_archived(step: Step, before: Snapshot, after: Snapshot) -> None:
    """Renamed beside itself to a name that was free, contents untouched, records following."""
    assert isinstance(step.result, RelativeDir), str(step)
    assert step.result.parent_parts == step.parts[:-1], str(step)
    assert step.result.leaf.startswith(f"archived-{step.parts[-1]}"), str(step)
    archive = "export/" + str(step.result)
    assert archive not in before, f"{step}: the name was taken"
    assert subtree(after, archive) == subtree(before, step.target), str(step)
    assert outside_of(after, RECORDS, archive) == outside_of(before, RECORDS, step.target), str(
        step
    )
    assert record_of(step.parts) not in after, str(step)
    if record_of(step.parts) in before:
        moved = after.get(record_of(step.result.parts))
        assert moved == before[record_of(step.parts)], f"{step}: the owner record follows"


def record_of(parts: Parts) -> str:
    """The snapshot key of the owner record of ``parts``."""
    return "/".join(("export", *journal.mirror_of(parts), RECORD))


async def scenario(world: World, ops: Sequence[Operation]) -> list[object]:
    results = []
    for op, parts, mode in ops:
        found = classify(world.export, parts)
        before = snapshot(world.root)
        result = await perform(world, op, parts, mode)
        event(f"{op} on a path that is {found.state}")  # see --hypothesis-show-statistics
        check(world, Step(op, parts, mode, found, result), before)
        results.append(result)
    return results


def explore(tree: Sequence[Entry], ops: Sequence[Operation]) -> list[object]:
    """Plant ``tree`` on a fresh export, run ``ops``, check each; returns their results."""
    with tempfile.TemporaryDirectory(prefix="nfs-properties-") as tmp:
        root = Path(os.path.realpath(tmp))
        export = root / "export"
        outside = root / "outside"
        export.mkdir()
        outside.mkdir()
        (outside / "marker").write_bytes(MARKER)
        for serial, entry in enumerate(tree):
            plant(export, outside, entry, serial)
        watchdog = Watchdog(export)
        storage = Storage(export, watchdog, timeout=30.0, max_threads=2)
        try:
            return asyncio.run(scenario(World(root, export, outside, storage, watchdog), ops))
        finally:
            storage.close()


@TREE_PROPERTIES
@given(world=worlds())
@example(
    # A volume holding every kind of link, archived past a symlink that has the archive's name,
    # then created again and removed.
    world=(
        [
            (("ns", "app", name), kind)
            for name, kind in zip(COMPONENTS + ARCHIVES, LINKS, strict=False)
        ]
        + [(("ns", "app", "db", "app"), "outside"), (("ns", "archived-app"), "outside")],
        [
            ("archive", ("ns", "app"), 0o777),
            ("create", ("ns", "app"), 0o750),
            ("remove", ("ns", "app"), 0o750),
        ],
    ),
)
def test_random_operations_touch_only_their_own_directory(
    world: tuple[list[Entry], list[Operation]],
) -> None:
    tree, ops = world
    explore(tree, ops)


@st.composite
def redirected_claims(draw: st.DrawFn) -> tuple[list[Entry], Parts, int, str]:
    """A claim path with a symlink planted at one of its components, on a random tree."""
    parts: Parts = draw(claim_paths)
    at = draw(st.integers(min_value=0, max_value=len(parts) - 1))
    link = draw(st.sampled_from(LINKS))
    # Plain directories up to the link, so the link itself is what the walk meets.
    tree: list[Entry] = [(parts[: depth + 1], "dir") for depth in range(at)]
    tree.append((parts[: at + 1], link))
    tree += draw(entries)
    op = draw(st.sampled_from(OPERATIONS[:-1]))
    return tree, parts, at, op


@TREE_PROPERTIES
@given(case=redirected_claims())
def test_a_symlink_anywhere_on_the_path_is_refused_and_changes_nothing(
    case: tuple[list[Entry], Parts, int, str],
) -> None:
    tree, parts, at, op = case
    [result] = explore(tree, [(op, parts, 0o777)])
    assert isinstance(result, Redirected), result
    assert (result.where, result.what) == ("/".join(parts[: at + 1]), SYMLINK), "names the link"


# --- naming and parsing ---------------------------------------------------------------------------

component_text = st.text(
    alphabet=st.characters(exclude_characters="/\x00", exclude_categories=["Cs"]),
    min_size=1,
)
long_components = st.builds(
    lambda char, count: char * count,
    st.sampled_from(["x", "é", "€", "😀"]),
    st.integers(min_value=60, max_value=260),
)


@PROPERTIES
@given(
    first=st.one_of(component_text, long_components),
    second=st.one_of(component_text, long_components),
)
@example(first="x" * 254, second="x" * 255)
@example(first="owner.json", second="tmp-1")
def test_mirror_names_are_injective_safe_and_short(first: str, second: str) -> None:
    for component in (first, second):
        mirror = mirror_name(component)
        assert mirror != RECORD
        assert not mirror.startswith("tmp-")
        assert mirror not in (".", "..")
        assert "/" not in mirror
        assert len(mirror.encode("utf-8")) <= MAX_NAME_BYTES
        assert component_of(mirror) in (component, None)
        if len(component.encode("utf-8")) < MAX_NAME_BYTES:
            assert component_of(mirror) == component
    assert (mirror_name(first) == mirror_name(second)) == (first == second)


path_text = st.text(alphabet=["a", "b", ".", "/", "\x00", "é", " ", "\\", "~", "-"], max_size=14)


@PROPERTIES
@given(value=st.one_of(path_text, st.just(JOURNAL_DIR), path_text.map(lambda v: v + "/..")))
@example(value="a/../..")
@example(value="a/./b")
@example(value="...")
@example(value="../a")
@example(value=f"{JOURNAL_DIR}/x")
@example(value=f"x/{JOURNAL_DIR}")
def test_parse_relative_never_accepts_a_path_that_escapes(value: str) -> None:
    try:
        rel = parse_relative(value)
    except UnsafePathError as error:
        assert error.rendered == value
        return
    assert str(rel) == value
    assert posixpath.normpath(value) == value, "accepted paths are already normalised"
    assert not posixpath.isabs(value)
    assert rel.parts[0] != JOURNAL_DIR
    assert all(part not in ("", ".", "..") for part in rel.parts)
    joined = posixpath.normpath(posixpath.join("/export", value))
    assert joined.startswith("/export/"), "strictly inside the export, never the root itself"


fitting_components = st.one_of(
    st.text(
        alphabet=st.characters(exclude_characters="/\x00", exclude_categories=["Cs"]),
        min_size=1,
        max_size=20,
    ).filter(lambda part: part not in (".", "..", JOURNAL_DIR)),
    st.builds(
        lambda char, count: char * min(count, MAX_NAME_BYTES // len(char.encode())),
        st.sampled_from(["x", "é", "€", "😀"]),
        st.integers(min_value=60, max_value=260),
    ),
)


@TREE_PROPERTIES
@given(
    parts=st.lists(fitting_components, min_size=1, max_size=3),
    taken=st.integers(min_value=0, max_value=5),
)
def test_archive_names_stay_beside_the_directory(parts: list[str], taken: int) -> None:
    rel = RelativeDir(tuple(parts))
    seen: list[RelativeDir] = []

    def is_taken(candidate: RelativeDir) -> bool:
        seen.append(candidate)
        return len(seen) <= taken

    archived = archive_name(rel, is_taken)
    assert archived.parent_parts == rel.parent_parts
    assert archived != rel
    assert len(set(seen)) == len(seen) == taken + 1, "each attempt is a new name"
    assert len(archived.leaf.encode()) <= MAX_NAME_BYTES


def test_the_watchdog_catches_a_followed_symlink(tmp_path: Path) -> None:
    """The property above is only as good as its watchdog: prove it sees a walk through a
    symlink (here made on purpose by opening the link without O_NOFOLLOW)."""
    export = tmp_path / "export"
    (export / "real").mkdir(parents=True)
    (export / "link").symlink_to("real")
    watchdog = Watchdog(export)
    root = os.open(export, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = watchdog.open(root, "link", os.O_RDONLY | os.O_DIRECTORY, "link")
        try:
            watchdog.listdir(fd, "link")
        finally:
            os.close(fd)
    finally:
        os.close(root)
    assert watchdog.violations == [
        "open 'link' without O_NOFOLLOW",
        f"listdir 'link' acted on {str(os.path.realpath(export / 'real'))!r}",
    ]


@pytest.mark.parametrize(
    ("made", "parts", "found"),
    [
        pytest.param({"a": "dir"}, ("a", "b"), Lexical("missing", 1), id="missing-leaf"),
        pytest.param({"a": "up"}, ("a", "b"), Lexical("blocked", 0, True), id="link-parent"),
        pytest.param({"a": "file"}, ("a",), Lexical("blocked", 0, False), id="file-leaf"),
        pytest.param({"a": "dir", "a/b": "dir"}, ("a", "b"), Lexical("exists", 2), id="exists"),
    ],
)
def test_the_oracle_reads_paths_without_following(
    tmp_path: Path, made: dict[str, str], parts: Parts, found: Lexical
) -> None:
    for serial, (path, kind) in enumerate(made.items()):
        plant(tmp_path, tmp_path, (tuple(path.split("/")), kind), serial)
    assert classify(tmp_path, parts) == found
