"""Filesystem effects on the mounted NFS export: create, reuse, remove and archive claim
directories, and keep the provisioner's records (journal.py) in step with them.

reconciler.py, sweep.py and preflight.py call ``Storage`` (app.py builds it); each operation is
one job on a worker thread with a timeout, so a hung NFS mount fails one attempt instead of
stalling the others. Every path is reached through ``safefs.Tree``: from a descriptor on the
export root, one no-follow component at a time, so nothing a tenant writes can redirect it.

Overlap (SPEC §4): every operation on a claim's directory runs under ``reserve``, which holds
the path in this process (reservations.py) and its first component's lock on the export
(exportlocks.py, for other writers) from the first inspection until records and directory
agree. Releases write a ``journal.Operation`` before their first change, so that a failure
halfway leaves a record of which records belong where, finished by the retry, and every other
operation keeps off both paths until then. No kopf, kubernetes or prometheus here.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import functools
import json
import os
import queue
import stat
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, ParamSpec, TypeVar

from provisioner import exportlocks, journal
from provisioner.exportlocks import ExportLocks, Writer
from provisioner.fence import Fence, Fenced
from provisioner.journal import Intent, Operation, Owner
from provisioner.ownership import Inspection
from provisioner.paths import (
    JOURNAL_DIR,
    RelativeDir,
    archive_name,
    parse_relative,
    parts_overlap,
)
from provisioner.reservations import Busy, Reservations
from provisioner.safefs import NOT_A_DIRECTORY, SYMLINK, Redirected, Syscalls, Tree

_T = TypeVar("_T")
_P = ParamSpec("_P")

Observer = Callable[[str, float, str], None]
"""``observe(op, seconds, outcome)`` with outcome "ok", "error" or "timeout"; feeds metrics."""

_HINTS: dict[int, str] = {
    errno.EACCES: (
        "the export is not writable by the provisioner: check root_squash/all_squash on the "
        "NFS server and the ownership of the directory"
    ),
    errno.ENOSPC: "the export is full",
    errno.EDQUOT: "the export's quota is exhausted",
    errno.EROFS: "the export is mounted read-only",
    errno.ESTALE: "stale NFS file handle: remount the export",
    errno.EIO: "I/O error from the NFS mount: check the NFS server and the network",
    errno.ENOENT: "a path component is missing: check that the export is mounted at the mount path",
    errno.ENAMETOOLONG: "the path is too long for the server: use a shorter pathPattern",
}
_HINTS[errno.EPERM] = _HINTS[errno.EACCES]


def _quote(value: Path | str) -> str:
    return json.dumps(str(value), ensure_ascii=False)


class StorageError(Exception):
    """A filesystem call on the export failed; ``hint`` says what the admin can do about it."""

    def __init__(self, op: str, path: Path | str, cause: str, hint: str = "") -> None:
        self.op = op
        self.path = Path(path)
        self.cause = cause
        self.hint = hint
        super().__init__(self._message())

    def _message(self) -> str:
        text = f"{self.op} {_quote(self.path)} failed: {self.cause}."
        return f"{text} {self.hint}" if self.hint else text

    @classmethod
    def from_os_error(cls, op: str, path: Path, exc: OSError) -> StorageError:
        """Name the errno and, when it differs from ``path``, the file the call failed on."""
        code = exc.errno
        cause = (exc.strerror or str(exc)).lower()
        if code is not None:
            cause += f" ({errno.errorcode.get(code, code)})"
        if exc.filename is not None and str(exc.filename) != str(path):
            cause += f" on {_quote(os.fsdecode(exc.filename))}"
        return cls(op, path, cause, _HINTS.get(code, "") if code is not None else "")


class StorageTimeout(StorageError):
    """A filesystem call did not return in time; its thread may still be stuck in the kernel."""

    def __init__(self, op: str, path: Path | str, timeout: float) -> None:
        self.timeout = timeout
        super().__init__(
            op,
            path,
            cause=f"did not finish within {timeout:g} s",
            hint="the NFS mount may be hung: check the NFS server and the node's mount",
        )

    def _message(self) -> str:
        return (
            f"{self.op} {_quote(self.path)} did not finish within {self.timeout:g} s; "
            "the NFS mount may be hung"
        )


@dataclass(frozen=True)
class DirOwner:
    """Mode and owner of a claim's directory; None leaves uid or gid as the server sets it."""

    mode: int = 0o777  # nfs-subdir's default, so pods running as any uid can write
    uid: int | None = None
    gid: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.mode <= 0o7777:
            raise ValueError(f"directory mode {oct(self.mode)} is outside 0o0000-0o7777")
        for name, value in (("uid", self.uid), ("gid", self.gid)):
            if value is not None and value < 0:
                raise ValueError(f"directory {name} {value} must be >= 0, or None to keep it")


class _DaemonThreadPool(concurrent.futures.Executor):
    """A fixed pool of daemon threads.

    Not ThreadPoolExecutor: its threads are joined at interpreter exit, so one call stuck on a
    hung NFS mount would keep the process from exiting on SIGTERM. A job cancelled while still
    queued (its caller timed out) is skipped, so it cannot act after its caller gave up.
    """

    def __init__(self, threads: int, name: str) -> None:
        self._jobs: queue.SimpleQueue[
            tuple[concurrent.futures.Future[Any], Callable[[], Any]] | None
        ] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{index}", daemon=True)
            for index in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def submit(
        self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs
    ) -> concurrent.futures.Future[_T]:
        future: concurrent.futures.Future[_T] = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("storage is closed; create a new Storage to use the export")
            self._jobs.put((future, functools.partial(fn, *args, **kwargs)))
        return future

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, call = job
            if not future.set_running_or_notify_cancel():
                continue
            # Every exception, even KeyboardInterrupt, belongs to the awaiting caller, as with
            # ThreadPoolExecutor; letting it escape would kill this worker thread.
            try:
                result = call()
            except BaseException as exc:  # noqa: BLE001
                future.set_exception(exc)
            else:
                future.set_result(result)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if cancel_futures:
                while True:
                    try:
                        job = self._jobs.get_nowait()
                    except queue.Empty:
                        break
                    if job is not None:
                        job[0].cancel()
            for _ in self._threads:
                self._jobs.put(None)
        if wait:
            for thread in self._threads:
                thread.join()


_ARCHIVE_ATTEMPTS = 5
Discarded = Literal["removed", "missing", "kept"]
_PROBE_PREFIX = f"{JOURNAL_DIR}-probe-"


class Storage:
    """Claim directories under ``mount``, each operation one thread job with a timeout.

    A timed-out job keeps its thread until the kernel returns, so ``max_threads`` must exceed
    the number of concurrent callers (the reconciler's workers) plus the calls expected to hang;
    when all threads are stuck, new calls wait in the queue and time out too, and never run late.
    A job stuck in the kernel when its caller gives up may still complete that one call (for
    example the mkdir it was blocked in) but starts nothing after it: the caller has already
    reported the attempt as failed, and the next attempt re-inspects the export.
    """

    def __init__(
        self,
        mount: Path,
        calls: Syscalls,
        timeout: float,
        max_threads: int = 16,
        observe: Observer | None = None,
        fence: Fence | None = None,
        writer: Writer | None = None,
        lock_ttl: float = exportlocks.DEFAULT_TTL,
        scan_limit: int = journal.SCAN_LIMIT,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"storage timeout {timeout!r} s must be positive")
        if max_threads < 1:
            raise ValueError(f"storage max_threads {max_threads!r} must be at least 1")
        self.mount = mount
        self.timeout = timeout
        self._calls = calls
        self._observe = observe
        self._fence = fence  # checked before each mutating call of a job (see _Cancellable)
        self._pool = _DaemonThreadPool(max_threads, "storage")
        self.scan_limit = scan_limit
        self.reservations = Reservations()
        self.aliases: frozenset[str] = frozenset()
        self.locks = ExportLocks(
            lambda op, job: self._run(op, None, job), writer or Writer(), lock_ttl
        )

    @property
    def writer(self) -> Writer:
        return self.locks.writer

    def set_writer(
        self, cluster: str, provisioner: str, aliases: frozenset[str] = frozenset()
    ) -> None:
        """Name this process on the export (its locks and records) once the cluster is known.
        Records of any of ``aliases`` (earlier names of this cluster, identity.py) are read as
        ``cluster``'s."""
        self.locks.writer = replace(self.locks.writer, cluster=cluster, provisioner=provisioner)
        self.aliases = aliases - {cluster}

    def _canonical(self, cluster: str) -> str:
        """A record's cluster as this process names it: an alias of ours is ours."""
        return self.writer.cluster if cluster in self.aliases else cluster

    @contextlib.asynccontextmanager
    async def reserve(self, holder: str, *dirs: RelativeDir) -> AsyncIterator[None]:
        """Hold ``dirs`` (each with everything inside and above it) for ``holder``: in this
        process, and against other writers through the export lock of each first component.
        ``Busy`` when another holder or writer has an overlapping path: nothing was touched,
        try again later. The same holder may reserve again inside (re-entrant)."""
        held = self.reservations.take(holder, (rel.parts for rel in dirs))
        locked: list[str] = []
        try:
            for component in sorted({rel.parts[0] for rel in dirs}):
                await self.locks.acquire(component)
                locked.append(component)
            yield
        finally:
            for component in reversed(locked):
                await self.locks.release(component)
            self.reservations.give_back(held)

    async def remove_locks_left(self) -> list[str]:
        """Remove the export locks earlier instances of this writer left when killed; only while
        no other instance of it acts (the leader's sweep, before any work)."""
        writer = self.writer
        return await self._run(
            "remove_locks_left", None, lambda tree: exportlocks.remove_left_by(tree, writer)
        )

    # --- provisioning ---------------------------------------------------------------------------

    async def inspect(self, rel: RelativeDir) -> Inspection:
        """Which levels of ``rel`` exist, and the owner records above, at and inside it.

        Redirected if a component is a symlink (or not a plain directory of the export).
        """
        limit = self.scan_limit
        found = await self._run("inspect", rel, lambda tree: _inspect(tree, rel, limit))
        return found.seen_by(self._canonical) if self.aliases else found

    async def create_dir(
        self, rel: RelativeDir, mode: DirOwner, owner: Owner, intent: Intent
    ) -> None:
        """Create ``rel`` and its missing parents for a claim, crash-safely:

        the intent, then the owner record of the directory, are synced to the export before
        the first mkdir; the leaf is chmod'ed (umask-independent) and chown'ed
        through its descriptor. If the leaf exists by the time it is made, nothing is changed
        and the attempt fails (the next one re-inspects and decides again).
        """
        await self._run("create_dir", rel, lambda tree: _create(tree, rel, mode, owner, intent))

    async def reuse_dir(self, rel: RelativeDir, mode: DirOwner, adopt: Owner | None) -> None:
        # Like create_dir, only under the caller's ``reserve`` of ``rel``.
        """Apply mode and owner to the existing leaf ``rel`` (as nfs-subdir does on reuse), and
        record ``adopt`` as its owner when it had no record."""
        await self._run("reuse_dir", rel, lambda tree: _reuse(tree, rel, mode, adopt))

    async def clear_intent(self, volume: str) -> None:
        """The claim's PersistentVolume is saved: its directory no longer needs the sweep."""
        await self._run("clear_intent", None, lambda tree: journal.clear_intent(tree, volume))

    async def discard_created_dir(
        self, rel: RelativeDir, volume: str, holder: str = ""
    ) -> Discarded:
        """Undo ``create_dir`` for a claim that went away before its PV was saved: rmdir the
        leaf (never recursive), drop its records and the intent. "kept" if it held anything
        (its records stay: it is a leftover of its namespace), "missing" if it was never made
        or is gone already."""
        async with self.reserve(holder or f"the undo of {volume}", rel):
            return await self._run(
                "discard_created_dir", rel, lambda tree: _discard(tree, rel, volume)
            )

    async def read_intents(self) -> tuple[list[Intent], list[str]]:
        """Every intent on the export (an alias of this cluster read as its own name), and the
        names of the files that could not be parsed."""
        intents, unreadable = await self._run("read_intents", None, journal.read_intents)
        return [
            replace(intent, cluster=self._canonical(intent.cluster)) for intent in intents
        ], unreadable

    async def remove_temporaries(self, cluster: str, provisioner: str) -> list[str]:
        """Remove the half-written record files this cluster's provisioner left when it was
        killed; only call it while none of its writes can be in flight."""
        return await self._run(
            "remove_temporaries",
            None,
            lambda tree: journal.remove_temporaries(tree, cluster, provisioner),
        )

    async def record_owner(self, rel: RelativeDir, owner: Owner, holder: str = "") -> None:
        """Hand the existing directory ``rel`` over to ``owner`` (an admin's decision, or an
        adoption). Refused while a release is under way on the path."""
        async with self.reserve(holder or "a hand-over", rel):
            await self._run("record_owner", rel, lambda tree: _record(tree, rel, owner))

    # --- release --------------------------------------------------------------------------------

    async def remove_dir(self, rel: RelativeDir | str, volume: str = "", holder: str = "") -> bool:
        """Remove ``rel`` and its contents, then its records; False if it was already missing.
        Parents stay. ``volume`` (the PersistentVolume being released) names the operation
        record that keeps everyone else off the path until the delete has finished."""
        checked = _checked(rel)
        operation = self._operation("delete", volume, checked)
        async with self.reserve(holder or _holder(volume), checked):
            return await self._run("remove_dir", checked, lambda tree: _remove(tree, operation))

    async def archive_dir(
        self, rel: RelativeDir | str, volume: str = "", holder: str = ""
    ) -> RelativeDir | None:
        """Rename ``rel`` to a free ``archived-<leaf>[-N]`` beside it, then its records; None
        if it is missing. The target is reserved (and locked) like a claim's path before the
        rename; an ``Operation`` record written first lets a retry for ``volume`` finish an
        archive that failed or was killed halfway, to the same name."""
        checked = _checked(rel)
        holder = holder or _holder(volume)
        async with self.reserve(holder, checked):
            free = functools.partial(self.reservations.is_free, holder=holder)
            pick = functools.partial(_archive_target, rel=checked, volume=volume, free=free)
            for _ in range(_ARCHIVE_ATTEMPTS):
                target = await self._run("archive_dir", checked, pick)
                if target is None:
                    return None
                operation = self._operation("archive", volume, checked, target)
                try:
                    async with self.reserve(holder, target):
                        return await self._run(
                            "archive_dir", checked, functools.partial(_archive, op=operation)
                        )
                except (Busy, _TargetTaken):
                    continue  # taken since it was picked: pick the next free name
        raise StorageError(
            "archive_dir",
            str(checked),
            cause=f"every free archive name was taken before the rename, {_ARCHIVE_ATTEMPTS} times",
            hint="something else is creating archived-* directories here; the delete is retried",
        )

    def _operation(
        self, kind: str, volume: str, source: RelativeDir, target: RelativeDir | None = None
    ) -> Operation:
        return Operation(
            volume=volume or f"unnamed-{uuid.uuid4().hex[:12]}",
            kind=kind,
            source=str(source),
            target="" if target is None else str(target),
            cluster=self.writer.cluster,
            provisioner=self.writer.provisioner,
            since=journal.timestamp(),
        )

    # --- housekeeping ---------------------------------------------------------------------------

    async def check_writable(self) -> None:
        """Preflight: the mount is a directory where a file can be written and removed."""
        await self._run_job(
            "check_writable", None, lambda: _check_writable(self.mount, self._calls)
        )

    def close(self) -> None:
        """Stop idle threads; threads stuck in a hung call are daemons and die with the process."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _run(self, op: str, rel: RelativeDir | None, job: Callable[[Tree], _T]) -> _T:
        """Run ``job`` on a Tree opened on the export root, in the pool, with the timeout."""

        gate = _Cancellable(self._calls, self._fence)

        def on_tree() -> _T:
            with Tree(self.mount, gate) as tree:
                return job(tree)

        try:
            return await self._run_job(op, rel, on_tree)
        except StorageTimeout:
            gate.cancel()  # the stuck call may finish; nothing after it starts
            raise

    async def _run_job(self, op: str, rel: RelativeDir | None, job: Callable[[], _T]) -> _T:
        path = self.mount if rel is None else self.mount.joinpath(*rel.parts)

        def call() -> _T:
            # Converted on the worker thread: an OSError that is a TimeoutError (ETIMEDOUT from
            # the NFS client) must not be mistaken for our own timeout below.
            try:
                return job()
            except OSError as exc:
                raise StorageError.from_os_error(op, path, exc) from exc

        loop = asyncio.get_running_loop()
        started = time.monotonic()
        outcome = "error"
        try:
            result = await asyncio.wait_for(loop.run_in_executor(self._pool, call), self.timeout)
            outcome = "ok"
            return result
        except TimeoutError:
            outcome = "timeout"
            raise StorageTimeout(op, path, self.timeout) from None
        finally:
            if self._observe is not None:
                self._observe(op, time.monotonic() - started, outcome)


def _holder(volume: str) -> str:
    return f"the release of PersistentVolume {volume}" if volume else "a release"


class _TargetTaken(Exception):
    """The archive name picked is taken (by a directory, records or a release under way)."""


class _Cancellable:
    """``Syscalls`` that refuse to start once ``cancel`` was called: a job whose caller timed
    out (its thread stuck in one call) must not go on acting after the attempt was reported
    failed. With a ``fence``, mutating calls (mkdir, chmod, chown, rename, unlink, rmdir, write,
    and open for writing or creating) also refuse unless the fence is valid: a replica that is
    not known to hold the leader lease reads but changes nothing. A call already under way when
    the fence closes may still complete; nothing after it starts."""

    def __init__(self, inner: Syscalls, fence: Fence | None = None) -> None:
        self._inner = inner
        self._fence = fence
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    def _check(self, where: str) -> None:
        if self._cancelled.is_set():
            raise OSError(errno.ECANCELED, "abandoned after the timeout", where)

    def _mutating(self, op: str, where: str) -> None:
        self._check(where)
        if self._fence is None:
            return
        try:
            self._fence.check(op)
        except Fenced as error:
            raise OSError(errno.ECANCELED, str(error), where) from None

    def open(self, parent: int, name: str, flags: int, where: str) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC):
            self._mutating("open for writing", where)
        else:
            self._check(where)
        return self._inner.open(parent, name, flags, where)

    def stat(self, parent: int, name: str, where: str) -> os.stat_result:
        self._check(where)
        return self._inner.stat(parent, name, where)

    def mkdir(self, parent: int, name: str, where: str) -> None:
        self._mutating("mkdir", where)
        self._inner.mkdir(parent, name, where)

    def chmod(self, fd: int, mode: int, where: str) -> None:
        self._mutating("chmod", where)
        self._inner.chmod(fd, mode, where)

    def chown(self, fd: int, uid: int, gid: int, where: str) -> None:
        self._mutating("chown", where)
        self._inner.chown(fd, uid, gid, where)

    def rename(
        self, parent: int, src: str, dst_parent: int, dst: str, where: str, replace: bool
    ) -> None:
        self._mutating("rename", where)
        self._inner.rename(parent, src, dst_parent, dst, where, replace)

    def unlink(self, parent: int, name: str, where: str) -> None:
        self._mutating("unlink", where)
        self._inner.unlink(parent, name, where)

    def rmdir(self, parent: int, name: str, where: str) -> None:
        self._mutating("rmdir", where)
        self._inner.rmdir(parent, name, where)

    def listdir(self, fd: int, where: str) -> list[str]:
        self._check(where)
        return self._inner.listdir(fd, where)

    def write(self, fd: int, data: bytes, where: str) -> None:
        self._mutating("write", where)
        self._inner.write(fd, data, where)

    def fsync(self, fd: int, where: str) -> None:
        self._check(where)
        self._inner.fsync(fd, where)


def _checked(rel: RelativeDir | str) -> RelativeDir:
    # Strings come from PV annotations: validate before queueing, so refusals are immediate.
    return parse_relative(rel) if isinstance(rel, str) else rel


def _inspect(tree: Tree, rel: RelativeDir, limit: int) -> Inspection:
    existing = tree.existing_depth(rel.parts)
    operations = tuple(
        operation.describe()
        for operation in journal.read_operations(tree)
        if any(parts_overlap(rel.parts, path.split("/")) for path in operation.paths())
    )
    # Records are read only for levels that exist: one left by a crash before its mkdir is stale.
    above = [
        (path, owner)
        for path, owner in journal.owners_above(tree, rel.parts)
        if path.count("/") < existing
    ]
    if existing < len(rel.parts):
        return Inspection(
            existing, len(rel.parts), owners_above=tuple(above), operations=operations
        )
    below, complete = journal.scan_below(tree, rel.parts, limit)
    return Inspection(
        existing,
        len(rel.parts),
        leaf_owner=journal.read_owner(tree, rel.parts),
        owners_above=tuple(above),
        owners_below=tuple(below),
        below_complete=complete,
        scan_limit=limit,
        operations=operations,
    )


def _apply_mode(tree: Tree, fd: int, rel: RelativeDir, mode: DirOwner) -> None:
    tree.calls.chmod(fd, mode.mode, str(rel))
    if mode.uid is not None or mode.gid is not None:
        uid = -1 if mode.uid is None else mode.uid
        gid = -1 if mode.gid is None else mode.gid
        tree.calls.chown(fd, uid, gid, str(rel))


def _create(tree: Tree, rel: RelativeDir, mode: DirOwner, owner: Owner, intent: Intent) -> None:
    existing = tree.existing_depth(rel.parts)
    if existing == len(rel.parts):
        raise _appeared(rel)
    journal.write_intent(tree, intent)
    # Only the leaf is recorded: parents stay shareable between namespaces (a team's directory),
    # and ownership.decide refuses both a directory inside another namespace's leaf and the
    # reuse of one that holds another namespace's leaf.
    for depth in range(existing + 1, len(rel.parts) + 1):
        # A record of a level that does not exist is stale: a crash (or a failed mkdir) came
        # between it and its directory. Removed before the mkdir, or a parent made now for
        # this claim would bring another tenant's record back to life around it.
        journal.remove_owner(tree, rel.parts[:depth])
    if not journal.create_owner(tree, rel.parts, owner):
        # Someone else (another cluster sharing the export) is creating it right now: their
        # record stays, and the next attempt decides again.
        raise _appeared(rel)
    fd, created = tree.make_dirs(rel.parts)
    try:
        if len(rel.parts) not in created:
            journal.remove_owner(tree, rel.parts)
            raise _appeared(rel)
        _apply_mode(tree, fd, rel, mode)
    finally:
        os.close(fd)


def _appeared(rel: RelativeDir) -> StorageError:
    return StorageError(
        "create_dir",
        str(rel),
        cause="the directory appeared while it was being created",
        hint="the next attempt decides again whether it may be reused",
    )


def _reuse(tree: Tree, rel: RelativeDir, mode: DirOwner, adopt: Owner | None) -> None:
    with tree.opened(rel.parts) as fd:
        if adopt is not None:
            journal.write_owner(tree, rel.parts, adopt)
        _apply_mode(tree, fd, rel, mode)


def _discard(tree: Tree, rel: RelativeDir, volume: str) -> Discarded:
    outcome: Discarded
    try:
        if tree.entry(rel.parts) is None:
            outcome = "missing"  # never made: a crash between the records and the mkdir
        else:
            outcome = "removed" if tree.remove_empty(rel.parts) else "kept"
    except FileNotFoundError:
        outcome = "missing"
    if outcome != "kept":
        journal.remove_owners(tree, rel.parts)
    journal.clear_intent(tree, volume)
    return outcome


def _record(tree: Tree, rel: RelativeDir, owner: Owner) -> None:
    with tree.opened(rel.parts):
        journal.write_owner(tree, rel.parts, owner)


def _is_dir(tree: Tree, parts: tuple[str, ...]) -> bool:
    """Whether ``parts`` is a plain directory (False if missing); Redirected if it is a symlink
    or anything else, checked before an operation record is written for it."""
    try:
        info = tree.entry(parts)
    except FileNotFoundError:
        return False
    if info is None:
        return False
    if stat.S_ISLNK(info.st_mode):
        raise Redirected("/".join(parts), SYMLINK)
    if not stat.S_ISDIR(info.st_mode):
        raise Redirected("/".join(parts), NOT_A_DIRECTORY)
    return True


def _remove(tree: Tree, operation: Operation) -> bool:
    rel = parse_relative(operation.source)
    if not _is_dir(tree, rel.parts) and journal.read_operation(tree, operation.volume) is None:
        journal.remove_owners(tree, rel.parts)
        return False
    journal.write_operation(tree, operation)
    try:
        existed = tree.remove_tree(rel.parts)
    except FileNotFoundError:
        existed = False  # a parent is missing, so the directory is too
    journal.remove_owners(tree, rel.parts)
    journal.clear_operation(tree, operation.volume)
    return existed


def _taken_for_archive(tree: Tree, name: RelativeDir, pending: list[Operation]) -> bool:
    """A directory, records (even without a directory: never judged stale from here) or a
    release under way has the name."""
    shown = str(name)
    return (
        tree.entry(name.parts) is not None
        or journal.has_records(tree, name.parts)
        or any(shown in operation.paths() for operation in pending)
    )


def _archive_target(
    tree: Tree, rel: RelativeDir, volume: str, free: Callable[[tuple[str, ...]], bool]
) -> RelativeDir | None:
    """The archive name for ``rel``: the one an unfinished archive of ``volume`` chose, or the
    first free one; None when there is nothing to archive."""
    if volume:
        pending = journal.read_operation(tree, volume)
        if pending is not None and pending.kind == "archive" and pending.source == str(rel):
            return parse_relative(pending.target)
    if not _is_dir(tree, rel.parts):
        return None
    left = _left_by_an_older_archive(tree, rel, volume)
    if left is not None:
        return left
    operations = journal.read_operations(tree)
    return archive_name(
        rel, lambda name: not free(name.parts) or _taken_for_archive(tree, name, operations)
    )


def _left_by_an_older_archive(tree: Tree, rel: RelativeDir, volume: str) -> RelativeDir | None:
    """The archive name where a version without operation records, which moved the records
    first, left this volume's records when it was killed before the directory's rename: the
    first name without a directory, holding a record made for ``volume``, while ``rel`` itself
    has none. Its retry finishes there, as that version's would."""
    if not volume or journal.has_records(tree, rel.parts):
        return None
    candidate = archive_name(rel, lambda name: tree.entry(name.parts) is not None)
    owner = journal.read_owner(tree, candidate.parts)
    return candidate if owner is not None and owner.volume == volume else None


def _archive(tree: Tree, op: Operation) -> RelativeDir | None:
    """Rename the directory, then move its records, under an ``Operation`` record: run again
    after any failure, it finishes the same archive (roll forward, never back)."""
    source, target = parse_relative(op.source), parse_relative(op.target)
    pending = journal.read_operation(tree, op.volume)
    if pending is None or pending.paths() != op.paths():
        others = [item for item in journal.read_operations(tree) if item.volume != op.volume]
        if tree.entry(target.parts) is not None or any(
            str(target) in item.paths() for item in others
        ):
            raise _TargetTaken(str(target))
        if not _is_dir(tree, source.parts):
            return None
        # Records at the free name without a directory are a crash's leftover of a create; we
        # hold the reservation and the lock that cover the name, so we may judge them stale.
        if _left_by_an_older_archive(tree, source, op.volume) != target:
            journal.remove_owners(tree, target.parts)
        journal.write_operation(tree, op)
    at_source = tree.entry(source.parts) is not None
    at_target = tree.entry(target.parts) is not None
    if at_source and at_target:
        raise StorageError(
            "archive_dir",
            str(source),
            cause=f'both it and its archive "{target}" exist while the archive was under way',
            hint="an admin moved directories here; inspect both and remove "
            f"{JOURNAL_DIR}/operations/{op.volume}.json when done",
        )
    if at_source:
        try:
            tree.rename_dir(source.parent_parts, source.leaf, target.leaf)
        except FileExistsError:
            # Made there since the check (only possible on NFS's check-then-rename, by
            # something that takes no lock): nothing moved, so the record is simply withdrawn.
            journal.clear_operation(tree, op.volume)
            raise _TargetTaken(str(target)) from None
    elif not at_target:
        journal.clear_operation(tree, op.volume)
        return None  # the directory is gone (by hand): its records stay for an admin to see
    journal.move_owners(tree, source.parts, target.parts)
    journal.clear_operation(tree, op.volume)
    return target


def _check_writable(mount: Path, calls: Syscalls) -> None:
    hint = "mount the NFS export there, or point the provisioner at the path it is on"
    if not os.path.lexists(mount):
        raise StorageError("check_writable", mount, "the mount path does not exist", hint)
    if not os.path.isdir(mount):
        raise StorageError("check_writable", mount, "the mount path is not a directory", hint)
    with Tree(mount, calls) as tree:
        tree.probe(f"{_PROBE_PREFIX}{uuid.uuid4().hex}")
