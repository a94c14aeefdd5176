"""Unit tests for provisioner.exportlocks and Storage.reserve: reservations across writers.

SPEC §4: a writer of the export (another cluster, another provisioner name, the ``handover``
command) holds the lock of a path's first component, ``.nfs-provisioner/locks/<mirror>``, made
by an exclusive create, renewed while held and broken once expired. Every test runs on a real
export in tmp_path with the real ``safefs.LocalSyscalls``; two writers are two ``Storage``
objects on the same directory. Lock files are checked on disk as an admin would find them.

Times given to ``try_create``/``live`` are explicit, so no test depends on the clock; the tests
of the renewal task use a small ttl and poll with a generous deadline.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import AsyncExitStack
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, TypeVar

import pytest

from provisioner.exportlocks import (
    LOCKS,
    ExportLocks,
    LockRecord,
    Writer,
    live,
    lock_name,
    release,
    remove_left_by,
    renew,
    try_create,
)
from provisioner.journal import SCRATCH
from provisioner.paths import JOURNAL_DIR, parse_relative
from provisioner.reservations import Busy
from provisioner.safefs import LocalSyscalls, Tree
from provisioner.storage import Storage

_T = TypeVar("_T")
TTL = 10.0
NOW = 1_800_000_000.0
"""A fixed "now" for the functions that take one: far from the real clock on purpose."""
SLOW_OK = 30.0
SHORT_TTL = 0.4
"""For the renewal tests: renewed every 0.1 s."""
DEADLINE = 10.0
A = Writer("c1", "p1", "host-a/1/aaaa")
B = Writer("c2", "p1", "host-b/2/bbbb")


def run(coroutine: Coroutine[Any, Any, _T]) -> _T:
    return asyncio.run(coroutine)


def later() -> float:
    """An expiry an hour from the real clock, for records a ``Storage`` (which reads the clock)
    must find live."""
    return time.time() + 3600


def record(writer: Writer, component: str, expires: float) -> LockRecord:
    return LockRecord(writer.cluster, writer.provisioner, writer.instance, component, expires)


@pytest.fixture
def fresh(tmp_path: Path) -> Path:
    """An export nothing was ever written to."""
    root = tmp_path / "fresh"
    root.mkdir()
    return root


@pytest.fixture
def export(tmp_path: Path) -> Path:
    """An export in use: the journal's scratch directory exists (every record write makes it)."""
    root = tmp_path / "export"
    root.joinpath(*SCRATCH).mkdir(parents=True)
    return root


@pytest.fixture
def tree(export: Path) -> Iterator[Tree]:
    with Tree(export, LocalSyscalls()) as opened:
        yield opened


@pytest.fixture
def storages(export: Path) -> Iterator[Callable[..., Storage]]:
    made: list[Storage] = []

    def make(writer: Writer, **kw: Any) -> Storage:
        store = Storage(export, LocalSyscalls(), timeout=SLOW_OK, writer=writer, **kw)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


def lock_file(export: Path, component: str) -> Path:
    return export.joinpath(*LOCKS, lock_name(component))


def on_disk(export: Path, component: str) -> LockRecord | None:
    """The record in the lock file, None if there is no lock file."""
    path = lock_file(export, component)
    if not path.exists():
        return None
    return LockRecord(**json.loads(path.read_bytes()))


def lock_dir(export: Path) -> list[str]:
    return sorted(os.listdir(export.joinpath(*LOCKS)))


def scratch_files(export: Path) -> list[str]:
    return sorted(os.listdir(export.joinpath(*SCRATCH)))


def plant(export: Path, component: str, content: bytes, modified: float) -> Path:
    """A lock file as a writer killed mid-way (or an admin) left it, with its mtime."""
    path = lock_file(export, component)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    os.utime(path, (modified, modified))
    return path


async def eventually(check: Callable[[], bool], what: str) -> None:
    """Poll ``check`` until it holds; fail after ``DEADLINE`` seconds (a slow machine's margin,
    not a timing claim)."""
    deadline = time.monotonic() + DEADLINE
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"never happened: {what}")
        await asyncio.sleep(0.01)


async def background_tasks_done() -> None:
    mine = asyncio.current_task()
    await eventually(
        lambda: all(task.done() for task in asyncio.all_tasks() if task is not mine),
        "the renewal task ended",
    )


# --- live ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expires", "modified", "expected"),
    [
        pytest.param(NOW + 1, 0.0, True, id="record-not-expired"),
        pytest.param(NOW, NOW, False, id="record-expires-now"),
        pytest.param(NOW - 1, NOW, False, id="record-expired-mtime-is-ignored"),
    ],
)
def test_live_judges_a_record_by_its_expiry(
    expires: float, modified: float, expected: bool
) -> None:
    assert live(record(A, "x", expires), modified, NOW, TTL) is expected


@pytest.mark.parametrize(
    ("modified", "expected"),
    [
        pytest.param(NOW, True, id="just-created"),
        pytest.param(NOW - TTL + 1, True, id="younger-than-ttl"),
        pytest.param(NOW - TTL, False, id="exactly-ttl-old"),
        pytest.param(NOW - TTL - 1, False, id="older-than-ttl"),
    ],
)
def test_live_judges_a_lock_without_a_record_by_its_mtime(modified: float, expected: bool) -> None:
    assert live(None, modified, NOW, TTL) is expected


# --- one lock file, two writers ------------------------------------------------------------------


def test_try_create_makes_the_locks_directory_on_a_fresh_export(fresh: Path) -> None:
    with Tree(fresh, LocalSyscalls()) as tree:
        assert try_create(tree, record(A, "shared", NOW + TTL), TTL, NOW) is None
    assert on_disk(fresh, "shared") == record(A, "shared", NOW + TTL)
    assert lock_dir(fresh) == [lock_name("shared")]


def test_a_second_writer_is_given_the_holders_record(tree: Tree, export: Path) -> None:
    mine = record(A, "shared", NOW + TTL)
    assert try_create(tree, mine, TTL, NOW) is None
    content = lock_file(export, "shared").read_bytes()
    assert try_create(tree, record(B, "shared", NOW + TTL), TTL, NOW) == mine
    assert try_create(tree, record(B, "shared", NOW + TTL), TTL, NOW + TTL - 1) == mine
    assert lock_file(export, "shared").read_bytes() == content
    assert lock_dir(export) == [lock_name("shared")]


def test_another_component_is_another_lock(tree: Tree, export: Path) -> None:
    assert try_create(tree, record(A, "team-a", NOW + TTL), TTL, NOW) is None
    assert try_create(tree, record(B, "team-b", NOW + TTL), TTL, NOW) is None
    assert on_disk(export, "team-a") == record(A, "team-a", NOW + TTL)
    assert on_disk(export, "team-b") == record(B, "team-b", NOW + TTL)


def test_after_release_another_writer_takes_the_lock(tree: Tree, export: Path) -> None:
    assert try_create(tree, record(A, "shared", NOW + TTL), TTL, NOW) is None
    release(tree, "shared", A.instance)
    assert on_disk(export, "shared") is None
    assert try_create(tree, record(B, "shared", NOW + TTL), TTL, NOW) is None
    assert on_disk(export, "shared") == record(B, "shared", NOW + TTL)


def test_release_by_another_writer_leaves_the_lock(tree: Tree, export: Path) -> None:
    assert try_create(tree, record(A, "shared", NOW + TTL), TTL, NOW) is None
    content = lock_file(export, "shared").read_bytes()
    release(tree, "shared", B.instance)
    # Same cluster and provisioner, another instance: still not the holder.
    release(tree, "shared", "host-a/1/other")
    assert lock_file(export, "shared").read_bytes() == content
    release(tree, "missing", A.instance)  # no lock: nothing to do, no error
    assert lock_dir(export) == [lock_name("shared")]


def test_release_leaves_a_lock_being_written(tree: Tree, export: Path) -> None:
    path = plant(export, "shared", b"", NOW)
    release(tree, "shared", A.instance)
    assert path.exists()


def test_an_expired_lock_is_broken_and_taken(tree: Tree, export: Path) -> None:
    assert try_create(tree, record(A, "shared", NOW - 1), TTL, NOW - 100) is None
    assert try_create(tree, record(B, "shared", NOW + TTL), TTL, NOW) is None
    assert on_disk(export, "shared") == record(B, "shared", NOW + TTL)
    # The expired lock was renamed aside and that file removed: only the new lock is left.
    assert lock_dir(export) == [lock_name("shared")]


def test_a_lock_that_expires_right_now_is_broken(tree: Tree, export: Path) -> None:
    assert try_create(tree, record(A, "shared", NOW), TTL, NOW - 100) is None
    assert try_create(tree, record(B, "shared", NOW + TTL), TTL, NOW) is None
    assert on_disk(export, "shared") == record(B, "shared", NOW + TTL)


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b'{"cluster": "c9", "provis', id="partial"),
        pytest.param(b'{"cluster": "c9"}\n', id="fields-missing"),
    ],
)
def test_a_lock_without_a_record_counts_by_its_mtime_until_ttl(
    tree: Tree, export: Path, content: bytes
) -> None:
    """A writer killed between the exclusive create and the write leaves such a file."""
    path = plant(export, "shared", content, NOW - TTL + 1)
    holder = try_create(tree, record(B, "shared", NOW + TTL), TTL, NOW)
    assert holder is not None
    assert (holder.cluster, holder.provisioner) == ("", "")
    assert "writing its lock" in holder.instance
    assert path.read_bytes() == content
    os.utime(path, (NOW - TTL - 1, NOW - TTL - 1))
    assert try_create(tree, record(B, "shared", NOW + TTL), TTL, NOW) is None
    assert on_disk(export, "shared") == record(B, "shared", NOW + TTL)
    assert lock_dir(export) == [lock_name("shared")]


def test_renew_rewrites_our_lock_with_a_later_expiry(tree: Tree, export: Path) -> None:
    assert try_create(tree, record(A, "shared", NOW + TTL), TTL, NOW) is None
    assert renew(tree, record(A, "shared", NOW + 2 * TTL)) is True
    assert on_disk(export, "shared") == record(A, "shared", NOW + 2 * TTL)
    assert lock_dir(export) == [lock_name("shared")]
    assert scratch_files(export) == []  # the rewrite's temporary file was renamed into place


def test_renew_returns_false_once_another_writer_holds_the_lock(tree: Tree, export: Path) -> None:
    assert try_create(tree, record(A, "shared", NOW - 1), TTL, NOW - 100) is None
    assert try_create(tree, record(B, "shared", NOW + TTL), TTL, NOW) is None
    assert renew(tree, record(A, "shared", NOW + 2 * TTL)) is False
    assert on_disk(export, "shared") == record(B, "shared", NOW + TTL)
    # Another instance of our own cluster and provisioner is another holder too.
    sibling = replace(A, instance="host-a/1/other")
    assert renew(tree, record(sibling, "shared", NOW + 2 * TTL)) is False
    assert on_disk(export, "shared") == record(B, "shared", NOW + TTL)


def test_renew_never_recreates_a_released_or_unwritten_lock(tree: Tree, export: Path) -> None:
    assert try_create(tree, record(A, "shared", NOW + TTL), TTL, NOW) is None
    release(tree, "shared", A.instance)
    assert renew(tree, record(A, "shared", NOW + 2 * TTL)) is False
    assert on_disk(export, "shared") is None
    path = plant(export, "other", b"", NOW)
    assert renew(tree, record(A, "other", NOW + 2 * TTL)) is False
    assert path.read_bytes() == b""


def test_renew_works_on_an_export_without_records_yet(fresh: Path) -> None:
    with Tree(fresh, LocalSyscalls()) as tree:
        assert try_create(tree, record(A, "shared", NOW + TTL), TTL, NOW) is None
        assert renew(tree, record(A, "shared", NOW + 2 * TTL)) is True
    assert on_disk(fresh, "shared") == record(A, "shared", NOW + 2 * TTL)


class BreakerRacedAtRename(LocalSyscalls):
    """Writer A's calls: just before A renames the expired lock aside, writer B breaks that
    same expired lock and takes the component (B read it expired at the same moment)."""

    def __init__(self, export: Path) -> None:
        self.export = export
        self.raced: LockRecord | str | None = "not yet"

    def rename(
        self, parent: int, src: str, dst_parent: int, dst: str, where: str, replace: bool
    ) -> None:
        if self.raced == "not yet" and src == lock_name("shared"):
            with Tree(self.export, LocalSyscalls()) as other:
                self.raced = try_create(other, record(B, "shared", NOW + TTL), TTL, NOW)
        super().rename(parent, src, dst_parent, dst, where, replace)


def test_two_breakers_of_one_expired_lock_never_both_hold_it(tree: Tree, export: Path) -> None:
    dead = replace(A, instance="host-a/1/killed")  # A's own lock would be taken over instead
    assert try_create(tree, record(dead, "shared", NOW - 1), TTL, NOW - 100) is None
    calls = BreakerRacedAtRename(export)
    with Tree(export, calls) as racing:
        mine = try_create(racing, record(A, "shared", NOW + TTL), TTL, NOW)
    assert calls.raced is None  # B broke the expired lock and holds the component
    assert on_disk(export, "shared") == record(B, "shared", NOW + TTL)
    assert mine is not None  # so A must not hold it too


def test_our_own_lock_left_by_a_failed_release_is_taken_over(tree: Tree, export: Path) -> None:
    """An unlink that failed (EIO) leaves this very process's lock: its next reservation there
    takes it over instead of waiting for it to expire."""
    assert try_create(tree, record(A, "shared", NOW + TTL), TTL, NOW) is None
    assert try_create(tree, record(A, "shared", NOW + 2 * TTL), TTL, NOW) is None
    assert on_disk(export, "shared") == record(A, "shared", NOW + 2 * TTL)
    assert try_create(tree, record(B, "shared", NOW + TTL), TTL, NOW) == record(
        A, "shared", NOW + 2 * TTL
    )


# --- the locks an earlier instance left ----------------------------------------------------------


def test_remove_left_by_removes_only_our_earlier_instances_locks(tree: Tree, export: Path) -> None:
    me = Writer("c1", "p1", "host-a/1/now")
    earlier = replace(me, instance="host-a/1/killed")
    long = "x" * 255  # a hashed lock name: the component comes from the record
    for writer, component in [
        (earlier, "left"),
        (earlier, long),
        (me, "mine"),
        (Writer("c2", "p1", "host-b/1/x"), "other-cluster"),
        (Writer("c1", "p2", "host-c/1/y"), "other-provisioner"),
        (Writer("", "", "host-d/1/z"), "unnamed"),
    ]:
        assert try_create(tree, record(writer, component, NOW + TTL), TTL, NOW) is None
    plant(export, "being-written", b"", NOW)
    leftover = export.joinpath(*LOCKS, "broken-0123456789abcdef")
    leftover.write_bytes(b"an expired lock a breaker was killed before removing")
    assert sorted(remove_left_by(tree, me)) == sorted(["left", long])
    assert lock_dir(export) == sorted(
        lock_name(component)
        for component in [
            "mine",
            "other-cluster",
            "other-provisioner",
            "unnamed",
            "being-written",
        ]
    )
    assert on_disk(export, "mine") == record(me, "mine", NOW + TTL)
    assert remove_left_by(tree, me) == []


def test_remove_left_by_on_an_export_without_locks_removes_nothing(fresh: Path) -> None:
    with Tree(fresh, LocalSyscalls()) as tree:
        assert remove_left_by(tree, A) == []
    assert os.listdir(fresh) == []


def test_storage_removes_the_locks_its_earlier_instance_left(
    export: Path, tree: Tree, storages: Callable[..., Storage]
) -> None:
    killed = Writer("c1", "p1", "host-a/1/killed")
    theirs = record(B, "theirs", later())
    assert try_create(tree, record(killed, "shared", later()), TTL, NOW) is None
    assert try_create(tree, theirs, TTL, NOW) is None
    store = storages(Writer())
    store.set_writer("c1", "p1")
    instance = store.writer.instance
    assert instance != killed.instance

    async def scenario() -> None:
        with pytest.raises(Busy):
            async with store.reserve("claim", parse_relative("shared/x")):
                pass
        assert await store.remove_locks_left() == ["shared"]
        async with store.reserve("claim", parse_relative("shared/x")):
            held = on_disk(export, "shared")
            assert held is not None
            assert (held.cluster, held.provisioner, held.instance) == ("c1", "p1", instance)

    run(scenario())
    assert on_disk(export, "theirs") == theirs
    assert on_disk(export, "shared") is None


# --- two writers through Storage.reserve ---------------------------------------------------------


def test_two_writers_never_reserve_overlapping_paths_at_once(
    export: Path, storages: Callable[..., Storage]
) -> None:
    s1 = storages(Writer("c1", "p1"))
    s2 = storages(Writer("c2", "p1"))

    async def scenario() -> None:
        async with s1.reserve("h", parse_relative("shared")):
            held = on_disk(export, "shared")
            assert held is not None and held.writer == s1.writer
            for wanted in ("shared/x", "shared", "shared/x/y"):
                with pytest.raises(Busy) as caught:
                    async with s2.reserve("h", parse_relative(wanted)):
                        pytest.fail("entered a reservation another writer holds")
                message = str(caught.value)
                assert "another writer of the export" in message
                assert s1.writer.instance in message
                assert 'provisioner "p1" of cluster c1' in message
                assert caught.value.path == "shared"
            # Nothing of the refused reservations is left behind in the second writer.
            assert s2.reservations.held() == []
            assert s2.locks.held() == []
            # Another first component is another lock: no conflict.
            async with s2.reserve("h", parse_relative("elsewhere/x")):
                assert s2.locks.held() == ["elsewhere"]
        assert on_disk(export, "shared") is None
        async with s2.reserve("h", parse_relative("shared/x")):
            held = on_disk(export, "shared")
            assert held is not None and held.writer == s2.writer
            with pytest.raises(Busy) as caught:
                async with s1.reserve("h", parse_relative("shared")):
                    pytest.fail("entered a reservation another writer holds")
            assert s2.writer.instance in str(caught.value)
            assert "cluster c2" in str(caught.value)
        assert on_disk(export, "shared") is None

    run(scenario())
    assert lock_dir(export) == []


def test_a_reservation_is_all_or_nothing_across_components(
    export: Path, storages: Callable[..., Storage]
) -> None:
    s1 = storages(Writer("c1", "p1"))
    s2 = storages(Writer("c2", "p1"))

    async def scenario() -> None:
        async with s2.reserve("h", parse_relative("b/inside")):
            with pytest.raises(Busy):
                async with s1.reserve(
                    "archive", parse_relative("a/src"), parse_relative("b/target")
                ):
                    pytest.fail("entered a reservation another writer holds in part")
            # The lock of "a" (taken first, in sorted order) was given back.
            assert on_disk(export, "a") is None
            assert s1.locks.held() == []
            assert s1.reservations.held() == []
            async with s1.reserve("claim", parse_relative("a/src")):
                assert s1.locks.held() == ["a"]

    run(scenario())
    assert lock_dir(export) == []


def test_one_writer_shares_a_components_lock_between_holders(
    export: Path, storages: Callable[..., Storage]
) -> None:
    store = storages(Writer("c1", "p1"))
    other = storages(Writer("c2", "p1"))

    async def scenario() -> None:
        first = AsyncExitStack()
        second = AsyncExitStack()
        await first.enter_async_context(store.reserve("claim-a", parse_relative("team/a")))
        await second.enter_async_context(store.reserve("claim-b", parse_relative("team/b")))
        assert store.reservations.held() == [("team/a", "claim-a"), ("team/b", "claim-b")]
        assert store.locks.held() == ["team"]
        assert lock_dir(export) == [lock_name("team")]
        content = lock_file(export, "team").read_bytes()
        with pytest.raises(Busy):
            async with other.reserve("h", parse_relative("team/c")):
                pass
        await first.aclose()
        # claim-b still works under "team": the lock stays, unchanged.
        assert store.locks.held() == ["team"]
        assert lock_file(export, "team").read_bytes() == content
        with pytest.raises(Busy):
            async with other.reserve("h", parse_relative("team/a")):
                pass
        await second.aclose()
        assert store.locks.held() == []
        assert on_disk(export, "team") is None
        async with other.reserve("h", parse_relative("team/a")):
            pass

    run(scenario())


def test_a_conflict_in_the_process_leaves_the_lock_count_as_it_was(
    export: Path, storages: Callable[..., Storage]
) -> None:
    store = storages(Writer("c1", "p1"))

    async def scenario() -> None:
        async with store.reserve("claim-a", parse_relative("team/a")):
            with pytest.raises(Busy) as caught:
                async with store.reserve("release", parse_relative("team")):
                    pytest.fail("entered a reservation that overlaps another holder's")
            assert "claim-a" in str(caught.value)
            assert store.locks.held() == ["team"]
        # The refused reservation took no count: leaving the only one removes the lock.
        assert store.locks.held() == []
        assert on_disk(export, "team") is None

    run(scenario())


def test_the_same_holder_reserves_again_inside_its_own_reservation(
    export: Path, storages: Callable[..., Storage]
) -> None:
    store = storages(Writer("c1", "p1"))

    async def scenario() -> None:
        async with store.reserve("release", parse_relative("ns/app")):
            async with store.reserve("release", parse_relative("ns/archived-app")):
                assert store.locks.held() == ["ns"]
                with pytest.raises(Busy):
                    async with store.reserve("claim", parse_relative("ns/archived-app/x")):
                        pass
            assert store.reservations.held() == [("ns/app", "release")]
            assert on_disk(export, "ns") is not None
            with pytest.raises(Busy):
                async with store.reserve("claim", parse_relative("ns")):
                    pass
        assert store.reservations.held() == []
        assert on_disk(export, "ns") is None

    run(scenario())


# --- renewal -------------------------------------------------------------------------------------


def test_the_renewal_task_rewrites_the_lock_while_held_and_stops_after(
    export: Path, storages: Callable[..., Storage]
) -> None:
    store = storages(Writer("c1", "p1"), lock_ttl=SHORT_TTL)

    def expires() -> float:
        held = on_disk(export, "shared")
        assert held is not None and held.writer == store.writer
        return held.expires

    async def scenario() -> None:
        async with store.reserve("h", parse_relative("shared/x")):
            first = expires()
            await eventually(lambda: expires() > first, "the lock's expiry moved forward")
            second = expires()
            await eventually(lambda: expires() > second, "the lock's expiry moved forward again")
            assert store.locks.lost == set()
        assert on_disk(export, "shared") is None
        await background_tasks_done()
        await asyncio.sleep(3 * SHORT_TTL / 4)  # three renewal periods: nothing brings it back
        assert on_disk(export, "shared") is None

    run(scenario())
    assert lock_dir(export) == []
    assert scratch_files(export) == []


def test_the_renewal_task_starts_again_for_the_next_reservation(
    export: Path, storages: Callable[..., Storage]
) -> None:
    store = storages(Writer("c1", "p1"), lock_ttl=SHORT_TTL)

    def expires(component: str) -> float:
        held = on_disk(export, component)
        assert held is not None
        return held.expires

    async def scenario() -> None:
        async with store.reserve("h", parse_relative("one")):
            pass
        await background_tasks_done()
        async with store.reserve("h", parse_relative("two")):
            first = expires("two")
            await eventually(lambda: expires("two") > first, "the second lock was renewed")

    run(scenario())


def test_lost_names_a_lock_another_writer_broke_while_we_held_it(
    export: Path, storages: Callable[..., Storage]
) -> None:
    store = storages(Writer("c1", "p1"), lock_ttl=SHORT_TTL)
    theirs = record(B, "shared", later())

    async def scenario() -> None:
        async with store.reserve("h", parse_relative("shared/x")):
            assert store.locks.lost == set()
            # As if this process stalled past the ttl: B broke our lock and took the component.
            lock_file(export, "shared").unlink()
            with Tree(export, LocalSyscalls()) as tree:
                assert try_create(tree, theirs, TTL, NOW) is None
            await eventually(lambda: "shared" in store.locks.lost, "the loss was noticed")
            # Our renewal never overwrites the new holder's lock.
            assert on_disk(export, "shared") == theirs
        # Nor does our release remove it.
        assert on_disk(export, "shared") == theirs
        assert store.locks.held() == []

    run(scenario())


# --- ExportLocks in one process ------------------------------------------------------------------


class Counted:
    """A ``Runner`` like Storage._run (a worker thread, a Tree per job) that counts jobs."""

    def __init__(self, export: Path) -> None:
        self.export = export
        self.ops: list[str] = []

    def __call__(self, op: str, job: Callable[[Tree], _T], /) -> Awaitable[_T]:
        self.ops.append(op)

        def work() -> _T:
            with Tree(self.export, LocalSyscalls()) as tree:
                return job(tree)

        return asyncio.to_thread(work)


def test_concurrent_acquires_in_one_process_take_the_lock_once(export: Path) -> None:
    runner = Counted(export)
    locks = ExportLocks(runner, A, ttl=TTL)

    async def scenario() -> None:
        await asyncio.gather(*(locks.acquire("shared") for _ in range(5)))
        assert runner.ops.count("lock") == 1
        assert locks.held() == ["shared"]
        for _ in range(4):
            await locks.release("shared")
            assert on_disk(export, "shared") is not None
        await locks.release("shared")
        assert on_disk(export, "shared") is None
        assert runner.ops.count("unlock") == 1
        assert locks.held() == []

    run(scenario())


def test_concurrent_acquires_against_another_writer_all_fail(export: Path, tree: Tree) -> None:
    theirs = record(B, "shared", later())
    assert try_create(tree, theirs, TTL, NOW) is None
    locks = ExportLocks(Counted(export), A, ttl=TTL)

    async def scenario() -> None:
        outcomes = await asyncio.gather(
            *(locks.acquire("shared") for _ in range(3)), return_exceptions=True
        )
        assert all(isinstance(outcome, Busy) for outcome in outcomes), outcomes
        assert locks.held() == []

    run(scenario())
    assert on_disk(export, "shared") == theirs


def test_busy_names_a_writer_that_is_still_writing_its_lock(export: Path) -> None:
    plant(export, "shared", b"", later())  # its mtime keeps it live for this test
    locks = ExportLocks(Counted(export), A, ttl=TTL)

    async def scenario() -> None:
        with pytest.raises(Busy) as caught:
            await locks.acquire("shared")
        assert "a writer that is writing its lock" in str(caught.value)
        assert locks.held() == []

    run(scenario())
    assert lock_file(export, "shared").read_bytes() == b""


def test_a_record_in_a_lock_file_is_the_json_an_admin_reads(tree: Tree, export: Path) -> None:
    mine = record(A, "shared", NOW + TTL)
    assert try_create(tree, mine, TTL, NOW) is None
    assert json.loads(lock_file(export, "shared").read_bytes()) == asdict(mine)
    assert lock_file(export, "shared").parent == export / JOURNAL_DIR / "locks"
    assert mine.writer == A
    assert "c1" in A.describe() and '"p1"' in A.describe() and A.instance in A.describe()


def test_a_default_writer_names_this_process() -> None:
    one, two = Writer(), Writer()
    assert one.instance != two.instance
    assert f"/{os.getpid()}/" in one.instance
    assert "unknown" in one.describe()


class GatedRewrite(LocalSyscalls):
    """Holds a renewal's rename into the locks directory until ``go``: the renewal has read
    the lock (still ours) and is about to write it back."""

    def __init__(self) -> None:
        self.reached = threading.Event()
        self.go = threading.Event()
        self.done = threading.Event()

    def rename(
        self, parent: int, src: str, dst_parent: int, dst: str, where: str, replace: bool
    ) -> None:
        gated = dst == lock_name("shared") and not self.reached.is_set()
        if gated:
            self.reached.set()
            self.go.wait(DEADLINE)
        try:
            super().rename(parent, src, dst_parent, dst, where, replace)
        finally:
            if gated:
                self.done.set()


def test_a_release_during_a_renewal_leaves_no_lock(export: Path) -> None:
    gate = GatedRewrite()

    def run_job(op: str, job: Callable[[Tree], _T], /) -> Awaitable[_T]:
        calls = gate if op == "renew_lock" else LocalSyscalls()

        def work() -> _T:
            with Tree(export, calls) as tree:
                return job(tree)

        return asyncio.to_thread(work)

    locks = ExportLocks(run_job, A, ttl=SHORT_TTL)

    async def scenario() -> None:
        await locks.acquire("shared")
        await eventually(gate.reached.is_set, "a renewal is about to write the lock")
        await locks.release("shared")
        assert on_disk(export, "shared") is None
        gate.go.set()
        await eventually(gate.done.is_set, "the renewal wrote the lock")
        await background_tasks_done()
        assert on_disk(export, "shared") is None, "the released lock is back"
        await locks.acquire("shared")  # not Busy against this very process
        await locks.release("shared")

    try:
        run(scenario())
    finally:
        gate.go.set()
