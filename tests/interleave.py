"""Deterministic interleaving of concurrent storage operations, for stateful property tests.

What: ``Interleaver`` is a ``safefs.Syscalls`` around another one (``LocalSyscalls`` by
default), given as the ``calls`` of one or more ``Storage`` instances. Inside
``Interleaver.run(operations, choose)`` every filesystem call that one of the ``operations``
makes on a worker thread stops before it reaches the inner ``Syscalls``. Once the run is
quiescent - every operation finished or stopped at a call - ``choose`` is shown the stopped
calls (``Pending``, in a fixed order) and picks the one that goes next, or an errno it fails
with instead of running. Then the run waits for quiescence again, and so on until every
operation has finished; ``run`` returns each one's ``Outcome``.

Why: ``Storage`` runs every operation as a job on its own worker threads, so two operations
racing on the export (``create_dir`` against ``archive_dir``, or two writers on one export)
interleave by thread timing: the rare orders are rarely run and a failure cannot be replayed.
Here the order is a function of ``choose``'s answers alone - the same answers give the same
calls in the same order - so hypothesis can draw the answers (``choices_from``), find a bad
interleaving and shrink it. ``first``, ``round_robin`` and ``scripted`` are plain choosers.

How a call is told apart: each operation runs as a task whose context holds its index (and
the tasks it starts inherit it). asyncio's ``run_in_executor`` does not carry the context to the
worker thread, so during a run the event loop's ``run_in_executor`` is wrapped (on that loop
only; ``asyncio.to_thread`` and ``Storage`` go through it): a job submitted from an operation is
tagged with the operation for its thread (a thread-local) and counted - submitted, started,
returned on its thread, delivered back on the loop. The pending calls are sorted by
(operation, op, where), so their order does not depend on which thread got there first.

Quiescence comes from those counts, not from timing: no job is queued for a thread, every
started job is stopped at a call, and every unfinished operation has a job in flight; then the
loop gets a few turns, and if nothing changed the run is quiescent (a thread slow to take a job,
on a loaded machine, only makes the run wait). One case needs time without change: an operation
waiting on the event loop rather than on a job (``loop_settle``) - for another operation, as for
a lock that one is taking, or asleep. An operation asleep on a timer makes the interleaving
depend on time: keep such sleeps out of operations, or far longer than the run. If nothing at
all changes for ``stall_timeout`` seconds while the run is not quiescent, ``run`` raises
``InterleaveError`` naming what it waits for, instead of hanging the test suite. That is also
what happens when every thread of an executor holds a stopped call and a job waits for one:
each operation needs a thread of its own (``Storage``'s ``max_threads``).

What is not scheduled: calls outside ``run`` (setup and checks), calls on the event loop's
thread (waiting there would deadlock), and calls from threads that no operation of the current
run submitted a job to: they go straight to the inner ``Syscalls``. A job whose operation gave
up on it (a timeout) stays in the run: its stopped call is still offered to ``choose``, as a hung
call may still complete; ``run`` returns once no job is left. A call by a job of a run that is
over (it raised) fails with ECANCELED, so nothing changes the export after ``run``.

hypothesis: give the test ``@settings(deadline=None)`` (a run waits on threads), and ``Storage``
a timeout far above the run's length, or a job can time out while it waits for its turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import errno
import itertools
import os
import threading
from collections.abc import Awaitable, Callable, Iterable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar, cast

from hypothesis import strategies as st

from provisioner.safefs import LocalSyscalls, Syscalls

_T = TypeVar("_T")
_RUN_IN_EXECUTOR = "run_in_executor"


@dataclass(frozen=True, order=True)
class Pending:
    """A call stopped before it reached the filesystem: which operation made it (its index in
    ``run``'s ``operations``), the ``Syscalls`` method and its export-relative ``where``."""

    operation: int
    op: str
    where: str

    def __str__(self) -> str:
        return f"#{self.operation} {self.op} {self.where or '.'}"


@dataclass(frozen=True)
class Choice:
    """Let ``pending[index]`` go next; with ``errno``, it fails with OSError(errno) instead of
    running. A chooser may return a bare ``int`` for ``Choice(index)``."""

    index: int
    errno: int | None = None


Chooser = Callable[[list[Pending]], Choice | int]
"""Given the pending calls (never empty, in a fixed order), which one goes next."""


@dataclass(frozen=True)
class Step:
    """A call ``run`` let go (``errno`` None) or failed with ``errno``; see ``trace``."""

    call: Pending
    errno: int | None = None


@dataclass(frozen=True)
class Outcome(Generic[_T]):
    """How an operation ended: its ``value``, or the ``error`` it raised."""

    value: _T | None = None
    error: BaseException | None = None

    def get(self) -> _T:
        """The value; raises the error."""
        if self.error is not None:
            raise self.error
        return cast(_T, self.value)


class InterleaveError(RuntimeError):
    """``run`` cannot go on: no progress for ``stall_timeout``, or a bad choice."""


class _Ticket:
    """Which operation of which run a context belongs to."""

    __slots__ = ("operation", "owner", "run")

    def __init__(self, owner: Interleaver, run: int, operation: int) -> None:
        self.owner = owner
        self.run = run
        self.operation = operation


class _Call:
    """A call stopped in ``_admit``: it waits for ``granted``, then fails with ``errno`` or runs."""

    __slots__ = ("errno", "granted", "job", "pending", "seq")

    def __init__(self, pending: Pending, job: _Job, seq: int) -> None:
        self.pending = pending
        self.job = job
        self.seq = seq  # arrival order: breaks ties between identical calls, nothing else
        self.granted = threading.Event()
        self.errno: int | None = None


class _Job:
    """One ``run_in_executor`` job of an operation."""

    __slots__ = ("blocked", "delivered", "operation", "returned", "run", "started")

    def __init__(self, run: int, operation: int) -> None:
        self.run = run
        self.operation = operation
        self.started = False  # its thread entered it
        self.returned = False  # its thread left it
        self.delivered = False  # its future is done on the loop (or it was cancelled)
        self.blocked: _Call | None = None

    @property
    def queued(self) -> bool:
        return not self.started and not self.delivered

    @property
    def active(self) -> bool:
        return self.started and not (self.returned and self.delivered)


_TICKET: contextvars.ContextVar[_Ticket | None] = contextvars.ContextVar(
    "interleave_ticket", default=None
)


class Interleaver:
    """``Syscalls`` whose calls from ``run``'s operations go one at a time, as ``choose`` says.

    ``trace`` lists the calls of the last run in the order they were let go (or failed). One
    Interleaver may be the ``calls`` of several ``Storage`` instances (several writers); it runs
    one ``run`` at a time. ``loop_settle`` is how long a run with an operation waiting on the
    event loop must go unchanged to be quiescent (see the module's docstring); ``turns`` how
    many turns of the event loop confirm any quiescence; ``stall_timeout`` how long a run may
    go without any change.
    """

    def __init__(
        self,
        inner: Syscalls | None = None,
        *,
        loop_settle: float = 0.005,
        stall_timeout: float = 5.0,
        turns: int = 5,
    ) -> None:
        self.inner: Syscalls = inner or LocalSyscalls()
        self.loop_settle = loop_settle
        self.stall_timeout = stall_timeout
        self.turns = turns
        self.trace: list[Step] = []
        self._lock = threading.Lock()
        self._run = 0  # the current run, or the last one
        self._active = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._wake: asyncio.Event | None = None
        self._jobs: set[_Job] = set()  # the live (queued or active) jobs of the current run
        self._changes = 0
        self._seq = itertools.count()
        self._local = threading.local()  # .job: the job this worker thread is running

    # --- the run ------------------------------------------------------------------------------

    async def run(
        self,
        operations: Sequence[Awaitable[_T] | Callable[[], Awaitable[_T]]],
        choose: Chooser,
    ) -> list[Outcome[_T]]:
        """Run ``operations`` (coroutines, or functions returning one; not Tasks, which have a
        context of their own) concurrently, their calls ordered by ``choose``; each one's
        outcome, in order. If ``choose`` raises, or the run stalls, the operations are
        cancelled, their stopped calls fail with ECANCELED and the error propagates."""
        if self._active:
            raise RuntimeError("Interleaver.run is already running; it runs one at a time")
        loop = asyncio.get_running_loop()
        with self._lock:
            self._run += 1
            self._active = True
            self._jobs.clear()
            self._loop = loop
            self._loop_thread = threading.get_ident()
            self._wake = asyncio.Event()
        self.trace = []
        previous = vars(loop).get(_RUN_IN_EXECUTOR)
        setattr(loop, _RUN_IN_EXECUTOR, self._wrap(loop.run_in_executor))
        tasks: list[asyncio.Task[_T]] = []
        try:
            for index, operation in enumerate(operations):
                context = contextvars.copy_context()
                context.run(_TICKET.set, _Ticket(self, self._run, index))
                task = loop.create_task(_awaited(operation), context=context)
                task.add_done_callback(self._task_done)
                tasks.append(task)
            while calls := await self._quiescent(tasks):
                self._grant(calls, choose([call.pending for call in calls]))
        except BaseException:
            self._stop()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            self._stop()
            if previous is None:
                delattr(loop, _RUN_IN_EXECUTOR)
            else:
                setattr(loop, _RUN_IN_EXECUTOR, previous)
        return [_outcome(task) for task in tasks]

    def _wrap(self, original: Callable[..., asyncio.Future[Any]]) -> Callable[..., Any]:
        """``loop.run_in_executor`` that tags and counts the jobs of the run's operations."""

        def run_in_executor(
            executor: Executor | None, func: Callable[..., Any], *args: Any
        ) -> asyncio.Future[Any]:
            ticket = _TICKET.get()
            if ticket is None or ticket.owner is not self or ticket.run != self._run:
                return original(executor, func, *args)
            job = _Job(ticket.run, ticket.operation)

            def work() -> Any:
                self._local.job = job
                self._update(job, "started")
                try:
                    return func(*args)
                finally:
                    self._update(job, "returned")
                    self._local.job = None

            self._update(job, None)
            try:
                future = original(executor, work)
            except BaseException:
                self._update(job, "delivered")
                raise
            future.add_done_callback(lambda _: self._update(job, "delivered"))
            return future

        return run_in_executor

    def _update(self, job: _Job, event: Literal["started", "returned", "delivered"] | None) -> None:
        with self._lock:
            if event is not None:
                setattr(job, event, True)
            if self._active and job.run == self._run and (job.queued or job.active):
                self._jobs.add(job)
            else:
                self._jobs.discard(job)
            self._changed()

    def _task_done(self, _: asyncio.Task[Any]) -> None:
        with self._lock:
            self._changed()

    def _changed(self) -> None:
        """Count a change and wake ``_quiescent``; called with the lock held, on any thread."""
        self._changes += 1
        if not self._active or self._wake is None or self._loop is None:
            return
        if threading.get_ident() == self._loop_thread:
            self._wake.set()
        else:
            self._loop.call_soon_threadsafe(self._wake.set)

    def _state(self, tasks: Sequence[asyncio.Task[Any]]) -> tuple[float | None, list[_Call]]:
        """With the lock held: how long the run must stay unchanged to count as quiescent
        (None: it is not quiescent), and the stopped calls in order."""
        calls = sorted(
            (job.blocked for job in self._jobs if job.blocked is not None),
            key=lambda call: (call.pending, call.seq),
        )
        if any(job.queued or (job.active and job.blocked is None) for job in self._jobs):
            return None, calls  # a job waits for a thread, or runs between calls or in one
        in_jobs = {job.operation for job in self._jobs}
        if any(not task.done() and i not in in_jobs for i, task in enumerate(tasks)):
            return (self.loop_settle if calls else None), calls
        return 0.0, calls

    async def _quiescent(self, tasks: Sequence[asyncio.Task[Any]]) -> list[_Call]:
        """Wait until quiescent; the stopped calls, in order ([] once all is done)."""
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        seen, since = -1, loop.time()
        while True:
            self._wake.clear()
            with self._lock:
                changes = self._changes
                settle, calls = self._state(tasks)
            if changes != seen:
                seen, since = changes, loop.time()
            waited = loop.time() - since
            if settle is not None and waited >= settle:
                for _ in range(self.turns):  # let callbacks of the loop run: an operation's
                    await asyncio.sleep(0)  # subtask may be about to submit a job
                with self._lock:
                    if self._changes == changes:
                        return calls
                continue
            if settle is not None:
                timeout = settle - waited
            else:
                if waited >= self.stall_timeout:
                    raise InterleaveError(self._stalled(tasks, waited))
                timeout = self.stall_timeout - waited
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    def _grant(self, calls: Sequence[_Call], choice: Choice | int) -> None:
        if isinstance(choice, int):
            choice = Choice(choice)
        if not 0 <= choice.index < len(calls):
            raise InterleaveError(
                f"choose returned {choice.index} for {len(calls)} pending calls: "
                + ", ".join(str(call.pending) for call in calls)
            )
        call = calls[choice.index]
        with self._lock:
            call.job.blocked = None
            call.errno = choice.errno
            self._changed()
        self.trace.append(Step(call.pending, choice.errno))
        call.granted.set()

    def _stop(self) -> None:
        """End the run: stopped calls fail with ECANCELED, later ones too (see ``_admit``)."""
        with self._lock:
            self._active = False
            for job in self._jobs:
                if job.blocked is not None:
                    job.blocked.errno = errno.ECANCELED
                    job.blocked.granted.set()
                    job.blocked = None
            self._jobs.clear()

    def _stalled(self, tasks: Sequence[asyncio.Task[Any]], waited: float) -> str:
        with self._lock:
            jobs = sorted(self._jobs, key=lambda job: job.operation)
            described = [
                f"#{job.operation}: "
                + (
                    "job queued for a thread (are all the executor's threads stopped?)"
                    if job.queued
                    else f"stopped at {job.blocked.pending}"
                    if job.blocked is not None
                    else "job running between calls"
                )
                for job in jobs
            ]
        in_jobs = {job.operation for job in jobs}
        described += [
            f"#{index}: waiting on the event loop, no job in flight"
            for index, task in enumerate(tasks)
            if not task.done() and index not in in_jobs
        ]
        return (
            f"interleaved run made no progress for {waited:.1f} s and is not quiescent; "
            f"{'; '.join(described) or 'nothing in flight'}; after {len(self.trace)} steps"
        )

    # --- Syscalls -----------------------------------------------------------------------------

    def _admit(self, op: str, where: str) -> None:
        """Stop a call of a run's operation until ``run`` lets it go; let any other call by."""
        job: _Job | None = getattr(self._local, "job", None)
        if job is None or threading.get_ident() == self._loop_thread:
            return
        with self._lock:
            if not self._active or job.run != self._run:
                raise OSError(errno.ECANCELED, "its interleaved run is over", where)
            call = _Call(Pending(job.operation, op, where), job, next(self._seq))
            job.blocked = call
            self._changed()
        call.granted.wait()
        if call.errno is not None:
            raise OSError(call.errno, os.strerror(call.errno), where)

    def open(self, parent: int, name: str, flags: int, where: str) -> int:
        self._admit("open", where)
        return self.inner.open(parent, name, flags, where)

    def stat(self, parent: int, name: str, where: str) -> os.stat_result:
        self._admit("stat", where)
        return self.inner.stat(parent, name, where)

    def mkdir(self, parent: int, name: str, where: str) -> None:
        self._admit("mkdir", where)
        self.inner.mkdir(parent, name, where)

    def chmod(self, fd: int, mode: int, where: str) -> None:
        self._admit("chmod", where)
        self.inner.chmod(fd, mode, where)

    def chown(self, fd: int, uid: int, gid: int, where: str) -> None:
        self._admit("chown", where)
        self.inner.chown(fd, uid, gid, where)

    def rename(
        self, parent: int, src: str, dst_parent: int, dst: str, where: str, replace: bool
    ) -> None:
        self._admit("rename", where)
        self.inner.rename(parent, src, dst_parent, dst, where, replace)

    def unlink(self, parent: int, name: str, where: str) -> None:
        self._admit("unlink", where)
        self.inner.unlink(parent, name, where)

    def rmdir(self, parent: int, name: str, where: str) -> None:
        self._admit("rmdir", where)
        self.inner.rmdir(parent, name, where)

    def listdir(self, fd: int, where: str) -> list[str]:
        self._admit("listdir", where)
        return self.inner.listdir(fd, where)

    def write(self, fd: int, data: bytes, where: str) -> None:
        self._admit("write", where)
        self.inner.write(fd, data, where)

    def fsync(self, fd: int, where: str) -> None:
        self._admit("fsync", where)
        self.inner.fsync(fd, where)


async def _awaited(operation: Awaitable[_T] | Callable[[], Awaitable[_T]]) -> _T:
    return await (operation() if callable(operation) else operation)


def _outcome(task: asyncio.Task[_T]) -> Outcome[_T]:
    if task.cancelled():
        return Outcome(error=asyncio.CancelledError())
    error = task.exception()
    return Outcome(error=error) if error is not None else Outcome(value=task.result())


# --- choosers ---------------------------------------------------------------------------------


def first(pending: Sequence[Pending]) -> int:
    """Always the first call: the lowest-numbered operation runs until it finishes or waits."""
    return 0


def round_robin() -> Chooser:
    """A chooser that takes the operations in turn, one call each."""
    last = -1

    def choose(pending: Sequence[Pending]) -> int:
        nonlocal last
        index = next((i for i, call in enumerate(pending) if call.operation > last), 0)
        last = pending[index].operation
        return index

    return choose


def scripted(choices: Iterable[Choice | int], then: Chooser = first) -> Chooser:
    """A chooser that answers ``choices`` in order, then asks ``then``."""
    script = iter(choices)

    def choose(pending: list[Pending]) -> Choice | int:
        choice = next(script, None)
        return then(pending) if choice is None else choice

    return choose


def choices_from(data: st.DataObject, errnos: Sequence[int] = (), fault_odds: int = 10) -> Chooser:
    """A chooser that draws from hypothesis's ``data`` which call goes next and, one time in
    ``fault_odds`` when ``errnos`` are given, an errno it fails with instead of running. Both
    shrink: to the first call, and to no fault."""
    if fault_odds < 1:
        raise ValueError(f"fault_odds {fault_odds!r} must be at least 1")

    def choose(pending: Sequence[Pending]) -> Choice:
        index = 0
        if len(pending) > 1:
            index = data.draw(st.integers(0, len(pending) - 1), label="next call")
        fault = None
        if errnos and data.draw(st.integers(0, fault_odds - 1), label="fault") == fault_odds - 1:
            fault = data.draw(st.sampled_from(errnos), label=f"fails {pending[index]}")
        return Choice(index, fault)

    return choose
