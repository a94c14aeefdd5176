"""Unit tests for tests/interleave.py, the deterministic scheduler of racing storage operations.

Operations are plain jobs on worker threads (``asyncio.to_thread``) making known calls, or real
``Storage`` operations; both on a tmp_path export through ``LocalSyscalls``. A ``Recorder`` under
the ``Interleaver`` lists the calls that reached the filesystem, in the order they did.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import os
import re
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from provisioner.journal import Intent, Owner
from provisioner.paths import parse_relative
from provisioner.safefs import LocalSyscalls, Syscalls
from provisioner.storage import DirOwner, Storage, StorageError
from tests.interleave import (
    Choice,
    Chooser,
    InterleaveError,
    Interleaver,
    Outcome,
    Pending,
    Step,
    choices_from,
    first,
    round_robin,
    scripted,
)

SLOW_OK = 30.0
"""Storage's timeout: far above a run, so no job times out while it waits for its turn."""


class Recorder(LocalSyscalls):
    """``LocalSyscalls`` that list every call that reached them, as ``(op, where)``."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def _record(self, op: str, where: str) -> None:
        with self._lock:
            self.calls.append((op, where))

    def open(self, parent: int, name: str, flags: int, where: str) -> int:
        self._record("open", where)
        return super().open(parent, name, flags, where)

    def stat(self, parent: int, name: str, where: str) -> os.stat_result:
        self._record("stat", where)
        return super().stat(parent, name, where)

    def mkdir(self, parent: int, name: str, where: str) -> None:
        self._record("mkdir", where)
        super().mkdir(parent, name, where)

    def chmod(self, fd: int, mode: int, where: str) -> None:
        self._record("chmod", where)
        super().chmod(fd, mode, where)

    def chown(self, fd: int, uid: int, gid: int, where: str) -> None:
        self._record("chown", where)
        super().chown(fd, uid, gid, where)

    def rename(
        self, parent: int, src: str, dst_parent: int, dst: str, where: str, replace: bool
    ) -> None:
        self._record("rename", where)
        super().rename(parent, src, dst_parent, dst, where, replace)

    def unlink(self, parent: int, name: str, where: str) -> None:
        self._record("unlink", where)
        super().unlink(parent, name, where)

    def rmdir(self, parent: int, name: str, where: str) -> None:
        self._record("rmdir", where)
        super().rmdir(parent, name, where)

    def listdir(self, fd: int, where: str) -> list[str]:
        self._record("listdir", where)
        return super().listdir(fd, where)

    def write(self, fd: int, data: bytes, where: str) -> None:
        self._record("write", where)
        super().write(fd, data, where)

    def fsync(self, fd: int, where: str) -> None:
        self._record("fsync", where)
        super().fsync(fd, where)


def reached(trace: Sequence[Step]) -> list[tuple[str, str]]:
    """The calls of ``trace`` that were let go to the filesystem (not failed instead)."""
    return [(step.call.op, step.call.where) for step in trace if step.errno is None]


def make_dirs(calls: Syscalls, root: int, names: Sequence[str]) -> None:
    for name in names:
        calls.mkdir(root, name, name)


def jobs(
    calls: Syscalls, root: int, *scripts: Sequence[str]
) -> list[Callable[[], Awaitable[None]]]:
    """One operation per script: a worker thread making its directories in order."""
    return [
        functools.partial(asyncio.to_thread, make_dirs, calls, root, names) for names in scripts
    ]


@pytest.fixture
def root(tmp_path: Path) -> Iterator[int]:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield fd
    finally:
        os.close(fd)


def last(pending: Sequence[Pending]) -> int:
    return len(pending) - 1


@pytest.mark.parametrize(
    ("make_chooser", "expected"),
    [
        pytest.param(lambda: first, "a1 a2 a3 b1 b2", id="first"),
        pytest.param(lambda: last, "b1 b2 a1 a2 a3", id="last"),
        pytest.param(round_robin, "a1 b1 a2 b2 a3", id="round-robin"),
        pytest.param(lambda: scripted([1, 0, 0, 1]), "b1 a1 a2 b2 a3", id="scripted"),
    ],
)
def test_calls_reach_the_filesystem_in_the_chosen_order(
    root: int, tmp_path: Path, make_chooser: Callable[[], Chooser], expected: str
) -> None:
    recorder = Recorder()
    interleaver = Interleaver(recorder)
    operations = jobs(interleaver, root, ["a1", "a2", "a3"], ["b1", "b2"])

    outcomes = asyncio.run(interleaver.run(operations, make_chooser()))

    assert outcomes == [Outcome(), Outcome()]
    assert recorder.calls == [("mkdir", name) for name in expected.split()]
    assert reached(interleaver.trace) == recorder.calls
    assert sorted(os.listdir(tmp_path)) == ["a1", "a2", "a3", "b1", "b2"]


def test_choose_sees_each_operations_stopped_call_in_a_fixed_order(root: int) -> None:
    interleaver = Interleaver(Recorder())
    seen: list[list[Pending]] = []

    def choose(pending: Sequence[Pending]) -> int:
        seen.append(list(pending))
        return len(pending) - 1

    asyncio.run(interleaver.run(jobs(interleaver, root, ["x"], ["a", "b"], ["m"]), choose))

    assert seen == [
        [Pending(0, "mkdir", "x"), Pending(1, "mkdir", "a"), Pending(2, "mkdir", "m")],
        [Pending(0, "mkdir", "x"), Pending(1, "mkdir", "a")],
        [Pending(0, "mkdir", "x"), Pending(1, "mkdir", "b")],
        [Pending(0, "mkdir", "x")],
    ]
    assert str(seen[0][1]) == "#1 mkdir a"


def test_an_injected_errno_fails_the_call_instead_of_running_it(root: int, tmp_path: Path) -> None:
    recorder = Recorder()
    interleaver = Interleaver(recorder)
    operations = jobs(interleaver, root, ["a1", "a2"], ["b1", "b2"])

    outcomes = asyncio.run(interleaver.run(operations, scripted([Choice(1, errno.EIO)])))

    assert outcomes[0] == Outcome()
    error = outcomes[1].error
    assert isinstance(error, OSError)
    assert (error.errno, error.filename) == (errno.EIO, "b1")
    assert recorder.calls == [("mkdir", "a1"), ("mkdir", "a2")]  # b1 never ran, b2 never came
    assert interleaver.trace[0] == Step(Pending(1, "mkdir", "b1"), errno.EIO)
    assert sorted(os.listdir(tmp_path)) == ["a1", "a2"]


def test_calls_outside_run_on_the_loop_or_from_other_threads_go_straight_through(
    root: int, tmp_path: Path
) -> None:
    recorder = Recorder()
    interleaver = Interleaver(recorder)
    interleaver.mkdir(root, "setup", "setup")  # no run: nothing to wait for

    async def mixed() -> None:
        interleaver.mkdir(root, "on-loop", "on-loop")  # waiting here would deadlock the run
        other = threading.Thread(target=interleaver.mkdir, args=(root, "other", "other"))
        other.start()
        other.join()
        await asyncio.to_thread(interleaver.mkdir, root, "job", "job")

    asyncio.run(interleaver.run([mixed], first))

    assert interleaver.trace == [Step(Pending(0, "mkdir", "job"))]
    assert recorder.calls == [("mkdir", name) for name in ("setup", "on-loop", "other", "job")]
    assert sorted(os.listdir(tmp_path)) == ["job", "on-loop", "other", "setup"]


def test_a_bad_choice_stops_the_run_and_cancels_the_stopped_calls(root: int) -> None:
    interleaver = Interleaver(Recorder())
    failed: list[int | None] = []

    def job() -> None:
        try:
            interleaver.mkdir(root, "a", "a")
        except OSError as exc:
            failed.append(exc.errno)

    with pytest.raises(InterleaveError, match="choose returned 3 for 1 pending calls: #0 mkdir a"):
        asyncio.run(interleaver.run([lambda: asyncio.to_thread(job)], lambda _: 3))

    deadline = time.monotonic() + 5
    while not failed and time.monotonic() < deadline:
        time.sleep(0.01)
    assert failed == [errno.ECANCELED]
    interleaver.mkdir(root, "a", "a")  # the interleaver is idle again: nothing waits
    assert os.path.isdir(f"/proc/self/fd/{root}/a")


def test_an_operation_that_never_reaches_a_call_stalls_with_a_clear_error() -> None:
    interleaver = Interleaver(stall_timeout=0.2)

    async def forever() -> None:
        await asyncio.Event().wait()

    with pytest.raises(InterleaveError, match="#0: waiting on the event loop, no job in flight"):
        asyncio.run(interleaver.run([forever], first))


# --- Storage ----------------------------------------------------------------------------------

OWNERS = [
    Owner(cluster="c1", namespace="team-a", provisioner="nfs", volume="pvc-1", since="t0"),
    Owner(cluster="c2", namespace="team-a", provisioner="nfs", volume="pvc-2", since="t0"),
]


def intent_for(rel: str, owner: Owner) -> Intent:
    return Intent(
        volume=owner.volume,
        namespace=owner.namespace,
        claim=owner.volume,
        claim_uid=f"uid-{owner.volume}",
        directory=rel,
        cluster=owner.cluster,
        provisioner=owner.provisioner,
        since="t0",
    )


def create(storage: Storage, rel: str, owner: Owner) -> Callable[[], Coroutine[Any, Any, None]]:
    return lambda: storage.create_dir(
        parse_relative(rel), DirOwner(mode=0o750), owner, intent_for(rel, owner)
    )


def test_setup_through_storage_outside_run_goes_straight_through(tmp_path: Path) -> None:
    recorder = Recorder()
    interleaver = Interleaver(recorder)
    storage = Storage(tmp_path, interleaver, timeout=SLOW_OK)
    try:
        asyncio.run(create(storage, "team-a/app", OWNERS[0])())
    finally:
        storage.close()
    assert (tmp_path / "team-a" / "app").is_dir()
    assert ("mkdir", "team-a/app") in recorder.calls
    assert interleaver.trace == []


def test_an_injected_eio_reaches_a_storage_operation_as_storage_error(tmp_path: Path) -> None:
    recorder = Recorder()
    interleaver = Interleaver(recorder)
    storage = Storage(tmp_path, interleaver, timeout=SLOW_OK)

    def fail_the_claims_mkdir(pending: Sequence[Pending]) -> Choice:
        for index, call in enumerate(pending):
            if (call.op, call.where) == ("mkdir", "team-a"):
                return Choice(index, errno.EIO)
        return Choice(0)

    try:
        [outcome] = asyncio.run(
            interleaver.run([create(storage, "team-a/app", OWNERS[0])], fail_the_claims_mkdir)
        )
    finally:
        storage.close()
    assert isinstance(outcome.error, StorageError)
    assert "EIO" in outcome.error.cause
    assert isinstance(outcome.error.__cause__, OSError)
    assert outcome.error.__cause__.errno == errno.EIO
    assert Step(Pending(0, "mkdir", "team-a"), errno.EIO) in interleaver.trace
    assert ("mkdir", "team-a") not in recorder.calls
    assert not (tmp_path / "team-a").exists()


def test_operations_without_a_thread_each_stall_with_a_clear_error(tmp_path: Path) -> None:
    interleaver = Interleaver(stall_timeout=0.3)
    storage = Storage(tmp_path, interleaver, timeout=SLOW_OK, max_threads=1)
    operations = [create(storage, "a/app", OWNERS[0]), create(storage, "b/app", OWNERS[1])]
    try:
        with pytest.raises(InterleaveError, match=r"#\d: job queued for a thread"):
            asyncio.run(interleaver.run(operations, first))
    finally:
        storage.close()


def race(mount: Path, choose: Chooser, recorder: Recorder) -> tuple[list[Outcome[Any]], list[Step]]:
    """Two writers (two Storage instances, one Interleaver) race: one creates ``team-a/app``
    while the other creates it too and a third operation archives ``team-a/old``."""
    (mount / "team-a" / "old").mkdir(parents=True)
    interleaver = Interleaver(recorder)
    writers = [Storage(mount, interleaver, timeout=SLOW_OK) for _ in OWNERS]
    operations: list[Callable[[], Awaitable[Any]]] = [
        create(writers[0], "team-a/app", OWNERS[0]),
        create(writers[1], "team-a/app", OWNERS[1]),
        lambda: writers[0].archive_dir("team-a/old", volume="pvc-old"),
    ]
    recorder.calls.clear()
    try:
        outcomes = asyncio.run(interleaver.run(operations, choose))
    finally:
        for writer in writers:
            writer.close()
    assert reached(interleaver.trace) == recorder.calls
    return outcomes, interleaver.trace


def test_two_writers_sharing_an_interleaver_are_interleaved(tmp_path: Path) -> None:
    outcomes, trace = race(tmp_path, round_robin(), Recorder())
    assert {step.call.operation for step in trace} == {0, 1, 2}
    assert [step.call.operation for step in trace[:3]] == [0, 1, 2]
    assert sum(outcome.error is None for outcome in outcomes[:2]) <= 1, outcomes


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_the_same_choices_give_the_same_calls(data: st.DataObject) -> None:
    chosen: list[Choice | int] = []
    draw = choices_from(data, [errno.EIO, errno.ESTALE])

    def recording(pending: list[Pending]) -> Choice | int:
        chosen.append(draw(pending))
        return chosen[-1]

    runs = []
    for choose in (recording, scripted(chosen, then=lambda _: -1)):
        recorder = Recorder()
        with tempfile.TemporaryDirectory(prefix="interleave-") as tmp:
            outcomes, trace = race(Path(tmp), choose, recorder)
            tree = sorted(
                # A temporary record file left by a fault: its name is random.
                re.sub(r"(tmp-[0-9a-f]+-)[0-9a-f]+$", r"\1*", str(path.relative_to(tmp)))
                for path in Path(tmp).rglob("*")
            )
            ended = [(repr(end.value), str(end.error).replace(tmp, "/export")) for end in outcomes]
        runs.append((ended, trace, recorder.calls, tree))
        # Two writers never both create the directory, whatever the order and the faults.
        assert sum(outcome.error is None for outcome in outcomes[:2]) <= 1, outcomes
    assert runs[0] == runs[1]
