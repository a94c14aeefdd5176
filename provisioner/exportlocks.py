"""Locks on the export itself, so that reservations hold across writers.

Several writers may share one export: two clusters (dev and prod on one NAS), two provisioner
names, or the ``handover`` command run beside the provisioner. ``reservations.py`` keeps one
process's operations apart; this module keeps writers apart. SPEC §4.

A writer that works on a directory holds the lock of that directory's first path component:
``.nfs-provisioner/locks/<mirror name>``, created with ``O_CREAT | O_EXCL`` (an exclusive
create is atomic on the NFS server, in v3 and v4; a rename is not, since the Linux client
refuses ``RENAME_NOREPLACE``). Locking the first component is coarser than the reservation
(``team/a`` and ``team/b`` share ``team``'s lock), but it makes "a path conflicts with its
ancestors and descendants" hold with one exclusive create and no lookup that an NFS client's
cache could answer from stale data. Inside one process the lock is shared by every operation
under that component (a count), so the fine-grained reservation still decides there.

The record carries the writer's identity and an expiry; the holder rewrites it every
``ttl / 4`` while it holds it, so a live writer's lock never ages out and a dead writer's does
after ``ttl``. An expired lock is broken by renaming it aside (one breaker wins) and removing it.
At the start of its leadership a provisioner removes the locks its own earlier instances left
(``remove_left_by``): leader election guarantees that no other instance of the same cluster and
provisioner name is acting. Writers' clocks must agree to well within ``ttl``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Protocol, TypeVar

from provisioner.journal import mirror_name, write_as
from provisioner.paths import JOURNAL_DIR
from provisioner.reservations import Busy
from provisioner.safefs import Tree

logger = logging.getLogger(__name__)

LOCKS = (JOURNAL_DIR, "locks")
DEFAULT_TTL = 120.0
_BROKEN_PREFIX = "broken-"
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_T = TypeVar("_T")


def _instance() -> str:
    return f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(4)}"


@dataclass(frozen=True)
class Writer:
    """Who writes the export: a cluster's provisioner name, and this process (``instance``)."""

    cluster: str = ""
    provisioner: str = ""
    instance: str = field(default_factory=_instance)

    def describe(self) -> str:
        return (
            f'provisioner "{self.provisioner or "unknown"}" of cluster '
            f"{self.cluster or 'unknown'} ({self.instance})"
        )


@dataclass(frozen=True)
class LockRecord:
    """The content of a lock file: who holds it, until when (seconds since the epoch)."""

    cluster: str
    provisioner: str
    instance: str
    component: str
    expires: float

    @property
    def writer(self) -> Writer:
        return Writer(self.cluster, self.provisioner, self.instance)


def lock_name(component: str) -> str:
    return mirror_name(component)


def _encode(record: LockRecord) -> bytes:
    return (json.dumps(asdict(record), sort_keys=True) + "\n").encode()


def _decode(raw: bytes) -> LockRecord | None:
    try:
        data = json.loads(raw)
        return LockRecord(
            cluster=str(data["cluster"]),
            provisioner=str(data["provisioner"]),
            instance=str(data["instance"]),
            component=str(data["component"]),
            expires=float(data["expires"]),
        )
    except (ValueError, KeyError, TypeError):
        return None


def live(record: LockRecord | None, modified: float, now: float, ttl: float) -> bool:
    """Whether a lock still counts. A record being written (empty or partial) counts from its
    file's modification time, so a writer killed between the create and the write leaves a
    lock that ages out like any other."""
    if record is not None:
        return record.expires > now
    return modified + ttl > now


# --- on the export (run inside a storage job) ----------------------------------------------------


def _read(tree: Tree, name: str) -> LockRecord | None:
    """The record in lock ``name``; None if there is no lock or its record is not written yet
    (``_modified`` tells those apart)."""
    raw = tree.read_file(LOCKS, name)
    return None if raw is None else _decode(raw)


def _modified(tree: Tree, name: str) -> float | None:
    """The modification time of lock ``name``; None if there is no lock."""
    info = tree.entry((*LOCKS, name))
    return None if info is None else info.st_mtime


def try_create(tree: Tree, record: LockRecord, ttl: float, now: float) -> LockRecord | None:
    """Take the lock of ``record.component``: None when taken, else the record of the live
    holder (a writer whose content is not written yet is shown as unknown). An expired lock
    is broken first; one of this very process (``instance``) that a failed release left is
    taken over."""
    name = lock_name(record.component)
    for _attempt in range(2):
        try:
            _create(tree, name, _encode(record))
            return None
        except FileExistsError:
            pass
        current = _read(tree, name)
        if current is not None and current.instance == record.instance:
            # Ours, left by a release that failed (an EIO on the unlink): the caller does not
            # hold it (ExportLocks takes each component once), so it is taken over.
            renew(tree, record)
            return None
        if current is not None and live(current, 0.0, now, ttl):
            return current
        if current is None:
            # Not written yet (or just released): its age decides.
            modified = _modified(tree, name)
            if modified is None:
                continue  # released between the create and the read
            if live(None, modified, now, ttl):
                return LockRecord("", "", "a writer that is writing its lock", "", 0.0)
        _break(tree, name, current)
    return _read(tree, name) or LockRecord("", "", "unknown", record.component, 0.0)


def _create(tree: Tree, name: str, data: bytes) -> None:
    """Exclusive-create the lock file; the locks directory is made only when it is missing."""
    try:
        _create_in_locks(tree, name, data)
    except FileNotFoundError:
        os.close(tree.make_dirs(LOCKS)[0])
        _create_in_locks(tree, name, data)


def _create_in_locks(tree: Tree, name: str, data: bytes) -> None:
    where = "/".join((*LOCKS, name))
    with tree.opened(LOCKS) as parent:
        fd = tree.calls.open(parent, name, _CREATE, where)
        try:
            tree.calls.write(fd, data, where)
        finally:
            os.close(fd)


def _break(tree: Tree, name: str, expired: LockRecord | None) -> None:
    """Rename the expired lock aside (only one breaker can) and remove it. If what was moved is
    not the expired record read before (another breaker took the name meanwhile), it is put
    back: only the lock that was judged expired is ever removed."""
    aside = f"{_BROKEN_PREFIX}{secrets.token_hex(8)}"
    where = "/".join((*LOCKS, name))
    with tree.opened(LOCKS) as parent:
        try:
            tree.calls.rename(parent, name, parent, aside, where, replace=True)
        except FileNotFoundError:
            return  # another writer broke or released it first
        raw = tree.read_file(LOCKS, aside)
        moved = None if raw is None else _decode(raw)
        if moved != expired:
            try:
                tree.calls.rename(parent, aside, parent, name, where, replace=False)
            except FileExistsError:
                logger.error(
                    "export lock %s: a live lock was moved aside while breaking an expired one, "
                    "and another took its place; %s may overlap another writer's work",
                    where,
                    moved.writer.describe() if moved is not None else "its holder",
                )
                tree.remove_file(LOCKS, aside)
            return
    logger.warning(
        "export lock %s: broke the expired lock of %s",
        where,
        expired.writer.describe() if expired is not None else "a writer killed while taking it",
    )
    tree.remove_file(LOCKS, aside)


def renew(tree: Tree, record: LockRecord) -> bool:
    """Rewrite our lock with a later expiry; False if it is no longer ours (it expired and
    another writer broke it)."""
    name = lock_name(record.component)
    current = _read(tree, name)
    if current is None or current.instance != record.instance:
        return False
    write_as(tree, LOCKS, name, _encode(record), record.cluster, record.provisioner)
    return True


def release(tree: Tree, component: str, instance: str) -> None:
    """Remove our lock of ``component``; another writer's is left alone."""
    name = lock_name(component)
    current = _read(tree, name)
    if current is not None and current.instance == instance:
        tree.remove_file(LOCKS, name)


def remove_left_by(tree: Tree, writer: Writer) -> list[str]:
    """Remove the locks that earlier instances of ``writer``'s cluster and provisioner left
    (killed while holding them); the components they named. Only safe while no other instance
    of that writer acts: the leader's sweep."""
    removed = []
    for name in tree.list_files(LOCKS):
        if name.startswith(_BROKEN_PREFIX):
            tree.remove_file(LOCKS, name)
            continue
        record = _read(tree, name)
        if record is None:
            continue
        if (record.cluster, record.provisioner) == (writer.cluster, writer.provisioner) and (
            record.instance != writer.instance
        ):
            tree.remove_file(LOCKS, name)
            removed.append(record.component)
    return removed


# --- in the process ------------------------------------------------------------------------------


class Runner(Protocol):
    """Runs a job on the export: ``Storage._run`` (a worker thread, with the timeout)."""

    def __call__(self, op: str, job: Callable[[Tree], _T], /) -> Awaitable[_T]: ...


class ExportLocks:
    """The export locks this process holds, counted per component, renewed while held.

    ``run`` runs a job on the export (``Storage._run``: a worker thread, with the timeout).
    """

    def __init__(self, run: Runner, writer: Writer, ttl: float = DEFAULT_TTL) -> None:
        self._run = run
        self.writer = writer
        self.ttl = ttl
        self._counts: dict[str, int] = {}
        self._taking: dict[str, asyncio.Future[None]] = {}
        self._renewing: asyncio.Task[None] | None = None
        # A renewal reads the lock and writes it back: a release between the two would be
        # undone, so renewals and releases take turns.
        self._turn = asyncio.Lock()
        self.lost: set[str] = set()
        """Components whose lock another writer broke while we held it (never expected: it
        means this process stalled for longer than ``ttl``)."""

    def _record(self, component: str) -> LockRecord:
        return LockRecord(
            cluster=self.writer.cluster,
            provisioner=self.writer.provisioner,
            instance=self.writer.instance,
            component=component,
            expires=time.time() + self.ttl,
        )

    async def acquire(self, component: str) -> None:
        """Hold ``component``'s lock (once more, if this process holds it already); ``Busy``
        naming the other writer if it holds it."""
        while component in self._taking:
            await asyncio.shield(self._taking[component])
        if component in self._counts:
            self._counts[component] += 1
            return
        taking: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._taking[component] = taking
        try:
            record = self._record(component)
            holder = await self._run(
                "lock", lambda tree: try_create(tree, record, self.ttl, time.time())
            )
            if holder is not None:
                raise Busy(
                    component,
                    component,
                    f"another writer of the export, {_describe(holder)},",
                )
            self._counts[component] = 1
            self._start_renewing()
        finally:
            del self._taking[component]
            taking.set_result(None)

    async def release(self, component: str) -> None:
        count = self._counts.get(component, 0) - 1
        if count > 0:
            self._counts[component] = count
            return
        self._counts.pop(component, None)
        instance = self.writer.instance
        try:
            async with self._turn:
                await self._run("unlock", lambda tree: release(tree, component, instance))
        except Exception as error:  # noqa: BLE001 - unrenewed, the lock ages out after ttl
            logger.warning(
                "export lock of %r: could not remove it (%s); it expires in %.0f s",
                component,
                error,
                self.ttl,
            )

    def held(self) -> list[str]:
        return sorted(self._counts)

    def _start_renewing(self) -> None:
        if self._renewing is None or self._renewing.done():
            self._renewing = asyncio.get_running_loop().create_task(self._renew_while_held())

    async def _renew_while_held(self) -> None:
        while self._counts:
            await asyncio.sleep(self.ttl / 4)
            for component in list(self._counts):
                try:
                    async with self._turn:
                        if component not in self._counts:
                            continue  # released meanwhile
                        kept = await self._run("renew_lock", _renewal(self._record(component)))
                except Exception as error:  # noqa: BLE001 - tried again at the next round
                    logger.warning("export lock of %r: renewal failed: %s", component, error)
                    continue
                if not kept and component in self._counts:
                    self.lost.add(component)
                    logger.error(
                        "export lock of %r was broken by another writer while held: this "
                        "process stalled for over %.0f s; its operation there may overlap "
                        "another writer's",
                        component,
                        self.ttl,
                    )


def _renewal(record: LockRecord) -> Callable[[Tree], bool]:
    return lambda tree: renew(tree, record)


def _describe(record: LockRecord) -> str:
    with contextlib.suppress(ValueError, OverflowError):
        left = record.expires - time.time()
        if record.cluster or record.provisioner:
            return f"{record.writer.describe()}, lock valid for {max(left, 0):.0f} s more"
    return record.instance or "unknown"
