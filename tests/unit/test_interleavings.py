"""Every interleaving hypothesis finds: claims, releases, injected failures and a second
cluster on one export, their filesystem calls ordered call by call (SPEC §4, issue 25).

A ``RuleBasedStateMachine`` builds a history: claims of two clusters with tenant-chosen paths
that nest, collide and hit each other's archive names (``PATHS``), deletions of bound claims
(their PVs released by archive, delete or retain), and steps that run several pending
reconciles at once. In a step, ``tests.interleave.Interleaver`` stops every filesystem call of
the running reconciles and hypothesis chooses which goes next, now and then failing the chosen
call with EIO instead; failed attempts stay pending and are retried by later steps, as the work
queue would. Both clusters' ``Storage`` share the one interleaver, so the second writer's calls
interleave with the first's as another process's would.

After every step: each volume's data is in a directory recorded for its own tenant (no record
lost, no data handed to another namespace or cluster), no directory of one tenant lies inside
another's, every live volume still holds its data, and no reservation or lock is left held.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from provisioner.safefs import LocalSyscalls
from tests.interleave import Choice, Chooser, Interleaver, Pending
from tests.overlap_world import check_export, make_cluster

PATHS = (
    "x/app",
    "x/archived-app",
    "x/archived-app/sub",
    "x/archived-app-2",
    "x",
    "shared",
    "shared/x",
)
NAMESPACES = ("team-a", "team-b", "x")
POLICIES = ("archive", "delete", "retain")
FAULT_ODDS = 12


def _scratch() -> tempfile.TemporaryDirectory[str]:
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return tempfile.TemporaryDirectory(dir=shm)
    return tempfile.TemporaryDirectory()


def scheduler(data: st.DataObject) -> Chooser:
    """Which stopped call goes next, from a seeded random source hypothesis draws (and can
    shrink): drawing each index directly shrinks towards "always the first operation", which
    runs the operations one after the other and never overlaps them. One call in
    ``FAULT_ODDS`` fails with EIO instead, when the drawn run has faults."""
    rng = data.draw(st.randoms(use_true_random=False), label="schedule")
    faults = data.draw(st.booleans(), label="with faults")

    def choose(pending: Sequence[Pending]) -> Choice:
        index = rng.randrange(len(pending))
        fault = errno.EIO if faults and rng.randrange(FAULT_ODDS) == 0 else None
        return Choice(index, fault)

    return choose


class Overlap(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.scratch = _scratch()
        self.export = Path(self.scratch.name) / "export"
        self.export.mkdir()
        self.calls = Interleaver(LocalSyscalls())
        self.loop = asyncio.new_event_loop()
        self.clusters = [
            make_cluster(self.export, f"cluster-{index}", self.calls) for index in (1, 2)
        ]
        for cluster in self.clusters:
            for policy in POLICIES:
                cluster.add_class(policy, onDelete=policy)
        self.serial = 0
        self.provisions: list[tuple[int, str]] = []
        """Claims not bound yet: (cluster index, claim name)."""
        self.releases: list[tuple[int, str]] = []
        """Claims deleted whose PV is not released yet."""
        self.bound: list[tuple[int, str]] = []
        self.faulted = False
        """An injected EIO may have failed a lock's removal: the file stays until its writer
        takes it over (its next reservation there) or it expires."""

    def teardown(self) -> None:
        for task in asyncio.all_tasks(self.loop):
            task.cancel()
        with contextlib.suppress(Exception):
            self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.close()
        for cluster in self.clusters:
            cluster.storage.close()
        self.scratch.cleanup()

    @initialize(
        claims=st.lists(
            st.tuples(
                st.integers(0, 1),
                st.sampled_from(NAMESPACES),
                st.sampled_from(PATHS),
                st.sampled_from(POLICIES),
            ),
            min_size=2,
            max_size=4,
        )
    )
    def first_claims(self, claims: list[tuple[int, str, str, str]]) -> None:
        for cluster, namespace, path, policy in claims:
            self.claim(cluster, namespace, path, policy)

    @rule(
        cluster=st.integers(0, 1),
        namespace=st.sampled_from(NAMESPACES),
        path=st.sampled_from(PATHS),
        policy=st.sampled_from(POLICIES),
    )
    def claim(self, cluster: int, namespace: str, path: str, policy: str) -> None:
        self.serial += 1
        name = f"claim-{self.serial}"
        self.clusters[cluster].add_claim(namespace, name, path, class_name=policy)
        self.provisions.append((cluster, name))

    @precondition(lambda self: bool(self.bound))
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        chosen = data.draw(st.sampled_from(self.bound), label="claim deleted")
        self.bound.remove(chosen)
        self.releases.append(chosen)

    @precondition(lambda self: bool(self.provisions or self.releases))
    @rule(data=st.data())
    def run_together(self, data: st.DataObject) -> None:
        work = [("provision", item) for item in self.provisions] + [
            ("release", item) for item in self.releases
        ]
        picked = data.draw(
            st.lists(st.sampled_from(work), min_size=1, max_size=3, unique=True),
            label="reconciles run together",
        )
        operations = [self._operation(kind, item) for kind, item in picked]
        outcomes = self.loop.run_until_complete(self.calls.run(operations, scheduler(data)))
        for outcome in outcomes:
            outcome.get()  # a crash (not a failed attempt) is a bug
        self.faulted = self.faulted or any(step.errno is not None for step in self.calls.trace)
        for kind, (index, name) in picked:
            cluster = self.clusters[index]
            if (
                kind == "release"
                and cluster.claims[name].volume_name_for not in cluster.kube.volumes
            ):
                self.releases.remove((index, name))
            if kind == "provision" and cluster.claims[name].volume_name_for in cluster.kube.volumes:
                self.provisions.remove((index, name))
                cluster.moved_in(name, self.export)
                self.bound.append((index, name))

    def _operation(self, kind: str, item: tuple[int, str]):  # type: ignore[no-untyped-def]
        cluster = self.clusters[item[0]]
        if kind == "provision":
            return lambda: cluster.provision(item[1])
        return lambda: cluster.release(item[1])

    @invariant()
    def each_directory_has_one_tenant_and_no_data_is_lost(self) -> None:
        check_export(self.export)
        for cluster in self.clusters:
            cluster.check_volumes(self.export)

    @invariant()
    def nothing_stays_reserved_or_locked(self) -> None:
        for cluster in self.clusters:
            assert cluster.storage.reservations.held() == []
            assert cluster.storage.locks.held() == []
        locks = self.export / ".nfs-provisioner" / "locks"
        if not self.faulted:
            assert not locks.is_dir() or sorted(os.listdir(locks)) == []


Overlap.TestCase.settings = settings(
    max_examples=int(os.environ.get("INTERLEAVINGS", "40")),
    stateful_step_count=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
test_interleavings = Overlap.TestCase
