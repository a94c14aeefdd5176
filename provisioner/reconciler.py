"""Level-triggered reconcile of claims (provision) and volumes (release).

The kopf handlers feed the cache and enqueue keys; the periodic resync enqueues everything. One
``reconcile`` per key reads the cache, asks ``core`` what to do, performs it through ``storage``
and ``kube``, and records Events and metrics. Every step is idempotent: the PV name is fixed by the
claim and delete reads only what the PV recorded, so repeating work after a crash is harmless.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from dataclasses import dataclass
from typing import Any

from provisioner import adoption, core, ownership, paths
from provisioner.api import ApiError, Conflict, KubeApi, NotFound, ObjectRef
from provisioner.cache import Cache, Merged
from provisioner.config import (
    ClassParameters,
    OnDelete,
    ParameterError,
    Settings,
    parse_class_parameters,
)
from provisioner.journal import Intent, Owner
from provisioner.metrics import Metrics
from provisioner.reservations import Busy
from provisioner.safefs import Redirected
from provisioner.storage import DirOwner, Storage, StorageError
from provisioner.workqueue import Backoff, WorkQueue

logger = logging.getLogger(__name__)

CLAIM = "claim"
VOLUME = "volume"


class RetryLater(Exception):
    """The attempt failed for a reason that may pass; the queue retries with backoff."""


@dataclass(frozen=True)
class Identity:
    """Who we are in Events (``source.component``), as the upstream library spells it."""

    component: str


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


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


def volume_ref(volume: core.Volume) -> ObjectRef:
    return ObjectRef(kind="PersistentVolume", name=volume.name, uid=volume.uid)


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
        self.cluster = ""
        """The cluster's identity (identity.py), set by app before the first reconcile; recorded
        on the export."""
        self.patch_volumes = True
        """Whether PVs may be patched (permissions.PATCH_VOLUMES), set by app with ``cluster``.
        Without: no finalizer on new PVs, and what adoption records stays in ``_unrecorded``."""
        # PV uid -> (its name, our annotations a patch would have written: adoption, its
        # policy, a refusal) when PVs may not be patched: this process's memory of them.
        self._unrecorded: dict[str, tuple[str, dict[str, str]]] = {}
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
        for uid in [uid for uid, (pv, _) in self._unrecorded.items() if pv == name]:
            del self._unrecorded[uid]
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
        storage_class = self.cache.storage_class(claim.class_name)
        volume_exists = self.cache.volume(claim.volume_name_for) is not None
        decision = core.decide_claim(
            claim, storage_class, self.settings.provisioner_name, volume_exists
        )
        if decision.verdict is core.Verdict.IGNORE:
            logger.debug("claim %s: ignored: %s", claim.key, decision.reason)
            return
        if decision.verdict is core.Verdict.WAIT:
            logger.info("claim %s: waiting: %s", claim.key, decision.reason)
            return
        assert storage_class is not None  # decide_claim waits when the class is missing
        if decision.verdict is core.Verdict.REFUSE:
            await self._refuse(claim, storage_class, decision.reason)
            return
        try:
            parameters = parse_class_parameters(storage_class.name, storage_class.parameters)
            directory = paths.claim_dir(
                parameters.path_pattern,
                paths.ClaimFields(claim.namespace, claim.name, claim.labels, claim.annotations),
                claim.volume_name_for,
            )
        except (ParameterError, paths.UnsafePathError) as error:
            await self._refuse(claim, storage_class, f'claim "{claim.key}": {error}')
            return
        holders = self.cache.volumes_overlapping(str(directory)) - {claim.volume_name_for}
        if holders:
            await self._refuse(
                claim,
                storage_class,
                f'directory "{directory}" is already used by PersistentVolume '
                f"{', '.join(sorted(holders))} (the same directory, inside it or around it); "
                "a directory is never shared between claims. Change the pathPattern inputs "
                "(labels/annotations) or delete the other claim",
            )
            return
        # The overlap rule above cannot see a claim whose PV is not saved yet, nor a release or
        # another writer at work: the reservation does (nested directories conflict too).
        try:
            async with self.storage.reserve(_claim_holder(claim), directory):
                if delivered or await self._confirmed(claim):
                    await self._provision(claim, storage_class, directory, parameters)
        except Busy as error:
            raise RetryLater(f"claim {claim.key}: {error}") from error
        except StorageError as error:  # taking or giving back the export lock failed
            self.metrics.provision_failed_total.labels(storage_class.name).inc()
            self._event(claim_ref(claim), "Warning", "ProvisioningFailed", str(error))
            raise RetryLater(f"claim {claim.key}: {error}") from error

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

    async def _refuse(self, claim: core.Claim, storage_class: core.StorageClass, why: str) -> None:
        """Post the refusal once per claim and reason; only then is it a failed attempt (resyncs
        and watch events that meet the same refusal again count nothing)."""
        if self._refused.get(claim.uid) == why:
            return
        self._refused[claim.uid] = why
        self.metrics.provision_failed_total.labels(storage_class.name).inc()
        logger.warning("claim %s: refused: %s", claim.key, why)
        self._event(claim_ref(claim), "Warning", "ProvisioningFailed", why)

    async def _provision(
        self,
        claim: core.Claim,
        storage_class: core.StorageClass,
        directory: paths.RelativeDir,
        parameters: ClassParameters,
    ) -> None:
        started = time.monotonic()
        ref = claim_ref(claim)
        mode = DirOwner(mode=parameters.mode, uid=parameters.uid, gid=parameters.gid)
        tenant = Owner(
            cluster=self.cluster,
            namespace=claim.namespace,
            provisioner=self.settings.provisioner_name,
            volume=claim.volume_name_for,
            since=_now(),
        )
        try:
            inspection = await self.storage.inspect(directory)
            decision = ownership.decide(
                inspection,
                directory,
                tenant,
                default_name=parameters.path_pattern is None,
                provisioner_namespace=self.settings.namespace,
            )
            if decision.plan is ownership.Plan.REFUSE:
                await self._refuse(claim, storage_class, f'claim "{claim.key}": {decision.reason}')
                return
            self._event(
                ref,
                "Normal",
                "Provisioning",
                f'External provisioner is provisioning volume for claim "{claim.key}"',
            )
            created = decision.plan is ownership.Plan.CREATE
            if created:
                intent = Intent(
                    volume=claim.volume_name_for,
                    namespace=claim.namespace,
                    claim=claim.name,
                    claim_uid=claim.uid,
                    directory=str(directory),
                    cluster=self.cluster,
                    provisioner=self.settings.provisioner_name,
                    since=tenant.since,
                )
                await self.storage.create_dir(directory, mode, tenant, intent)
            else:
                await self.storage.reuse_dir(directory, mode, tenant if decision.adopt else None)
        except Redirected as error:
            await self._refuse(
                claim, storage_class, f'claim "{claim.key}": directory "{directory}": {error}'
            )
            return
        except StorageError as error:
            self.metrics.provision_failed_total.labels(storage_class.name).inc()
            self._event(ref, "Warning", "ProvisioningFailed", str(error))
            raise RetryLater(f"claim {claim.key}: {error}") from error
        if not created:
            self._event(
                ref,
                "Normal",
                "Provisioning",
                f'Reusing existing directory "{directory}" on the export: no PersistentVolume '
                f"records it, and {decision.reason}",
            )
        body = core.build_volume(
            claim,
            storage_class,
            directory,
            parameters.on_delete,
            self.export,
            self.settings.provisioner_name,
            finalizer=self.patch_volumes,
        )
        try:
            saved = await self._save_volume(claim, body)
        except (ApiError, RetryLater) as error:
            self.metrics.provision_failed_total.labels(storage_class.name).inc()
            await self._undo_if_claim_gone(claim, directory, created)
            self._event(
                ref,
                "Warning",
                "ProvisioningFailed",
                f"Error creating PersistentVolume {claim.volume_name_for} for claim "
                f'"{claim.key}": {error}; retrying',
            )
            raise RetryLater(str(error)) from error
        self.cache.put_volume(core.volume_from(saved))
        # Also after a reuse: an earlier attempt may have created the directory (and its intent)
        # and crashed before the PV was saved.
        await self._clear_intent(claim)
        self._refused.pop(claim.uid, None)
        self.metrics.provision_total.labels(storage_class.name).inc()
        self.metrics.provision_duration.labels(storage_class.name).observe(
            time.monotonic() - started
        )
        logger.info(
            "claim %s: provisioned volume %s in directory %s (%s)",
            claim.key,
            claim.volume_name_for,
            directory,
            "created" if created else "reused",
        )
        self._event(
            ref,
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
        if volume.uid in self._unrecorded:
            volume = core.with_annotations(volume, self._unrecorded[volume.uid][1])
        standing = adoption.standing(volume, self.settings.provisioner_name)
        if standing is adoption.Standing.NOT_ADOPTED:
            logger.debug("volume %s: ignored: not adopted: %s", name, volume.not_adopted)
            return
        if standing is adoption.Standing.ADOPT:
            adopted = await self._adopt(volume)
            if adopted is None:
                return
            volume = adopted
        decision = core.decide_volume(volume, self.settings.provisioner_name)
        if decision.action is core.VolumeAction.IGNORE:
            logger.debug("volume %s: ignored: %s", name, decision.reason)
            return
        ref = volume_ref(volume)
        if decision.action is core.VolumeAction.RELEASE_FINALIZER:
            await self._drop_finalizer(volume)
            self._event(ref, "Normal", "VolumeRetained", decision.reason)
            return
        started = time.monotonic()
        try:
            outcome = await self._apply_on_delete(volume)
        except Busy as error:
            raise RetryLater(f"volume {name}: {error}") from error
        except (StorageError, paths.UnsafePathError, core.ReleaseRefused, Redirected) as error:
            self.metrics.delete_failed_total.labels(volume.storage_class).inc()
            self._event(ref, "Warning", "VolumeFailedDelete", str(error))
            raise RetryLater(f"volume {name}: {error}") from error
        self._event(ref, outcome.event_type, outcome.reason, outcome.message)
        if not volume.deleting:
            deleted = await self.kube.delete_volume(name, volume.uid)
            if deleted is not None:
                volume = core.volume_from(deleted)
        await self._drop_finalizer(volume)
        self._released.add(name)
        self.metrics.delete_total.labels(volume.storage_class).inc()
        self.metrics.delete_duration.labels(volume.storage_class).observe(
            time.monotonic() - started
        )
        logger.info("volume %s: released: %s", name, outcome.message)

    async def _apply_on_delete(self, volume: core.Volume) -> core.ReleaseOutcome:
        directory = core.recorded_directory(volume, self.export.path)
        basis, event_type = "", "Normal"
        if volume.adopted is not None:
            # The previous provisioner's rules: the class decides at the first release attempt,
            # recorded so that retries apply the same policy (adoption.legacy_policy).
            if volume.on_delete is None:
                volume = await self._record_legacy_policy(volume)
            basis, event_type = adoption.release_note(volume.on_delete_basis)
        policy = core.recorded_on_delete(volume)
        if policy is OnDelete.RETAIN:
            kept = basis or " (onDelete: retain)"
            return core.ReleaseOutcome(
                "VolumeRetained", f'Directory "{directory}" kept{kept}', event_type
            )
        if volume.adopted is not None:
            overlap = adoption.overlap_refusal(
                volume, directory, self.cache.volumes_overlapping(str(directory))
            )
            if overlap is not None:
                raise core.ReleaseRefused(overlap)
        if policy is OnDelete.DELETE:
            existed = await self.storage.remove_dir(directory, volume.name)
            if not existed:
                logger.warning(
                    "volume %s: directory %s was already missing", volume.name, directory
                )
                return core.ReleaseOutcome(
                    "VolumeDeleted",
                    f'Directory "{directory}" was already missing; nothing to delete{basis}',
                    event_type,
                )
            return core.ReleaseOutcome(
                "VolumeDeleted", f'Directory "{directory}" deleted{basis}', event_type
            )
        archived = await self.storage.archive_dir(directory, volume.name)
        if archived is None:
            logger.warning("volume %s: directory %s was already missing", volume.name, directory)
            return core.ReleaseOutcome(
                "VolumeArchived",
                f'Directory "{directory}" was already missing; nothing to archive{basis}',
                event_type,
            )
        return core.ReleaseOutcome(
            "VolumeArchived", f'Directory "{directory}" archived as "{archived}"{basis}', event_type
        )

    # --- volumes: adoption of the previous provisioner's ----------------------------------------

    async def _adopt(self, volume: core.Volume) -> core.Volume | None:
        """Record a PV of the previous provisioner as ours (adoption.py), once; None when it
        was refused (one Warning, then left alone) or is gone."""
        located = adoption.locate(volume, self.export)
        if isinstance(located, adoption.Refusal):
            await self._refuse_adoption(volume, located)
            return None
        directory = located.directory
        holder = f"the adoption of PersistentVolume {volume.name}"
        try:
            async with self.storage.reserve(holder, directory):
                inspection = await self.storage.inspect(directory)
                if inspection.exists and inspection.leaf_owner is None and volume.claim_namespace:
                    # Before the PV is patched: a retry re-inspects and finds the record.
                    owner = Owner(
                        cluster=self.cluster,
                        namespace=volume.claim_namespace,
                        provisioner=self.settings.provisioner_name,
                        volume=volume.name,
                        since=_now(),
                    )
                    await self.storage.record_owner(directory, owner, holder)
        except Redirected as error:
            await self._refuse_adoption(
                volume, adoption.Refusal(adoption.redirected_reason(error.where, error.what))
            )
            return None
        except (StorageError, Busy) as error:
            raise RetryLater(f"volume {volume.name}: cannot adopt it yet: {error}") from error
        adopted = await self._record(
            volume, adoption.adoption_patch(volume, located, self.export, _now())
        )
        if adopted is None:
            return None
        logger.info("volume %s: adopted with directory %s", volume.name, directory)
        self._event(
            volume_ref(adopted),
            "Normal",
            "VolumeAdopted",
            adoption.adopted_message(volume, located, inspection.exists),
        )
        return adopted

    async def _refuse_adoption(self, volume: core.Volume, refusal: adoption.Refusal) -> None:
        """Once: the annotation makes the refusal visible and stops every later attempt (in
        memory, once per process, when PVs may not be patched)."""
        if await self._record(volume, adoption.refusal_patch(volume, refusal)) is None:
            return
        logger.warning("volume %s: not adopted: %s", volume.name, refusal.reason)
        self._event(
            volume_ref(volume),
            "Warning",
            "AdoptionRefused",
            adoption.refusal_message(volume, refusal),
        )

    async def _record_legacy_policy(self, volume: core.Volume) -> core.Volume:
        """Resolve an adopted PV's policy from its StorageClass as it is now, and record it.

        The PV often changes under us right then (the PV controller marks it Released): a
        conflict re-reads it and tries again, unless the policy got recorded meanwhile or the PV
        no longer needs cleaning (then the whole reconcile decides again)."""
        for _attempt in range(3):
            policy = adoption.legacy_policy(
                volume.storage_class, self.cache.storage_class(volume.storage_class)
            )
            if not self.patch_volumes:
                recorded = self._keep_unrecorded(volume, adoption.policy_patch(volume, policy))
                logger.info(
                    "volume %s: on-delete %s: %s", volume.name, policy.on_delete, policy.basis
                )
                return recorded
            try:
                saved = await self.kube.patch_volume(
                    volume.name, adoption.policy_patch(volume, policy)
                )
            except Conflict:
                fresh = await self.kube.get_volume(volume.name)
                if fresh is None:
                    break
                volume = core.volume_from(fresh)
                self.cache.put_volume(volume)
                decision = core.decide_volume(volume, self.settings.provisioner_name)
                if decision.action is not core.VolumeAction.CLEAN:
                    raise RetryLater(f"volume {volume.name}: changed; deciding again") from None
                if volume.on_delete is not None:
                    return volume
                continue
            except NotFound:
                break
            recorded = core.volume_from(saved)
            self.cache.put_volume(recorded)
            logger.info("volume %s: on-delete %s: %s", volume.name, policy.on_delete, policy.basis)
            return recorded
        raise RetryLater(f"volume {volume.name}: gone or changing while recording its policy")

    async def _record(self, volume: core.Volume, patch: dict[str, Any]) -> core.Volume | None:
        """Record ``patch`` (our annotations) on the PV, or in memory when PVs may not be
        patched; the volume as it now reads, None if the PV is gone."""
        if not self.patch_volumes:
            return self._keep_unrecorded(volume, patch)
        saved = await self._patch_volume(volume, patch)
        if saved is None:
            return None
        recorded = core.volume_from(saved)
        self.cache.put_volume(recorded)
        return recorded

    def _keep_unrecorded(self, volume: core.Volume, patch: dict[str, Any]) -> core.Volume:
        """Remember the annotations ``patch`` would have written on ``volume`` (PVs may not be
        patched), and return the volume as it would then read."""
        annotations: dict[str, str] = patch["metadata"]["annotations"]
        self._unrecorded.setdefault(volume.uid, (volume.name, {}))[1].update(annotations)
        return core.with_annotations(volume, annotations)

    async def _patch_volume(
        self, volume: core.Volume, patch: dict[str, object]
    ) -> dict[str, object] | None:
        """Apply a merge patch carrying the resourceVersion read; None if the PV is gone. A
        conflict is retried with backoff: the watch brings the newer version meanwhile."""
        try:
            return await self.kube.patch_volume(volume.name, patch)
        except NotFound:
            return None
        except Conflict as error:
            raise RetryLater(f"volume {volume.name}: changed while being patched") from error

    async def _drop_finalizer(self, volume: core.Volume) -> None:
        """Remove our finalizer: one request, whatever changed since the PV was read."""
        if core.FINALIZER in volume.finalizers:
            await self.kube.remove_volume_finalizer(volume.name, core.FINALIZER, volume.uid)


async def relist(reconciler: Reconciler) -> tuple[Merged, Merged, Merged]:
    """Complete lists of claims, PVs and StorageClasses, merged into the cache.

    ``cache.plan_merge`` keeps the newer version of each object, and drops what the lists prove
    gone: objects deleted during a watch gap, which kopf's re-list after 410 Gone never reports.
    Those are forgotten by the reconciler too. Returns the merges of claims, PVs and classes.
    """
    kube, cache = reconciler.kube, reconciler.cache
    claims, claims_version = await kube.list_claims_versioned()
    volumes, volumes_version = await kube.list_volumes_versioned()
    classes, classes_version = await kube.list_classes_versioned()
    merged_claims = cache.merge_claims(claims, claims_version)
    merged_volumes = cache.merge_volumes(volumes, volumes_version)
    merged_classes = cache.merge_classes(
        ((core.storage_class_from(body), core.resource_version(body)) for body in classes),
        classes_version,
    )
    for uid in merged_claims.dropped:
        logger.info("claim uid %s: absent from the list; dropped from the cache", uid)
        reconciler.forget_claim(uid)
    for name in merged_volumes.dropped:
        logger.info("volume %s: absent from the list; dropped from the cache", name)
        reconciler.forget_volume(name)
    return merged_claims, merged_volumes, merged_classes


def _counts(merges: tuple[Merged, Merged, Merged]) -> str:
    claims, volumes, classes = merges
    return (
        f"listed {claims.listed} claims, {volumes.listed} PersistentVolumes and "
        f"{classes.listed} StorageClasses; dropped {len(claims.dropped)} claims, "
        f"{len(volumes.dropped)} PersistentVolumes and {len(classes.dropped)} StorageClasses "
        "deleted while unwatched"
    )


async def gate(reconciler: Reconciler) -> None:
    """Hold the leader's first reconcile until complete lists are in the cache (SPEC §4).

    Our equivalent of kopf's index gate (kopf holds handlers until every ``@kopf.index`` has
    its first list; our reconciles are not kopf handlers). kopf lists claims, PVs and classes in
    independent watches, so without it a claim could be reconciled before the PV that owns its
    directory is known. Retried with backoff until the lists succeed: nothing is reconciled
    until then.
    """
    delay = reconciler.settings.backoff_base
    while True:
        reconciler.relist_wanted.clear()  # this list covers kopf's lists so far
        try:
            merges = await relist(reconciler)
        except Exception as error:  # a bug must not end leadership silently: logged, retried
            logger.warning(
                "start-up gate: cannot list claims, PersistentVolumes and StorageClasses: %s; "
                "nothing is reconciled until they are listed; retrying in %.1f s",
                error,
                delay,
                exc_info=not isinstance(error, ApiError),
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, reconciler.settings.backoff_max)
            continue
        logger.info("start-up gate: %s; reconciling", _counts(merges))
        return


RELIST_SETTLE = 5.0
"""Seconds between kopf's first re-listed object and our own list: let its list finish."""


async def resync_forever(reconciler: Reconciler, period: float) -> None:
    """The operator-level periodic resync: fresh lists prune what a watch gap left behind, then
    every object goes through the same reconcile again. Between resyncs, a re-list by kopf (after
    410 Gone) triggers a list-and-prune of our own a few seconds later."""
    loop = asyncio.get_running_loop()
    due = loop.time() + period
    while True:
        try:
            await asyncio.wait_for(reconciler.relist_wanted.wait(), max(0.0, due - loop.time()))
        except TimeoutError:
            await _resync(reconciler)
            due = loop.time() + period
            continue
        await asyncio.sleep(RELIST_SETTLE)
        reconciler.relist_wanted.clear()
        try:
            logger.info("watch re-listed: %s", _counts(await relist(reconciler)))
        except Exception as error:  # the next resync lists again
            logger.warning(
                "watch re-listed, but cannot list (%s); pruning at the next resync",
                error,
                exc_info=not isinstance(error, ApiError),
            )


async def _resync(reconciler: Reconciler) -> None:
    reconciler.relist_wanted.clear()
    try:
        logger.info("resync: %s", _counts(await relist(reconciler)))
    except Exception as error:  # the resync goes on without the lists
        logger.warning(
            "resync: cannot list (%s); re-queueing what the cache holds",
            error,
            exc_info=not isinstance(error, ApiError),
        )
    claims, volumes = reconciler.cache.counts()
    logger.info("resync: re-queueing %d claims and %d volumes", claims, volumes)
    reconciler.resync()
