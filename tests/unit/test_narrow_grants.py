"""The provisioner under nfs-subdir's own RBAC: what steps down, and that nothing else does.

nfs-subdir's ClusterRole grants no ``patch`` on PersistentVolumes and nothing on namespaces.
Without ``patch``, new PVs carry no finalizer (it could never be removed) and the old
provisioner's volumes are adopted in this process's memory only; without the namespace, the
cluster is named by its CA certificate (identity.py). These tests drive the real ``Reconciler``
and ``Storage`` over ``FakeKube`` and a temporary export, with the grant taken away, and check
that no PV patch is even tried, that adoption and the old rules still apply, and that records
written under an earlier name of the cluster stay its own.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from provisioner import adoption, core, identity, permissions
from provisioner.api import JSON
from provisioner.cache import Cache
from provisioner.config import LockKind, Settings
from provisioner.journal import Intent, Owner
from provisioner.metrics import Metrics
from provisioner.paths import parse_relative
from provisioner.reconciler import Identity, Reconciler
from provisioner.safefs import LocalSyscalls
from provisioner.storage import DirOwner, Storage
from provisioner.workqueue import RetryLater
from tests.fakes import FakeKube, _merge

REPO = Path(__file__).resolve().parents[2]
NAME = "k8s-sigs.io/nfs-subdir-external-provisioner"
NAMESPACE = "default"


def run(coroutine: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coroutine)


def pem(*ders: bytes) -> bytes:
    blocks = [
        b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(der) + b"-----END CERTIFICATE-----\n"
        for der in ders
    ]
    return b"".join(blocks)


# --- identity -----------------------------------------------------------------------------------


def test_the_ca_fingerprint_is_the_sha256_of_each_certificate_in_order() -> None:
    first, second = b"first certificate DER" * 20, b"second certificate DER" * 20
    found = identity.ca_fingerprints(b"junk before\n" + pem(first, second) + b"junk after")
    assert found == [
        "ca:" + hashlib.sha256(first).hexdigest()[:32],
        "ca:" + hashlib.sha256(second).hexdigest()[:32],
    ]


@pytest.mark.parametrize(
    "bundle",
    [b"", b"no pem here", b"-----BEGIN CERTIFICATE-----\n@@@\n-----END CERTIFICATE-----\n"],
)
def test_a_bundle_without_a_certificate_gives_no_identity(bundle: bytes) -> None:
    with pytest.raises(identity.NoCertificate):
        identity.from_ca(bundle)


def test_without_the_uid_the_first_certificate_names_the_cluster_and_all_are_aliases() -> None:
    bundle = pem(b"old CA" * 30, b"new CA" * 30)
    old, new = identity.ca_fingerprints(bundle)
    found = identity.from_ca(bundle)
    assert (found.primary, found.aliases, found.from_ca) == (old, frozenset({old, new}), True)
    # Storage reads a record of any alias as the primary's, and no other (below).
    assert new in found.aliases
    assert "another-cluster" not in found.aliases
    assert "CA certificate" in found.describe()


def test_with_the_uid_the_ca_names_stay_aliases() -> None:
    bundle = pem(b"CA" * 40)
    (fingerprint,) = identity.ca_fingerprints(bundle)
    found = identity.from_uid("4f0c-uid", bundle)
    assert (found.primary, found.from_ca) == ("4f0c-uid", False)
    assert found.aliases == {"4f0c-uid", fingerprint}
    assert fingerprint in found.aliases
    assert identity.from_uid("4f0c-uid", None).aliases == {"4f0c-uid"}
    assert identity.from_uid("4f0c-uid", b"not a bundle").aliases == {"4f0c-uid"}


# --- permissions ----------------------------------------------------------------------------------


def shipped_rules() -> set[tuple[str, str, str, str | None, bool]]:
    """(group, resource, verb, name, namespaced) for every verb rbac/ grants."""
    rules = set()
    for file in ("clusterrole.yaml", "leader-election.yaml"):
        for doc in yaml.safe_load_all((REPO / "rbac" / file).read_text()):
            if not doc or doc["kind"] not in ("ClusterRole", "Role"):
                continue
            for rule in doc["rules"]:
                names = rule.get("resourceNames") or [None]
                rules |= {
                    (group, resource, verb, name, doc["kind"] == "Role")
                    for group in rule["apiGroups"]
                    for resource in rule["resources"]
                    for verb in rule["verbs"]
                    for name in names
                }
    return rules


def test_rbac_grants_the_needed_and_the_wanted_permissions_and_nothing_else() -> None:
    settings = Settings(
        provisioner_name="example.com/nfs",
        nfs_server="nas",
        nfs_path="/exports",
        mount_path="/persistentvolumes",
        lock_kind=LockKind.ENDPOINTS_LEASES,
    )
    wanted = {
        (p.group, p.resource, p.verb, p.name, p.namespaced)
        for p in permissions.all_permissions(settings)
    }
    assert wanted == shipped_rules()


def test_the_wanted_permissions_are_not_needed() -> None:
    settings = Settings(
        provisioner_name="example.com/nfs", nfs_server="nas", nfs_path="/x", mount_path="/m"
    )
    needed = permissions.needed_permissions(settings)
    for grant in permissions.WANTED:
        assert grant.permission not in needed


def test_a_degraded_line_says_what_changes_and_the_rule_that_turns_it_on() -> None:
    line = permissions.degraded_line(permissions.READ_CLUSTER_UID)
    assert line.startswith("without the cluster's identity from kube-system's uid: ")
    assert "CA certificate's fingerprint" in line
    assert line.endswith(
        '  # ClusterRole\n  - apiGroups: [""]\n    resources: ["namespaces"]\n'
        '    resourceNames: ["kube-system"]\n    verbs: ["get"]'
    )


# --- what a patch would have recorded, kept in memory --------------------------------------------


def old_volume_body(directory: str = "default-old-pvc-old") -> JSON:
    """A PV as nfs-subdir v4.0.2 writes it: provisioned-by, spec.nfs, nothing of ours."""
    return {
        "metadata": {
            "name": "pvc-old",
            "uid": "pv-uid-old",
            "resourceVersion": "7",
            "annotations": {core.ANN_PROVISIONED_BY: NAME},
        },
        "spec": {
            "persistentVolumeReclaimPolicy": "Delete",
            "storageClassName": "nfs-client",
            "accessModes": ["ReadWriteMany"],
            "capacity": {"storage": "1Mi"},
            "nfs": {"server": "nas.example", "path": f"/exports/{directory}"},
            "claimRef": {"namespace": NAMESPACE, "name": "old", "uid": "claim-uid-old"},
        },
        "status": {"phase": "Bound"},
    }


RECORDED = ("directory", "export_path", "on_delete", "adopted", "on_delete_basis", "not_adopted")


def test_each_adoption_patch_reads_back_the_same_from_memory() -> None:
    body = old_volume_body()
    volume = core.volume_from(body)
    export = core.Export("nas.example", "/exports")
    located = adoption.locate(volume, export)
    assert isinstance(located, adoption.Located)
    policy = adoption.legacy_policy("nfs-client", None)
    patches = [
        adoption.adoption_patch(volume, located, export, "2026-12-07T00:00:00Z"),
        adoption.refusal_patch(volume, adoption.Refusal("a reason")),
        adoption.policy_patch(volume, policy),
    ]
    for patch in patches:
        patched = copy.deepcopy(body)
        _merge(patched, patch)
        remembered = core.with_annotations(volume, patch["metadata"]["annotations"])
        read = core.volume_from(patched)
        for field in RECORDED:
            assert getattr(remembered, field) == getattr(read, field), (patch, field)
        assert remembered.name == read.name


# --- the reconciler without PV patch --------------------------------------------------------------


class World:
    def __init__(self, tmp_path: Path) -> None:
        self.export = tmp_path / "export"
        self.export.mkdir()
        settings = Settings(
            provisioner_name=NAME,
            nfs_server="nas.example",
            nfs_path="/exports",
            mount_path=str(self.export),
            leader_election=False,
        )
        self.kube = FakeKube()
        self.storage = Storage(self.export, LocalSyscalls(), timeout=10.0, max_threads=2)
        self.reconciler = Reconciler(
            settings,
            Cache(core.Export(settings.nfs_server, settings.nfs_path)),
            self.kube,
            self.storage,
            Metrics(),
            Identity("swap-test"),
        )
        self.reconciler.cluster = "ca:0123"
        self.reconciler.patch_volumes = False
        self.storage.set_writer("ca:0123", NAME)
        self.reconciler.lead()

    def add_class(self, **parameters: str) -> None:
        stored = self.kube.add_class(
            {
                "metadata": {"name": "nfs-client"},
                "provisioner": NAME,
                "parameters": parameters,
                "reclaimPolicy": "Delete",
            }
        )
        self.reconciler.cache.put_class(
            core.storage_class_from(stored), stored["metadata"]["resourceVersion"]
        )

    def add_old_volume(self, directory: str = "default-old-pvc-old") -> str:
        (self.export / directory).mkdir()
        (self.export / directory / "data").write_text("kept by the old provisioner")
        stored = run(self.kube.create_volume(old_volume_body(directory)))
        self.reconciler.cache.put_volume(core.volume_from(stored))
        return str(stored["metadata"]["name"])

    def watch_brings(self, name: str, **status: str) -> None:
        """A new version of the PV from the watch, as the API server has it."""
        changed = self.kube.update_volume(name, lambda pv: pv.update(status=dict(status)))
        self.reconciler.cache.put_volume(core.volume_from(changed))

    def reasons(self) -> list[str]:
        return [event.reason for event in self.kube.events]


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    made = World(tmp_path)
    try:
        yield made
    finally:
        made.storage.close()


def test_new_volumes_get_no_finalizer_and_release_without_any_patch(world: World) -> None:
    world.add_class(archiveOnDelete="false")
    body: JSON = {
        "metadata": {"name": "test-claim", "namespace": NAMESPACE},
        "spec": {
            "storageClassName": "nfs-client",
            "accessModes": ["ReadWriteMany"],
            "resources": {"requests": {"storage": "1Mi"}},
        },
    }
    claim = core.claim_from(world.kube.add_claim(body))
    world.reconciler.cache.put_claim(claim)
    run(world.reconciler.reconcile_claim(claim.uid))
    name = claim.volume_name_for
    assert world.kube.volumes[name]["metadata"]["finalizers"] == []
    directory = world.export / f"{NAMESPACE}-test-claim-{name}"
    assert directory.is_dir()

    world.watch_brings(name, phase="Released")
    run(world.reconciler.reconcile_volume(name))
    assert name not in world.kube.volumes
    assert not directory.exists()
    assert "patch_volume" not in world.kube.calls
    assert "remove_volume_finalizer" not in world.kube.calls


def test_an_old_volume_is_adopted_in_memory_once_and_released_by_the_old_rules(
    world: World,
) -> None:
    world.add_class(archiveOnDelete="false")
    name = world.add_old_volume()
    run(world.reconciler.reconcile_volume(name))
    assert world.reasons() == ["VolumeAdopted"]
    stored = world.kube.volumes[name]["metadata"]
    assert set(stored["annotations"]) == {core.ANN_PROVISIONED_BY}
    assert not stored.get("finalizers")
    # Recorded on the export: the directory belongs to the claim's namespace.
    found = run(world.storage.inspect(parse_relative("default-old-pvc-old")))
    assert found.leaf_owner is not None
    assert (found.leaf_owner.cluster, found.leaf_owner.namespace) == ("ca:0123", NAMESPACE)

    # A new version from the watch replaces the cache entry: still adopted, no second Event.
    world.watch_brings(name, phase="Bound")
    run(world.reconciler.reconcile_volume(name))
    assert world.reasons() == ["VolumeAdopted"]

    world.watch_brings(name, phase="Released")
    run(world.reconciler.reconcile_volume(name))
    assert world.reasons() == ["VolumeAdopted", "VolumeDeleted"]
    assert "Adopted volume" in world.kube.events[-1].message
    assert not (world.export / "default-old-pvc-old").exists()
    assert name not in world.kube.volumes
    assert "patch_volume" not in world.kube.calls


def test_an_old_volume_keeps_the_policy_of_its_first_release_attempt(world: World) -> None:
    world.add_class(archiveOnDelete="true")
    name = world.add_old_volume()
    run(world.reconciler.reconcile_volume(name))  # adopted while bound
    world.watch_brings(name, phase="Released")

    async def first_attempt() -> None:
        # The policy (archive) is resolved, then the directory is busy: nothing is moved.
        async with world.storage.reserve(
            "an admin's hand-over", parse_relative("default-old-pvc-old")
        ):
            with pytest.raises(RetryLater):
                await world.reconciler.reconcile_volume(name)

    run(first_attempt())
    assert (world.export / "default-old-pvc-old" / "data").is_file()
    # The class changes meanwhile; the retry still applies what the first attempt resolved.
    world.add_class(archiveOnDelete="false")
    world.watch_brings(name, phase="Released")
    run(world.reconciler.reconcile_volume(name))
    assert (world.export / "archived-default-old-pvc-old" / "data").is_file()
    assert "patch_volume" not in world.kube.calls


def test_an_old_volume_that_cannot_be_adopted_is_refused_once_per_process(world: World) -> None:
    world.add_class()
    body = old_volume_body()
    body["spec"]["nfs"]["path"] = "/exports"  # the export root itself
    stored = run(world.kube.create_volume(body))
    world.reconciler.cache.put_volume(core.volume_from(stored))
    name = stored["metadata"]["name"]
    run(world.reconciler.reconcile_volume(name))
    world.watch_brings(name, phase="Released")
    run(world.reconciler.reconcile_volume(name))
    assert world.reasons() == ["AdoptionRefused"]
    assert name in world.kube.volumes
    assert "patch_volume" not in world.kube.calls


# --- records written under another name of this cluster ------------------------------------------


def test_records_under_an_alias_of_the_cluster_are_its_own(tmp_path: Path) -> None:
    storage = Storage(tmp_path, LocalSyscalls(), timeout=10.0, max_threads=2)
    try:
        (tmp_path / "team").mkdir()
        storage.set_writer("ca:0123", NAME)
        run(storage.record_owner(parse_relative("team"), Owner("ca:0123", "default", NAME)))
        # The namespace grant was added: the uid names the cluster, the CA stays an alias.
        storage.set_writer("kube-system-uid", NAME, frozenset({"kube-system-uid", "ca:0123"}))
        found = run(storage.inspect(parse_relative("team")))
        assert found.leaf_owner is not None
        assert found.leaf_owner.cluster == "kube-system-uid"
        # Another cluster's record is not renamed.
        storage.set_writer("other", NAME, frozenset({"other"}))
        found = run(storage.inspect(parse_relative("team")))
        assert found.leaf_owner is not None
        assert found.leaf_owner.cluster == "ca:0123"
    finally:
        storage.close()


def test_intents_under_an_alias_of_the_cluster_are_its_own(tmp_path: Path) -> None:
    """The sweep settles only its own cluster's intents: those written under the CA's name
    before the grant was added are read back under the uid; another cluster's are not."""
    storage = Storage(tmp_path, LocalSyscalls(), timeout=10.0, max_threads=2)
    try:
        for cluster, volume in (("ca:0123", "pvc-1"), ("other", "pvc-2")):
            storage.set_writer(cluster, NAME)
            intent = Intent(volume, NAMESPACE, "data", "uid", f"d-{volume}", cluster, NAME, "t")
            run(
                storage.create_dir(
                    parse_relative(f"d-{volume}"),
                    DirOwner(),
                    Owner(cluster, NAMESPACE, NAME),
                    intent,
                )
            )
        storage.set_writer("kube-system-uid", NAME, frozenset({"kube-system-uid", "ca:0123"}))
        intents, unreadable = run(storage.read_intents())
        assert unreadable == []
        assert sorted((i.volume, i.cluster) for i in intents) == [
            ("pvc-1", "kube-system-uid"),
            ("pvc-2", "other"),
        ]
    finally:
        storage.close()
