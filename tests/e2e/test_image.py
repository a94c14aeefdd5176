"""End-to-end: the image users build, built from the repository's Dockerfile with no registry.

What it proves: ``controlplane.images`` turns the Dockerfile into ``nfs-provisioner:e2e`` on a
machine that reaches PyPI and the Debian mirror but no container registry (a debootstrapped
base, a private dockerd, BuildKit), the image runs ``nfs-provisioner --version`` with the
package's version in a container with no network, its default user is the Dockerfile's
root 0:0 (as nfs-subdir's image), ``docker save`` wrote an archive ``ctr images import`` can
read, and afterwards the host is as it was: no dockerd of ours, no docker0, the same iptables
and ip6tables rules, the same ``ip_forward``, no new cgroup, nothing of dockerd's left in
``/etc/docker`` or ``/run`` (``docker``, ``containerd``, ``runc``).

Runs as root under ``make e2e`` only (``-m e2e``); not as root it fails with the reason, never
skips. One build (about 75 s cold, 25 s with the base tarball cached) serves the first four
tests; the last three check the pure decisions behind it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, fields
from importlib.metadata import version
from pathlib import Path

import pytest

from controlplane.baseimage import apt_mirror, pip_index_env
from controlplane.imagehost import mounts_under
from controlplane.images import EXPECTED_USER, PROJECT_TAG, BuildResult, build_project_image

pytestmark = pytest.mark.e2e

RUN_DIRS = frozenset({"docker", "containerd", "runc"})  # what dockerd 20.10 creates in /run


@dataclass(frozen=True)
class HostState:
    """What a dockerd could change on the host and must not have changed after the build."""

    links: tuple[str, ...]
    iptables: str
    ip6tables: str
    ip_forward: str
    dockerd_pids: frozenset[int]
    etc_docker: tuple[str, ...]
    run_dirs: tuple[str, ...]
    cgroups: tuple[str, ...]


def _normalized_rules(command: str) -> str:
    """``iptables-save`` without its timestamp comments and packet counters."""
    text = subprocess.run([command], capture_output=True, text=True, check=True).stdout
    lines = (re.sub(r"\[\d+:\d+\]", "", line) for line in text.splitlines())
    return "\n".join(line for line in lines if not line.startswith("#"))


def _dockerd_pids() -> frozenset[int]:
    pids = set()
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "comm").read_text().strip() == "dockerd":
                pids.add(int(entry.name))
        except OSError:
            continue  # exited while we looked
    return frozenset(pids)


def host_state() -> HostState:
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True)
    etc_docker = Path("/etc/docker")
    return HostState(
        links=tuple(sorted(line.split(":")[1].strip() for line in links.stdout.splitlines())),
        iptables=_normalized_rules("iptables-save"),
        ip6tables=_normalized_rules("ip6tables-save"),
        ip_forward=Path("/proc/sys/net/ipv4/ip_forward").read_text().strip(),
        dockerd_pids=_dockerd_pids(),
        etc_docker=tuple(sorted(p.name for p in etc_docker.iterdir()))
        if etc_docker.is_dir()
        else (),
        run_dirs=tuple(sorted(p.name for p in Path("/run").iterdir() if p.name in RUN_DIRS)),
        cgroups=tuple(sorted(str(p) for p in Path("/sys/fs/cgroup").glob("*/*") if p.is_dir())),
    )


def _describe(name: str, before: object, after: object) -> str:
    if isinstance(before, tuple | frozenset) and isinstance(after, tuple | frozenset):
        added, removed = sorted(set(after) - set(before)), sorted(set(before) - set(after))
        return f"{name}: added {added}, removed {removed}"
    return f"{name}: {before!r} -> {after!r}"


def host_differences(before: HostState, after: HostState) -> list[str]:
    return [
        _describe(f.name, getattr(before, f.name), getattr(after, f.name))
        for f in fields(HostState)
        if getattr(before, f.name) != getattr(after, f.name)
    ]


@dataclass(frozen=True)
class Built:
    result: BuildResult
    state: Path
    before: HostState
    after: HostState


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    if os.geteuid() != 0:
        pytest.fail(
            "the image e2e test must run as root (debootstrap, a private dockerd): "
            "run `sudo make e2e`",
            pytrace=False,
        )
    state = tmp_path_factory.mktemp("image")
    before = host_state()
    problem = None
    try:
        result = build_project_image(state)
    except RuntimeError as exc:
        problem = str(exc)
    if problem is not None:  # outside the except block: one message, no chained traceback
        pytest.fail(f"the image did not build: {problem}", pytrace=False)
    yield Built(result, state, before, host_state())
    result.tarball.unlink(missing_ok=True)


def test_version_matches_the_package(built: Built) -> None:
    assert built.result.tag == PROJECT_TAG
    assert built.result.version_output == f"nfs-provisioner {version('nfs-provisioner')}"


def test_default_user_is_non_root(built: Built) -> None:
    assert built.result.user == EXPECTED_USER


def test_saved_archive_names_the_image(built: Built) -> None:
    """A ``docker save`` archive: what ``ctr -n k8s.io images import`` takes."""
    with tarfile.open(built.result.tarball) as archive:
        member = archive.extractfile("manifest.json")
        assert member is not None
        manifest = json.load(member)
    assert [tag for entry in manifest for tag in entry["RepoTags"]] == [PROJECT_TAG]


def test_host_is_unchanged(built: Built) -> None:
    differences = host_differences(built.before, built.after)
    assert not differences, "the host changed during the build:\n" + "\n".join(differences)
    assert "docker0" not in built.after.links
    assert not re.search(r"DOCKER", built.after.iptables + built.after.ip6tables)
    leftovers = [
        pid
        for pid in (int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit())
        if _mentions(pid, str(built.state))
    ]
    assert leftovers == [], f"processes still using {built.state}: {leftovers}"
    assert str(built.state) not in Path("/proc/self/mountinfo").read_text()


def _mentions(pid: int, needle: str) -> bool:
    try:
        return needle in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


# The pure decisions behind the build, on this host's kinds of input (no root needed).


def test_apt_mirror_reads_deb822_and_one_line_sources() -> None:
    deb822 = (
        "Types: deb\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\n\n"
        "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n"
    )
    assert apt_mirror([("debian.sources", deb822)]) == "http://mirror.example/debian"
    one_line = (
        "# comment\ndeb [arch=amd64 signed-by=/k.gpg] http://m.example/debian bookworm main\n"
    )
    assert apt_mirror(
        [("other.list", "deb https://x.example/apt cloud main\n"), ("s.list", one_line)]
    ) == ("http://m.example/debian")
    assert apt_mirror([]) == "http://deb.debian.org/debian"


def test_pip_index_env_keeps_index_settings_env_first() -> None:
    listing = (
        ":env:.cert='/etc/ssl/certs/ca-certificates.crt'\n"
        ":env:.find-links='/opt/wheels'\n"
        ":env:.index-url='https://env.example/simple'\n"
        "global.index-url='https://file.example/simple'\n"
        "global.trusted-host='a.example b.example'\n"
    )
    assert pip_index_env(listing) == {
        "PIP_INDEX_URL": "https://env.example/simple",
        "PIP_TRUSTED_HOST": "a.example b.example",
    }


def test_mounts_under_is_deepest_first_and_unescapes() -> None:
    mountinfo = (
        "45 27 254:0 /s /s/docker/data rw - ext4 /dev/vda rw\n"
        "46 27 0:4 net:[1] /s/docker/exec/netns/default rw - nsfs nsfs rw\n"
        "47 27 0:5 / /s\\040x/y rw - tmpfs tmpfs rw\n"
        "48 27 0:6 / /sx rw - tmpfs tmpfs rw\n"
    )
    assert mounts_under(mountinfo, Path("/s")) == [
        Path("/s/docker/exec/netns/default"),
        Path("/s/docker/data"),
    ]
    assert mounts_under(mountinfo, Path("/s x")) == [Path("/s x/y")]
