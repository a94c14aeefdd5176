"""The ``mount.nfs`` stand-in: mounts an NFS export with the FUSE client instead of the kernel.

What: mount(8) runs helpers as ``mount.nfs SERVER:/PATH DIR [-sfnvrw] -o OPTS`` (for kubelet,
``rw`` plus the PV's ``mountOptions``). This maps ``port=``, ``mountport=`` and ``nfsvers=``
(or ``vers=``) into a libnfs URL, starts ``controlplane.nfs_client`` detached in a new session
(``setsid``) and exits 0 once DIR carries the new FUSE mount, or 32 (mount(8)'s "mount failure")
within 10 s. The client joins the NFS server's network namespace with ``nsenter --net`` but
keeps the host mount namespace, so kubelet and runc see the mount. ``umount DIR`` ends it.

Defaults come from the JSON file named by ``$NFS_STANDIN_CONFIG`` (``controlplane.nfs_server``
writes ``STATE/client.json``: ``netns_pid``, ``nfs_port``, ``mount_port``). Without it the client
runs in the caller's network namespace with ports 2049 and 20048. Client logs and pid files go
to ``clients/`` beside that file. :func:`write_wrapper` writes ``STATE/bin/mount.nfs``, a shell
script that sets the variable and runs this module; installing it where mount(8) looks is the
caller's business (nothing here touches anything outside the state directory).

Test infrastructure only: the provisioner never imports it.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG_ENV = "NFS_STANDIN_CONFIG"
MOUNT_FAILURE = 32  # mount(8)'s exit status for "mount failure"
USAGE_ERROR = 1
TIMEOUT = 10.0
REPO = Path(__file__).resolve().parent.parent
FUSE_TYPE = "fuse.nfs"


@dataclass(frozen=True)
class Request:
    """One parsed ``mount.nfs`` invocation."""

    server: str
    path: str
    mountpoint: Path
    options: dict[str, str]
    read_only: bool


def parse_args(argv: list[str]) -> Request:
    """Parse ``SPEC DIR [-sfnvrw] [-o OPTS]...`` the way mount(8) passes them; also
    ``mount -t nfs -o OPTS SPEC DIR`` as the kubelet calls mount(8) (see write_mount_wrapper)."""
    positional: list[str] = []
    options: dict[str, str] = {}
    read_only = False
    args = iter(argv)
    for arg in args:
        if arg == "-t":
            fstype = next(args, "")
            if fstype not in ("nfs", "nfs4"):
                raise ValueError(f'filesystem type "{fstype}" is not nfs')
        elif arg == "-o":
            for item in next(args, "").split(","):
                key, _, value = item.partition("=")
                if key:
                    options[key] = value
        elif arg.startswith("-") and len(arg) > 1:
            read_only = read_only or "r" in arg[1:]
        else:
            positional.append(arg)
    if len(positional) != 2:
        raise ValueError("usage: mount.nfs SERVER:/PATH DIR [-o OPTIONS]")
    spec, directory = positional
    host_end = spec.find("]") + 1 if spec.startswith("[") else 0
    colon = spec.find(":/", host_end)
    if colon <= 0:
        raise ValueError(f"not SERVER:/PATH: {spec}")
    read_only = read_only or "ro" in options
    return Request(spec[:colon], spec[colon + 1 :], Path(directory), options, read_only)


def build_url(request: Request, defaults: dict[str, Any]) -> str:
    """The libnfs URL: NFSv3 unless ``nfsvers``/``vers`` says otherwise; ports given explicitly."""
    opts = request.options
    version = opts.get("nfsvers") or opts.get("vers") or "3"
    version = version.split(".", 1)[0]
    nfs_port = opts.get("port") or str(defaults.get("nfs_port", 2049))
    mount_port = opts.get("mountport") or str(defaults.get("mount_port", 20048))
    query = f"version={version}&nfsport={nfs_port}"
    if version == "3":
        query += f"&mountport={mount_port}"
    return f"nfs://{request.server}{request.path}?{query}"


def fuse_mount_ids(mountpoint: Path) -> set[str]:
    """IDs of the FUSE NFS mounts on ``mountpoint`` in this mount namespace."""
    ids = set()
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split(" ")
        separator = fields.index("-")
        target = fields[4].encode().decode("unicode_escape").encode("latin-1").decode()
        if target == str(mountpoint) and fields[separator + 1] == FUSE_TYPE:
            ids.add(fields[0])
    return ids


def load_defaults() -> tuple[dict[str, Any], Path | None]:
    """The server's defaults and the directory for client logs (none without a config)."""
    config = os.environ.get(CONFIG_ENV)
    if not config:
        return {}, None
    path = Path(config)
    return json.loads(path.read_text()), path.parent / "clients"


def mount(request: Request, timeout: float = TIMEOUT) -> int:
    """Start the FUSE client for ``request``; 0 once mounted, else 32 with the reason on stderr."""
    deadline = time.monotonic() + timeout
    mountpoint = request.mountpoint.resolve()
    if not mountpoint.is_dir():
        print(f"mount.nfs: mount point {mountpoint} does not exist", file=sys.stderr)
        return MOUNT_FAILURE
    defaults, log_dir = load_defaults()
    command = [sys.executable, "-m", "controlplane.nfs_client", build_url(request, defaults)]
    command += [str(mountpoint), "--fsname", f"{request.server}:{request.path}"]
    if request.read_only:
        command.append("--read-only")
    netns_pid = defaults.get("netns_pid")
    if netns_pid is not None:
        netns = f"/proc/{netns_pid}/ns/net"
        if not Path(netns).exists():
            print(f"mount.nfs: the NFS server (netns pid {netns_pid}) is gone", file=sys.stderr)
            return MOUNT_FAILURE
        nsenter = shutil.which("nsenter") or "/usr/bin/nsenter"  # kubelet's PATH may be bare
        command = [nsenter, f"--net={netns}", *command]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    before = fuse_mount_ids(mountpoint)
    log_path = None
    log_start = 0
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / (str(mountpoint).strip("/").replace("/", "_") + ".log")
        log_start = log_path.stat().st_size if log_path.exists() else 0
    with open(log_path or os.devnull, "ab") as log:
        client = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=env,
            start_new_session=True,
        )
    if log_path is not None:
        log_path.with_suffix(".pid").write_text(f"{client.pid}\n")
    while time.monotonic() < deadline:
        if fuse_mount_ids(mountpoint) - before:
            return 0
        if client.poll() is not None:
            tail = (
                log_path.read_bytes()[log_start:][-1500:].decode(errors="replace")
                if log_path
                else ""
            )
            print(f"mount.nfs: client exited {client.returncode}: {tail}", file=sys.stderr)
            return MOUNT_FAILURE
        time.sleep(0.02)
    os.killpg(client.pid, signal.SIGTERM)
    client.wait(5)
    print(f"mount.nfs: {mountpoint} not mounted after {timeout:.0f} s", file=sys.stderr)
    return MOUNT_FAILURE


def write_wrapper(state: Path, python: str = sys.executable) -> Path:
    """Write ``STATE/bin/mount.nfs``, running this module with ``python`` for this state dir."""
    state = state.resolve()
    wrapper = state / "bin" / "mount.nfs"
    wrapper.parent.mkdir(parents=True, exist_ok=True)
    wrapper.write_text(
        "#!/bin/sh\n"
        "# Generated by controlplane.mount_nfs: the mount.nfs stand-in for this state directory.\n"
        f"export {CONFIG_ENV}={shlex.quote(str(state / 'client.json'))}\n"
        f'export PYTHONPATH={shlex.quote(str(REPO))}"${{PYTHONPATH:+:$PYTHONPATH}}"\n'
        f'exec {shlex.quote(python)} -m controlplane.mount_nfs "$@"\n'
    )
    wrapper.chmod(0o755)
    return wrapper


def write_mount_wrapper(state: Path, mount_nfs: Path) -> Path:
    """Write ``STATE/mount-bin/mount``: mount(8) for a kubelet whose PATH starts there. It hands
    ``-t nfs``/``-t nfs4`` to ``mount_nfs`` (the stand-in from :func:`write_wrapper`) and every
    other mount to /bin/mount. The kubelet finds mount(8) through PATH (mount-utils), so no
    system binary is replaced."""
    state = state.resolve()
    wrapper = state / "mount-bin" / "mount"
    wrapper.parent.mkdir(parents=True, exist_ok=True)
    wrapper.write_text(
        "#!/bin/sh\n"
        "# Generated by controlplane.mount_nfs: nfs mounts go to the stand-in, others to mount.\n"
        'case " $* " in\n'
        f'  *" -t nfs "*|*" -t nfs4 "*) exec {shlex.quote(str(mount_nfs))} "$@" ;;\n'
        "esac\n"
        'exec /bin/mount "$@"\n'
    )
    wrapper.chmod(0o755)
    return wrapper


def main(argv: list[str] | None = None) -> int:
    try:
        request = parse_args(sys.argv[1:] if argv is None else argv)
    except ValueError as exc:
        print(f"mount.nfs: {exc}", file=sys.stderr)
        return USAGE_ERROR
    return mount(request)


if __name__ == "__main__":
    sys.exit(main())
