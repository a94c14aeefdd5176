"""Filesystem effects on the mounted NFS export: create, remove and archive claim directories.

reconciler.py and preflight.py call ``Storage`` (app.py builds it); each blocking call runs on
its own thread with a timeout, so a hung NFS mount fails one attempt instead of stalling the others.
Every destructive call goes through ``paths.locate``. No kopf, kubernetes or prometheus here.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import errno
import functools
import json
import os
import queue
import shutil
import threading
import time
import typing
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, ParamSpec, Protocol, TypeVar

from provisioner.paths import RelativeDir, archive_name, locate, parse_relative

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


class Filesystem(Protocol):
    """The raw, synchronous seam: one method per effect, OSError on failure."""

    def mkdir(self, path: Path) -> None:
        """Create one directory level; FileExistsError if anything exists at ``path``."""

    def chmod(self, path: Path, mode: int) -> None: ...

    def chown(self, path: Path, uid: int, gid: int) -> None:
        """-1 for ``uid`` or ``gid`` leaves that one unchanged."""

    def exists(self, path: Path) -> bool:
        """True if an entry exists, including a dangling symlink."""

    def is_dir(self, path: Path) -> bool: ...

    def rename(self, src: Path, dst: Path) -> None:
        """Move ``src`` to ``dst``; FileExistsError if ``dst`` exists, never replace it."""

    def rmtree(self, path: Path) -> None: ...

    def rmdir(self, path: Path) -> None:
        """Remove an empty directory; OSError ENOTEMPTY (or EEXIST) if it holds anything."""

    def list_dirs(self, path: Path) -> list[str]:
        """Names of the directories directly in ``path``; symlinks are not followed or listed."""

    def write_probe(self, dir: Path) -> None:
        """Create and remove a uniquely named file in ``dir``."""


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def _load_renameat2() -> Any:
    """glibc's renameat2, or None where libc lacks it (musl, glibc < 2.28)."""
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    function.restype = ctypes.c_int
    return function


_renameat2 = _load_renameat2()


class LocalFilesystem:
    """``Filesystem`` on the local kernel (the NFS export is a local mount)."""

    def mkdir(self, path: Path) -> None:
        # Parents get 0o777 & ~umask like `mkdir -p`; Storage chmods the claim's leaf explicitly.
        os.mkdir(path)

    def chmod(self, path: Path, mode: int) -> None:
        os.chmod(path, mode)

    def chown(self, path: Path, uid: int, gid: int) -> None:
        os.chown(path, uid, gid)

    def exists(self, path: Path) -> bool:
        return os.path.lexists(path)

    def is_dir(self, path: Path) -> bool:
        return os.path.isdir(path)

    def rename(self, src: Path, dst: Path) -> None:
        if _renameat2 is not None:
            flags = _RENAME_NOREPLACE
            if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
                return
            code = ctypes.get_errno()
            # NFS clients refuse RENAME_NOREPLACE with EINVAL; only then fall back below.
            if code not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise OSError(code, os.strerror(code), str(src), None, str(dst))
        # Check-then-rename leaves a race: a directory created at `dst` in between is replaced if
        # it is empty (rename(2) semantics) and refused with ENOTEMPTY if not, so no data is lost.
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
        try:
            os.rename(src, dst)
        except OSError as exc:
            if exc.errno == errno.ENOTEMPTY:
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from exc
            raise

    def rmtree(self, path: Path) -> None:
        shutil.rmtree(path)

    def rmdir(self, path: Path) -> None:
        os.rmdir(path)

    def list_dirs(self, path: Path) -> list[str]:
        with os.scandir(path) as entries:
            return [entry.name for entry in entries if entry.is_dir(follow_symlinks=False)]

    def write_probe(self, dir: Path) -> None:
        probe = dir / f".nfs-provisioner-probe-{uuid.uuid4().hex}"
        descriptor = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(descriptor, b"probe\n")
        finally:
            os.close(descriptor)
        os.unlink(probe)


FaultOp = Literal[
    "mkdir",
    "chmod",
    "chown",
    "exists",
    "is_dir",
    "rename",
    "rmtree",
    "rmdir",
    "list_dirs",
    "write_probe",
]
_FAULT_OPS: tuple[FaultOp, ...] = typing.get_args(FaultOp)


@dataclass(frozen=True)
class FaultRule:
    """Make ``op`` on paths containing ``match`` raise ``errno`` ("error") or block ("hang")."""

    op: str
    match: str = ""
    effect: Literal["error", "hang"] = "error"
    errno: str = "EIO"

    def applies(self, op: str, paths: Sequence[Path]) -> bool:
        return self.op == op and any(self.match in str(path) for path in paths)


def write_fault_rules(rules_file: Path, rules: Sequence[FaultRule]) -> None:
    """Replace the rules atomically, so a running provisioner never reads half a file."""
    staging = rules_file.with_name(f".{rules_file.name}.{uuid.uuid4().hex}")
    staging.write_text(json.dumps([asdict(rule) for rule in rules]))
    os.replace(staging, rules_file)


def read_fault_rules(rules_file: Path) -> list[FaultRule]:
    """The rules in ``rules_file``; a missing file means no faults."""
    try:
        raw = json.loads(rules_file.read_text())
    except FileNotFoundError:
        return []
    except ValueError as exc:
        raise ValueError(f"fault rules file {_quote(rules_file)} is not valid JSON: {exc}") from exc
    if not isinstance(raw, list):
        raise ValueError(f"fault rules file {_quote(rules_file)} must hold a JSON list of rules")
    return [_parse_fault_rule(rules_file, index, item) for index, item in enumerate(raw)]


def _parse_fault_rule(rules_file: Path, index: int, item: object) -> FaultRule:
    where = f"fault rule #{index} in {_quote(rules_file)}"
    if not isinstance(item, dict) or not all(isinstance(value, str) for value in item.values()):
        raise ValueError(f"{where} must be an object of strings, got {item!r}")
    unknown = set(item) - {"op", "match", "effect", "errno"}
    if unknown:
        raise ValueError(
            f"{where} has unknown keys {sorted(unknown)}; use op, match, effect, errno"
        )
    rule = FaultRule(**item)
    if rule.op not in _FAULT_OPS:
        raise ValueError(f"{where}: op {_quote(rule.op)} is not one of {', '.join(_FAULT_OPS)}")
    if rule.effect not in ("error", "hang"):
        raise ValueError(f'{where}: effect {_quote(rule.effect)} must be "error" or "hang"')
    if not isinstance(getattr(errno, rule.errno, None), int):
        raise ValueError(f'{where}: errno {_quote(rule.errno)} is not a name like "EACCES"')
    return rule


class FaultInjectingFilesystem:
    """A ``Filesystem`` that fails or hangs on demand; the fault seam for tests, not a mock.

    The rules file is re-read before every call, so a test can change faults while a
    provisioner subprocess runs. A hang lasts until its rule is removed (then the real call
    proceeds, as when an NFS server comes back) or ``max_hang`` seconds pass.
    """

    def __init__(
        self, inner: Filesystem, rules_file: Path, max_hang: float = 3600.0, poll: float = 0.02
    ) -> None:
        self.inner = inner
        self.rules_file = rules_file
        self._max_hang = max_hang
        self._poll = poll

    def _inject(self, op: FaultOp, *paths: Path) -> None:
        for rule in read_fault_rules(self.rules_file):
            if not rule.applies(op, paths):
                continue
            if rule.effect == "hang":
                self._hang(rule)
            else:
                code = int(getattr(errno, rule.errno))
                raise OSError(code, os.strerror(code), str(paths[0]))

    def _hang(self, rule: FaultRule) -> None:
        deadline = time.monotonic() + self._max_hang
        while time.monotonic() < deadline and rule in read_fault_rules(self.rules_file):
            time.sleep(self._poll)

    def mkdir(self, path: Path) -> None:
        self._inject("mkdir", path)
        self.inner.mkdir(path)

    def chmod(self, path: Path, mode: int) -> None:
        self._inject("chmod", path)
        self.inner.chmod(path, mode)

    def chown(self, path: Path, uid: int, gid: int) -> None:
        self._inject("chown", path)
        self.inner.chown(path, uid, gid)

    def exists(self, path: Path) -> bool:
        self._inject("exists", path)
        return self.inner.exists(path)

    def is_dir(self, path: Path) -> bool:
        self._inject("is_dir", path)
        return self.inner.is_dir(path)

    def rename(self, src: Path, dst: Path) -> None:
        self._inject("rename", src, dst)
        self.inner.rename(src, dst)

    def rmtree(self, path: Path) -> None:
        self._inject("rmtree", path)
        self.inner.rmtree(path)

    def rmdir(self, path: Path) -> None:
        self._inject("rmdir", path)
        self.inner.rmdir(path)

    def list_dirs(self, path: Path) -> list[str]:
        self._inject("list_dirs", path)
        return self.inner.list_dirs(path)

    def write_probe(self, dir: Path) -> None:
        self._inject("write_probe", dir)
        self.inner.write_probe(dir)


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


class Storage:
    """Claim directories under ``mount``, each operation one thread job with a timeout.

    A timed-out job keeps its thread until the kernel returns, so ``max_threads`` must exceed
    the number of concurrent callers (the reconciler's workers) plus the calls expected to hang;
    when all threads are stuck, new calls wait in the queue and time out too, and never run late.
    """

    def __init__(
        self,
        mount: Path,
        fs: Filesystem,
        timeout: float,
        max_threads: int = 16,
        observe: Observer | None = None,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"storage timeout {timeout!r} s must be positive")
        if max_threads < 1:
            raise ValueError(f"storage max_threads {max_threads!r} must be at least 1")
        self.mount = mount
        self.timeout = timeout
        self._fs = fs
        self._observe = observe
        self._pool = _DaemonThreadPool(max_threads, "storage")

    async def ensure_dir(self, rel: RelativeDir, owner: DirOwner) -> bool:
        """Create ``rel`` (and missing parents); True if the leaf was created, False if reused.

        The leaf is chmod'ed to ``owner.mode`` (umask-independent) and chown'ed if asked, also
        when reused, as nfs-subdir does. Parents get 0o777 & ~umask, like ``mkdir -p``.
        """
        return await self._run("ensure_dir", rel, lambda: self._ensure_dir(rel, owner))

    async def remove_dir(self, rel: RelativeDir | str) -> bool:
        """Remove ``rel`` and its contents; False if it was already missing. Parents stay."""
        checked = _checked(rel)
        return await self._run("remove_dir", checked, lambda: self._remove_dir(checked))

    async def archive_dir(self, rel: RelativeDir | str) -> RelativeDir | None:
        """Rename ``rel`` to a free ``archived-<leaf>[-N]`` beside it; None if it is missing."""
        checked = _checked(rel)
        return await self._run("archive_dir", checked, lambda: self._archive_dir(checked))

    async def discard_created_dir(self, rel: RelativeDir) -> None:
        """Remove a leaf this provisioner just created for a claim whose PV was never saved."""
        await self._run("discard_created_dir", rel, lambda: self._remove_dir(rel))

    async def list_top_dirs(self) -> list[str]:
        """Names of the directories directly under the export (symlinks excluded)."""
        return await self._run("list_top_dirs", None, lambda: self._fs.list_dirs(self.mount))

    async def remove_empty_dir(self, rel: RelativeDir) -> bool:
        """Remove ``rel`` only if it is empty: True if removed, False if it holds anything or is
        already gone. Never recursive, so it cannot lose data whatever the caller believed."""
        return await self._run("remove_empty_dir", rel, lambda: self._remove_empty_dir(rel))

    async def check_writable(self) -> None:
        """Preflight: the mount is a directory where a file can be written and removed."""
        await self._run("check_writable", None, self._check_writable)

    def close(self) -> None:
        """Stop idle threads; threads stuck in a hung call are daemons and die with the process."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _run(self, op: str, rel: RelativeDir | None, job: Callable[[], _T]) -> _T:
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

    def _ensure_dir(self, rel: RelativeDir, owner: DirOwner) -> bool:
        for depth in range(1, len(rel.parts)):
            parent = locate(self.mount, RelativeDir(rel.parts[:depth]))
            if not self._fs.is_dir(parent):
                self._make_dir("ensure_dir", parent)
        leaf = locate(self.mount, rel)
        created = self._make_dir("ensure_dir", leaf)
        self._fs.chmod(leaf, owner.mode)
        if owner.uid is not None or owner.gid is not None:
            uid = -1 if owner.uid is None else owner.uid
            gid = -1 if owner.gid is None else owner.gid
            self._fs.chown(leaf, uid, gid)
        return created

    def _make_dir(self, op: str, path: Path) -> bool:
        try:
            self._fs.mkdir(path)
        except FileExistsError:
            if self._fs.is_dir(path):
                return False
            raise StorageError(
                op,
                path,
                cause="it exists but is not a directory",
                hint="move the file out of the way on the export, or use another pathPattern",
            ) from None
        return True

    def _remove_dir(self, rel: RelativeDir) -> bool:
        path = locate(self.mount, rel)
        if not self._fs.exists(path):
            return False
        try:
            self._fs.rmtree(path)
        except FileNotFoundError:
            # Someone else removed it meanwhile; only a leftover still on disk is a failure.
            if self._fs.exists(path):
                raise
        return True

    def _remove_empty_dir(self, rel: RelativeDir) -> bool:
        try:
            self._fs.rmdir(locate(self.mount, rel))
        except FileNotFoundError:
            return False
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                return False
            raise
        return True

    def _archive_dir(self, rel: RelativeDir) -> RelativeDir | None:
        source = locate(self.mount, rel)
        if not self._fs.exists(source):
            return None
        for _ in range(_ARCHIVE_ATTEMPTS):
            target = archive_name(
                rel, lambda name: self._fs.exists(self.mount.joinpath(*name.parts))
            )
            try:
                self._fs.rename(source, locate(self.mount, target))
            except FileExistsError:
                continue  # the name was taken between the check and the rename: pick the next
            return target
        raise StorageError(
            "archive_dir",
            source,
            cause=f"every free archive name was taken before the rename, {_ARCHIVE_ATTEMPTS} times",
            hint="something else is creating archived-* directories here; the delete is retried",
        )

    def _check_writable(self) -> None:
        if not self._fs.exists(self.mount):
            raise StorageError(
                "check_writable",
                self.mount,
                cause="the mount path does not exist",
                hint="mount the NFS export there, or point the provisioner at the path it is on",
            )
        if not self._fs.is_dir(self.mount):
            raise StorageError(
                "check_writable",
                self.mount,
                cause="the mount path is not a directory",
                hint="mount the NFS export there, or point the provisioner at the path it is on",
            )
        self._fs.write_probe(self.mount)


def _checked(rel: RelativeDir | str) -> RelativeDir:
    # Strings come from PV annotations: validate before queueing, so refusals are immediate.
    return parse_relative(rel) if isinstance(rel, str) else rel
