"""Build the project's container image on a machine with Docker but no container registry.

What: (a) makes a local stand-in for ``python:3.11-slim-bookworm`` with ``debootstrap`` from the
Debian mirror the host's apt uses (Python 3.11 from Debian, ``pip`` usable as root, the host's CA
bundle and pip index settings baked in), cached as a tarball under
``~/.cache/nfs-provisioner/images/`` keyed by a hash of its recipe; (b) runs a private ``dockerd``
whose data, exec root, pid file and socket all live in a state directory, imports that base,
builds the repository's ``Dockerfile`` with BuildKit, checks the image (``--version``, default
user), ``docker save``\\ s it into the state directory and stops the daemon again.

Why: the end-to-end tests need the image users build, built from the same Dockerfile, but this
machine reaches PyPI and the Debian mirror only (through a TLS-intercepting proxy signed by a
local CA), never a registry: ``python:3.11-slim-bookworm`` cannot be pulled, and neither can the
``docker/dockerfile`` frontend. ``/usr/bin/docker`` (Debian's 20.10 CLI) is used explicitly,
because the unpackaged CLI first in ``PATH`` has no buildx and cannot use BuildKit.

Who calls it: ``tests/e2e`` (through :func:`build_project_image`) and people, through
``python -m controlplane.images base|build --state DIR`` (prints the tarball's path).

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

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

DOCKER = Path("/usr/bin/docker")  # Debian's CLI 20.10: BuildKit without buildx
DOCKERD = Path("/usr/sbin/dockerd")
DEBOOTSTRAP = "debootstrap"

BASE_TAG = "local/python:3.11-slim-bookworm"
PROJECT_TAG = "nfs-provisioner:e2e"
EXPECTED_USER = "0:0"  # the Dockerfile's USER

SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = ("python3", "python3-pip", "python3-venv")
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
# Not /etc/ssl/certs/ca-certificates.crt: that is the ca-certificates package's file, which its
# postinst (or an `apt-get install` in a derived image) rewrites without the host's local CA.
IMAGE_CA = "/etc/ssl/host-ca-bundle.pem"
IMAGE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Bump when the way the base is made changes, so the cached tarball is rebuilt.
RECIPE_VERSION = 1

# pip settings copied from the host so that pip in the image uses the index the host uses.
# The certificate is not among them: the image gets its own copy of the host's CA (IMAGE_CA).
PIP_KEYS = {
    "index-url": "PIP_INDEX_URL",
    "extra-index-url": "PIP_EXTRA_INDEX_URL",
    "trusted-host": "PIP_TRUSTED_HOST",
    "default-timeout": "PIP_DEFAULT_TIMEOUT",
}
# Later sections win: `pip config list` shows the merged files as `global.`/`install.`/...,
# and environment variables as `:env:.`, which override every file.
PIP_SECTION_PRIORITY = ("global", "wheel", "install", ":env:")

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


def cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where base-image tarballs are kept (same variables as the control-plane binary cache)."""
    env = os.environ if environ is None else environ
    root = env.get("NFS_PROVISIONER_CACHE")
    if not root:
        cache = env.get("XDG_CACHE_HOME") or str(Path(env.get("HOME") or Path.home()) / ".cache")
        root = str(Path(cache) / "nfs-provisioner")
    return Path(root) / "images"


def _deb822_stanzas(text: str) -> Iterator[dict[str, str]]:
    stanza: dict[str, str] = {}
    for line in [*text.splitlines(), ""]:
        if not line.strip():
            if stanza:
                yield stanza
            stanza = {}
        elif not line.startswith("#") and ":" in line and not line[0].isspace():
            key, _, value = line.partition(":")
            stanza[key.strip().lower()] = value.strip()


def _one_line_entries(text: str) -> Iterator[tuple[str, str, str]]:
    """(type, uri, suite) of each ``deb [options] URI SUITE COMPONENTS`` line."""
    for raw in text.splitlines():
        line = re.sub(r"\[[^]]*\]", " ", raw.split("#", 1)[0]).split()
        if len(line) >= 3:
            yield line[0], line[1], line[2]


def apt_mirror(sources: Iterable[tuple[str, str]], suite: str = SUITE) -> str:
    """The URI of the first ``deb`` source for ``suite`` among (file name, text) pairs.

    Understands both ``*.sources`` (deb822) and ``*.list`` (one-line) files; falls back to
    deb.debian.org when no source names the suite itself (``-security``/``-updates`` do not
    count: debootstrap needs the main archive).
    """
    for name, text in sources:
        if name.endswith(".sources"):
            for stanza in _deb822_stanzas(text):
                if (
                    "deb" in stanza.get("types", "").split()
                    and suite in stanza.get("suites", "").split()
                ):
                    return stanza.get("uris", "").split()[0]
        else:
            for kind, uri, entry_suite in _one_line_entries(text):
                if kind == "deb" and entry_suite == suite:
                    return uri
    return DEFAULT_MIRROR


def pip_index_env(config_list: str) -> dict[str, str]:
    """The ``PIP_*`` variables that reproduce the host's index settings, from ``pip config list``.

    Each output line reads ``section.key='value'``. Only index-related keys are kept (see
    :data:`PIP_KEYS`); the certificate and host-local paths such as ``find-links`` are not.
    """
    found: dict[str, tuple[int, str]] = {}
    for line in config_list.splitlines():
        match = re.fullmatch(r"(.+?)\.([a-z-]+)='(.*)'", line.strip())
        if not match or match[2] not in PIP_KEYS or match[1] not in PIP_SECTION_PRIORITY:
            continue
        rank = PIP_SECTION_PRIORITY.index(match[1])
        if match[2] not in found or rank >= found[match[2]][0]:
            found[match[2]] = (rank, match[3])
    return {PIP_KEYS[key]: value for key, (_, value) in sorted(found.items())}


@dataclass(frozen=True)
class BaseRecipe:
    """Everything that determines the base image's content; its hash names the cached tarball."""

    mirror: str
    ca_sha256: str
    pip_env: tuple[tuple[str, str], ...]
    suite: str = SUITE
    packages: tuple[str, ...] = BASE_PACKAGES
    version: int = RECIPE_VERSION

    def key(self) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def tarball_name(self) -> str:
        return f"python-3.11-slim-{self.suite}-{self.key()}.tar"

    def image_env(self) -> dict[str, str]:
        """The ENV the image gets at import (a rootfs tarball carries no image config)."""
        return {
            "PATH": IMAGE_PATH,
            "LANG": "C.UTF-8",
            "PIP_CERT": IMAGE_CA,
            "SSL_CERT_FILE": IMAGE_CA,
            **dict(self.pip_env),
        }

    def import_changes(self) -> list[str]:
        """``docker import --change`` instructions: ENV as above, and python3 as the command."""
        # Quoted as in a Dockerfile, so that values with spaces (pip host lists) stay whole.
        changes = [f"ENV {name}={json.dumps(value)}" for name, value in self.image_env().items()]
        return [*changes, 'CMD ["python3"]']


def debootstrap_argv(recipe: BaseRecipe, rootfs: Path) -> list[str]:
    """debootstrap in a mount namespace of its own: its /proc, /sys (and, in a container, /dev
    binds) in the target can never outlive it on the host, even if it is killed."""
    return [
        "unshare",
        "--mount",
        "--propagation=private",
        "--",
        DEBOOTSTRAP,
        "--variant=minbase",
        f"--include={','.join(recipe.packages)}",
        recipe.suite,
        str(rootfs),
        recipe.mirror,
    ]


def _unescape_mountinfo(field_text: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field_text)


def mounts_under(mountinfo: str, root: Path) -> list[Path]:
    """Mount points at or below ``root`` in a ``/proc/self/mountinfo`` text, deepest first."""
    points = []
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) > 4:
            point = Path(_unescape_mountinfo(fields[4]))
            if point == root or root in point.parents:
                points.append(point)
    return sorted(set(points), key=lambda p: len(p.parts), reverse=True)


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


def build_argv(tag: str, base_tag: str, dockerfile: Path, context: Path) -> list[str]:
    return [
        "build",
        "--network=host",  # RUN pip wheel reaches PyPI; the build has no bridge to use
        f"--build-arg=PYTHON_IMAGE={base_tag}",
        f"--file={dockerfile}",
        f"--tag={tag}",
        str(context),
    ]


def processes_mentioning(cmdlines: Mapping[int, str], needle: str) -> list[int]:
    """Pids whose command line contains ``needle`` (our state directory)."""
    return sorted(pid for pid, cmdline in cmdlines.items() if needle in cmdline)


# --- Host I/O -------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[images] {message}", file=sys.stderr, flush=True)


def read_apt_sources(etc_apt: Path = Path("/etc/apt")) -> list[tuple[str, str]]:
    files = [etc_apt / "sources.list", *sorted((etc_apt / "sources.list.d").glob("*"))]
    return [(f.name, f.read_text()) for f in files if f.is_file()]


def host_pip_config_list() -> str:
    """``pip config list`` as the host's pip (this interpreter's) sees it, env vars included."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"],
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout


def host_recipe(ca_bundle: Path = HOST_CA) -> BaseRecipe:
    return BaseRecipe(
        mirror=apt_mirror(read_apt_sources()),
        ca_sha256=hashlib.sha256(ca_bundle.read_bytes()).hexdigest(),
        pip_env=tuple(sorted(pip_index_env(host_pip_config_list()).items())),
    )


def current_mounts_under(root: Path) -> list[Path]:
    return mounts_under(Path("/proc/self/mountinfo").read_text(), root.resolve())


def unmount_all_under(root: Path) -> None:
    """Unmount whatever is mounted below ``root`` (debootstrap's /proc, dockerd's netns...)."""
    for point in current_mounts_under(root):
        log(f"unmounting {point}")
        if subprocess.run(["umount", str(point)], check=False).returncode != 0:
            subprocess.run(["umount", "--lazy", str(point)], check=True)
    left = current_mounts_under(root)
    if left:
        raise RuntimeError(f"still mounted under {root}: {left}")


def remove_tree(path: Path) -> None:
    """``rm -rf`` that refuses to descend into a mount (a bind of /dev must never be emptied)."""
    if not path.exists():
        return
    unmount_all_under(path)
    shutil.rmtree(path)


def run_logged(
    argv: Sequence[str],
    logfile: Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> None:
    """Run ``argv`` with output appended to ``logfile``; on failure, raise with its tail."""
    logfile.parent.mkdir(parents=True, exist_ok=True)
    with logfile.open("ab") as out:
        out.write(f"$ {' '.join(argv)}\n".encode())
        out.flush()
        code = subprocess.run(
            argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, check=False
        ).returncode
    if code != 0:
        tail = "\n".join(logfile.read_text(errors="replace").splitlines()[-25:])
        raise RuntimeError(f"{' '.join(argv[:2])} failed (exit {code}); {logfile}:\n{tail}")


def customize_rootfs(rootfs: Path, ca_bundle: Path) -> None:
    """Make a Debian rootfs behave like the python image for the Dockerfile, and shrink it."""
    for marker in rootfs.glob("usr/lib/python3*/EXTERNALLY-MANAGED"):
        marker.unlink()  # PEP 668: let `pip install` as root write /usr/local like python:3.11
    python = rootfs / "usr/local/bin/python"
    python.unlink(missing_ok=True)
    python.symlink_to("/usr/bin/python3")
    image_ca = rootfs / IMAGE_CA.lstrip("/")
    image_ca.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ca_bundle, image_ca)
    (rootfs / "etc/hostname").write_text("localhost\n")  # not the build host's name
    for leftover in [
        *rootfs.glob("var/cache/apt/archives/*.deb"),
        *rootfs.glob("var/cache/apt/*.bin"),
        *(p for p in rootfs.glob("var/lib/apt/lists/*") if p.is_file()),
    ]:
        leftover.unlink()


def build_base_tarball(recipe: BaseRecipe, work: Path, target: Path, ca_bundle: Path) -> None:
    """debootstrap into ``work/rootfs``, customize, and tar it to ``target`` (atomically)."""
    rootfs = work / "base-rootfs"
    remove_tree(rootfs)
    try:
        run_logged(debootstrap_argv(recipe, rootfs), work / "debootstrap.log")
    finally:
        unmount_all_under(rootfs)  # nothing by now (see debootstrap_argv); rmtree must be sure
    customize_rootfs(rootfs, ca_bundle)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    try:
        run_logged(
            ["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(partial), "."],
            work / "debootstrap.log",
        )
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
        remove_tree(rootfs)


def ensure_base_tarball(
    state: Path, cache: Path | None = None, ca_bundle: Path = HOST_CA
) -> tuple[Path, BaseRecipe]:
    """The cached base rootfs tarball for the host's current recipe, built if missing."""
    recipe = host_recipe(ca_bundle)
    target = (cache or cache_dir()) / recipe.tarball_name()
    if target.is_file():
        log(f"base image cached: {target}")
    else:
        log(f"building base image {target.name} with debootstrap from {recipe.mirror}")
        started = time.monotonic()
        build_base_tarball(recipe, state, target, ca_bundle)
        log(f"base image built in {time.monotonic() - started:.1f} s")
    return target, recipe


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


@dataclass(frozen=True)
class BuildResult:
    """What the e2e harness needs from a build: the saved image and what was checked."""

    tarball: Path
    tag: str
    version_output: str
    user: str
    timings: dict[str, float]


def import_base(docker: PrivateDockerd, tarball: Path, recipe: BaseRecipe) -> None:
    changes = [f"--change={change}" for change in recipe.import_changes()]
    with tarball.open("rb") as data:
        docker.run(["import", *changes, "-", BASE_TAG], stdin=data.fileno())


def image_user(docker: PrivateDockerd, tag: str) -> str:
    return docker.run(["image", "inspect", "--format", "{{.Config.User}}", tag]).stdout.strip()


def image_version(docker: PrivateDockerd, tag: str) -> str:
    """``nfs-provisioner --version`` run in a container with no network at all."""
    return docker.run(["run", "--rm", "--network=none", tag, "--version"]).stdout.strip()


def build_project_image(
    state: Path,
    *,
    tag: str = PROJECT_TAG,
    repo: Path = REPO,
    cache: Path | None = None,
    keep_data_root: bool = False,
) -> BuildResult:
    """Build ``repo``'s Dockerfile on the local base, check it, save it to ``state``.

    Returns the ``docker save`` tarball (for ``ctr images import``) and the checks' results.
    The daemon is stopped before returning; its data root is removed unless ``keep_data_root``.
    """
    state = state.resolve()
    state.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    mark = time.monotonic()

    def lap(name: str) -> None:
        nonlocal mark
        now = time.monotonic()
        timings[name] = round(now - mark, 1)
        log(f"{name}: {timings[name]} s")
        mark = now

    base, recipe = ensure_base_tarball(state, cache)
    lap("base tarball")
    target = state / f"{tag.replace(':', '_').replace('/', '_')}.tar"
    docker = PrivateDockerd(state)
    try:
        with docker:
            lap("dockerd start")
            import_base(docker, base, recipe)
            lap("base import")
            docker.run_logged(
                build_argv(tag, BASE_TAG, repo / "Dockerfile", repo), state / "build.log"
            )
            lap("image build")
            version, user = image_version(docker, tag), image_user(docker, tag)
            lap("image checks")
            docker.run(["save", f"--output={target}", tag])
            lap("image save")
        lap("dockerd stop")
    finally:
        if not keep_data_root:
            remove_tree(docker.paths.data_root)
    return BuildResult(target, tag, version, user, timings)


# --- Command line ---------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m controlplane.images", description=__doc__)
    parser.add_argument("command", choices=("base", "build"), help="base: only the base tarball")
    parser.add_argument("--state", type=Path, required=True, help="run directory (logs, image)")
    parser.add_argument("--tag", default=PROJECT_TAG)
    parser.add_argument("--keep-data-root", action="store_true")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("must run as root (debootstrap and dockerd)")
    # SIGTERM as SystemExit, so the daemon (in a session of its own) is still stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        if args.command == "base":
            tarball, _ = ensure_base_tarball(args.state.resolve())
            print(tarball)
        else:
            result = build_project_image(
                args.state, tag=args.tag, keep_data_root=args.keep_data_root
            )
            log(f"{result.tag}: {result.version_output!r}, user {result.user!r}")
            log(f"timings (s): {json.dumps(result.timings)}")
            print(result.tarball)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
