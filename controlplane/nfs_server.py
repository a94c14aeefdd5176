"""An NFS server for the one-node test cluster: nfs-ganesha and its own rpcbind in a private netns.

What: writes a ganesha configuration with two exports under a caller-given state directory, then
starts ``unshare --net --mount --propagation private --fork`` running a small shell script that
brings up ``lo``, mounts a tmpfs on ``/run`` (so rpcbind's socket and ganesha's run files stay
private), starts ``rpcbind -f -w``, waits for ``/run/rpcbind.sock`` and runs ``ganesha.nfsd -F``.
The server is ready at the log line ``NFS SERVER INITIALIZED``. Clients join the network
namespace with ``nsenter --net=/proc/<netns_pid>/ns/net`` and reach it at 127.0.0.1.

Why a namespace: the machine has no kernel NFS, and host ports 111/2049 must stay free, so
several servers can run at once and nothing outside the state directory changes. The script
keeps ganesha and rpcbind as its own children (instead of exec'ing ganesha) so that stopping it
reaps both: this machine's pid 1 does not reap orphans.

Exports (NFSv3 and v4, TCP, AUTH_SYS, FSAL VFS; anonymous uid/gid 65534):
- ``seeds`` (pseudo ``/k8s``): a root-owned 0755 directory, ``No_Root_Squash``.
- ``squash`` (pseudo ``/squash``): owned by 65534:65534, 0755, ``Root_Squash``.

Test infrastructure only: the provisioner never imports it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

NOBODY = 65534
NFS_PORT = 2049
MOUNT_PORT = 20048
READY_LINE = "NFS SERVER INITIALIZED"
HANDLE_FILE = "server.json"
CLIENT_CONFIG = "client.json"

SCRIPT = """\
#!/bin/bash
# Runs as the first process of a private network + mount namespace (see nfs_server.py).
set -u
echo $$ > {netns_pid}
ip link set lo up || exit 1
mount -t tmpfs -o mode=0755 tmpfs /run || exit 1
rpcbind -f -w &
rpc=$!
echo $rpc > {rpcbind_pid}
for _ in $(seq 200); do [ -S /run/rpcbind.sock ] && break; sleep 0.05; done
if [ ! -S /run/rpcbind.sock ]; then
    echo "rpcbind did not create /run/rpcbind.sock" >&2
    kill -TERM $rpc; wait $rpc; exit 1
fi
ganesha.nfsd -F -f {conf} -L {log} -p {pid} &
gan=$!
trap 'kill -TERM $gan 2>/dev/null' TERM INT HUP
rc=0
while kill -0 $gan 2>/dev/null; do wait $gan; rc=$?; done
kill -TERM $rpc 2>/dev/null; wait $rpc
exit $rc
"""

EXPORT = """\
EXPORT {{
    Export_Id = {export_id};
    Path = "{path}";
    Pseudo = "{pseudo}";
    Protocols = 3, 4;
    Transports = TCP;
    Access_Type = RW;
    SecType = sys;
    Squash = {squash};
    Anonymous_Uid = {nobody};
    Anonymous_Gid = {nobody};
    FSAL {{ Name = VFS; }}
}}
"""

CONFIG = """\
NFS_CORE_PARAM {{
    Protocols = 3, 4;
    NFS_Port = {nfs_port};
    MNT_Port = {mount_port};
    Enable_UDP = false;
    Enable_NLM = false;
    Enable_RQUOTA = false;
    Mount_Path_Pseudo = true;
}}
NFSV4 {{
    Graceless = true;
    RecoveryRoot = "{recovery}";
    Only_Numeric_Owners = true;
}}
NFS_KRB5 {{
    Active_krb5 = false;
}}
{exports}"""


@dataclass(frozen=True)
class Export:
    """One export: the host directory behind it and the path clients mount."""

    host_dir: Path
    pseudo: str


@dataclass
class NfsServer:
    """A running server. ``netns_pid`` names the namespace clients must join."""

    state: Path
    netns_pid: int
    unshare_pid: int
    seeds: Export
    squash: Export
    nfs_port: int = NFS_PORT
    mount_port: int = MOUNT_PORT

    @property
    def netns_path(self) -> str:
        return f"/proc/{self.netns_pid}/ns/net"

    def nsenter(self) -> list[str]:
        """The argv prefix that runs a command in the server's network namespace only."""
        return ["nsenter", f"--net={self.netns_path}"]

    def url(self, export: Export, version: int = 3) -> str:
        """The libnfs URL of one export (no rpcbind needed: both ports are given)."""
        return (
            f"nfs://127.0.0.1{export.pseudo}?version={version}"
            f"&nfsport={self.nfs_port}&mountport={self.mount_port}"
        )

    def stop(self, timeout: float = 15.0) -> None:
        """TERM the namespace's script (it stops ganesha, then rpcbind) and wait for all three."""
        _signal_if_ours(self.netns_pid, self.unshare_pid, signal.SIGTERM)
        if not _wait_gone(self.unshare_pid, timeout):
            for name in ("ganesha.pid", "rpcbind.pid"):
                pid = _read_pid(self.state / name)
                if pid is not None:
                    _signal_if_ours(pid, self.netns_pid, signal.SIGKILL)
            _signal_if_ours(self.netns_pid, self.unshare_pid, signal.SIGKILL)
            _signal_pid(self.unshare_pid, signal.SIGKILL)
            _wait_gone(self.unshare_pid, 5.0)
        (self.state / HANDLE_FILE).unlink(missing_ok=True)
        (self.state / CLIENT_CONFIG).unlink(missing_ok=True)


def start(state: Path, timeout: float = 20.0) -> NfsServer:
    """Write the configuration under ``state`` and start the server; raise if it is not ready."""
    state = state.resolve()
    seeds, squash = _make_exports(state)
    conf = _write_config(state, seeds, squash)
    log = state / "ganesha.log"
    log.write_text("")
    for name in ("netns.pid", "rpcbind.pid", "ganesha.pid"):
        (state / name).unlink(missing_ok=True)
    script = _write_script(state, conf, log)
    with (state / "netns.out").open("wb") as out:
        proc = subprocess.Popen(
            ["unshare", "--net", "--mount", "--propagation", "private", "--fork", str(script)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return _wait_ready(state, proc, log, (seeds, squash), timeout)


def _make_exports(state: Path) -> tuple[Export, Export]:
    """The state's directories, and the two exported ones with their owners and modes."""
    for sub in ("exports", "recovery", "run"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    seeds = Export(state / "exports" / "seeds", "/k8s")
    squash = Export(state / "exports" / "squash", "/squash")
    seeds.host_dir.mkdir(exist_ok=True)
    os.chown(seeds.host_dir, 0, 0)
    seeds.host_dir.chmod(0o755)
    squash.host_dir.mkdir(exist_ok=True)
    os.chown(squash.host_dir, NOBODY, NOBODY)
    squash.host_dir.chmod(0o755)
    return seeds, squash


def _write_config(state: Path, seeds: Export, squash: Export) -> Path:
    """``ganesha.conf`` with both exports; returns its path."""
    exports = EXPORT.format(
        export_id=1,
        path=seeds.host_dir,
        pseudo=seeds.pseudo,
        squash="No_Root_Squash",
        nobody=NOBODY,
    ) + EXPORT.format(
        export_id=2, path=squash.host_dir, pseudo=squash.pseudo, squash="Root_Squash", nobody=NOBODY
    )
    conf = state / "ganesha.conf"
    conf.write_text(
        CONFIG.format(
            nfs_port=NFS_PORT, mount_port=MOUNT_PORT, recovery=state / "recovery", exports=exports
        )
    )
    return conf


def _write_script(state: Path, conf: Path, log: Path) -> Path:
    """The namespace's script (lo, private /run, rpcbind, ganesha), executable; returns its path."""
    script = state / "netns.sh"
    script.write_text(
        SCRIPT.format(
            netns_pid=state / "netns.pid",
            rpcbind_pid=state / "rpcbind.pid",
            conf=conf,
            log=log,
            pid=state / "ganesha.pid",
        )
    )
    script.chmod(0o755)
    return script


def _wait_ready(
    state: Path,
    proc: subprocess.Popen[bytes],
    log: Path,
    exports: tuple[Export, Export],
    timeout: float,
) -> NfsServer:
    """The server once ganesha logs :data:`READY_LINE`; else stop what started and raise."""
    seeds, squash = exports
    deadline = time.monotonic() + timeout
    netns_pid = None
    while time.monotonic() < deadline:
        netns_pid = netns_pid or _read_pid(state / "netns.pid")
        if netns_pid is not None and READY_LINE in log.read_text(errors="replace"):
            server = NfsServer(state, netns_pid, proc.pid, seeds, squash)
            _write_handle(server)
            return server
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    returncode = proc.poll()
    if netns_pid is not None:
        NfsServer(state, netns_pid, proc.pid, seeds, squash).stop()
    else:
        _signal_pid(proc.pid, signal.SIGKILL)
        proc.wait()
    tail = (state / "netns.out").read_text(errors="replace")[-2000:]
    tail += log.read_text(errors="replace")[-3000:]
    status = "timed out" if returncode is None else f"exit {returncode}"
    raise RuntimeError(f"nfs-ganesha did not become ready ({status}):\n{tail}")


def load(state: Path) -> NfsServer:
    """The handle of a server started by ``up`` (for ``down``)."""
    raw = json.loads((state.resolve() / HANDLE_FILE).read_text())
    seeds = Export(Path(raw["seeds"]["host_dir"]), raw["seeds"]["pseudo"])
    squash = Export(Path(raw["squash"]["host_dir"]), raw["squash"]["pseudo"])
    return NfsServer(
        Path(raw["state"]),
        raw["netns_pid"],
        raw["unshare_pid"],
        seeds,
        squash,
        raw["nfs_port"],
        raw["mount_port"],
    )


def _write_handle(server: NfsServer) -> None:
    """Record the handle, and the defaults the ``mount.nfs`` stand-in reads."""
    handle = asdict(server)
    (server.state / HANDLE_FILE).write_text(json.dumps(handle, default=str, indent=2))
    client = {
        "netns_pid": server.netns_pid,
        "nfs_port": server.nfs_port,
        "mount_port": server.mount_port,
    }
    (server.state / CLIENT_CONFIG).write_text(json.dumps(client, indent=2))


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name (state, ppid, ...)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _parent_of(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[1])


def _state_of(pid: int) -> str | None:
    fields = _stat_fields(pid)
    return None if fields is None else fields[0]


def _signal_if_ours(pid: int, parent: int, sig: signal.Signals) -> None:
    """Signal ``pid`` only while it is still the child of ``parent`` (no pid reuse accidents)."""
    if _parent_of(pid) == parent:
        _signal_pid(pid, sig)


def _signal_pid(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _wait_gone(pid: int, timeout: float) -> bool:
    """Wait for ``pid`` to exit, reaping it when it is our child (else a zombie counts as gone)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            if _state_of(pid) in (None, "Z"):
                return True
        else:
            if done == pid:
                return True
        time.sleep(0.05)
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m controlplane.nfs_server", description=__doc__)
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("--state", type=Path, required=True, help="state directory")
    args = parser.parse_args(argv)
    if shutil.which("ganesha.nfsd") is None or shutil.which("rpcbind") is None:
        print("needs the Debian packages nfs-ganesha, nfs-ganesha-vfs, rpcbind", file=sys.stderr)
        return 1
    if args.action == "up":
        server = start(args.state)
        print(json.dumps(asdict(server), default=str, indent=2))
        return 0
    load(args.state).stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
