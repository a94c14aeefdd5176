"""kopf wiring only: watch events on claims, volumes and StorageClasses feed the cache and queue.

``app`` registers these on a private ``kopf.OperatorRegistry``. Only ``@kopf.on.event`` is used:
it stores nothing on the watched objects (no annotations, no finalizers), so users' PVCs carry
nothing of ours but Events. All decisions happen in the reconciler, level-triggered. DELETED
events leave tombstones in the cache, so a list taken before them cannot bring the object back.
The handlers read the raw event's plain dict, not kopf's ``Body`` view: every field read through
the view costs a lookup chain, on every event of every claim and PV of the cluster. Only kopf's
public API is used here; the one private part we rely on is in ``kopfcompat``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import kopf

from provisioner import core
from provisioner.reconciler import Reconciler


class NoDiffBase(kopf.DiffBaseStorage):
    """Keeps no "last handled" state: with only ``@kopf.on.event`` handlers nothing reads it.

    kopf's stock storages deep-copy every event's body to diff it against the last handled
    one (5 % of the provisioner's CPU in a 1,000-claim burst, by py-spy), and would store it
    on the object if a change handler ever needed it, which we never want.
    """

    def build(
        self,
        *,
        body: kopf.Body,
        extra_fields: Iterable[kopf.FieldSpec] | None = None,
    ) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


def configure(settings: kopf.OperatorSettings) -> None:
    """kopf settings that keep the framework off users' objects and out of extra RBAC."""
    settings.persistence.diffbase_storage = NoDiffBase()
    settings.posting.enabled = False  # we post our own Events with upstream reasons
    settings.scanning.disabled = True  # no CRD discovery: the resources are fixed built-ins
    settings.peering.standalone = True  # leader election is ours (Endpoints/Lease), not peering
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 30
    # Every claim and PV of a large cluster passes through here (tests/bench/memory.py): list in
    # pages, and let each object's worker exit soon after its event. An idle worker keeps its
    # last event's body, so with kopf's 5 s every listed body would be alive at once at start-up.
    settings.watching.chunk_size = 500
    settings.queueing.idle_timeout = 0.2


def register(registry: kopf.OperatorRegistry, reconciler: Reconciler) -> None:
    cache = reconciler.cache

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        # The same credentials as provisioner.kube: in-cluster token, else $KUBECONFIG.
        return kopf.login_via_client(**kwargs)

    @kopf.on.event("persistentvolumeclaims", registry=registry)
    async def claim_event(type: str | None, event: kopf.RawEvent, **_: Any) -> None:
        if type is None:
            reconciler.relist_soon()  # kopf is (re-)listing: prune what vanished meanwhile
        claim = core.claim_from(event["object"])
        if type == "DELETED":
            cache.claim_deleted(claim)
            reconciler.forget_claim(claim.uid)
            return
        cache.put_claim(claim)
        reconciler.enqueue_claim(claim.uid, delivered=True)

    @kopf.on.event("persistentvolumes", registry=registry)
    async def volume_event(type: str | None, event: kopf.RawEvent, **_: Any) -> None:
        if type is None:
            reconciler.relist_soon()
        volume = core.volume_from(event["object"])
        if type == "DELETED":
            if cache.volume_deleted(volume):
                reconciler.forget_volume(volume.name)
            return
        cache.put_volume(volume)
        reconciler.enqueue_volume(volume.name)

    @kopf.on.event("storage.k8s.io", "v1", "storageclasses", registry=registry)
    async def class_event(type: str | None, event: kopf.RawEvent, **_: Any) -> None:
        body = event["object"]
        storage_class = core.storage_class_from(body)
        if type == "DELETED":
            cache.class_deleted(storage_class.name, core.resource_version(body))
            return
        cache.put_class(storage_class, core.resource_version(body))
        reconciler.enqueue_class(storage_class.name)  # claims waiting for it go ahead
