"""End-to-end checks of the NFS pieces of the one-node cluster: ganesha in its netns, the FUSE
client and the ``mount.nfs`` stand-in, against real files on the host export directories.

What: starts ``controlplane.nfs_server`` in a fresh state directory, mounts both exports through
the generated ``STATE/bin/mount.nfs`` and checks that the server, not the client, decides
ownership and permissions (no_root_squash, root squash, a non-root uid), that the common file
operations reach the host directory, and that stopping leaves no process, mount or netns.

Why here: they need root, FUSE and the Debian nfs-ganesha/rpcbind packages, so they run under
``make e2e``, never ``make test``. Not being root is a failure with the reason, never a skip.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from controlplane import mount_nfs, nfs_server

pytestmark = pytest.mark.e2e

NOBODY = nfs_server.NOBODY
USER = 1000
MOUNT_DEADLINE = 10.0


@dataclass
class Mounted:
    """A running server with both exports mounted through the ``mount.nfs`` stand-in."""

    server: nfs_server.NfsServer
    wrapper: Path
    seeds: Path
    squash: Path


def _require_root_and_tools() -> None:
    if os.geteuid() != 0:
        pytest.fail("the NFS e2e tests need root (netns, FUSE, setpriv): run `make e2e` as root")
    missing = [
        tool
        for tool in ("ganesha.nfsd", "rpcbind", "unshare", "nsenter", "setpriv", "umount")
        if shutil.which(tool) is None
    ]
    if missing or not Path("/dev/fuse").exists():
        pytest.fail(f"missing for the NFS e2e tests: {missing or '/dev/fuse'}")


def _state_dir() -> Path:
    """A state directory that uid 1000 can traverse (pytest's own tmp dirs are 0700)."""
    state = Path(tempfile.mkdtemp(prefix="nfs-e2e-", dir="/tmp"))
    state.chmod(0o755)
    return state


def _run_mount(wrapper: Path, spec: str, target: Path, options: str) -> tuple[int, str, float]:
    target.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    done = subprocess.run(
        [str(wrapper), spec, str(target), "-o", options],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd="/",
        env={"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")},
    )
    return done.returncode, done.stderr, time.monotonic() - started


def _mount(wrapper: Path, spec: str, target: Path) -> None:
    code, stderr, elapsed = _run_mount(wrapper, spec, target, "rw,nfsvers=3")
    assert code == 0, f"mount.nfs {spec} exited {code}: {stderr}"
    assert elapsed < MOUNT_DEADLINE
    assert _mounts_under(target) == [str(target)]


def _mounts_under(root: Path) -> list[str]:
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        target = line.split(" ")[4].replace("\\040", " ")
        if target == str(root) or target.startswith(f"{root}/"):
            found.append(target)
    return found


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for this machine's pid 1 (which reaps slowly)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z"


def _netns_users(inode: int) -> list[int]:
    users = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if os.stat(proc / "ns" / "net").st_ino == inode and _alive(int(proc.name)):
                    users.append(int(proc.name))
            except OSError:
                continue
    return users


def _pids(state: Path) -> list[int]:
    """Every process this state directory started: script, ganesha, rpcbind, FUSE clients."""
    files = [state / "netns.pid", state / "rpcbind.pid", state / "ganesha.pid"]
    files += sorted((state / "clients").glob("*.pid"))
    return [int(f.read_text()) for f in files if f.exists()]


def _wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return bool(condition())


def _tear_down(mounted: Mounted) -> None:
    """Unmount, stop, and check that nothing is left; remove the state directory only then."""
    state = mounted.server.state
    pids = _pids(state)
    netns_inode = os.stat(mounted.server.netns_path).st_ino
    for target in (mounted.seeds, mounted.squash):
        if _mounts_under(target):
            subprocess.run(["umount", str(target)], check=False)
    mounted.server.stop()
    gone = _wait_until(lambda: not [pid for pid in pids if _alive(pid)])
    assert gone, f"left running: {[pid for pid in pids if _alive(pid)]}"
    assert _mounts_under(state) == []
    assert _netns_users(netns_inode) == []
    shutil.rmtree(state)


def _start(state: Path) -> Mounted:
    server = nfs_server.start(state)
    try:
        wrapper = mount_nfs.write_wrapper(state)
        mounted = Mounted(server, wrapper, state / "mnt" / "seeds", state / "mnt" / "squash")
        _mount(wrapper, f"127.0.0.1:{server.seeds.pseudo}", mounted.seeds)
        _mount(wrapper, f"127.0.0.1:{server.squash.pseudo}", mounted.squash)
    except BaseException:
        for target in (state / "mnt" / "seeds", state / "mnt" / "squash"):
            subprocess.run(["umount", str(target)], check=False, capture_output=True)
        server.stop()
        raise
    return mounted


@pytest.fixture(scope="module")
def nfs() -> Iterator[Mounted]:
    _require_root_and_tools()
    mounted = _start(_state_dir())
    yield mounted
    _tear_down(mounted)


def _as_user(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["setpriv", f"--reuid={USER}", f"--regid={USER}", "--clear-groups", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd="/",
    )


def test_root_mkdir_on_seeds_export_is_root_owned(nfs: Mounted) -> None:
    (nfs.seeds / "root-dir").mkdir(mode=0o750)
    host = nfs.server.seeds.host_dir / "root-dir"
    st = host.stat()
    assert stat.S_ISDIR(st.st_mode)
    assert (st.st_uid, st.st_gid) == (0, 0)
    assert stat.S_IMODE(st.st_mode) == 0o750
    # no_root_squash: root may give it away
    os.chown(nfs.seeds / "root-dir", USER, USER)
    assert (host.stat().st_uid, host.stat().st_gid) == (USER, USER)


def test_root_is_squashed_on_squash_export(nfs: Mounted) -> None:
    (nfs.squash / "squashed.txt").write_text("from root\n")
    host = nfs.server.squash.host_dir / "squashed.txt"
    assert (host.stat().st_uid, host.stat().st_gid) == (NOBODY, NOBODY)
    assert host.read_text() == "from root\n"
    with pytest.raises(PermissionError) as caught:
        os.chown(nfs.squash / "squashed.txt", USER, USER)
    assert caught.value.errno == errno.EPERM
    assert host.stat().st_uid == NOBODY
    # ganesha squashes the requested owner 0 as well: chown to root is a no-op, not EPERM
    os.chown(nfs.squash / "squashed.txt", 0, 0)
    assert host.stat().st_uid == NOBODY


def test_non_root_uid_creates_files_as_itself(nfs: Mounted) -> None:
    shared = nfs.seeds / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    done = _as_user(f"echo hi > {shared}/mine && mkdir {shared}/sub && id -u")
    assert done.returncode == 0, done.stderr
    host = nfs.server.seeds.host_dir / "shared"
    for name in ("mine", "sub"):
        st = (host / name).stat()
        assert (st.st_uid, st.st_gid) == (USER, USER), name
    assert (host / "mine").read_text() == "hi\n"
    # the server checks permissions for that uid: a root-owned 0755 directory refuses it
    denied = _as_user(f"mkdir {nfs.seeds}/not-yours")
    assert denied.returncode != 0
    assert "Permission denied" in denied.stderr
    assert not (nfs.server.seeds.host_dir / "not-yours").exists()


def test_rename_unlink_rmdir_truncate(nfs: Mounted) -> None:
    work = nfs.seeds / "ops"
    work.mkdir()
    (work / "a.txt").write_bytes(b"0123456789")
    with (work / "a.txt").open("r+b") as handle:
        handle.seek(4)
        assert handle.read(3) == b"456"
        handle.truncate(5)
        handle.flush()
        os.fsync(handle.fileno())
    with (work / "a.txt").open("ab") as handle:
        handle.write(b"XY")
    (work / "a.txt").rename(work / "b.txt")
    host = nfs.server.seeds.host_dir / "ops"
    assert sorted(p.name for p in host.iterdir()) == ["b.txt"]
    assert (host / "b.txt").read_bytes() == b"01234XY"
    assert sorted(p.name for p in work.iterdir()) == ["b.txt"]
    (work / "b.txt").unlink()
    assert not (host / "b.txt").exists()
    work.rmdir()
    assert not host.exists()
    assert os.statvfs(nfs.seeds).f_bsize > 0


def test_symlink_through_nfs_is_a_symlink_on_host(nfs: Mounted) -> None:
    (nfs.seeds / "link").symlink_to("../elsewhere/target")
    host = nfs.server.seeds.host_dir / "link"
    assert host.is_symlink()
    assert os.readlink(host) == "../elsewhere/target"
    assert os.readlink(nfs.seeds / "link") == "../elsewhere/target"
    assert stat.S_ISLNK(os.lstat(nfs.seeds / "link").st_mode)
    (nfs.seeds / "link").unlink()
    assert not host.is_symlink()


def test_mount_helper_fails_fast_on_a_bad_export(nfs: Mounted) -> None:
    target = nfs.server.state / "mnt" / "bad"
    code, stderr, elapsed = _run_mount(nfs.wrapper, "127.0.0.1:/no-such-export", target, "rw")
    assert code == 32, stderr
    assert elapsed < MOUNT_DEADLINE
    assert _mounts_under(target) == []
    code, stderr, elapsed = _run_mount(nfs.wrapper, "127.0.0.1:/k8s", target, "rw,port=2050")
    assert code == 32, stderr
    assert elapsed < MOUNT_DEADLINE


def test_stop_leaves_no_process_mount_or_netns() -> None:
    _require_root_and_tools()
    mounted = _start(_state_dir())
    (mounted.seeds / "probe").write_text("x")
    _tear_down(mounted)
