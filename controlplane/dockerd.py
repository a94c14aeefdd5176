"""A private dockerd: one of our own under a state directory, that leaves the host as it was.

What: :class:`PrivateDockerd` runs ``/usr/sbin/dockerd`` whose data, exec root, pid file,
socket and client configuration all live in one directory of the run's state
(:class:`DockerdPaths`), waits until it answers, runs ``/usr/bin/docker`` against it (captured,
or streamed to a log for long builds) and, as a context manager, stops it and everything it left.
``/usr/bin/docker`` (Debian's 20.10 CLI) is used explicitly, because the unpackaged CLI first in
``PATH`` has no buildx and cannot use BuildKit.

Who calls it: ``controlplane.images``, which imports the base and builds the Dockerfile in it.

What it must not do: change the host beyond the run. The daemon runs with ``--bridge=none
--iptables=false --ip6tables=false --ip-forward=false --ip-masq=false`` (no docker0, no
iptables rules, ``ip_forward`` untouched), its own empty ``--config-file``, its own
``--cgroup-parent`` (removed on stop) and its own mount namespace with a private ``/run``, so
its mounts and what it, containerd and runc write to ``/run`` disappear with it. The one file
dockerd 20.10 still writes outside, ``/etc/docker/key.json``, is removed on stop if it did not
exist before; anything still mounted under the state directory is unmounted; and processes are
stopped by recorded pid, or found by the state directory in their command line, never by name.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from controlplane.imagehost import log, run_logged, unmount_all_under

DOCKER = Path("/usr/bin/docker")  # Debian's CLI 20.10: BuildKit without buildx
DOCKERD = Path("/usr/sbin/dockerd")

DAEMON_START_TIMEOUT = 60.0
DAEMON_STOP_TIMEOUT = 30.0
# dockerd 20.10 writes its trust key here whatever its flags; removed on stop if ours.
HOST_KEY = Path("/etc/docker/key.json")
HOST_DIRS = (Path("/etc/docker"),)
# dockerd runs in a mount namespace of its own with a private tmpfs on /run: what it, its
# containerd and runc put there (/run/docker/plugins, containerd's hardcoded shim socket
# directory /run/containerd/s, runc's default root /run/runc for BuildKit steps) and every mount
# it makes (the data root's self-bind, EXEC_ROOT/netns/default) vanish with the namespace, and
# never meet another containerd's /run/containerd on the same host.
PRIVATE_RUN = 'mount -t tmpfs -o mode=0755 tmpfs /run && exec "$@"'
CGROUP_ROOT = Path("/sys/fs/cgroup")


# --- Pure decisions -------------------------------------------------------------------------


@dataclass(frozen=True)
class DockerdPaths:
    """Where the private daemon keeps everything: one directory under the run's state."""

    root: Path

    @property
    def data_root(self) -> Path:
        return self.root / "data"

    @property
    def exec_root(self) -> Path:
        return self.root / "exec"

    @property
    def pidfile(self) -> Path:
        return self.root / "dockerd.pid"

    @property
    def socket(self) -> Path:
        return self.root / "docker.sock"

    @property
    def config_file(self) -> Path:
        return self.root / "daemon.json"

    @property
    def client_config(self) -> Path:
        return self.root / "client"

    @property
    def log(self) -> Path:
        return self.root / "dockerd.log"

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"

    @property
    def cgroup_parent(self) -> str:
        """A cgroup of this daemon's own for containers and BuildKit steps (cgroupfs driver).

        The default, ``/docker``, would be shared with any other dockerd and is left behind
        (empty) in every hierarchy after the daemon stops; this one is removed on stop.
        """
        digest = hashlib.sha256(str(self.root).encode()).hexdigest()[:12]
        return f"/nfs-provisioner-images-{digest}"


def dockerd_argv(paths: DockerdPaths) -> list[str]:
    """The daemon's command line: everything under ``paths``, no host networking changes.

    Started through ``unshare --mount`` and a private ``/run`` (see :data:`PRIVATE_RUN`);
    ``unshare`` and ``sh`` exec, so the pid started is dockerd's.
    """
    return [
        "unshare",
        "--mount",
        "--propagation=private",
        "--",
        "sh",
        "-c",
        PRIVATE_RUN,
        "sh",
        str(DOCKERD),
        f"--config-file={paths.config_file}",
        f"--data-root={paths.data_root}",
        f"--exec-root={paths.exec_root}",
        f"--pidfile={paths.pidfile}",
        f"--host={paths.host}",
        f"--cgroup-parent={paths.cgroup_parent}",
        "--bridge=none",
        "--iptables=false",
        "--ip6tables=false",
        "--ip-forward=false",
        "--ip-masq=false",
    ]


def docker_env(paths: DockerdPaths, environ: Mapping[str, str]) -> dict[str, str]:
    """The CLI's environment: BuildKit on, our daemon, client config kept out of ``~/.docker``."""
    env = {k: v for k, v in environ.items() if not k.startswith("DOCKER_")}
    env.update(DOCKER_BUILDKIT="1", DOCKER_HOST=paths.host, DOCKER_CONFIG=str(paths.client_config))
    return env


def processes_mentioning(cmdlines: Mapping[int, str], needle: str) -> list[int]:
    """Pids whose command line contains ``needle`` (our state directory)."""
    return sorted(pid for pid, cmdline in cmdlines.items() if needle in cmdline)


# --- Host I/O -------------------------------------------------------------------------------


def remove_cgroups(parent: str, root: Path = CGROUP_ROOT) -> None:
    """Remove ``parent`` and its children in every cgroup v1/v2 hierarchy (empty by now)."""
    for hierarchy in sorted(root.glob("*")) if root.is_dir() else []:
        top = hierarchy / parent.lstrip("/")
        if not top.is_dir():
            continue
        for directory, _, _ in sorted(os.walk(top), key=lambda w: len(w[0]), reverse=True):
            Path(directory).rmdir()  # cgroupfs: rmdir of a cgroup with no tasks and no children


def _cmdlines() -> dict[int, str]:
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                raw = (entry / "cmdline").read_bytes()
                found[int(entry.name)] = raw.replace(b"\0", b" ").decode(errors="replace")
    return found


def _wait_gone(pids: Iterable[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [pid for pid in alive if Path(f"/proc/{pid}").exists()]
    return alive


@dataclass
class PrivateDockerd:
    """A dockerd of our own under ``state``; use as a context manager (stops on exit)."""

    state: Path
    paths: DockerdPaths = field(init=False)
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False)
    _preexisting: tuple[Path, ...] = field(default=(), init=False)

    def __post_init__(self) -> None:
        self.state = self.state.resolve()
        self.paths = DockerdPaths(self.state / "docker")

    def start(self) -> None:
        for required in (DOCKER, DOCKERD):
            if not required.exists():
                raise RuntimeError(f"{required} is missing: apt-get install docker.io")
        self._preexisting = tuple(p for p in (HOST_KEY, *HOST_DIRS) if p.exists())
        self.paths.root.mkdir(parents=True, exist_ok=True)
        self.paths.config_file.write_text("{}\n")  # never the host's /etc/docker/daemon.json
        with self.paths.log.open("ab") as out:
            self._proc = subprocess.Popen(
                dockerd_argv(self.paths),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + DAEMON_START_TIMEOUT
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError(f"dockerd exited {self._proc.returncode}; see {self.paths.log}")
            probe = self.run(["version", "--format", "{{.Server.Version}}"], check=False)
            if probe.returncode == 0:
                log(f"dockerd {probe.stdout.strip()} ready on {self.paths.host}")
                return
            time.sleep(0.2)
        raise RuntimeError(f"dockerd not ready in {DAEMON_START_TIMEOUT} s; see {self.paths.log}")

    def run(
        self, args: Sequence[str], *, check: bool = True, stdin: int | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``/usr/bin/docker ARGS`` against this daemon, output captured."""
        result = subprocess.run(
            [str(DOCKER), *args],
            env=docker_env(self.paths, os.environ),
            capture_output=True,
            text=True,
            check=False,
            stdin=stdin,
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"docker {' '.join(args)} failed (exit {result.returncode}):\n"
                f"{result.stdout[-3000:]}{result.stderr[-3000:]}"
            )
        return result

    def run_logged(self, args: Sequence[str], logfile: Path) -> None:
        """Like :meth:`run` but streaming output to ``logfile`` (long builds)."""
        run_logged([str(DOCKER), *args], logfile, env=docker_env(self.paths, os.environ))

    def stop(self) -> None:
        """Stop the daemon and everything it left: processes, mounts, files outside the state."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(DAEMON_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None
        self._stop_stragglers()
        unmount_all_under(self.paths.root)
        self._remove_host_leftovers()
        remove_cgroups(self.paths.cgroup_parent)

    def _stop_stragglers(self) -> None:
        """containerd and shims name our exec root on their command line; nothing else does."""
        pids = processes_mentioning(_cmdlines(), str(self.paths.root))
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            pids = _wait_gone(pids, 10.0)
        if pids:
            raise RuntimeError(f"processes of the private dockerd survived: {pids}")

    def _remove_host_leftovers(self) -> None:
        """Files dockerd 20.10 writes outside its roots, if they are ours (absent before)."""
        if HOST_KEY not in self._preexisting:
            HOST_KEY.unlink(missing_ok=True)
        for directory in HOST_DIRS:
            if directory not in self._preexisting and directory.is_dir():
                with contextlib.suppress(OSError):  # not empty: someone else's now
                    for sub in sorted(directory.rglob("*"), reverse=True):
                        sub.rmdir()
                    directory.rmdir()

    def __enter__(self) -> PrivateDockerd:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
