"""Walk and act under the export through directory descriptors; never follow a symbolic link.

Tenants own everything inside their volumes, symlinks included, and through claim annotations
may choose a claim's path. So every operation here starts from a descriptor on the export root
and opens one component at a time, relative to its parent, with ``O_NOFOLLOW | O_DIRECTORY``.
Effects go to the descriptor that was checked (fchmod, fchown, fsync) or to a name inside a
checked parent (mkdirat, renameat, unlinkat), so there is no window between a check and its use.
A recursive remove never crosses a symlink or a mount point (``st_dev`` change).

storage.py runs these functions on worker threads with a timeout; each primitive call goes
through ``Syscalls`` so tests can inject faults. Paths given here are already validated
``RelativeDir`` parts (paths.py); no kopf, kubernetes or prometheus here.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import secrets
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_MAX_RECORD_BYTES = 1 << 20

SYMLINK = "a symbolic link"
NOT_A_DIRECTORY = "not a directory"
MOUNT_POINT = "a mount point (another filesystem)"


def _quote(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)


class Redirected(Exception):
    """A component of a path under the export is a symlink, not a directory, or another
    filesystem. Nothing was created, changed or removed through it."""

    def __init__(self, where: str, what: str) -> None:
        self.where = where
        self.what = what
        super().__init__(
            f"{_quote(where)} on the export is {what}; the provisioner never follows symbolic "
            "links or crosses into other filesystems under the export, so nothing was touched "
            "through it. It was probably written by a workload: an admin should inspect and "
            "remove it"
        )


class Syscalls(Protocol):
    """The primitive calls, each relative to an open directory descriptor.

    ``where`` is the path of the entry relative to the export root, for fault matching and
    messages only; it is never used to reach the entry.
    """

    def open(self, parent: int, name: str, flags: int, where: str) -> int: ...

    def stat(self, parent: int, name: str, where: str) -> os.stat_result:
        """lstat: a symlink is reported as itself; FileNotFoundError if missing."""

    def mkdir(self, parent: int, name: str, where: str) -> None: ...

    def chmod(self, fd: int, mode: int, where: str) -> None: ...

    def chown(self, fd: int, uid: int, gid: int, where: str) -> None: ...

    def rename(
        self, parent: int, src: str, dst_parent: int, dst: str, where: str, replace: bool
    ) -> None:
        """Without ``replace``, FileExistsError if ``dst`` exists (it is never replaced)."""

    def unlink(self, parent: int, name: str, where: str) -> None: ...

    def rmdir(self, parent: int, name: str, where: str) -> None: ...

    def listdir(self, fd: int, where: str) -> list[str]: ...

    def write(self, fd: int, data: bytes, where: str) -> None: ...

    def fsync(self, fd: int, where: str) -> None: ...


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


class LocalSyscalls:
    """``Syscalls`` on the local kernel (the NFS export is a local mount)."""

    def open(self, parent: int, name: str, flags: int, where: str) -> int:
        return os.open(name, flags, 0o600, dir_fd=parent)

    def stat(self, parent: int, name: str, where: str) -> os.stat_result:
        return os.stat(name, dir_fd=parent, follow_symlinks=False)

    def mkdir(self, parent: int, name: str, where: str) -> None:
        # 0o777 & ~umask like `mkdir -p`; Storage chmods a claim's leaf explicitly.
        os.mkdir(name, 0o777, dir_fd=parent)

    def chmod(self, fd: int, mode: int, where: str) -> None:
        os.fchmod(fd, mode)

    def chown(self, fd: int, uid: int, gid: int, where: str) -> None:
        os.fchown(fd, uid, gid)

    def rename(
        self, parent: int, src: str, dst_parent: int, dst: str, where: str, replace: bool
    ) -> None:
        if replace:
            os.rename(src, dst, src_dir_fd=parent, dst_dir_fd=dst_parent)
            return
        if _renameat2 is not None:
            if (
                _renameat2(
                    parent, os.fsencode(src), dst_parent, os.fsencode(dst), _RENAME_NOREPLACE
                )
                == 0
            ):
                return
            code = ctypes.get_errno()
            # NFS clients refuse RENAME_NOREPLACE with EINVAL; only then fall back below.
            if code not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise OSError(code, os.strerror(code), where)
        # Check-then-rename leaves a race: a directory created at `dst` in between is replaced if
        # it is empty (rename(2) semantics) and refused with ENOTEMPTY if not, so no data is lost.
        try:
            os.stat(dst, dir_fd=dst_parent, follow_symlinks=False)
        except FileNotFoundError:
            pass
        else:
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst)
        try:
            os.rename(src, dst, src_dir_fd=parent, dst_dir_fd=dst_parent)
        except OSError as exc:
            if exc.errno == errno.ENOTEMPTY:
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst) from exc
            raise

    def unlink(self, parent: int, name: str, where: str) -> None:
        os.unlink(name, dir_fd=parent)

    def rmdir(self, parent: int, name: str, where: str) -> None:
        os.rmdir(name, dir_fd=parent)

    def listdir(self, fd: int, where: str) -> list[str]:
        # listdir(fd) reads through a duplicate; the position of ``fd`` itself is untouched.
        return os.listdir(fd)

    def write(self, fd: int, data: bytes, where: str) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    def fsync(self, fd: int, where: str) -> None:
        os.fsync(fd)


def _join(where: str, name: str) -> str:
    return f"{where}/{name}" if where else name


_CHANGES_ALLOWED = 4096
"""How many changes by the tenant one ``remove_tree`` follows (a directory filled again before
its rmdir, an entry replaced by one of another kind, a directory moved from under the walk)
before it gives up with EAGAIN: a workload rewriting its volume forever must not hold a storage
thread forever. The delete is retried later, by which time the workload is usually gone."""

_KEPT_CHANGING = "the volume kept changing while it was deleted; the delete is retried"


def _identity(fd: int) -> tuple[int, int]:
    """``(st_dev, st_ino)`` of an open descriptor: which directory it is, whatever its name."""
    info = os.fstat(fd)
    return info.st_dev, info.st_ino


class _Level(NamedTuple):
    """A directory on the path from the top of a remove down to the current directory."""

    name: str
    """Its name in the level above (unused for the top)."""
    ident: tuple[int, int]
    pending: list[str]
    """Names listed in it and not handled yet; the walk takes them from the end."""


class _Walk:
    """One recursive remove: the current directory (``fd``, the only descriptor it holds,
    whatever the depth), the levels above it by name and identity, and how many more changes by
    the tenant it follows. ``top`` belongs to the caller."""

    def __init__(self, top: int, top_where: str) -> None:
        self.top = top
        self.top_where = top_where
        self.fd = -1
        self.where = top_where
        self.levels: list[_Level] = []
        self.changes_left = _CHANGES_ALLOWED

    def spend(self) -> None:
        """Count one change by the tenant; OSError EAGAIN once there were too many."""
        if self.changes_left <= 0:
            raise OSError(errno.EAGAIN, _KEPT_CHANGING, self.top_where)
        self.changes_left -= 1

    def requeue(self, name: str) -> None:
        """Handle ``name`` in the current directory again: the tenant changed it meanwhile."""
        self.spend()
        self.levels[-1].pending.append(name)

    def move(self, fd: int, where: str) -> None:
        """Make ``fd`` (owned from now on) the current directory; close the previous one."""
        self.close()
        self.fd = fd
        self.where = where

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Tree:
    """An open descriptor on the export root, and every walk and effect below it.

    Used as a context manager by one storage job; the root is reopened for every job, so a
    remounted export is picked up and no descriptor outlives its job.
    """

    def __init__(self, mount: Path, calls: Syscalls) -> None:
        self.calls = calls
        self.mount = mount
        # The mount path itself is the admin's, so following a symlink there is fine.
        self.fd = os.open(mount, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.dev = os.fstat(self.fd).st_dev

    def __enter__(self) -> Tree:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # --- walking ------------------------------------------------------------------------------

    def _refusal(self, parent: int, name: str, where: str) -> Redirected:
        """Why ``name`` could not be opened as a directory without following it."""
        try:
            info = self.calls.stat(parent, name, where)
        except OSError:
            return Redirected(where, NOT_A_DIRECTORY)
        return Redirected(where, SYMLINK if stat.S_ISLNK(info.st_mode) else NOT_A_DIRECTORY)

    def open_child(self, parent: int, name: str, where: str) -> int:
        """Open the directory ``name`` in ``parent``: no symlink, no other filesystem."""
        try:
            fd = self.calls.open(parent, name, _DIR_FLAGS, where)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise self._refusal(parent, name, where) from None
            raise
        if os.fstat(fd).st_dev != self.dev:
            os.close(fd)
            raise Redirected(where, MOUNT_POINT)
        return fd

    @contextlib.contextmanager
    def opened(self, parts: Sequence[str]) -> Iterator[int]:
        """A descriptor on the directory ``parts`` (the root for ``()``), closed afterwards.

        FileNotFoundError if a component is missing; Redirected if one is not a plain
        directory of this filesystem.
        """
        fd = os.dup(self.fd)
        try:
            where = ""
            for name in parts:
                where = _join(where, name)
                child = self.open_child(fd, name, where)
                os.close(fd)
                fd = child
            yield fd
        finally:
            os.close(fd)

    def existing_depth(self, parts: Sequence[str]) -> int:
        """How many leading components of ``parts`` exist (as plain directories)."""
        fd = os.dup(self.fd)
        try:
            where = ""
            for depth, name in enumerate(parts):
                where = _join(where, name)
                try:
                    child = self.open_child(fd, name, where)
                except FileNotFoundError:
                    return depth
                os.close(fd)
                fd = child
            return len(parts)
        finally:
            os.close(fd)

    def entry(self, parts: Sequence[str]) -> os.stat_result | None:
        """lstat of the last component (None if missing); its parents must be plain dirs."""
        with self.opened(parts[:-1]) as parent:
            try:
                return self.calls.stat(parent, parts[-1], "/".join(parts))
            except FileNotFoundError:
                return None

    # --- directories ----------------------------------------------------------------------------

    def make_dirs(self, parts: Sequence[str]) -> tuple[int, list[int]]:
        """Create the missing components of ``parts``; returns an open descriptor on the last
        one (the caller closes it) and the depths (1-based) of the components created here."""
        fd = os.dup(self.fd)
        created: list[int] = []
        try:
            where = ""
            for depth, name in enumerate(parts, start=1):
                where = _join(where, name)
                try:
                    self.calls.mkdir(fd, name, where)
                    created.append(depth)
                except FileExistsError:
                    pass
                child = self.open_child(fd, name, where)
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd, created

    def remove_tree(self, parts: Sequence[str]) -> bool:
        """Remove the directory ``parts`` and everything in it; False only if it is missing
        (FileNotFoundError, as from ``opened``, if a parent of it is missing).

        Symlinks inside are unlinked, never followed; a mount point inside stops the remove.
        The tenant may still be changing its volume: an entry that vanishes is skipped, a
        directory filled again is listed again, and a directory moved from under the walk
        makes it start again from the top. None of that reads as "missing"; after
        ``_CHANGES_ALLOWED`` such changes it gives up with OSError EAGAIN.
        """
        where = "/".join(parts)
        with self.opened(parts[:-1]) as parent:
            try:
                top = self.open_child(parent, parts[-1], where)
            except FileNotFoundError:
                return False
            walk = _Walk(top, where)
            try:
                self._remove_contents(walk)
                while not self._rmdir_emptied(parent, parts[-1], where):
                    walk.spend()
                    self._remove_contents(walk)
            finally:
                walk.close()
                os.close(top)
        return True

    def _remove_contents(self, walk: _Walk) -> None:
        """Empty the top directory of ``walk``, listing it afresh.

        Iterative, so a tenant's deeply nested tree cannot exhaust Python's recursion limit;
        and it holds at most two descriptors of its own at any depth (the current directory
        and the one being entered or gone back to), so it cannot exhaust the descriptors.
        """
        self._start(walk)
        while True:
            level = walk.levels[-1]
            if level.pending:
                self._remove_entry(walk, level.pending.pop())
            elif len(walk.levels) > 1:
                self._ascend(walk)
            else:
                walk.close()
                return

    def _start(self, walk: _Walk) -> None:
        """Make the top the current directory, listed afresh, with no level below it."""
        fd = os.dup(walk.top)
        walk.move(fd, walk.top_where)
        walk.levels = [_Level("", _identity(fd), self._listing(fd, walk.top_where))]

    def _listing(self, fd: int, where: str) -> list[str]:
        """The names in the directory ``fd``; none if it was removed meanwhile."""
        try:
            return self.calls.listdir(fd, where)
        except FileNotFoundError:
            return []

    def _remove_entry(self, walk: _Walk, name: str) -> None:
        """Unlink ``name`` in the current directory, or enter it if it is a directory."""
        where = _join(walk.where, name)
        try:
            info = self.calls.stat(walk.fd, name, where)
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(info.st_mode):
            self._unlink_entry(walk, name, where)
        elif info.st_dev != self.dev:
            raise Redirected(where, MOUNT_POINT)
        else:
            self._descend(walk, name, where)

    def _unlink_entry(self, walk: _Walk, name: str, where: str) -> None:
        """Unlink what is not a directory; a directory put in its place is handled again."""
        try:
            self.calls.unlink(walk.fd, name, where)
        except FileNotFoundError:
            pass
        except IsADirectoryError:
            walk.requeue(name)

    def _descend(self, walk: _Walk, name: str, where: str) -> None:
        """Make the directory ``name`` the current one, its listing a new level; a symlink or
        file put in its place since its lstat is handled again, never followed."""
        try:
            fd = self.calls.open(walk.fd, name, _DIR_FLAGS, where)
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            walk.requeue(name)
            return
        try:
            ident = _identity(fd)
            if ident[0] != self.dev:
                raise Redirected(where, MOUNT_POINT)
            listing = self._listing(fd, where)
        except BaseException:
            os.close(fd)
            raise
        walk.move(fd, where)
        walk.levels.append(_Level(name, ident, listing))

    def _ascend(self, walk: _Walk) -> None:
        """Go back up to the level above and rmdir the directory just emptied there.

        The level above is reached by opening ".." and is used only if it is the directory the
        walk came down from: a tenant who moved the current directory elsewhere makes ".."
        another directory, perhaps outside the volume, whose entries are not ours to remove.
        Then the walk starts again from the top. A directory filled again before its rmdir,
        or replaced by a file, is handled again.
        """
        emptied = walk.levels.pop()
        where = walk.where[: len(walk.where) - len(emptied.name) - 1]
        fd = self._open_parent(walk, walk.levels[-1].ident)
        if fd is None:
            walk.spend()
            self._start(walk)
            return
        emptied_where = walk.where
        walk.move(fd, where)
        try:
            if self._rmdir_emptied(fd, emptied.name, emptied_where):
                return
        except NotADirectoryError:
            pass
        walk.requeue(emptied.name)

    def _open_parent(self, walk: _Walk, ident: tuple[int, int]) -> int | None:
        """A descriptor on ".." of the current directory if that is the directory ``ident``,
        else None. The call's ``where`` is ``<current>/..``, what it opens as the walk sees it,
        so that it is told apart from the open of the same directory on the way down."""
        try:
            fd = self.calls.open(walk.fd, "..", _DIR_FLAGS, _join(walk.where, ".."))
        except FileNotFoundError:
            return None
        try:
            same = _identity(fd) == ident
        except BaseException:
            os.close(fd)
            raise
        if not same:
            os.close(fd)
            return None
        return fd

    def _rmdir_emptied(self, parent: int, name: str, where: str) -> bool:
        """rmdir a directory the walk emptied: True once it is gone (also if someone else
        removed it), False if the tenant put something in it again."""
        try:
            self.calls.rmdir(parent, name, where)
        except FileNotFoundError:
            return True
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                return False
            raise
        return True

    def remove_empty(self, parts: Sequence[str]) -> bool:
        """rmdir: True if removed; False if missing or not empty (nothing with data is lost)."""
        where = "/".join(parts)
        with self.opened(parts[:-1]) as parent:
            try:
                info = self.calls.stat(parent, parts[-1], where)
            except FileNotFoundError:
                return False
            if stat.S_ISLNK(info.st_mode):
                raise Redirected(where, SYMLINK)
            try:
                self.calls.rmdir(parent, parts[-1], where)
            except FileNotFoundError:
                return False
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    return False
                raise
        return True

    def rename_dir(self, parent_parts: Sequence[str], src: str, dst: str) -> bool:
        """Rename the directory ``src`` to ``dst`` inside ``parent_parts``, never replacing
        anything; False if ``src`` is missing, FileExistsError if ``dst`` exists."""
        where = "/".join((*parent_parts, src))
        with self.opened(parent_parts) as parent:
            try:
                info = self.calls.stat(parent, src, where)
            except FileNotFoundError:
                return False
            if stat.S_ISLNK(info.st_mode):
                raise Redirected(where, SYMLINK)
            if not stat.S_ISDIR(info.st_mode):
                raise Redirected(where, NOT_A_DIRECTORY)
            # rename(2) acts on the entry in ``parent`` and never follows ``src``.
            self.calls.rename(parent, src, parent, dst, where, replace=False)
        return True

    def list_dirs(self, parts: Sequence[str] = ()) -> list[str]:
        """Names of the plain directories directly in ``parts``; symlinks are left out."""
        where = "/".join(parts)
        with self.opened(parts) as fd:
            found = []
            for name in self.calls.listdir(fd, where):
                try:
                    info = self.calls.stat(fd, name, _join(where, name))
                except FileNotFoundError:
                    continue
                if stat.S_ISDIR(info.st_mode):
                    found.append(name)
            return sorted(found)

    # --- small files (the provisioner's own records) -------------------------------------------

    def write_file(
        self,
        parts: Sequence[str],
        name: str,
        data: bytes,
        replace: bool = True,
        scratch: Sequence[str] | None = None,
        prefix: str = "tmp-",
    ) -> None:
        """Atomically create or replace the file ``name`` in ``parts``, its data synced to the
        server before it is renamed into place. Without ``replace``, FileExistsError if the
        file exists (it is left as it was).

        The directory is not synced: on NFS, RENAME (like MKDIR and REMOVE) is committed to
        stable storage by the server before it replies (RFC 1813 3.3; RFC 7530 likewise), so
        the record is durable before the next call - the mkdir it guards - is even sent; an
        fsync of a directory adds nothing there but a round trip. A file's WRITEs are unstable
        until COMMIT, which the fsync sends.

        The data is written to ``<prefix><random>`` in ``scratch`` (default: ``parts`` itself)
        and renamed into place. A process killed in between leaves that temporary file behind;
        a scratch directory of its own and a prefix that names the writer let the writer find
        and remove its own leftovers (journal.remove_temporaries) without touching anyone
        else's files in flight.
        """
        where = _join("/".join(parts), name)
        temporary = f"{prefix}{secrets.token_hex(8)}"
        with contextlib.ExitStack() as stack:
            parent = stack.enter_context(self.opened(parts))
            spare = parent if scratch is None else stack.enter_context(self.opened(scratch))
            fd = self.calls.open(spare, temporary, _CREATE_FLAGS, where)
            try:
                self.calls.write(fd, data, where)
                self.calls.fsync(fd, where)
            except BaseException:
                os.close(fd)
                with contextlib.suppress(OSError):
                    self.calls.unlink(spare, temporary, where)
                raise
            os.close(fd)
            try:
                self.calls.rename(spare, temporary, parent, name, where, replace=replace)
            except BaseException:
                with contextlib.suppress(OSError):
                    self.calls.unlink(spare, temporary, where)
                raise

    def read_file(self, parts: Sequence[str], name: str) -> bytes | None:
        """The content of the regular file ``name`` in ``parts``; None if it is missing."""
        where = _join("/".join(parts), name)
        try:
            with self.opened(parts) as parent:
                try:
                    fd = self.calls.open(parent, name, _READ_FLAGS, where)
                except OSError as exc:
                    if exc.errno == errno.ELOOP:
                        raise Redirected(where, SYMLINK) from None
                    raise
                try:
                    if not stat.S_ISREG(os.fstat(fd).st_mode):
                        raise Redirected(where, "not a regular file")
                    chunks = []
                    size = 0
                    while chunk := os.read(fd, 65536):
                        chunks.append(chunk)
                        size += len(chunk)
                        if size > _MAX_RECORD_BYTES:
                            raise OSError(errno.EFBIG, "record file is too large", where)
                    return b"".join(chunks)
                finally:
                    os.close(fd)
        except FileNotFoundError:
            return None

    def remove_file(self, parts: Sequence[str], name: str) -> bool:
        """Unlink ``name`` in ``parts``; False if it was missing. Not synced: REMOVE is
        synchronous on an NFS server (see ``write_file``), and no caller needs more."""
        where = _join("/".join(parts), name)
        try:
            with self.opened(parts) as parent:
                try:
                    self.calls.unlink(parent, name, where)
                except FileNotFoundError:
                    return False
        except FileNotFoundError:
            return False
        return True

    def list_files(self, parts: Sequence[str]) -> list[str]:
        """Names of the regular files directly in ``parts``; [] if the directory is missing."""
        where = "/".join(parts)
        try:
            with self.opened(parts) as fd:
                names = []
                for name in self.calls.listdir(fd, where):
                    try:
                        info = self.calls.stat(fd, name, _join(where, name))
                    except FileNotFoundError:
                        continue
                    if stat.S_ISREG(info.st_mode):
                        names.append(name)
                return sorted(names)
        except FileNotFoundError:
            return []

    def probe(self, name: str) -> None:
        """Create, write and remove the file ``name`` at the root: is the export writable?"""
        fd = self.calls.open(self.fd, name, _CREATE_FLAGS, name)
        try:
            self.calls.write(fd, b"probe\n", name)
        except BaseException:
            # A full export must not collect probe files every few seconds.
            with contextlib.suppress(OSError):
                self.calls.unlink(self.fd, name, name)
            raise
        finally:
            os.close(fd)
        self.calls.unlink(self.fd, name, name)
