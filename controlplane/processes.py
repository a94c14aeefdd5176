"""Starting, watching and stopping the test cluster's processes, by recorded pid.

What: :func:`spawn_logged` (its own session, output appended to a log, killed with its parent
unless detached), :class:`ProcessRecord` (pid and start time, so a reused pid is never
signalled), :func:`stop_processes` (SIGTERM, then SIGKILL, last started first), free loopback
ports, an HTTP(S) probe on loopback, the last lines of a log and a captured ``subprocess.run``.

Why apart: the control plane (``controlplane.runner``) and the kubelet node
(``controlplane.node``) both supervise their processes this way, and neither may signal a
process by name or one it did not start.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import http.client
import os
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from controlplane.network import LOOPBACK

STOP_GRACE = 5.0  # seconds between SIGTERM and SIGKILL
_PR_SET_PDEATHSIG = 1


# --------------------------------------------------------------------------- ports


def free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """``count`` distinct TCP ports that were free on ``host`` a moment ago."""
    with contextlib.ExitStack() as stack:
        socks = [
            stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            for _ in range(count)
        ]
        for sock in socks:
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in socks]


def free_port(host: str = LOOPBACK) -> int:
    """One TCP port that was free on ``host`` a moment ago."""
    return free_ports(1, host)[0]


# --------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class ProcessRecord:
    """A process the control plane started; ``start_ticks`` tells a reused pid apart."""

    component: str
    pid: int
    start_ticks: int


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks) of a live pid from /proc, or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    fields = raw.rsplit(")", 1)[-1].split()  # the command name may contain spaces or ')'
    try:
        return fields[0], int(fields[19])  # stat fields 3 (state) and 22 (starttime)
    except (IndexError, ValueError):
        return None


def _is_running(record: ProcessRecord) -> bool:
    stat = _proc_stat(record.pid)
    return stat is not None and stat[1] == record.start_ticks and stat[0] not in {"Z", "X"}


def _signal(record: ProcessRecord, sig: signal.Signals) -> None:
    if _is_running(record):
        with contextlib.suppress(ProcessLookupError):
            os.kill(record.pid, sig)


def stop_processes(
    records: Sequence[ProcessRecord],
    children: Mapping[int, subprocess.Popen[bytes]] | None = None,
    grace: float = STOP_GRACE,
) -> None:
    """Stop recorded processes, last started first: SIGTERM, then SIGKILL after ``grace`` s.

    One at a time, so kube-apiserver shuts down while etcd still answers (with etcd gone first
    it retries until killed). ``children`` (pid -> Popen) are reaped so no zombie is left.
    """
    kids = dict(children or {})

    def gone(record: ProcessRecord, within: float) -> bool:
        deadline = time.monotonic() + within
        while True:
            if record.pid in kids:
                kids[record.pid].poll()
            if not _is_running(record):
                if record.pid in kids:
                    kids[record.pid].wait(timeout=5)  # /proc saw a zombie before poll() did
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)

    stuck = []
    for record in reversed(records):
        _signal(record, signal.SIGTERM)
        if gone(record, grace):
            continue
        _signal(record, signal.SIGKILL)
        if not gone(record, grace):
            stuck.append(f"{record.component} (pid {record.pid})")
    if stuck:
        raise RuntimeError(f"control plane: still running after SIGKILL: {', '.join(stuck)}")


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn asking Linux to SIGKILL the child when its parent dies (a killed pytest).

    SIGKILL, not SIGTERM: all three would get the signal at once, and kube-apiserver's
    graceful shutdown then waits on the etcd that is shutting down beside it. Nothing of a
    test control plane needs a graceful end; the next start sweeps etcd's data directory.
    """
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    sigkill = int(signal.SIGKILL)

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, sigkill)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def spawn_logged(
    component: str,
    argv: Sequence[str],
    log: Path,
    *,
    cwd: Path,
    detach: bool,
    who: str,
    env: Mapping[str, str] | None = None,
) -> tuple[subprocess.Popen[bytes], ProcessRecord]:
    """Start ``argv`` in its own session (no terminal signals), appending its output to
    ``log`` after a line naming ``who`` started it and how; unless ``detach``, Linux kills it
    when the starting thread dies. Returns the process and its record (pid + start time)."""
    with log.open("ab") as out:
        stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        out.write(f"# {stamp} {who} starts: {' '.join(argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=None if env is None else dict(env),
            start_new_session=True,  # survives the CLI when detached
            preexec_fn=None if detach else _die_with_parent(),  # noqa: PLW1509
        )
    stat = _proc_stat(proc.pid)
    return proc, ProcessRecord(component, proc.pid, stat[1] if stat else 0)


def _run(argv: Sequence[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)


def tail_lines(path: Path, lines: int) -> list[str]:
    """The last ``lines`` lines of a file (empty if it does not exist), read from the end."""
    if lines <= 0:
        return []
    try:
        with path.open("rb") as fh:
            pos = fh.seek(0, os.SEEK_END)
            data = b""
            while pos > 0 and data.count(b"\n") <= lines:
                step = min(65536, pos)
                pos -= step
                fh.seek(pos)
                data = fh.read(step) + data
    except FileNotFoundError:
        return []
    return data.decode("utf-8", errors="replace").splitlines()[-lines:]


# --------------------------------------------------------------------------- health probes


def _http_status(
    port: int, path: str, context: ssl.SSLContext | None = None, timeout: float = 2.0
) -> tuple[int, bytes] | None:
    conn: http.client.HTTPConnection
    if context is None:
        conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    else:
        conn = http.client.HTTPSConnection(LOOPBACK, port, timeout=timeout, context=context)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()
