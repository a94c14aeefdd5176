"""A small world of clusters sharing one export, for the overlap tests.

``Cluster`` is one cluster's provisioner: the real ``Reconciler`` over ``FakeKube`` and a real
``Storage`` (its own writer identity) on a shared temporary export, with a StorageClass whose
``pathPattern`` reads a claim annotation, so each claim chooses its path as a tenant would.
Workloads write a mark (``MARK``: whose data this is) into each new volume; ``check_export``
then holds the promise of SPEC §4: every volume's data sits in a directory recorded for its own
tenant, and no directory recorded for one tenant lies inside another tenant's. Used by
tests/unit/test_overlap.py (one race at a time) and tests/unit/test_interleavings.py (every
interleaving hypothesis finds).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

from provisioner import core, journal
from provisioner.api import JSON
from provisioner.cache import Cache
from provisioner.config import Settings
from provisioner.journal import Owner
from provisioner.metrics import Metrics
from provisioner.reconciler import Identity, Reconciler
from provisioner.safefs import LocalSyscalls, Syscalls, Tree
from provisioner.storage import Storage
from provisioner.workqueue import RetryLater
from tests.fakes import FakeKube

NAME = "test.io/nfs"
MARK = "tenant.txt"
"""Written by the test into each new volume, as its workload would: whose data this is."""
PATH_KEY = "example.com/path"


@dataclass
class Cluster:
    """One cluster's provisioner (its own API, cache and identity) on the shared export."""

    uid: str
    kube: FakeKube
    reconciler: Reconciler
    storage: Storage
    claims: dict[str, core.Claim] = field(default_factory=dict)
    moved: list[str] = field(default_factory=list)
    deleted: set[str] = field(default_factory=set)
    """Claims deleted by the test: their release may remove their data before their PV."""

    def add_class(self, name: str = "nfs", **parameters: str) -> None:
        body: JSON = {
            "metadata": {"name": name},
            "provisioner": NAME,
            "parameters": {"pathPattern": f"${{.PVC.annotations.{PATH_KEY}}}", **parameters},
            "reclaimPolicy": "Delete",
        }
        stored = self.kube.add_class(body)
        self.reconciler.cache.put_class(
            core.storage_class_from(stored), stored["metadata"]["resourceVersion"]
        )

    def add_claim(
        self, namespace: str, name: str, path: str, class_name: str = "nfs"
    ) -> core.Claim:
        body: JSON = {
            "metadata": {"name": name, "namespace": namespace, "annotations": {PATH_KEY: path}},
            "spec": {
                "storageClassName": class_name,
                "accessModes": ["ReadWriteMany"],
                "resources": {"requests": {"storage": "1Mi"}},
            },
        }
        claim = core.claim_from(self.kube.add_claim(body))
        self.reconciler.cache.put_claim(claim)
        self.claims[name] = claim
        return claim

    async def provision(self, name: str) -> bool:
        """One reconcile of the claim; True if its PV exists afterwards."""
        claim = self.claims[name]
        with contextlib.suppress(RetryLater):
            await self.reconciler.reconcile_claim(claim.uid)
        return claim.volume_name_for in self.kube.volumes

    async def bound(self, namespace: str, name: str, path: str, export: Path) -> None:
        """A claim provisioned at once, and its workload's mark written into it."""
        self.add_claim(namespace, name, path)
        assert await self.provision(name)
        self.moved_in(name, export)

    async def release(self, name: str) -> bool:
        """One reconcile of the claim's Released PV; True once the PV is gone."""
        volume = self.claims[name].volume_name_for
        self.deleted.add(name)
        if volume not in self.kube.volumes:
            return True
        released = self.kube.update_volume(
            volume, lambda pv: pv.update(status={"phase": "Released"})
        )
        self.reconciler.cache.put_volume(core.volume_from(released))
        with contextlib.suppress(RetryLater):
            await self.reconciler.reconcile_volume(volume)
        if volume in self.kube.volumes:
            return False
        self.reconciler.cache.drop_volume(volume)  # as the watch's DELETED event would
        self.reconciler.forget_volume(volume)
        return True

    def directory(self, name: str, export: Path) -> Path | None:
        volume = self.kube.volumes.get(self.claims[name].volume_name_for)
        if volume is None:
            return None
        path: str = volume["spec"]["nfs"]["path"]
        return export / path.removeprefix("/exports/")

    def moved_in(self, name: str, export: Path) -> None:
        """The claim's workload writes its mark into its new volume."""
        directory = self.directory(name, export)
        assert directory is not None
        (directory / MARK).write_text(f"{self.uid}/{self.claims[name].namespace}")
        self.moved.append(name)

    def check_volumes(self, export: Path) -> None:
        """Every live volume whose workload wrote its mark still has it. A deleted claim's PV
        may outlive its data: a release removes (or moves) the directory first, and deletes
        the PV after, or at a retry when that failed."""
        for name in self.moved:
            if name in self.deleted:
                continue
            directory = self.directory(name, export)
            if directory is not None:
                assert (directory / MARK).is_file(), f"the data of claim {name} is gone"


def make_cluster(export: Path, uid: str, calls: Syscalls, timeout: float = 40.0) -> Cluster:
    settings = Settings(
        provisioner_name=NAME,
        nfs_server="nas.example",
        nfs_path="/exports",
        mount_path=str(export),
        leader_election=False,
    )
    kube = FakeKube()
    storage = Storage(export, calls, timeout=timeout, max_threads=8)
    reconciler = Reconciler(
        settings,
        Cache(core.Export(settings.nfs_server, settings.nfs_path)),
        kube,
        storage,
        Metrics(),
        Identity(f"{NAME}_{uid}"),
    )
    reconciler.cluster = uid
    if hasattr(storage, "set_writer"):
        storage.set_writer(uid, NAME)
    reconciler.lead()
    return Cluster(uid, kube, reconciler, storage)


def records(export: Path) -> dict[str, Owner]:
    """Every owner record on the export, by directory."""
    found: dict[str, Owner] = {}
    with Tree(export, LocalSyscalls()) as tree:
        top = [
            (str(path.relative_to(export)), tuple(path.relative_to(export).parts))
            for path in export.rglob("*")
            if path.is_dir()
        ]
        for shown, parts in top:
            if parts[0] == ".nfs-provisioner":
                continue
            owner = journal.read_owner(tree, parts)
            if owner is not None:
                found[shown] = owner
    return found


def archived_from(export: Path, where: str) -> Owner | None:
    """The owner record of the directory an unfinished archive renamed to ``where``: until its
    retry moves the records too, they stay at the source, and the operation record keeps both
    paths from every other claim (journal.Operation)."""
    with Tree(export, LocalSyscalls()) as tree:
        for operation in journal.read_operations(tree):
            if operation.kind == "archive" and operation.target == where:
                return journal.read_owner(tree, tuple(operation.source.split("/")))
    return None


def check_export(export: Path) -> None:
    """Each volume's data is in a directory recorded for its own tenant; no directory recorded
    for one tenant (cluster and namespace) lies inside another tenant's."""
    owners = records(export)
    for mark in export.rglob(MARK):
        where = str(mark.parent.relative_to(export))
        owner = owners.get(where) or archived_from(export, where)
        assert owner is not None, f"the owner record of {where} was lost ({mark.read_text()})"
        assert f"{owner.cluster}/{owner.namespace}" == mark.read_text(), (
            f"{where} holds the data of {mark.read_text()} but belongs to {owner.describe()}"
        )
    for path, owner in owners.items():
        parts = path.split("/")
        for depth in range(1, len(parts)):
            other = "/".join(parts[:depth])
            around = owners.get(other)
            assert around is None or around.same_tenant(owner), (
                f"{path} ({owner.describe()}) is inside {other} ({around.describe()})"
            )
