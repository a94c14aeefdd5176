"""A FUSE NFSv3 client: the stand-in for the kernel NFS client that this machine lacks.

What: mounts one libnfs URL (``nfs://SERVER/PATH?version=3&nfsport=N&mountport=M``) on a
directory with ``allow_other`` and forwards file and directory operations to the server over
one libnfs context. Each call carries the calling process's uid and gid (``fuse_get_context``)
as AUTH_SYS credentials, so the server, not this process, decides root squash and permissions.
The context is not thread-safe: one lock serialises calls and the credential switch before each.

Why NFSv3: over v4, libnfs 4.0 returns EISDIR for chmod on a directory, which breaks mkdir.
Limits: supplementary groups are not sent (libnfs takes one gid); utimens is a no-op; statfs
reports fixed sizes (the Python binding has no statvfs); locks stay local to this mount.

Runs in the foreground until the mountpoint is unmounted or it gets SIGTERM/SIGINT (libfuse
unmounts then). Started by ``controlplane.mount_nfs``; test infrastructure only.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

import libnfs
import mfusepy

OPEN_FLAGS = os.O_ACCMODE | os.O_APPEND | os.O_TRUNC | os.O_SYNC
CREATE_FLAGS = OPEN_FLAGS | os.O_EXCL
TIME_KEYS = ("atime", "mtime", "ctime")
LOOP_ENDED = 8  # fuse_main's result when its loop ends with an error, as on a signal


class NfsOperations:
    """mfusepy operations over one libnfs context; every method runs with the caller's uid/gid."""

    use_ns = True  # times in nanoseconds (mfusepy reads this attribute)

    def __init__(self, url: str) -> None:
        self._lock = threading.Lock()
        self._cred: tuple[int, int] | None = None
        self._files: dict[int, Any] = {}
        self._next_fh = 1
        self._ctx: Any = libnfs.nfs_init_context()
        if self._ctx is None:
            raise RuntimeError("nfs_init_context failed")
        self._url: Any = libnfs.nfs_parse_url_dir(self._ctx, url)
        if self._url is None:
            raise RuntimeError(f"bad NFS URL {url}: {libnfs.nfs_get_error(self._ctx)}")
        if libnfs.nfs_mount(self._ctx, self._url.server, self._url.path) != 0:
            raise RuntimeError(f"cannot mount {url}: {libnfs.nfs_get_error(self._ctx)}")

    def close(self) -> None:
        libnfs.nfs_destroy_url(self._url)
        libnfs.nfs_destroy_context(self._ctx)

    def _call(self, func: Callable[..., Any], *args: Any) -> int:
        """Run one libnfs call as the FUSE caller; raise OSError for a negative result."""
        uid, gid, _pid = mfusepy.fuse_get_context()
        with self._lock:
            if self._cred != (uid, gid):
                libnfs.nfs_set_uid(self._ctx, uid)
                libnfs.nfs_set_gid(self._ctx, gid)
                self._cred = (uid, gid)
            result = int(func(self._ctx, *args))
        if result < 0:
            raise OSError(-result, os.strerror(-result))
        return result

    def _fh(self, fh: int | None) -> Any:
        if fh is None or fh not in self._files:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        return self._files[fh]

    def _remember(self, handle_ptr: Any) -> int:
        nfsfh = libnfs.NFSFileHandle_value(handle_ptr)
        libnfs.delete_NFSFileHandle(handle_ptr)
        with self._lock:
            fh = self._next_fh
            self._next_fh += 1
            self._files[fh] = nfsfh
        return fh

    def getattr(self, path: str, fh: int | None = None) -> dict[str, int]:
        st = libnfs.nfs_stat_64()
        self._call(libnfs.nfs_lstat64, path, st)
        attrs = {
            "st_mode": int(st.nfs_mode),
            "st_ino": int(st.nfs_ino),
            "st_nlink": int(st.nfs_nlink),
            "st_uid": int(st.nfs_uid),
            "st_gid": int(st.nfs_gid),
            "st_rdev": int(st.nfs_rdev),
            "st_size": int(st.nfs_size),
            "st_blksize": int(st.nfs_blksize),
            "st_blocks": int(st.nfs_blocks),
        }
        for key in TIME_KEYS:
            sec = int(getattr(st, f"nfs_{key}"))
            nsec = int(getattr(st, f"nfs_{key}_nsec"))
            attrs[f"st_{key}"] = sec * 10**9 + nsec
        return attrs

    def readdir(self, path: str, fh: int) -> list[tuple[str, dict[str, int], int]]:
        """Names with inode and mode: with ``use_ino`` an inode of 0 would hide the entry."""
        handle_ptr = libnfs.new_NFSDirHandle()
        self._call(libnfs.nfs_opendir, path, handle_ptr)
        handle = libnfs.NFSDirHandle_value(handle_ptr)
        libnfs.delete_NFSDirHandle(handle_ptr)
        entries: list[tuple[str, dict[str, int], int]] = []
        with self._lock:
            while (entry := libnfs.nfs_readdir(self._ctx, handle)) is not None:
                attrs = {"st_ino": int(entry.inode) or 1, "st_mode": int(entry.mode)}
                entries.append((str(entry.name), attrs, 0))
            libnfs.nfs_closedir(self._ctx, handle)
        return entries

    def mkdir(self, path: str, mode: int) -> int:
        self._call(libnfs.nfs_mkdir, path)
        return self._call(libnfs.nfs_chmod, path, mode & 0o7777)

    def rmdir(self, path: str) -> int:
        return self._call(libnfs.nfs_rmdir, path)

    def create(self, path: str, mode: int, flags: int) -> int:
        handle_ptr = libnfs.new_NFSFileHandle()
        self._call(libnfs.nfs_create, path, flags & CREATE_FLAGS, mode & 0o7777, handle_ptr)
        return self._remember(handle_ptr)

    def open(self, path: str, flags: int) -> int:
        handle_ptr = libnfs.new_NFSFileHandle()
        self._call(libnfs.nfs_open, path, flags & OPEN_FLAGS, handle_ptr)
        return self._remember(handle_ptr)

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        buf = bytearray(size)
        count = self._call(libnfs.nfs_pread, self._fh(fh), offset, size, buf)
        return bytes(buf[:count])

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        return self._call(libnfs.nfs_pwrite, self._fh(fh), offset, len(data), bytearray(data))

    def truncate(self, path: str, length: int, fh: int | None = None) -> int:
        if fh is not None and fh in self._files:
            return self._call(libnfs.nfs_ftruncate, self._files[fh], length)
        return self._call(libnfs.nfs_truncate, path, length)

    def fsync(self, path: str, datasync: int, fh: int) -> int:
        return self._call(libnfs.nfs_fsync, self._fh(fh))

    def flush(self, path: str, fh: int) -> int:
        return 0  # writes go to the server synchronously

    def release(self, path: str, fh: int) -> int:
        with self._lock:
            nfsfh = self._files.pop(fh, None)
            if nfsfh is not None:
                libnfs.nfs_close(self._ctx, nfsfh)
        return 0

    def unlink(self, path: str) -> int:
        return self._call(libnfs.nfs_unlink, path)

    def rename(self, old: str, new: str) -> int:
        return self._call(libnfs.nfs_rename, old, new)

    def link(self, target: str, source: str) -> int:
        return self._call(libnfs.nfs_link, source, target)

    def chmod(self, path: str, mode: int) -> int:
        return self._call(libnfs.nfs_chmod, path, mode & 0o7777)

    def chown(self, path: str, uid: int, gid: int) -> int:
        if uid == -1 or gid == -1:  # "unchanged": libnfs wants both, so send the current ones
            current = self.getattr(path)
            uid = current["st_uid"] if uid == -1 else uid
            gid = current["st_gid"] if gid == -1 else gid
        return self._call(libnfs.nfs_lchown, path, uid, gid)

    def symlink(self, target: str, source: str) -> int:
        """Create the link ``target`` whose content is ``source`` (as ``ln -s source target``)."""
        return self._call(libnfs.nfs_symlink, source, target)

    def readlink(self, path: str) -> str:
        buf = bytearray(4097)
        self._call(libnfs.nfs_readlink, path, buf, len(buf) - 1)
        return bytes(buf).split(b"\0", 1)[0].decode("utf-8", "surrogateescape")

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        return 0  # not forwarded: nothing in the tests or the provisioner depends on it

    def statfs(self, path: str) -> dict[str, int]:
        blocks = 1 << 28  # 1 TiB of 4 KiB blocks: fixed, the binding has no statvfs
        return {
            "f_bsize": 4096,
            "f_frsize": 4096,
            "f_blocks": blocks,
            "f_bfree": blocks,
            "f_bavail": blocks,
            "f_files": 1 << 24,
            "f_ffree": 1 << 24,
            "f_namemax": 255,
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m controlplane.nfs_client", description=__doc__)
    parser.add_argument("url", help="nfs://SERVER/PATH?version=3&nfsport=N&mountport=M")
    parser.add_argument("mountpoint")
    parser.add_argument("--fsname", default=None, help="source shown in mountinfo")
    parser.add_argument("--read-only", action="store_true")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING)
    try:
        ops = NfsOperations(args.url)
    except RuntimeError as exc:
        print(f"nfs_client: {exc}", file=sys.stderr)
        return 32
    try:
        mfusepy.FUSE(
            ops,
            args.mountpoint,
            foreground=True,
            allow_other=True,
            fsname=args.fsname or args.url,
            subtype="nfs",
            attr_timeout=0,
            entry_timeout=0,
            negative_timeout=0,
            use_ino=True,
            ro=args.read_only,
        )
    except RuntimeError as exc:
        if exc.args == (LOOP_ENDED,):  # SIGTERM/SIGINT/SIGHUP: libfuse has unmounted
            return 0
        print(f"nfs_client: FUSE failed with fuse_main code {exc}", file=sys.stderr)
        return 32
    finally:
        ops.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
