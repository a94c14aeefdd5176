"""The control loop without a control plane: ``Reconciler`` over ``FakeKube`` and a real
``Storage`` on pytest's tmp_path.

Each test drives ``reconcile_claim`` / ``reconcile_volume`` directly, as the work queue would,
and checks what the user would see: the PV in the (fake) API, the directory on the export and
the Events. The races of a real cluster (a PV changed under us, a claim deleted mid-provision)
are played with ``FakeKube.before`` hooks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from provisioner import core
from provisioner.api import JSON, ApiError
from provisioner.cache import Cache
from provisioner.config import Settings
from provisioner.metrics import Metrics
from provisioner.reconciler import Identity, Reconciler
from provisioner.safefs import LocalSyscalls
from provisioner.storage import Storage
from provisioner.workqueue import RetryLater
from tests.fakes import FakeKube

NAME = "test.io/nfs"
NAMESPACE = "team-a"


def run(coroutine: Coroutine[Any, Any, None]) -> None:
    asyncio.run(coroutine)


@dataclass
class World:
    kube: FakeKube
    reconciler: Reconciler
    export: Path

    def add_class(self, name: str = "nfs", **parameters: str) -> None:
        body: JSON = {
            "metadata": {"name": name},
            "provisioner": NAME,
            "parameters": parameters,
            "reclaimPolicy": "Delete",
        }
        stored = self.kube.add_class(body)
        self.reconciler.cache.put_class(
            core.storage_class_from(stored), stored["metadata"]["resourceVersion"]
        )

    def add_claim(self, name: str, class_name: str = "nfs", **spec: Any) -> core.Claim:
        body: JSON = {
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {
                "storageClassName": class_name,
                "accessModes": ["ReadWriteMany"],
                "resources": {"requests": {"storage": "1Mi"}},
                **spec,
            },
        }
        claim = core.claim_from(self.kube.add_claim(body))
        self.reconciler.cache.put_claim(claim)
        return claim

    def directory(self, claim: core.Claim) -> Path:
        return self.export / f"{claim.namespace}-{claim.name}-{claim.volume_name_for}"

    def provision(self, claim: core.Claim) -> str:
        run(self.reconciler.reconcile_claim(claim.uid))
        name = claim.volume_name_for
        assert name in self.kube.volumes, self.kube.events
        return name

    def release(self, name: str) -> None:
        """What the PV controller does when the claim is deleted: the PV becomes Released."""
        released = self.kube.update_volume(name, lambda pv: pv.update(status={"phase": "Released"}))
        self.reconciler.cache.put_volume(core.volume_from(released))


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    export = tmp_path / "export"
    export.mkdir()
    settings = Settings(
        provisioner_name=NAME,
        nfs_server="nas.example",
        nfs_path="/exports",
        mount_path=str(export),
        leader_election=False,
    )
    kube = FakeKube()
    storage = Storage(export, LocalSyscalls(), timeout=10.0, max_threads=2)
    reconciler = Reconciler(
        settings,
        Cache(core.Export(settings.nfs_server, settings.nfs_path)),
        kube,
        storage,
        Metrics(),
        Identity("test.io/nfs_test"),
    )
    reconciler.cluster = "cluster-uid"
    reconciler.lead()
    try:
        yield World(kube, reconciler, export)
    finally:
        storage.close()


def visible(export: Path) -> list[str]:
    """Paths on the export a user would see (the provisioner's hidden records aside)."""
    return sorted(
        str(path.relative_to(export))
        for path in export.rglob("*")
        if not any(part.startswith(".") for part in path.relative_to(export).parts)
    )


# --- provision ---------------------------------------------------------------------------------


def test_provisions_a_claim_with_a_pv_a_directory_and_events(world: World) -> None:
    world.add_class()
    claim = world.add_claim("data")
    name = world.provision(claim)
    pv = world.kube.volumes[name]
    directory = world.directory(claim)
    assert directory.is_dir()
    assert visible(world.export) == [directory.name]
    assert pv["spec"]["nfs"] == {"server": "nas.example", "path": f"/exports/{directory.name}"}
    assert pv["spec"]["claimRef"]["uid"] == claim.uid
    assert core.FINALIZER in pv["metadata"]["finalizers"]
    assert world.kube.reasons(claim.name) == ["Provisioning", "ProvisioningSucceeded"]
    # Level-triggered: the next pass sees the PV and does nothing more.
    run(world.reconciler.reconcile_claim(claim.uid))
    assert world.kube.calls.count("create_volume") == 1
    assert world.kube.reasons(claim.name) == ["Provisioning", "ProvisioningSucceeded"]


def test_a_refusal_is_reported_once_across_resyncs(world: World) -> None:
    world.add_class()
    claim = world.add_claim("picky", selector={"matchLabels": {"tier": "db"}})
    for _resync in range(3):
        run(world.reconciler.reconcile_claim(claim.uid))
    assert world.kube.reasons(claim.name) == ["ProvisioningFailed"]
    assert "spec.selector" in world.kube.events[0].message
    assert world.kube.volumes == {}
    assert visible(world.export) == []


def test_a_claim_waits_for_its_class(world: World) -> None:
    claim = world.add_claim("early", class_name="later")
    run(world.reconciler.reconcile_claim(claim.uid))
    assert world.kube.calls == []  # nothing asked, nothing written, no Event
    world.add_class("later")
    world.provision(claim)


def test_claim_deleted_before_its_pv_is_saved_leaves_no_directory(world: World) -> None:
    world.add_class()
    claim = world.add_claim("brief")

    def claim_deleted_then_create_fails() -> None:
        world.kube.delete_claim(NAMESPACE, claim.name)
        raise ApiError(0, "Unreachable", "POST /api/v1/persistentvolumes: connection reset")

    world.kube.before["create_volume"] = claim_deleted_then_create_fails
    with pytest.raises(RetryLater):
        run(world.reconciler.reconcile_claim(claim.uid))
    assert not world.directory(claim).exists()
    assert visible(world.export) == []
    assert world.kube.volumes == {}
    assert world.kube.reasons(claim.name)[-1] == "ProvisioningFailed"


def test_pv_saved_by_an_earlier_attempt_counts_as_success(world: World) -> None:
    """create_volume's Conflict with our own PV (the reply to an earlier attempt was lost)."""
    world.add_class()
    claim = world.add_claim("lost-reply")
    world.provision(claim)
    world.reconciler.cache.drop_volume(claim.volume_name_for)  # the watch has not told us yet
    run(world.reconciler.reconcile_claim(claim.uid))
    assert world.kube.calls.count("create_volume") == 2
    assert world.kube.reasons(claim.name)[-1] == "ProvisioningSucceeded"


# --- release ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("on_delete", "reason", "left"),
    [
        pytest.param("delete", "VolumeDeleted", [], id="delete"),
        pytest.param("archive", "VolumeArchived", ["archived-{leaf}"], id="archive"),
        pytest.param("retain", "VolumeRetained", ["{leaf}"], id="retain"),
    ],
)
def test_release_applies_the_recorded_policy(
    world: World, on_delete: str, reason: str, left: list[str]
) -> None:
    world.add_class(onDelete=on_delete)
    claim = world.add_claim("data")
    name = world.provision(claim)
    leaf = world.directory(claim).name
    (world.directory(claim) / "rows.db").write_text("tenant data")
    world.release(name)
    run(world.reconciler.reconcile_volume(name))
    assert name not in world.kube.volumes  # deleted, and our finalizer is off
    assert world.kube.reasons(name) == [reason]
    kept = [entry.format(leaf=leaf) for entry in left]
    assert [p for p in visible(world.export) if "/" not in p] == kept
    for entry in kept:
        assert (world.export / entry / "rows.db").read_text() == "tenant data"


def test_a_bound_volume_is_not_released(world: World) -> None:
    world.add_class()
    claim = world.add_claim("data")
    name = world.provision(claim)
    world.kube.update_volume(name, lambda pv: pv.update(status={"phase": "Bound"}))
    world.reconciler.cache.put_volume(core.volume_from(world.kube.volumes[name]))
    run(world.reconciler.reconcile_volume(name))
    assert name in world.kube.volumes
    assert world.directory(claim).is_dir()


def test_finalizer_removal_is_one_request_whatever_changed_since_the_read(world: World) -> None:
    """The PV controller updates the PV between our read and our write: the removal does not
    depend on the version read, so it neither conflicts nor needs a re-read."""
    world.add_class()
    claim = world.add_claim("data")
    name = world.provision(claim)
    world.release(name)

    def someone_else_writes_first() -> None:
        world.kube.update_volume(
            name, lambda pv: pv["metadata"].setdefault("labels", {}).update(x="y")
        )

    world.kube.before["remove_volume_finalizer"] = someone_else_writes_first
    before = len(world.kube.calls)
    run(world.reconciler.reconcile_volume(name))
    assert [c for c in world.kube.calls[before:] if c != "record_event"] == [
        "delete_volume",
        "remove_volume_finalizer",
    ]
    assert name not in world.kube.volumes
    assert not world.directory(claim).exists()


def writes(world: World, since: int) -> list[str]:
    """The API calls made since index ``since``, Events (queued, not requests) left out."""
    return [call for call in world.kube.calls[since:] if call != "record_event"]


def test_a_claim_the_watch_delivered_costs_one_request(world: World) -> None:
    """The PV create is the only API call on the provisioning path: the cache is as fresh as
    the watch for a delivered claim, and Events are queued, not sent here."""
    world.add_class()
    claim = world.add_claim("data")
    before = len(world.kube.calls)
    world.reconciler.enqueue_claim(claim.uid, delivered=True)
    world.provision(claim)
    assert writes(world, before) == ["create_volume"]
    assert [e.reason for e in world.kube.events] == ["Provisioning", "ProvisioningSucceeded"]


def test_a_standby_queues_nothing_until_it_leads(world: World) -> None:
    """A standby's events only fill the cache: no key per object of the cluster waits in its
    queue. Leading queues every claim and volume the cache gathered meanwhile."""
    world.add_class()
    reconciler = Reconciler(
        world.reconciler.settings,
        world.reconciler.cache,
        world.kube,
        world.reconciler.storage,
        Metrics(),
        Identity("test.io/nfs_standby"),
    )
    first = world.add_claim("first")
    name = world.provision(first)  # by the leader of the fixture
    world.reconciler.cache.put_volume(core.volume_from(world.kube.volumes[name]))
    second = world.add_claim("second")
    reconciler.enqueue_claim(second.uid, delivered=True)
    reconciler.enqueue_volume(name)
    reconciler.enqueue_class("nfs")
    assert reconciler.queue.depth == 0
    reconciler.lead()
    assert reconciler.queue.depth == 3  # both claims and the volume


@pytest.mark.parametrize("relisted", [False, True], ids=["brought-back", "after-a-relist"])
def test_a_claim_not_just_delivered_is_confirmed_first(world: World, relisted: bool) -> None:
    """A resync, a retry or a class event brings back a claim seen earlier; a re-list by kopf
    means a watch gap may have hidden its deletion: either way it is confirmed by GET."""
    world.add_class()
    claim = world.add_claim("data")
    if relisted:
        world.reconciler.enqueue_claim(claim.uid, delivered=True)
        world.reconciler.relist_soon()
    before = len(world.kube.calls)
    world.provision(claim)
    assert writes(world, before) == ["get_claim", "create_volume"]


def test_a_stale_claim_brought_back_is_dropped_without_a_directory(world: World) -> None:
    world.add_class()
    claim = world.add_claim("gone")
    world.kube.delete_claim(NAMESPACE, "gone")  # deleted while unwatched: still in the cache
    run(world.reconciler.reconcile_claim(claim.uid))
    assert claim.volume_name_for not in world.kube.volumes
    assert visible(world.export) == []
    assert world.reconciler.cache.claim(claim.uid) is None


def test_a_delivered_claim_is_confirmed_again_on_its_next_reconcile(world: World) -> None:
    """Delivery counts for one reconcile: a claim that waited (here for its class) and comes
    back later is confirmed."""
    claim = world.add_claim("data")
    world.reconciler.enqueue_claim(claim.uid, delivered=True)
    run(world.reconciler.reconcile_claim(claim.uid))  # waits: no class yet
    world.add_class()
    before = len(world.kube.calls)
    world.provision(claim)
    assert writes(world, before) == ["get_claim", "create_volume"]


def test_a_release_costs_the_delete_and_the_finalizer_removal(world: World) -> None:
    world.add_class()
    claim = world.add_claim("data")
    name = world.provision(claim)
    world.release(name)
    before = len(world.kube.calls)
    run(world.reconciler.reconcile_volume(name))
    assert writes(world, before) == ["delete_volume", "remove_volume_finalizer"]
    assert name not in world.kube.volumes
