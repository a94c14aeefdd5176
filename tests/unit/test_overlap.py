"""Regression tests of issue 25: ownership when operations overlap.

Each test plays one race the issue reproduced, deterministically: a ``Pause`` holds one
operation's worker thread at a chosen filesystem call while the other operation runs to its
end, then lets it go on. The control loop is the real ``Reconciler`` over ``FakeKube`` and a
real ``Storage`` on a temporary export, with tenant-chosen paths (``pathPattern`` reading a
claim annotation, nfs-subdir's documented example). After each race, ``check_export`` holds
the promise: every volume's data sits in a directory recorded for its own tenant, and no
directory recorded for one tenant is inside another tenant's.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import resource
import tempfile
import threading
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from provisioner.safefs import LocalSyscalls
from tests.overlap_world import MARK, Cluster, check_export, make_cluster, records

WAIT = 20.0
"""Seconds a paused call waits for the test at most: a bug must fail the test, not hang it."""


class Pause(LocalSyscalls):
    """Holds the first call of ``op`` whose ``where`` passes ``match`` until ``go`` is set."""

    def __init__(self) -> None:
        self.rule: tuple[str, Callable[[str], bool]] | None = None
        self.reached = threading.Event()
        self.go = threading.Event()
        self.fail: tuple[str, str] | None = None
        """(op, where): fail that call once with EIO."""

    def arm(self, op: str, match: Callable[[str], bool]) -> None:
        self.rule = (op, match)
        self.reached.clear()
        self.go.clear()

    def _hold(self, op: str, where: str) -> None:
        if self.fail == (op, where):
            self.fail = None
            raise OSError(errno.EIO, "injected I/O error", where)
        if self.rule is not None and self.rule[0] == op and self.rule[1](where):
            self.rule = None
            self.reached.set()
            if not self.go.wait(WAIT):
                raise AssertionError(f"paused {op} {where} was never released")

    def open(self, parent: int, name: str, flags: int, where: str) -> int:
        self._hold("open", where)
        return super().open(parent, name, flags, where)

    def mkdir(self, parent: int, name: str, where: str) -> None:
        self._hold("mkdir", where)
        super().mkdir(parent, name, where)

    def rename(
        self, parent: int, src: str, dst_parent: int, dst: str, where: str, replace: bool
    ) -> None:
        self._hold("rename", where)
        super().rename(parent, src, dst_parent, dst, where, replace)

    def write(self, fd: int, data: bytes, where: str) -> None:
        self._hold("write", where)
        super().write(fd, data, where)


@pytest.fixture
def export(tmp_path: Path) -> Iterator[Path]:
    """On /dev/shm where it can be: the scan-limit test makes 20,000 directories."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        with tempfile.TemporaryDirectory(dir=shm) as scratch:
            path = Path(scratch) / "export"
            path.mkdir()
            yield path
        return
    path = tmp_path / "export"
    path.mkdir()
    yield path


@pytest.fixture
def pause() -> Iterator[Pause]:
    calls = Pause()
    yield calls
    calls.go.set()


@pytest.fixture
def clusters(export: Path, pause: Pause) -> Iterator[list[Cluster]]:
    made = [make_cluster(export, "cluster-1", pause), make_cluster(export, "cluster-2", pause)]
    yield made
    for cluster in made:
        cluster.storage.close()


async def paused_while(
    pause: Pause, first: Coroutine[Any, Any, bool], then: Callable[[], Coroutine[Any, Any, Any]]
) -> bool:
    """Run ``first`` until its armed call, all of ``then()``, and ``first`` to its end."""
    task = asyncio.ensure_future(first)
    reached = await asyncio.to_thread(pause.reached.wait, WAIT)
    try:
        if reached:
            await then()
    finally:
        pause.go.set()
    return await task


def is_intent(where: str) -> bool:
    return where.startswith(".nfs-provisioner/intents/")


# --- 1. a release racing another namespace's claim -----------------------------------------------


@pytest.mark.parametrize(
    "path",
    [pytest.param("x/archived-app/sub", id="inside"), pytest.param("x/archived-app", id="at")],
)
def test_a_claim_for_the_archive_name_racing_the_archive(
    export: Path, clusters: list[Cluster], pause: Pause, path: str
) -> None:
    cluster = clusters[0]
    cluster.add_class(onDelete="archive")

    async def scenario() -> None:
        await cluster.bound("team-a", "app", "x/app", export)
        cluster.add_claim("team-b", "b", path)
        # team-b's claim is inspected, then held before its directory is made, while team-a's
        # volume is archived to the very name it chose.
        pause.arm("write", is_intent)
        await paused_while(pause, cluster.provision("b"), lambda: cluster.release("app"))
        for _ in range(3):
            await cluster.release("app")
            if await cluster.provision("b"):
                cluster.moved_in("b", export)
                break

    asyncio.run(scenario())
    check_export(export)
    cluster.check_volumes(export)
    assert cluster.claims["app"].volume_name_for not in cluster.kube.volumes, "archived"


# --- 2. an archive rename failing halfway, then claims ------------------------------------------


def test_an_archive_that_failed_halfway_keeps_its_names_from_claims(
    export: Path, clusters: list[Cluster], pause: Pause
) -> None:
    cluster = clusters[0]
    cluster.add_class(onDelete="archive")

    async def scenario() -> None:
        await cluster.bound("team-a", "app", "x/app", export)
        pause.fail = ("rename", "x/app")
        assert not await cluster.release("app"), "the EIO fails this attempt"
        cluster.add_claim("team-b", "b", "x/archived-app")
        if await cluster.provision("b"):
            cluster.moved_in("b", export)
        assert await cluster.release("app"), "the retry finishes the archive"
        for name in ("archived-app", "archived-app-2"):
            claim = cluster.add_claim("x", f"x-{name}", f"x/{name}")
            if await cluster.provision(claim.name):
                cluster.moved_in(claim.name, export)

    asyncio.run(scenario())
    check_export(export)
    cluster.check_volumes(export)
    assert (export / "x" / "archived-app" / MARK).read_text() == "cluster-1/team-a"


# --- 3. two clusters on one export ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "second"),
    [
        pytest.param(("team-a", "shared"), ("team-b", "shared/x"), id="nested"),
        pytest.param(("team-a", "team-a/data"), ("team-a", "team-a/data"), id="same-path"),
    ],
)
def test_two_clusters_creating_overlapping_paths(
    export: Path,
    clusters: list[Cluster],
    pause: Pause,
    first: tuple[str, str],
    second: tuple[str, str],
) -> None:
    one, two = clusters
    for cluster in clusters:
        cluster.add_class(onDelete="delete")

    async def scenario() -> None:
        one.add_claim(first[0], "a", first[1])
        two.add_claim(second[0], "b", second[1])

        async def first_cluster() -> None:
            if await one.provision("a"):
                one.moved_in("a", export)

        # Cluster 2 inspects, and is held before it creates; cluster 1 provisions meanwhile.
        pause.arm("write", is_intent)
        if await paused_while(pause, two.provision("b"), first_cluster):
            two.moved_in("b", export)
        # Then each retries what failed, and cluster 1 releases its volume (onDelete: delete).
        if "b" not in two.moved and await two.provision("b"):
            two.moved_in("b", export)
        if "a" not in one.moved:
            await first_cluster()
        check_export(export)
        if "a" in one.moved:
            assert await one.release("a")

    asyncio.run(scenario())
    check_export(export)
    two.check_volumes(export)


# --- 4. a scan limit that failed open -------------------------------------------------------------


def test_records_hidden_past_the_scan_limit_make_the_claim_refused(
    export: Path, clusters: list[Cluster]
) -> None:
    """10,000 archives of team-a under its prefix, then team-b's: the scan of the records inside
    ``team-a/p`` stops before team-b's, so the directory must not be given to team-a."""
    cluster = clusters[0]
    cluster.add_class(onDelete="archive")
    mirror = export / ".nfs-provisioner" / "owners" / "dteam-a" / "dp"
    for index in range(10_000):
        name = f"archived-v{index:05d}"
        (export / "team-a" / "p" / name).mkdir(parents=True)
        (mirror / f"d{name}").mkdir(parents=True)
        (mirror / f"d{name}" / "owner.json").write_text(
            json.dumps({"version": 1, "cluster": "cluster-1", "namespace": "team-a"})
        )

    async def scenario() -> None:
        await cluster.bound("team-b", "b", "team-a/p/zzz", export)
        assert await cluster.release("b")  # archived as team-a/p/archived-zzz
        cluster.add_claim("team-a", "a", "team-a/p")
        assert not await cluster.provision("a")

    asyncio.run(scenario())
    assert (export / "team-a" / "p" / "archived-zzz" / MARK).is_file()
    check_export(export)
    refusal = cluster.kube.events[-1]
    assert refusal.reason == "ProvisioningFailed"
    assert "more than 10000 recorded directories" in refusal.message


# --- 5 and 6. deletes that finish -----------------------------------------------------------------


class Tenant(LocalSyscalls):
    """The workload of ``volume``: at the delete's first look inside, it removes everything else
    there (renames and unlinks of its own files, racing the delete)."""

    def __init__(self, export: Path, volume: str) -> None:
        self.export = export
        self.volume = volume
        self.acted = False

    def stat(self, parent: int, name: str, where: str) -> os.stat_result:
        if not self.acted and where.startswith(self.volume + "/"):
            self.acted = True
            for entry in (self.export / self.volume).iterdir():
                if entry.name == name.rpartition("/")[2]:
                    continue
                if entry.is_dir():
                    entry.rename(entry.with_name(f"{entry.name}-moved"))
                else:
                    entry.unlink()
        return super().stat(parent, name, where)


def test_a_tenant_changing_its_volume_during_the_delete_does_not_stop_it(
    export: Path, tmp_path: Path
) -> None:
    cluster = make_cluster(export, "cluster-1", Tenant(export, "x/app"))
    try:
        cluster.add_class(onDelete="delete")

        async def scenario() -> None:
            cluster.add_claim("team-a", "app", "x/app")
            assert await cluster.provision("app")
            for index in range(5):
                (export / "x" / "app" / f"f{index}").write_text("data")
            (export / "x" / "app" / "sub").mkdir()
            assert await cluster.release("app")

        asyncio.run(scenario())
    finally:
        cluster.storage.close()
    assert not (export / "x" / "app").exists(), "the PV is gone, so must its data be"
    assert records(export) == {}
    assert [event.reason for event in cluster.kube.events][-1] == "VolumeDeleted"
    assert "already missing" not in cluster.kube.events[-1].message


def test_a_deep_volume_is_deleted_with_few_descriptors(
    export: Path, clusters: list[Cluster]
) -> None:
    cluster = clusters[0]
    cluster.add_class(onDelete="delete")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)

    async def scenario() -> None:
        cluster.add_claim("team-a", "app", "x/app")
        assert await cluster.provision("app")
        fd = os.open(export / "x" / "app", os.O_RDONLY | os.O_DIRECTORY)
        try:
            for _ in range(1_500):
                os.mkdir("d", dir_fd=fd)
                inner = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
                os.close(fd)
                fd = inner
        finally:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        try:
            assert await cluster.release("app")
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    asyncio.run(scenario())
    assert not (export / "x" / "app").exists()
