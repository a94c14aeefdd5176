"""Level-triggered reconcile of claims (provision) and volumes (release): the executor.

The kopf handlers feed the cache and enqueue keys; ``resync`` lists and enqueues everything
periodically. One ``reconcile`` per key reads the cache, asks the pure decision of its kind what
to do (``provisioning.plan_claim`` for a claim, ``releasing.plan_release`` for a PV), does it
through ``storage`` and the ``api.KubeApi`` seam, and records Events and metrics. It decides nothing
itself. Every step is idempotent: the PV name is fixed by the claim and a release reads only
what the PV recorded, so repeating work after a crash is harmless.

A claim: ``reconcile_claim`` -> ``provisioning.plan_claim`` (ignore, wait or refuse end here) ->
the directory reserved -> ``_confirmed`` -> ``_provision``: inspect, ``provisioning.plan_claim``
again with the inspection -> ``_make_directory`` -> ``_save`` (the PV).

A release: ``reconcile_volume`` -> ``releasing.plan_release`` -> a migration step for ``adopter``
(then decide again) -> ``_release`` -> ``_apply_on_delete`` -> the PV deleted, finalizer dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from provisioner import core, journal, ownership, paths, provisioning, releasing
from provisioner.adopter import Adopter, volume_ref
from provisioner.api import ApiError, Conflict, KubeApi, ObjectRef
from provisioner.cache import Cache
from provisioner.config import (
    Settings,
)
from provisioner.metrics import Metrics
from provisioner.reservations import Busy
from provisioner.safefs import Redirected
from provisioner.storage import DirOwner, Storage, StorageError
from provisioner.workqueue import Backoff, RetryLater, WorkQueue

logger = logging.getLogger(__name__)

CLAIM = "claim"
VOLUME = "volume"
RELEASE_STEPS = 5
"""Decisions per release: adopt, record the policy (a conflict or two), then act."""


@dataclass(frozen=True)
class Identity:
    """Who we are in Events (``source.component``), as the upstream library spells it."""

    component: str


def _claim_holder(claim: core.Claim) -> str:
    """The holder of a claim's reservation, as Busy shows it to whoever waits for it."""
    return f"the provisioning of claim {claim.key}"


def claim_ref(claim: core.Claim) -> ObjectRef:
    return ObjectRef(
        kind="PersistentVolumeClaim",
        name=claim.name,
        namespace=claim.namespace,
        uid=claim.uid,
        resource_version=claim.resource_version,
    )


class Reconciler:
    def __init__(
        self,
        settings: Settings,
        cache: Cache,
        kube: KubeApi,
        storage: Storage,
        metrics: Metrics,
        identity: Identity,
    ) -> None:
        self.settings = settings
        self.cache = cache
        self.kube = kube
        self.storage = storage
        self.metrics = metrics
        self.identity = identity
        self.export = core.Export(settings.nfs_server, settings.nfs_path)
        self.adopter = Adopter(
            settings.provisioner_name, self.export, cache, kube, storage, self._event
        )
        self.queue = WorkQueue(
            self.reconcile,
            workers=settings.workers,
            backoff=Backoff(base=settings.backoff_base, cap=settings.backoff_max),
            on_retry=self._on_retry,
        )
        # Set when kopf (re-)lists a resource (events of type None: at start and after every
        # 410 Gone); resync_forever then re-lists and prunes, since kopf reports no DELETED
        # for what vanished during the gap.
        self.relist_wanted = asyncio.Event()
        # The last refusal posted per claim, so a resync does not repeat the same Warning.
        self._refused: dict[str, str] = {}
        # Volumes released by this process whose DELETED event has not arrived yet: watch
        # events still in flight would otherwise start a second, confusing release.
        self._released: set[str] = set()
        # Claims the watch delivered since their last reconcile, with no re-list (a possible
        # watch gap) since: the cache is as fresh as the watch for them, so provisioning them
        # needs no GET to confirm they still exist (see ``_confirmed``).
        self._delivered: set[str] = set()
        # Until ``lead``, events only feed the cache: a standby queues nothing, so its queue
        # holds no key per object of the cluster and its queue-depth metric reads 0, not the
        # cluster's size. ``lead`` re-queues everything the cache gathered meanwhile.
        self._leading = False

    # --- entry points ----------------------------------------------------------------------------

    @property
    def cluster(self) -> str:
        """The cluster's identity (identity.py), set by app before the first reconcile; recorded
        on the export."""
        return self.adopter.cluster

    @cluster.setter
    def cluster(self, value: str) -> None:
        self.adopter.cluster = value

    @property
    def patch_volumes(self) -> bool:
        """Whether PVs may be patched (permissions.PATCH_VOLUMES), set by app with ``cluster``.
        Without: no finalizer on new PVs, and the adopter keeps what it records in memory."""
        return self.adopter.patch_volumes

    @patch_volumes.setter
    def patch_volumes(self, value: bool) -> None:
        self.adopter.patch_volumes = value

    def enqueue_claim(self, uid: str, delivered: bool = False) -> None:
        """``delivered``: the watch just brought this claim (not a resync, a retry, a class or
        a freed directory bringing back one seen earlier)."""
        if delivered:
            self._delivered.add(uid)
        self._enqueue(f"{CLAIM}:{uid}")

    def enqueue_volume(self, name: str) -> None:
        self._enqueue(f"{VOLUME}:{name}")

    def _enqueue(self, key: str) -> None:
        if self._leading:
            self.queue.add(key)

    def enqueue_class(self, class_name: str) -> None:
        for uid in self.cache.claims_of_class(class_name):
            self.enqueue_claim(uid)

    def lead(self) -> None:
        """Start queueing (this process won the election) with every object the cache holds."""
        self._leading = True
        self.resync()

    def resync(self) -> None:
        for claim in self.cache.claims():
            self.enqueue_claim(claim.uid)
        for volume in self.cache.volumes():
            self.enqueue_volume(volume.name)

    def relist_soon(self) -> None:
        """kopf is (re-)listing: there may have been a watch gap, whose deletions the cache
        misses until our own list prunes them; until then every claim is confirmed by GET."""
        if not self.relist_wanted.is_set():
            self._delivered.clear()
        self.relist_wanted.set()

    def forget_claim(self, uid: str) -> None:
        self._refused.pop(uid, None)
        self._delivered.discard(uid)
        self.queue.forget(f"{CLAIM}:{uid}")

    def forget_volume(self, name: str) -> None:
        self._released.discard(name)
        self.adopter.forget(name)
        self.queue.forget(f"{VOLUME}:{name}")
        # A refused claim may have been waiting for this volume's directory: try it again now
        # rather than at the next resync.
        for uid in list(self._refused):
            self.enqueue_claim(uid)

    async def reconcile(self, key: str) -> None:
        kind, _, ident = key.partition(":")
        self.metrics.in_flight.inc()
        try:
            if kind == CLAIM:
                await self.reconcile_claim(ident)
            else:
                await self.reconcile_volume(ident)
        finally:
            self.metrics.in_flight.dec()
            self.metrics.queue_depth.set(self.queue.depth)

    def _on_retry(self, key: str, failures: int, error: BaseException) -> None:
        kind = key.partition(":")[0]
        self.metrics.retries_total.labels(kind).inc()
        delay_hint = "retrying with backoff"
        if isinstance(error, RetryLater | StorageError | ApiError):
            logger.warning("%s: attempt %d failed: %s; %s", key, failures, error, delay_hint)
        else:
            logger.exception(
                "%s: attempt %d crashed; %s", key, failures, delay_hint, exc_info=error
            )

    def _event(self, ref: ObjectRef, event_type: str, reason: str, message: str) -> None:
        """Queue an Event: it never delays the reconcile (``eventsink.EventSink`` posts it with its
        own budget; identical repeats patch its count; what is dropped is counted in
        ``events_dropped_total``)."""
        self.kube.record_event(ref, event_type, reason, message, self.identity.component)

    # --- claims: provision -------------------------------------------------------------------

    async def reconcile_claim(self, uid: str) -> None:
        delivered = uid in self._delivered
        self._delivered.discard(uid)
        claim = self.cache.claim(uid)
        if claim is None:
            return
        plan = provisioning.plan_claim(self._claim_facts(claim))
        if await self._settled(claim, plan):
            return
        assert plan.directory is not None  # INSPECT names the directory to reserve
        # The overlap rule cannot see a claim whose PV is not saved yet, nor a release or another
        # writer at work: the reservation does (nested directories conflict too).
        try:
            async with self.storage.reserve(_claim_holder(claim), plan.directory):
                if delivered or await self._confirmed(claim):
                    await self._provision(claim, plan.directory)
        except Busy as error:
            raise RetryLater(f"claim {claim.key}: {error}") from error
        except StorageError as error:  # taking or giving back the export lock failed
            self._failed(claim, str(error))
            raise RetryLater(f"claim {claim.key}: {error}") from error

    def _claim_facts(
        self, claim: core.Claim, inspection: ownership.Inspection | None = None
    ) -> provisioning.ClaimFacts:
        return provisioning.ClaimFacts(
            claim=claim,
            storage_class=self.cache.storage_class(claim.class_name),
            provisioner_name=self.settings.provisioner_name,
            volume_exists=self.cache.volume(claim.volume_name_for) is not None,
            overlapping=self.cache.volumes_overlapping,
            inspection=inspection,
            cluster=self.cluster,
            provisioner_namespace=self.settings.namespace,
            now=journal.timestamp() if inspection is not None else "",
        )

    async def _settled(self, claim: core.Claim, plan: provisioning.ClaimPlan) -> bool:
        """Carry out a plan that needs no directory (ignore, wait, refuse); False otherwise."""
        if plan.verdict is provisioning.Verdict.IGNORE:
            logger.debug("claim %s: ignored: %s", claim.key, plan.reason)
        elif plan.verdict is provisioning.Verdict.WAIT:
            logger.info("claim %s: waiting: %s", claim.key, plan.reason)
        elif plan.verdict is provisioning.Verdict.REFUSE:
            await self._refuse(claim, plan.reason)
        else:
            return False
        return True

    async def _confirmed(self, claim: core.Claim) -> bool:
        """Whether the claim still exists, by GET: a watch gap can leave a deleted claim in the
        cache. Only for claims the watch did not just deliver (``_delivered``): what a class
        event, a retry, a resync or a freed directory brings back may be such a leftover."""
        try:
            current = await self.kube.get_claim(claim.namespace, claim.name)
        except ApiError as error:
            raise RetryLater(f"claim {claim.key}: cannot confirm it exists: {error}") from error
        fresh = core.claim_from(current) if current is not None else None
        gone = core.claim_gone(claim, fresh)
        if gone is None:
            return True
        logger.info("claim %s: not provisioned: %s; dropped from the cache", claim.key, gone)
        self.cache.drop_claim(claim.uid)
        self.forget_claim(claim.uid)
        return False

    async def _refuse(self, claim: core.Claim, why: str) -> None:
        """Post the refusal once per claim and reason; only then is it a failed attempt (resyncs
        and watch events that meet the same refusal again count nothing)."""
        if self._refused.get(claim.uid) == why:
            return
        self._refused[claim.uid] = why
        self.metrics.provision_failed_total.labels(claim.class_name).inc()
        logger.warning("claim %s: refused: %s", claim.key, why)
        self._event(claim_ref(claim), "Warning", "ProvisioningFailed", why)

    def _failed(self, claim: core.Claim, message: str) -> None:
        """A failed attempt that is retried: counted and reported every time."""
        self.metrics.provision_failed_total.labels(claim.class_name).inc()
        self._event(claim_ref(claim), "Warning", "ProvisioningFailed", message)

    async def _provision(self, claim: core.Claim, directory: paths.RelativeDir) -> None:
        """Under the directory's reservation: inspect it, decide again with what was found,
        make or reuse the directory, then save the PV."""
        started = time.monotonic()
        try:
            inspection = await self.storage.inspect(directory)
            plan = provisioning.plan_claim(self._claim_facts(claim, inspection))
            if await self._settled(claim, plan):
                return
            created = await self._make_directory(claim, plan)
        except Redirected as error:
            await self._refuse(claim, provisioning.redirected(claim, directory, error))
            return
        except StorageError as error:
            self._failed(claim, str(error))
            raise RetryLater(f"claim {claim.key}: {error}") from error
        await self._save(claim, plan, created, started)

    async def _make_directory(self, claim: core.Claim, plan: provisioning.ClaimPlan) -> bool:
        """Create the directory (True) or reuse the one found (False), as ``plan`` says."""
        assert plan.directory is not None and plan.parameters is not None
        ref = claim_ref(claim)
        mode = DirOwner(plan.parameters.mode, plan.parameters.uid, plan.parameters.gid)
        self._event(
            ref,
            "Normal",
            "Provisioning",
            f'External provisioner is provisioning volume for claim "{claim.key}"',
        )
        if plan.verdict is provisioning.Verdict.CREATE:
            assert plan.tenant is not None
            intent = provisioning.intent(claim, plan)
            await self.storage.create_dir(plan.directory, mode, plan.tenant, intent)
            return True
        await self.storage.reuse_dir(plan.directory, mode, plan.tenant if plan.adopt else None)
        self._event(
            ref,
            "Normal",
            "Provisioning",
            f'Reusing existing directory "{plan.directory}" on the export: no PersistentVolume '
            f"records it, and {plan.reason}",
        )
        return False

    async def _save(
        self, claim: core.Claim, plan: provisioning.ClaimPlan, created: bool, started: float
    ) -> None:
        """Write the PV (or find the one an earlier attempt wrote); undo a directory made for a
        claim that went away meanwhile."""
        assert plan.directory is not None and plan.parameters is not None
        assert plan.storage_class is not None
        body = core.build_volume(
            claim,
            plan.storage_class,
            plan.directory,
            plan.parameters.on_delete,
            self.export,
            self.settings.provisioner_name,
            finalizer=self.patch_volumes,
        )
        try:
            saved = await self._save_volume(claim, body)
        except (ApiError, RetryLater) as error:
            await self._undo_if_claim_gone(claim, plan.directory, created)
            self._failed(
                claim,
                f"Error creating PersistentVolume {claim.volume_name_for} for claim "
                f'"{claim.key}": {error}; retrying',
            )
            raise RetryLater(str(error)) from error
        self.cache.put_volume(core.volume_from(saved))
        # Also after a reuse: an earlier attempt may have created the directory (and its intent)
        # and crashed before the PV was saved.
        await self._clear_intent(claim)
        self._refused.pop(claim.uid, None)
        self.metrics.provision_total.labels(claim.class_name).inc()
        self.metrics.provision_duration.labels(claim.class_name).observe(time.monotonic() - started)
        logger.info(
            "claim %s: provisioned volume %s in directory %s (%s)",
            claim.key,
            claim.volume_name_for,
            plan.directory,
            "created" if created else "reused",
        )
        self._event(
            claim_ref(claim),
            "Normal",
            "ProvisioningSucceeded",
            f"Successfully provisioned volume {claim.volume_name_for}",
        )

    async def _clear_intent(self, claim: core.Claim) -> None:
        """The PV is saved; a failure here only leaves work for the sweep (it sees the PV)."""
        try:
            await self.storage.clear_intent(claim.volume_name_for)
        except StorageError as error:
            logger.warning(
                "claim %s: volume saved, but its intent record stays until the next sweep: %s",
                claim.key,
                error,
            )

    async def _save_volume(self, claim: core.Claim, body: dict[str, object]) -> dict[str, object]:
        try:
            return await self.kube.create_volume(body)
        except Conflict:
            existing = await self.kube.get_volume(claim.volume_name_for)
            if existing is not None and core.volume_is_for_claim(
                core.volume_from(existing), claim, self.settings.provisioner_name
            ):
                return existing  # a previous attempt saved it: success
            raise RetryLater(
                f"PersistentVolume {claim.volume_name_for} exists but is not ours for this claim"
            ) from None

    async def _undo_if_claim_gone(
        self, claim: core.Claim, directory: paths.RelativeDir, created: bool
    ) -> None:
        """Remove a directory we created for a claim that went away (never a reused one)."""
        if not created:
            return
        try:
            current = await self.kube.get_claim(claim.namespace, claim.name)
        except ApiError:
            return  # cannot tell; keep the directory and decide on the next attempt
        if current is not None and core.claim_from(current).uid == claim.uid:
            return
        try:
            outcome = await self.storage.discard_created_dir(
                directory, claim.volume_name_for, _claim_holder(claim)
            )
            logger.info(
                "claim %s: gone before its volume was saved; directory %s: %s",
                claim.key,
                directory,
                {"kept": "kept (it is not empty)"}.get(outcome, outcome),
            )
        except (StorageError, Redirected) as error:
            logger.warning("claim %s: could not remove %s: %s", claim.key, directory, error)

    # --- volumes: release ----------------------------------------------------------------------

    async def reconcile_volume(self, name: str) -> None:
        volume = self.cache.volume(name)
        if volume is None or name in self._released:
            return
        volume = self.adopter.with_recorded(volume)
        started = time.monotonic()
        # Adoption and recording an adopted PV's policy change the PV: decide again after each.
        for _step in range(RELEASE_STEPS):
            plan = releasing.plan_release(self._volume_facts(volume))
            if plan.step is releasing.Step.ADOPT:
                assert plan.located is not None
                changed = await self.adopter.adopt(volume, plan.located)
            elif plan.step is releasing.Step.RECORD_POLICY:
                assert plan.policy is not None
                changed = await self.adopter.record_policy(volume, plan.policy)
            else:
                await self._release(volume, plan, started)
                return
            if changed is None:
                return
            volume = changed
        raise RetryLater(f"volume {name}: gone or changing while recording its policy")

    def _volume_facts(self, volume: core.Volume) -> releasing.VolumeFacts:
        return releasing.VolumeFacts(
            volume=volume,
            provisioner_name=self.settings.provisioner_name,
            export=self.export,
            storage_class=self.cache.storage_class(volume.storage_class),
            overlapping=self.cache.volumes_overlapping,
        )

    async def _release(
        self, volume: core.Volume, plan: releasing.ReleasePlan, started: float
    ) -> None:
        """Carry out a release step: nothing, a refused adoption, the finalizer alone (Retain),
        or the directory's policy, then the PV deleted and our finalizer dropped."""
        if plan.step is releasing.Step.IGNORE:
            logger.debug("volume %s: ignored: %s", volume.name, plan.reason)
            return
        if plan.step is releasing.Step.REFUSE_ADOPTION:
            assert plan.refusal is not None
            await self.adopter.refuse(volume, plan.refusal)
            return
        ref = volume_ref(volume)
        if plan.step is releasing.Step.DROP_FINALIZER:
            await self._drop_finalizer(volume)
            self._event(ref, "Normal", "VolumeRetained", plan.reason)
            return
        try:
            outcome = await self._apply_on_delete(volume, plan)
        except Busy as error:
            raise RetryLater(f"volume {volume.name}: {error}") from error
        except (StorageError, paths.UnsafePathError, core.ReleaseRefused, Redirected) as error:
            self.metrics.delete_failed_total.labels(volume.storage_class).inc()
            self._event(ref, "Warning", "VolumeFailedDelete", str(error))
            raise RetryLater(f"volume {volume.name}: {error}") from error
        self._event(ref, outcome.event_type, outcome.reason, outcome.message)
        if not volume.deleting:
            deleted = await self.kube.delete_volume(volume.name, volume.uid)
            if deleted is not None:
                volume = core.volume_from(deleted)
        await self._drop_finalizer(volume)
        self._released.add(volume.name)
        self.metrics.delete_total.labels(volume.storage_class).inc()
        self.metrics.delete_duration.labels(volume.storage_class).observe(
            time.monotonic() - started
        )
        logger.info("volume %s: released: %s", volume.name, outcome.message)

    async def _apply_on_delete(
        self, volume: core.Volume, plan: releasing.ReleasePlan
    ) -> core.ReleaseOutcome:
        if plan.step is releasing.Step.REFUSE:
            raise core.ReleaseRefused(plan.reason)
        if plan.step is releasing.Step.RETAIN:
            return releasing.retained(plan)
        directory = plan.directory
        assert directory is not None
        if plan.step is releasing.Step.DELETE:
            existed = await self.storage.remove_dir(directory, volume.name)
            if not existed:
                logger.warning(
                    "volume %s: directory %s was already missing", volume.name, directory
                )
            return releasing.deleted(plan, existed)
        archive = await self.storage.archive_dir(directory, volume.name)
        if archive is None:
            logger.warning("volume %s: directory %s was already missing", volume.name, directory)
        return releasing.archived(plan, archive)

    async def _drop_finalizer(self, volume: core.Volume) -> None:
        """Remove our finalizer: one request, whatever changed since the PV was read."""
        if core.FINALIZER in volume.finalizers:
            await self.kube.remove_volume_finalizer(volume.name, core.FINALIZER, volume.uid)
