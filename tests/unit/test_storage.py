"""Unit tests for provisioner.storage: claim directories and their records on a real export.

Each test runs ``Storage`` on a tmp_path export with the real ``safefs.LocalSyscalls``; faults
(EACCES, hangs) come from tests/faults.py, because tests run as root and cannot make a directory
unwritable, and races come from small ``Syscalls`` fakes. Every refusal checks that nothing
changed, inside the export or in the directory beside it. Random trees of symlinks are the
subject of test_properties.py.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import stat
import subprocess
import sys
import textwrap
from collections.abc import Coroutine, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from provisioner.journal import RECORD, UNREADABLE, Intent, Owner
from provisioner.ownership import Inspection
from provisioner.paths import JOURNAL_DIR, RelativeDir, UnsafePathError, parse_relative
from provisioner.safefs import SYMLINK, LocalSyscalls, Redirected
from provisioner.storage import DirOwner, Storage, StorageError, StorageTimeout
from tests.faults import (
    FaultInjectingSyscalls,
    FaultRule,
    read_fault_rules,
    write_fault_rules,
)
from tests.scaffolding import is_scaffolding

_T = TypeVar("_T")
TIMEOUT = 0.2
"""For the tests about timeouts; the others use a generous one, so a slow machine is no fault."""
SLOW_OK = 10.0
ROOT_SQUASH_HINT = (
    "the export is not writable by the provisioner: check root_squash/all_squash on the NFS "
    "server and the ownership of the directory"
)
OWNER = Owner(cluster="c1", namespace="team-a", provisioner="nfs", volume="pvc-1", since="t0")
OTHER_VOLUME = Owner(cluster="c1", namespace="team-b", provisioner="nfs", volume="pvc-9")
OTHER = Owner(cluster="c1", namespace="team-b", provisioner="nfs", volume="pvc-2", since="t1")
MARKER = "outside the export: never touched"


def run(coroutine: Coroutine[Any, Any, _T]) -> _T:
    return asyncio.run(coroutine)


def intent_for(rel: str, volume: str = "pvc-1") -> Intent:
    return Intent(
        volume=volume,
        namespace="team-a",
        claim="data",
        claim_uid="uid-1",
        directory=rel,
        cluster="c1",
        provisioner="nfs",
        since="t0",
    )


def snapshot(root: Path, skip_journal: bool = False) -> dict[str, tuple[object, ...]]:
    """Every entry under ``root``, never following a link: kind and permissions, inode, link
    target or content hash. Equal snapshots mean nothing moved, changed or disappeared."""
    found: dict[str, tuple[object, ...]] = {}
    for directory, dirs, files in os.walk(root):
        if skip_journal and JOURNAL_DIR in dirs:
            dirs.remove(JOURNAL_DIR)
        for name in dirs + files:
            path = os.path.join(directory, name)
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                detail: object = os.readlink(path)
            elif stat.S_ISREG(info.st_mode):
                detail = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            else:
                detail = None
            found[os.path.relpath(path, root)] = (info.st_mode, info.st_ino, detail)
    return {key: value for key, value in found.items() if not is_scaffolding(key)}


def journal_files(mount: Path) -> list[str]:
    """Every file in the provisioner's own directory (locks, records, intents, operations)."""
    root = mount / JOURNAL_DIR
    return sorted(str(path.relative_to(mount)) for path in root.rglob("*") if path.is_file())


def tree_of(root: Path) -> list[str]:
    """The export as an admin lists it, the provisioner's records left out."""
    return sorted(snapshot(root, skip_journal=True))


def records(root: Path) -> list[str]:
    journal = root / JOURNAL_DIR
    return sorted(
        str(path.relative_to(journal)) for path in journal.rglob("*") if not path.is_dir()
    )


def owner_record(root: Path, rel: str) -> dict[str, str]:
    mirror = root / JOURNAL_DIR / "owners"
    for part in rel.split("/"):
        mirror = mirror / f"d{part}"
    data: dict[str, str] = json.loads((mirror / RECORD).read_text())
    return data


def write_record(mount: Path, rel: str, owner: Owner) -> None:
    """An owner record for a directory that does not exist (what a crash before mkdir leaves)."""
    mirror = mount / JOURNAL_DIR / "owners"
    for part in rel.split("/"):
        mirror = mirror / f"d{part}"
    mirror.mkdir(parents=True, exist_ok=True)
    (mirror / RECORD).write_text(json.dumps(asdict(owner)))


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


class Observed:
    """A fake metrics sink for Storage's observe hook; the export locks' jobs are left out."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def __call__(self, op: str, seconds: float, outcome: str) -> None:
        assert seconds >= 0
        if op not in ("lock", "unlock", "renew_lock"):
            self.calls.append((op, outcome))


@pytest.fixture
def mount(tmp_path: Path) -> Path:
    export = tmp_path / "export"
    export.mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "marker").write_text(MARKER)
    return export


@pytest.fixture
def outside(mount: Path) -> Path:
    return mount.parent / "outside"


@pytest.fixture
def rules(tmp_path: Path) -> Iterator[Path]:
    rules_file = tmp_path / "faults.json"
    yield rules_file
    # Releases any call still hanging on a rule, so its worker thread can finish.
    write_fault_rules(rules_file, [])


@pytest.fixture
def observed() -> Observed:
    return Observed()


def faulty(mount: Path, rules: Path, timeout: float, threads: int, **kw: Any) -> Storage:
    return Storage(
        mount, FaultInjectingSyscalls(rules, poll=0.01), timeout=timeout, max_threads=threads, **kw
    )


@pytest.fixture
def storage(mount: Path, rules: Path, observed: Observed) -> Iterator[Storage]:
    store = faulty(mount, rules, SLOW_OK, 4, observe=observed)
    yield store
    store.close()


@pytest.fixture
def hasty(mount: Path, rules: Path, observed: Observed) -> Iterator[Storage]:
    """Storage with a short timeout, for the hung-call tests."""
    store = faulty(mount, rules, TIMEOUT, 4, observe=observed)
    yield store
    store.close()


@pytest.fixture
def umask_077() -> Iterator[None]:
    previous = os.umask(0o077)
    yield
    os.umask(previous)


async def provision(storage: Storage, rel: RelativeDir, mode: DirOwner, owner: Owner) -> None:
    """What the reconciler does for a new directory: inspect, then create."""
    inspection = await storage.inspect(rel)
    assert not inspection.exists
    await storage.create_dir(rel, mode, owner, intent_for(str(rel), owner.volume))


# --- create -----------------------------------------------------------------------------------


@pytest.mark.usefixtures("umask_077")
@pytest.mark.parametrize(
    "mode",
    [
        pytest.param(0o777, id="default-0777"),
        pytest.param(0o750, id="restricted-0750"),
        pytest.param(0o2775, id="setgid-2775"),
        pytest.param(0o1777, id="sticky-1777"),
        pytest.param(0o000, id="none-000"),
    ],
)
def test_create_dir_sets_the_mode_regardless_of_umask(
    storage: Storage, mount: Path, mode: int
) -> None:
    run(provision(storage, parse_relative("team-a/web/data"), DirOwner(mode=mode), OWNER))
    assert mode_of(mount / "team-a" / "web" / "data") == mode
    # Parents are made like `mkdir -p`: 0o777 filtered by the umask.
    assert mode_of(mount / "team-a") == 0o700
    assert mode_of(mount / "team-a" / "web") == 0o700


def test_create_dir_records_the_intent_and_the_leafs_owner(storage: Storage, mount: Path) -> None:
    (mount / "team-a").mkdir()
    run(provision(storage, parse_relative("team-a/web/data"), DirOwner(), OWNER))
    assert tree_of(mount) == ["team-a", "team-a/web", "team-a/web/data"]
    assert records(mount) == [
        "intents/pvc-1.json",
        f"owners/dteam-a/dweb/ddata/{RECORD}",
    ], "parents get no record: they stay shareable between namespaces"
    assert owner_record(mount, "team-a/web/data")["namespace"] == "team-a"
    intents, unreadable = run(storage.read_intents())
    assert (intents, unreadable) == ([intent_for("team-a/web/data")], [])
    run(storage.clear_intent("pvc-1"))
    assert run(storage.read_intents()) == ([], [])
    run(storage.clear_intent("pvc-1"))  # already cleared: fine


def test_create_dir_syncs_its_records_before_the_first_mkdir(
    storage: Storage, mount: Path, rules: Path
) -> None:
    # The leaf's mkdir fails, as if the provisioner crashed right there: the records that let
    # the sweep and the next attempt decide are already on the export.
    write_fault_rules(rules, [FaultRule(op="mkdir", match="team-a/app")])
    with pytest.raises(StorageError):
        run(provision(storage, parse_relative("team-a/app"), DirOwner(), OWNER))
    assert tree_of(mount) == ["team-a"]
    assert records(mount) == ["intents/pvc-1.json", f"owners/dteam-a/dapp/{RECORD}"]


def test_a_stale_record_of_a_parent_made_now_is_dropped_first(
    storage: Storage, mount: Path, rules: Path
) -> None:
    """team-b's claim on "x" wrote its record, then its mkdir failed; team-a's claim on
    "x/app" then makes "x" as a parent. The stale record must not come back to life around
    team-a's directory (found by tests/unit/test_interleavings.py)."""
    write_fault_rules(rules, [FaultRule(op="mkdir", match="^x$")])
    with pytest.raises(StorageError):
        run(provision(storage, parse_relative("x"), DirOwner(), OTHER))
    assert records(mount) == ["intents/pvc-2.json", f"owners/dx/{RECORD}"]
    write_fault_rules(rules, [])
    run(provision(storage, parse_relative("x/app"), DirOwner(), OWNER))
    assert tree_of(mount) == ["x", "x/app"]
    assert records(mount) == [
        "intents/pvc-1.json",
        "intents/pvc-2.json",
        f"owners/dx/dapp/{RECORD}",
    ]
    found = run(storage.inspect(parse_relative("x")))
    assert found.leaf_owner is None
    assert [(path, owner.namespace) for path, owner in found.owners_below] == [("x/app", "team-a")]


def test_create_dir_refuses_a_directory_that_appeared_and_changes_nothing(
    storage: Storage, mount: Path
) -> None:
    rel = parse_relative("team-a/app")
    assert not run(storage.inspect(rel)).exists
    (mount / "team-a" / "app").mkdir(parents=True)
    (mount / "team-a" / "app" / "f").write_text("someone else's")
    before = snapshot(mount.parent)
    with pytest.raises(StorageError) as caught:
        run(storage.create_dir(rel, DirOwner(), OWNER, intent_for(str(rel))))
    assert caught.value.cause == "the directory appeared while it was being created"
    assert caught.value.hint == "the next attempt decides again whether it may be reused"
    assert snapshot(mount.parent) == before


class OtherClusterRace(LocalSyscalls):
    """Another cluster sharing the export makes ``shared/app`` for its own claim (owner record
    first, then mkdir, as create_dir does) just before this one's record replaces the file."""

    def __init__(self, mount: Path) -> None:
        self.mount = mount
        self.raced = False

    def rename(
        self, parent: int, src: str, dst_parent: int, dst: str, where: str, replace: bool
    ) -> None:
        if where.endswith(f"dshared/dapp/{RECORD}") and not self.raced:
            self.raced = True
            write_record(self.mount, "shared/app", OTHER_CLUSTER)
            (self.mount / "shared" / "app").mkdir(parents=True)
        super().rename(parent, src, dst_parent, dst, where, replace)


OTHER_CLUSTER = Owner(cluster="c2", namespace="team-b", provisioner="nfs", volume="pvc-9")


def test_create_dir_that_loses_a_race_leaves_the_winners_owner_record(mount: Path) -> None:
    """create_dir's docstring: "If the leaf exists by the time it is made, nothing is changed
    and the attempt fails (the next one re-inspects and decides again)". The owner record must
    then still name the cluster that made the directory, or the next inspection hands that
    tenant's directory to this one."""
    calls = OtherClusterRace(mount)
    store = Storage(mount, calls, timeout=SLOW_OK, max_threads=1)
    rel = parse_relative("shared/app")
    try:
        with pytest.raises(StorageError, match="appeared while it was being created"):
            run(store.create_dir(rel, DirOwner(), OWNER, intent_for(str(rel))))
        assert calls.raced
        assert run(store.inspect(rel)).leaf_owner == OTHER_CLUSTER
    finally:
        store.close()


class ChownRecorder(LocalSyscalls):
    """LocalSyscalls that records chown calls (and the directory each fd is) instead of making
    them, so the arguments can be checked without root."""

    def __init__(self) -> None:
        self.chowns: list[tuple[str, int, int]] = []

    def chown(self, fd: int, uid: int, gid: int, where: str) -> None:
        self.chowns.append((os.readlink(f"/proc/self/fd/{fd}"), uid, gid))


CHOWNS = [
    pytest.param(DirOwner(uid=1000, gid=2000), [(1000, 2000)], id="uid-and-gid"),
    pytest.param(DirOwner(uid=1000), [(1000, -1)], id="uid-only"),
    pytest.param(DirOwner(gid=2000), [(-1, 2000)], id="gid-only"),
    pytest.param(DirOwner(uid=0, gid=0), [(0, 0)], id="root-is-a-value-not-unset"),
    pytest.param(DirOwner(), [], id="neither"),
]


@pytest.mark.parametrize(("owner", "expected"), CHOWNS)
@pytest.mark.parametrize(
    "reuse", [pytest.param(False, id="create"), pytest.param(True, id="reuse")]
)
def test_the_leaf_is_chowned_through_its_descriptor_only_when_asked(
    mount: Path, owner: DirOwner, expected: list[tuple[int, int]], reuse: bool
) -> None:
    calls = ChownRecorder()
    store = Storage(mount, calls, timeout=SLOW_OK, max_threads=2)
    rel = parse_relative("ns/leaf")
    try:
        if reuse:
            (mount / "ns" / "leaf").mkdir(parents=True)
            run(store.reuse_dir(rel, owner, None))
        else:
            run(provision(store, rel, owner, OWNER))
    finally:
        store.close()
    leaf = os.path.realpath(mount / "ns" / "leaf")
    assert calls.chowns == [(leaf, uid, gid) for uid, gid in expected]


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a directory to another uid")
@pytest.mark.parametrize(
    ("owner", "uid", "gid"),
    [
        pytest.param(DirOwner(uid=1234, gid=5678), 1234, 5678, id="uid-and-gid"),
        pytest.param(DirOwner(uid=1234), 1234, 0, id="uid-only-keeps-gid"),
        pytest.param(DirOwner(gid=5678), 0, 5678, id="gid-only-keeps-uid"),
    ],
)
def test_create_dir_chowns_the_leaf_as_root(
    storage: Storage, mount: Path, owner: DirOwner, uid: int, gid: int
) -> None:
    run(provision(storage, parse_relative("ns/leaf"), owner, OWNER))
    info = os.stat(mount / "ns" / "leaf")
    assert (info.st_uid, info.st_gid) == (uid, gid)
    assert (os.stat(mount / "ns").st_uid, os.stat(mount / "ns").st_gid) == (0, 0), "leaf only"


# --- inspect ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Found:
    """A layout on the export for ``inspect`` and what it must report for ``team-a/app``."""

    dirs: tuple[str, ...]
    expected: Inspection
    owners: dict[str, Owner] = field(default_factory=dict)


INSPECTIONS = {
    "nothing": Found((), Inspection(0, 2)),
    "parent-only": Found(("team-a",), Inspection(1, 2)),
    "parent-with-record": Found(
        ("team-a",),
        Inspection(1, 2, owners_above=(("team-a", OTHER),)),
        {"team-a": OTHER},
    ),
    "records-of-levels-never-made-are-stale": Found(
        ("team-a",),
        Inspection(1, 2),
        {"team-a/app": OTHER, "team-a/app/x": OTHER},
    ),
    "stale-parent-record-without-the-parent": Found((), Inspection(0, 2), {"team-a": OTHER}),
    "unrecorded-leftover": Found(("team-a", "team-a/app"), Inspection(2, 2)),
    "recorded-leftover-with-records-inside": Found(
        ("team-a", "team-a/app", "team-a/app/x"),
        Inspection(
            2,
            2,
            leaf_owner=OWNER,
            owners_below=(("team-a/app/x", OTHER), ("team-a/app/x/y", OWNER)),
        ),
        {"team-a/app": OWNER, "team-a/app/x": OTHER, "team-a/app/x/y": OWNER, "team-a/b": OTHER},
    ),
}


@pytest.mark.parametrize("found", [pytest.param(f, id=name) for name, f in INSPECTIONS.items()])
def test_inspect(storage: Storage, mount: Path, found: Found) -> None:
    for path in found.dirs:
        (mount / path).mkdir()
    for path, owner in found.owners.items():
        if (mount / path).is_dir():
            run(storage.record_owner(parse_relative(path), owner))
        else:
            write_record(mount, path, owner)
    inspection = run(storage.inspect(parse_relative("team-a/app")))
    assert inspection.existing == found.expected.existing
    assert inspection.depth == found.expected.depth
    assert inspection.leaf_owner == found.expected.leaf_owner
    assert inspection.owners_above == found.expected.owners_above
    assert sorted(inspection.owners_below) == sorted(found.expected.owners_below)


def test_inspect_reports_an_unparsable_record_as_unreadable(storage: Storage, mount: Path) -> None:
    (mount / "team-a").mkdir()
    run(storage.record_owner(parse_relative("team-a"), OWNER))
    (mount / JOURNAL_DIR / "owners" / "dteam-a" / RECORD).write_text("{garbage")
    assert run(storage.inspect(parse_relative("team-a"))).leaf_owner == UNREADABLE


@pytest.mark.parametrize(
    "link",
    [pytest.param("team-a", id="parent"), pytest.param("team-a/app", id="leaf")],
)
def test_inspect_refuses_a_symlink_on_the_path(
    storage: Storage, mount: Path, outside: Path, observed: Observed, link: str
) -> None:
    if link == "team-a/app":
        (mount / "team-a").mkdir()
    (mount / link).symlink_to(outside)
    before = snapshot(mount.parent)
    with pytest.raises(Redirected) as caught:
        run(storage.inspect(parse_relative("team-a/app")))
    assert (caught.value.where, caught.value.what) == (link, SYMLINK)
    assert snapshot(mount.parent) == before
    assert observed.calls == [("inspect", "error")]


# --- reuse, record, discard -------------------------------------------------------------------


def test_reuse_dir_keeps_the_data_and_applies_the_mode(storage: Storage, mount: Path) -> None:
    (mount / "team-a" / "app").mkdir(parents=True, mode=0o700)
    (mount / "team-a" / "app" / "db").write_text("rows")
    os.chmod(mount / "team-a" / "app", 0o700)
    run(storage.reuse_dir(parse_relative("team-a/app"), DirOwner(mode=0o770), None))
    assert (mount / "team-a" / "app" / "db").read_text() == "rows"
    assert mode_of(mount / "team-a" / "app") == 0o770
    assert journal_files(mount) == [], "nothing adopted, nothing recorded"


def test_reuse_dir_adopts_an_unrecorded_directory(storage: Storage, mount: Path) -> None:
    (mount / "team-a" / "app").mkdir(parents=True)
    run(storage.reuse_dir(parse_relative("team-a/app"), DirOwner(), OWNER))
    assert records(mount) == [f"owners/dteam-a/dapp/{RECORD}"]
    assert run(storage.inspect(parse_relative("team-a/app"))).leaf_owner == OWNER


@pytest.mark.parametrize("operation", ["reuse_dir", "record_owner"])
def test_reuse_and_record_need_the_directory(storage: Storage, mount: Path, operation: str) -> None:
    (mount / "team-a").mkdir()
    rel = parse_relative("team-a/gone")
    with pytest.raises(StorageError) as caught:
        if operation == "reuse_dir":
            run(storage.reuse_dir(rel, DirOwner(), OWNER))
        else:
            run(storage.record_owner(rel, OWNER))
    assert caught.value.op == operation
    assert "(ENOENT)" in caught.value.cause
    assert journal_files(mount) == []


@pytest.mark.parametrize("operation", ["reuse_dir", "record_owner", "discard_created_dir"])
@pytest.mark.parametrize(
    "link", [pytest.param("ns", id="parent"), pytest.param("ns/app", id="leaf")]
)
def test_reuse_record_and_discard_refuse_a_symlink(
    storage: Storage, mount: Path, outside: Path, operation: str, link: str
) -> None:
    (outside / "app").mkdir()
    if link == "ns/app":
        (mount / "ns").mkdir()
    (mount / link).symlink_to(outside / "app" if link == "ns/app" else outside)
    before = snapshot(mount.parent)
    rel = parse_relative("ns/app")
    with pytest.raises(Redirected):
        if operation == "reuse_dir":
            run(storage.reuse_dir(rel, DirOwner(mode=0o700), OWNER))
        elif operation == "record_owner":
            run(storage.record_owner(rel, OWNER))
        else:
            run(storage.discard_created_dir(rel, "pvc-1"))
    assert snapshot(mount.parent) == before


def test_record_owner_hands_a_directory_over(storage: Storage, mount: Path) -> None:
    (mount / "shared" / "app").mkdir(parents=True)
    run(storage.record_owner(parse_relative("shared/app"), OWNER))
    run(storage.record_owner(parse_relative("shared/app"), OTHER))
    assert run(storage.inspect(parse_relative("shared/app"))).leaf_owner == OTHER


def test_discard_created_dir_removes_the_empty_leaf_its_records_and_intent(
    storage: Storage, mount: Path
) -> None:
    (mount / "team-a").mkdir()
    run(storage.record_owner(parse_relative("team-a"), OWNER))
    rel = parse_relative("team-a/app")
    run(provision(storage, rel, DirOwner(), OWNER))
    assert run(storage.discard_created_dir(rel, "pvc-1")) == "removed"
    assert tree_of(mount) == ["team-a"]
    assert records(mount) == [f"owners/dteam-a/{RECORD}"], "the parent's record stays"


def test_discard_created_dir_keeps_a_directory_with_data(storage: Storage, mount: Path) -> None:
    rel = parse_relative("team-a/app")
    run(provision(storage, rel, DirOwner(), OWNER))
    (mount / "team-a" / "app" / "written").write_text("a pod was quick")
    assert run(storage.discard_created_dir(rel, "pvc-1")) == "kept"
    assert tree_of(mount) == ["team-a", "team-a/app", "team-a/app/written"]
    assert "intents/pvc-1.json" not in records(mount)
    assert run(storage.inspect(rel)).leaf_owner == OWNER, "a kept leftover keeps its owner"


class CrashAtMkdir(LocalSyscalls):
    """Fails the mkdir of exactly ``where``, as a provisioner killed right there would."""

    def __init__(self, where: str) -> None:
        self.where = where

    def mkdir(self, parent: int, name: str, where: str) -> None:
        if where == self.where:
            raise OSError(errno.EIO, "killed", where)
        super().mkdir(parent, name, where)


@pytest.mark.parametrize(
    ("crash_at", "left"),
    [
        pytest.param("team-a/app", ["team-a"], id="crash-before-the-leaf-mkdir"),
        pytest.param("team-a", [], id="crash-before-any-mkdir"),
    ],
)
def test_discard_created_dir_of_a_directory_never_made_drops_its_records(
    mount: Path, crash_at: str, left: list[str]
) -> None:
    """A crash between the records and the mkdir is what the crash-safe order makes likely: the
    sweep then discards a directory that never existed. Nothing held data, so the answer is
    True (the docstring: False only "if it held anything"), and no owner record of the missing
    directory may stay behind to be mistaken for a tenant's later on."""
    rel = parse_relative("team-a/app")
    store = Storage(mount, CrashAtMkdir(crash_at), timeout=SLOW_OK, max_threads=1)
    try:
        with pytest.raises(StorageError):
            run(store.create_dir(rel, DirOwner(), OWNER, intent_for(str(rel))))
        assert tree_of(mount) == left
        assert records(mount) == ["intents/pvc-1.json", f"owners/dteam-a/dapp/{RECORD}"]
        assert run(store.discard_created_dir(rel, "pvc-1")) == "missing"
    finally:
        store.close()
    assert tree_of(mount) == left
    assert records(mount) == []


# --- remove -----------------------------------------------------------------------------------


def test_remove_dir_removes_only_the_leaf_and_its_records(
    storage: Storage, mount: Path, outside: Path
) -> None:
    for rel in ("ns/app", "ns/sibling"):
        run(provision(storage, parse_relative(rel), DirOwner(), OWNER))
    (mount / "ns" / "app" / "deep").mkdir()
    (mount / "ns" / "app" / "deep" / "f").write_text("x")
    (mount / "ns" / "app" / "escape").symlink_to(outside)
    (mount / "ns" / "app" / "deep" / "marker").symlink_to(outside / "marker")
    assert run(storage.remove_dir("ns/app")) is True
    assert tree_of(mount) == ["ns", "ns/sibling"]
    assert not any("dapp" in path for path in records(mount))
    assert any("dsibling" in path for path in records(mount))
    assert (outside / "marker").read_text() == MARKER


@pytest.mark.parametrize(
    "rel", [pytest.param("ns/gone", id="leaf-missing"), pytest.param("gone/x", id="parent-missing")]
)
def test_missing_directories_are_not_an_error(storage: Storage, mount: Path, rel: str) -> None:
    (mount / "ns").mkdir()
    assert run(storage.remove_dir(rel)) is False
    assert run(storage.archive_dir(rel)) is None
    assert tree_of(mount) == ["ns"]


@pytest.mark.parametrize(
    "rel",
    [
        pytest.param("..", id="dotdot"),
        pytest.param("a/../..", id="traversal"),
        pytest.param("", id="empty-is-the-root"),
        pytest.param(".", id="dot-is-the-root"),
        pytest.param("/etc", id="absolute"),
        pytest.param("a//b", id="empty-component"),
        pytest.param("a/\x00", id="nul"),
        pytest.param(JOURNAL_DIR, id="the-records"),
        pytest.param(f"{JOURNAL_DIR}/owners", id="inside-the-records"),
    ],
)
@pytest.mark.parametrize("operation", ["remove_dir", "archive_dir"])
def test_destructive_calls_refuse_unsafe_recorded_paths(
    storage: Storage, mount: Path, observed: Observed, rel: str, operation: str
) -> None:
    (mount / "a" / "b").mkdir(parents=True)
    run(storage.record_owner(parse_relative("a"), OWNER))
    before = snapshot(mount.parent)
    jobs = list(observed.calls)
    act = storage.remove_dir if operation == "remove_dir" else storage.archive_dir
    with pytest.raises(UnsafePathError):
        run(act(rel))
    assert snapshot(mount.parent) == before
    assert observed.calls == jobs, "refused before any filesystem job"


@pytest.mark.parametrize(
    ("link", "target"),
    [
        pytest.param("escape", "outside", id="leaf-to-outside"),
        pytest.param("self", ".", id="leaf-to-the-root"),
        pytest.param("ns-link", "ns", id="leaf-to-a-sibling-volume"),
        pytest.param("dangling", "nowhere", id="leaf-dangling"),
        pytest.param("loop", "loop", id="leaf-loop"),
    ],
)
@pytest.mark.parametrize(
    "nested", [pytest.param(False, id="leaf"), pytest.param(True, id="parent")]
)
@pytest.mark.parametrize("operation", ["remove_dir", "archive_dir"])
def test_destructive_calls_refuse_a_symlinked_path(
    storage: Storage,
    mount: Path,
    outside: Path,
    link: str,
    target: str,
    nested: bool,
    operation: str,
) -> None:
    (mount / "ns" / "app").mkdir(parents=True)
    (outside / "app").mkdir()
    (mount / link).symlink_to(outside if target == "outside" else target)
    before = snapshot(mount.parent)
    act = storage.remove_dir if operation == "remove_dir" else storage.archive_dir
    with pytest.raises(Redirected) as caught:
        run(act(f"{link}/app" if nested else link))
    assert (caught.value.where, caught.value.what) == (link, SYMLINK)
    assert snapshot(mount.parent) == before


# --- archive ----------------------------------------------------------------------------------


def test_archive_dir_renames_in_the_same_parent_and_records_follow(
    storage: Storage, mount: Path
) -> None:
    run(provision(storage, parse_relative("ns/app"), DirOwner(), OWNER))
    (mount / "ns" / "app" / "f").write_text("data")
    inode = os.stat(mount / "ns" / "app").st_ino
    archived = run(storage.archive_dir(parse_relative("ns/app")))
    assert archived == RelativeDir(("ns", "archived-app"))
    assert tree_of(mount) == ["ns", "ns/archived-app", "ns/archived-app/f"]
    assert os.stat(mount / "ns" / "archived-app").st_ino == inode
    assert run(storage.inspect(parse_relative("ns/archived-app"))).leaf_owner == OWNER
    assert not (mount / JOURNAL_DIR / "owners" / "dns" / "dapp").exists()


@pytest.mark.parametrize(
    "taken_by",
    [
        pytest.param("archive", id="non-empty-archive"),
        # rename(2) would silently replace an empty target directory: it must not happen either.
        pytest.param("empty", id="empty-archive"),
        pytest.param("file", id="a-file"),
        pytest.param("link", id="a-symlink-to-outside"),
        pytest.param("dangling", id="a-dangling-symlink"),
    ],
)
def test_archive_dir_never_overwrites_what_has_the_archive_name(
    storage: Storage, mount: Path, outside: Path, taken_by: str
) -> None:
    first = mount / "archived-app"
    if taken_by == "archive":
        first.mkdir()
        (first / "f").write_text("first")
    elif taken_by == "empty":
        first.mkdir()
    elif taken_by == "file":
        first.write_text("a file")
    elif taken_by == "link":
        first.symlink_to(outside)
    else:
        first.symlink_to("nowhere")
    (mount / "app").mkdir()
    (mount / "app" / "f").write_text("second")
    before = snapshot(mount.parent)
    assert run(storage.archive_dir("app")) == RelativeDir(("archived-app-2",))
    after = snapshot(mount.parent)
    moved = {"export/app", "export/app/f", "export/archived-app-2", "export/archived-app-2/f"}
    assert {k: v for k, v in after.items() if k not in moved} == {
        k: v for k, v in before.items() if k not in moved
    }
    assert (mount / "archived-app-2" / "f").read_text() == "second"


def test_archive_dir_counts_up_past_every_taken_name(storage: Storage, mount: Path) -> None:
    for name in ("archived-app", "archived-app-2", "archived-app-3"):
        (mount / name).mkdir()
    (mount / "app").mkdir()
    assert run(storage.archive_dir("app")) == RelativeDir(("archived-app-4",))


class _Killed(BaseException):
    """Stands for SIGKILL: the job stops where it is; nothing after it runs."""


class KilledAtDirRename(LocalSyscalls):
    """Dies at the rename of the directory ``where`` itself (its records' rename goes through)."""

    def __init__(self, where: str) -> None:
        self.where = where

    def rename(
        self, parent: int, src: str, dst_parent: int, dst: str, where: str, replace: bool
    ) -> None:
        if where == self.where:
            raise _Killed(where)
        super().rename(parent, src, dst_parent, dst, where, replace)


@pytest.mark.parametrize(
    ("killed_at", "left"),
    [
        pytest.param("ns/app", ["ns", "ns/app", "ns/app/f"], id="at-the-directory-rename"),
        pytest.param(
            f"{JOURNAL_DIR}/owners/dns/dapp",
            ["ns", "ns/archived-app", "ns/archived-app/f"],
            id="at-the-records-move",
        ),
    ],
)
def test_an_archive_killed_halfway_is_finished_by_the_retry(
    storage: Storage, mount: Path, killed_at: str, left: list[str]
) -> None:
    rel = parse_relative("ns/app")
    run(provision(storage, rel, DirOwner(), OWNER))
    (mount / "ns" / "app" / "f").write_text("data")
    dying = Storage(mount, KilledAtDirRename(killed_at), timeout=SLOW_OK, max_threads=1)
    try:
        with pytest.raises(_Killed):
            run(dying.archive_dir(rel, OWNER.volume))
    finally:
        dying.close()
    assert tree_of(mount) == left
    pending = mount / JOURNAL_DIR / "operations" / f"{OWNER.volume}.json"
    assert json.loads(pending.read_text())["target"] == "ns/archived-app"
    # Meanwhile nobody may use either path: directory and records disagree.
    for path in ("ns/app", "ns/archived-app", "ns/archived-app/sub"):
        assert run(storage.inspect(parse_relative(path))).operations, path
    assert run(storage.archive_dir(rel, OWNER.volume)) == RelativeDir(("ns", "archived-app"))
    assert tree_of(mount) == ["ns", "ns/archived-app", "ns/archived-app/f"]
    assert run(storage.inspect(parse_relative("ns/archived-app"))).leaf_owner == OWNER
    assert run(storage.inspect(rel)).leaf_owner is None
    assert [name for name in journal_files(mount) if "/owners/" in name or "/op" in name] == [
        f"{JOURNAL_DIR}/owners/dns/darchived-app/{RECORD}"
    ]


def test_a_record_without_a_directory_at_the_archive_name_is_never_replaced(
    storage: Storage, mount: Path
) -> None:
    """Only the holder of the reservation that covers a record may judge it stale: a release
    picking an archive name skips a name that has records, whatever they look like."""
    rel = parse_relative("ns/app")
    run(provision(storage, rel, DirOwner(), OWNER))
    (mount / "ns" / "archived-app").mkdir()
    run(storage.record_owner(parse_relative("ns/archived-app"), OTHER_VOLUME))
    (mount / "ns" / "archived-app").rmdir()
    assert run(storage.archive_dir(rel, OWNER.volume)) == RelativeDir(("ns", "archived-app-2"))
    assert run(storage.inspect(parse_relative("ns/archived-app-2"))).leaf_owner == OWNER
    kept = mount / JOURNAL_DIR / "owners" / "dns" / "darchived-app" / RECORD
    assert json.loads(kept.read_text())["volume"] == OTHER_VOLUME.volume


class RacingSyscalls(LocalSyscalls):
    """Creates the archive's target just before the first ``races`` no-replace renames, as if
    another process took the name between the check and the rename."""

    def __init__(self, races: int) -> None:
        self.races = races

    def rename(
        self, parent: int, src: str, dst_parent: int, dst: str, where: str, replace: bool
    ) -> None:
        if not replace and self.races > 0:
            self.races -= 1
            os.mkdir(dst, dir_fd=dst_parent)
        super().rename(parent, src, dst_parent, dst, where, replace)


def test_archive_dir_picks_the_next_name_when_it_loses_a_race(mount: Path) -> None:
    (mount / "app").mkdir()
    (mount / "app" / "f").write_text("data")
    calls = RacingSyscalls(races=1)
    store = Storage(mount, calls, timeout=SLOW_OK, max_threads=1)
    try:
        assert run(store.archive_dir("app")) == RelativeDir(("archived-app-2",))
    finally:
        store.close()
    assert calls.races == 0
    assert tree_of(mount) == ["archived-app", "archived-app-2", "archived-app-2/f"]


def test_archive_dir_gives_up_when_every_name_is_taken_in_a_race(mount: Path) -> None:
    (mount / "app").mkdir()
    store = Storage(mount, RacingSyscalls(races=100), timeout=SLOW_OK, max_threads=1)
    try:
        with pytest.raises(StorageError) as caught:
            run(store.archive_dir("app"))
    finally:
        store.close()
    assert caught.value.cause == ("every free archive name was taken before the rename, 5 times")
    assert "app" in tree_of(mount), "the directory itself is left where it was"


# --- errors and timeouts ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "hint"),
    [
        pytest.param("EACCES", ROOT_SQUASH_HINT, id="EACCES-root-squash"),
        pytest.param("EPERM", ROOT_SQUASH_HINT, id="EPERM-root-squash"),
        pytest.param("ENOSPC", "the export is full", id="ENOSPC"),
        pytest.param("EDQUOT", "the export's quota is exhausted", id="EDQUOT"),
        pytest.param("EROFS", "the export is mounted read-only", id="EROFS"),
        pytest.param("ESTALE", "stale NFS file handle: remount the export", id="ESTALE"),
        pytest.param(
            "EIO", "I/O error from the NFS mount: check the NFS server and the network", id="EIO"
        ),
        pytest.param("EBUSY", "", id="no-hint-for-the-rest"),
    ],
)
def test_filesystem_errors_become_storage_errors_with_a_hint(
    storage: Storage, mount: Path, rules: Path, code: str, hint: str
) -> None:
    (mount / "ns-app" / "inner").mkdir(parents=True)
    write_fault_rules(rules, [FaultRule(op="rmdir", match="ns-app/inner", errno=code)])
    with pytest.raises(StorageError) as caught:
        run(storage.remove_dir("ns-app"))
    error = caught.value
    assert not isinstance(error, StorageTimeout)
    assert (error.op, error.path) == ("remove_dir", mount / "ns-app")
    assert error.hint == hint
    assert f"({code})" in error.cause
    assert 'on "ns-app/inner"' in error.cause, "the entry the call failed on is named"
    assert str(error).startswith(f'remove_dir "{mount / "ns-app"}" failed: ')
    assert str(error).endswith(f". {error.hint}" if hint else ".")
    assert (mount / "ns-app").is_dir()


def test_an_etimedout_from_nfs_is_an_error_not_our_timeout(
    storage: Storage, rules: Path, observed: Observed
) -> None:
    # OSError(ETIMEDOUT) is Python's TimeoutError, the same class asyncio.wait_for raises.
    write_fault_rules(rules, [FaultRule(op="mkdir", match="slow", errno="ETIMEDOUT")])
    with pytest.raises(StorageError) as caught:
        run(provision(storage, parse_relative("slow"), DirOwner(), OWNER))
    assert not isinstance(caught.value, StorageTimeout)
    assert "(ETIMEDOUT)" in caught.value.cause
    assert observed.calls == [("inspect", "ok"), ("create_dir", "error")]


def test_a_hung_call_times_out_while_other_calls_go_on(
    hasty: Storage, mount: Path, rules: Path, observed: Observed
) -> None:
    write_fault_rules(rules, [FaultRule(op="mkdir", match="stuck", effect="hang")])

    async def both() -> tuple[object, object]:
        return await asyncio.gather(
            hasty.create_dir(parse_relative("stuck"), DirOwner(), OWNER, intent_for("stuck")),
            hasty.remove_dir("fine"),
            return_exceptions=True,
        )

    (mount / "fine").mkdir()
    hung, fine = run(both())
    assert fine is True
    assert not (mount / "fine").exists()
    assert isinstance(hung, StorageTimeout)
    assert str(hung) == (
        f'create_dir "{mount / "stuck"}" did not finish within {TIMEOUT:g} s; '
        "the NFS mount may be hung"
    )
    assert hung.hint == "the NFS mount may be hung: check the NFS server and the node's mount"
    assert sorted(observed.calls) == [("create_dir", "timeout"), ("remove_dir", "ok")]


def test_a_call_that_timed_out_in_the_queue_never_runs_late(mount: Path, rules: Path) -> None:
    # One thread, stuck: the second call waits in the queue, times out, and must not act later
    # (a directory appearing after its attempt was reported failed would confuse reconciling).
    write_fault_rules(rules, [FaultRule(op="mkdir", match="stuck", effect="hang")])
    store = faulty(mount, rules, TIMEOUT, threads=1)

    async def scenario() -> None:
        results = await asyncio.gather(
            store.create_dir(parse_relative("stuck"), DirOwner(), OWNER, intent_for("stuck")),
            store.create_dir(
                parse_relative("queued"), DirOwner(), OWNER, intent_for("queued", "pvc-2")
            ),
            return_exceptions=True,
        )
        assert all(isinstance(result, StorageTimeout) for result in results)
        write_fault_rules(rules, [])
        # Runs after the stuck call and after the queued one would have, on the same thread.
        await store.create_dir(
            parse_relative("after"), DirOwner(), OWNER, intent_for("after", "pvc-3")
        )

    try:
        run(scenario())
    finally:
        store.close()
    assert "queued" not in tree_of(mount)
    assert "after" in tree_of(mount)
    assert not any("queued" in record for record in records(mount)), "not even its records"


def test_a_job_that_timed_out_starts_nothing_after_its_stuck_call(mount: Path, rules: Path) -> None:
    """Storage's contract: a job stuck when its caller gives up "may still complete that one
    call (for example the mkdir it was blocked in) but starts nothing after it". Here the call
    that hangs is the intent's write, the first step of create_dir: the claim's directory must
    not appear once the attempt was reported failed (the next attempt re-inspects)."""
    write_fault_rules(rules, [FaultRule(op="write", match="intents/", effect="hang")])
    store = faulty(mount, rules, TIMEOUT, threads=1)

    async def scenario() -> None:
        with pytest.raises(StorageTimeout):
            await store.create_dir(
                parse_relative("late/leaf"), DirOwner(), OWNER, intent_for("late/leaf")
            )
        write_fault_rules(rules, [])
        # The one thread finishes the stuck job before it runs this one.
        await store.inspect(parse_relative("elsewhere"))

    try:
        run(scenario())
    finally:
        store.close()
    assert tree_of(mount) == [], "directories were made after the caller had given up"


def test_storage_threads_never_keep_the_process_from_exiting(tmp_path: Path) -> None:
    """A call stuck on a hung NFS mount must not block exit on SIGTERM: the pool's threads are
    daemons (ThreadPoolExecutor's are joined at exit)."""
    (tmp_path / "export").mkdir()
    script = textwrap.dedent(
        """
        import asyncio, sys, time
        from pathlib import Path
        from provisioner.paths import parse_relative
        from provisioner.safefs import LocalSyscalls
        from provisioner.storage import Storage, StorageTimeout

        class Hung(LocalSyscalls):
            def open(self, parent, name, flags, where):
                time.sleep(3600)

        async def main():
            storage = Storage(Path(sys.argv[1]), Hung(), timeout=0.1, max_threads=2)
            try:
                await storage.remove_dir(parse_relative("x"))
            except StorageTimeout:
                print("timed out", flush=True)

        asyncio.run(main())
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "export")],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "timed out\n", "")


def test_a_closed_storage_refuses_new_calls(mount: Path) -> None:
    store = Storage(mount, LocalSyscalls(), timeout=SLOW_OK, max_threads=1)
    store.close()
    store.close()  # twice is harmless
    with pytest.raises(RuntimeError, match="storage is closed"):
        run(store.remove_dir("x"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param({"timeout": 0}, "storage timeout 0 s must be positive", id="zero-timeout"),
        pytest.param({"timeout": -1.0}, "storage timeout -1.0 s", id="negative-timeout"),
        pytest.param({"max_threads": 0}, "max_threads 0 must be at least 1", id="no-threads"),
    ],
)
def test_storage_settings_are_checked(mount: Path, kwargs: dict[str, Any], message: str) -> None:
    settings: dict[str, Any] = {"timeout": 1.0, "max_threads": 1, **kwargs}
    with pytest.raises(ValueError, match=message):
        Storage(mount, LocalSyscalls(), **settings)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param({"mode": 0o10000}, "directory mode 0o10000 is outside", id="mode-too-big"),
        pytest.param({"mode": -1}, "directory mode -0o1 is outside", id="negative-mode"),
        pytest.param({"uid": -1}, "directory uid -1 must be >= 0", id="negative-uid"),
        pytest.param({"gid": -2}, "directory gid -2 must be >= 0", id="negative-gid"),
    ],
)
def test_dir_owner_values_are_checked(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DirOwner(**kwargs)


# --- check_writable ---------------------------------------------------------------------------


def test_check_writable_passes_and_leaves_no_probe(storage: Storage, mount: Path) -> None:
    run(storage.check_writable())
    assert os.listdir(mount) == []


def test_the_mount_path_itself_may_be_a_symlink(tmp_path: Path, mount: Path) -> None:
    """The mount path is the admin's (NFS_MOUNT_PATH), not a tenant's: it may be a link."""
    (tmp_path / "link").symlink_to(mount)
    (mount / "ns" / "app").mkdir(parents=True)
    store = Storage(tmp_path / "link", LocalSyscalls(), timeout=SLOW_OK, max_threads=1)
    try:
        run(store.check_writable())
        assert run(store.remove_dir("ns/app")) is True
    finally:
        store.close()
    assert tree_of(mount) == ["ns"]


@pytest.mark.parametrize(
    ("make", "cause"),
    [
        pytest.param(None, "the mount path does not exist", id="missing"),
        pytest.param("file", "the mount path is not a directory", id="a-file"),
        pytest.param("dangling", "the mount path is not a directory", id="a-dangling-symlink"),
    ],
)
def test_check_writable_names_a_bad_mount_path(
    tmp_path: Path, make: str | None, cause: str
) -> None:
    path = tmp_path / "mount"
    if make == "file":
        path.write_text("")
    elif make == "dangling":
        path.symlink_to(tmp_path / "nowhere")
    store = Storage(path, LocalSyscalls(), timeout=SLOW_OK, max_threads=1)
    try:
        with pytest.raises(StorageError) as caught:
            run(store.check_writable())
    finally:
        store.close()
    assert str(caught.value).startswith(f'check_writable "{path}" failed: {cause}. ')
    assert caught.value.hint == (
        "mount the NFS export there, or point the provisioner at the path it is on"
    )


def test_check_writable_explains_an_unwritable_export(
    storage: Storage, mount: Path, rules: Path
) -> None:
    write_fault_rules(rules, [FaultRule(op="open", match="-probe-", errno="EACCES")])
    with pytest.raises(StorageError) as caught:
        run(storage.check_writable())
    assert caught.value.path == mount
    assert caught.value.hint == ROOT_SQUASH_HINT
    assert os.listdir(mount) == []


@pytest.mark.parametrize("code", ["ENOSPC", "EDQUOT", "EIO"])
def test_check_writable_removes_its_probe_when_the_write_fails(
    storage: Storage, mount: Path, rules: Path, code: str
) -> None:
    """/readyz probes every 5 s: a full export must not collect a probe file each time."""
    write_fault_rules(rules, [FaultRule(op="write", match="-probe-", errno=code)])
    with pytest.raises(StorageError) as caught:
        run(storage.check_writable())
    assert f"({code})" in caught.value.cause
    assert os.listdir(mount) == []


# --- error messages and the fault seam --------------------------------------------------------


def test_storage_error_names_the_file_the_call_failed_on(tmp_path: Path) -> None:
    error = StorageError.from_os_error(
        "remove_dir", tmp_path / "ns", OSError(errno.EACCES, "Permission denied", "ns/a\nb")
    )
    assert error.cause == 'permission denied (EACCES) on "ns/a\\nb"'
    assert error.hint == ROOT_SQUASH_HINT
    same = StorageError.from_os_error(
        "remove_dir",
        tmp_path / "ns",
        OSError(errno.EACCES, "Permission denied", str(tmp_path / "ns")),
    )
    assert same.cause == "permission denied (EACCES)", "the operation's own path is not repeated"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param("{", "is not valid JSON", id="bad-json"),
        pytest.param('{"op": "mkdir"}', "must hold a JSON list", id="not-a-list"),
        pytest.param('[{"op": "mkdri"}]', 'op "mkdri" is not one of', id="unknown-op"),
        pytest.param('[{"op": "mkdir", "efect": "hang"}]', "unknown keys ['efect']", id="typo-key"),
        pytest.param('[{"op": "mkdir", "effect": "explode"}]', 'effect "explode"', id="bad-effect"),
        pytest.param('[{"op": "mkdir", "errno": "EWHAT"}]', 'errno "EWHAT"', id="bad-errno"),
        pytest.param('[{"op": 1}]', "must be an object of strings", id="not-strings"),
    ],
)
def test_fault_rules_file_errors_name_the_rule(tmp_path: Path, content: str, message: str) -> None:
    rules_file = tmp_path / "faults.json"
    rules_file.write_text(content)
    with pytest.raises(ValueError, match="fault rule") as caught:
        read_fault_rules(rules_file)
    assert message in str(caught.value)


def test_fault_rules_round_trip_and_missing_file_means_none(tmp_path: Path) -> None:
    rules_file = tmp_path / "faults.json"
    assert read_fault_rules(rules_file) == []
    rules = [FaultRule(op="rename", match="ns/", effect="hang"), FaultRule(op="chown")]
    write_fault_rules(rules_file, rules)
    assert read_fault_rules(rules_file) == rules


@pytest.mark.parametrize(
    ("rule", "name", "fails"),
    [
        pytest.param(FaultRule(op="mkdir", match="a"), "xay", True, id="substring-matches"),
        pytest.param(FaultRule(op="mkdir", match="b"), "xay", False, id="other-path"),
        pytest.param(FaultRule(op="chmod", match="a"), "xay", False, id="other-op"),
        pytest.param(FaultRule(op="mkdir"), "xay", True, id="empty-match-is-every-path"),
    ],
)
def test_fault_rules_match_op_and_path_substring(
    tmp_path: Path, rule: FaultRule, name: str, fails: bool
) -> None:
    rules_file = tmp_path / "faults.json"
    write_fault_rules(rules_file, [rule])
    calls = FaultInjectingSyscalls(rules_file)
    parent = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if fails:
            with pytest.raises(OSError) as caught:
                calls.mkdir(parent, name, name)
            assert caught.value.errno == errno.EIO
            assert not (tmp_path / name).exists()
        else:
            calls.mkdir(parent, name, name)
            assert (tmp_path / name).is_dir()
    finally:
        os.close(parent)


def test_an_archive_an_older_version_left_halfway_keeps_its_records(
    storage: Storage, mount: Path
) -> None:
    """The version before operation records moved the records to the archive name first and
    the directory second: killed in between, its records wait at ``archived-app`` with no
    directory there. The retry by this version finishes at that name, records kept."""
    rel = parse_relative("ns/app")
    run(provision(storage, rel, DirOwner(), OWNER))
    (mount / "ns" / "app" / "f").write_text("data")
    owners = mount / JOURNAL_DIR / "owners" / "dns"
    (owners / "dapp").rename(owners / "darchived-app")  # what the older version did first
    assert run(storage.archive_dir(rel, OWNER.volume)) == RelativeDir(("ns", "archived-app"))
    assert tree_of(mount) == ["ns", "ns/archived-app", "ns/archived-app/f"]
    assert run(storage.inspect(parse_relative("ns/archived-app"))).leaf_owner == OWNER
