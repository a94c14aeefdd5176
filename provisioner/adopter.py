"""Adopting the previous provisioner's PVs: the side effects of what adoption.py decides.

``releasing.plan_release`` says when a PV needs a step of the migration (``ADOPT``,
``REFUSE_ADOPTION``, ``RECORD_POLICY``); the reconciler hands that step to the ``Adopter`` and
plans again with the PV it gets back. The Adopter writes the owner record on the export (under
the directory's reservation) and our annotations on the PV: the adoption, a refusal, or the
on-delete policy resolved at the first release attempt. When the provisioner may not patch PVs
(``permissions.PATCH_VOLUMES``, nfs-subdir's own RBAC), it keeps those annotations in this
process's memory instead and ``with_recorded`` reads them back exactly as the patch would have.
Nothing of the old provisioner's rules is decided here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from provisioner import adoption, core, journal
from provisioner.api import Conflict, KubeApi, NotFound, ObjectRef
from provisioner.cache import Cache
from provisioner.journal import Owner
from provisioner.reservations import Busy
from provisioner.safefs import Redirected
from provisioner.storage import Storage, StorageError
from provisioner.workqueue import RetryLater

logger = logging.getLogger(__name__)

Event = Callable[[ObjectRef, str, str, str], None]
"""Queue an Event: (object, type, reason, message)."""


def volume_ref(volume: core.Volume) -> ObjectRef:
    return ObjectRef(kind="PersistentVolume", name=volume.name, uid=volume.uid)


class Adopter:
    def __init__(
        self,
        provisioner_name: str,
        export: core.Export,
        cache: Cache,
        kube: KubeApi,
        storage: Storage,
        event: Event,
    ) -> None:
        self.provisioner_name = provisioner_name
        self.export = export
        self.cache = cache
        self.kube = kube
        self.storage = storage
        self.event = event
        self.cluster = ""
        """The cluster's identity (identity.py) for the owner records it writes."""
        self.patch_volumes = True
        """Whether PVs may be patched; without, what would be recorded stays in memory."""
        # PV uid -> (its name, our annotations a patch would have written: adoption, its
        # policy, a refusal) when PVs may not be patched: this process's memory of them.
        self._unrecorded: dict[str, tuple[str, dict[str, str]]] = {}

    def with_recorded(self, volume: core.Volume) -> core.Volume:
        """The PV as it reads with what this process recorded in memory for it."""
        if volume.uid in self._unrecorded:
            return core.with_annotations(volume, self._unrecorded[volume.uid][1])
        return volume

    def forget(self, name: str) -> None:
        for uid in [uid for uid, (pv, _) in self._unrecorded.items() if pv == name]:
            del self._unrecorded[uid]

    async def adopt(self, volume: core.Volume, located: adoption.Located) -> core.Volume | None:
        """Record a PV of the previous provisioner as ours, once; None when it was refused (one
        Warning, then left alone) or is gone."""
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
                        provisioner=self.provisioner_name,
                        volume=volume.name,
                        since=journal.timestamp(),
                    )
                    await self.storage.record_owner(directory, owner, holder)
        except Redirected as error:
            await self.refuse(
                volume, adoption.Refusal(adoption.redirected_reason(error.where, error.what))
            )
            return None
        except (StorageError, Busy) as error:
            raise RetryLater(f"volume {volume.name}: cannot adopt it yet: {error}") from error
        patch = adoption.adoption_patch(volume, located, self.export, journal.timestamp())
        adopted = await self._record(volume, patch)
        if adopted is None:
            return None
        logger.info("volume %s: adopted with directory %s", volume.name, directory)
        self.event(
            volume_ref(adopted),
            "Normal",
            "VolumeAdopted",
            adoption.adopted_message(volume, located, inspection.exists),
        )
        return adopted

    async def refuse(self, volume: core.Volume, refusal: adoption.Refusal) -> None:
        """Once: the annotation makes the refusal visible and stops every later attempt (in
        memory, once per process, when PVs may not be patched)."""
        if await self._record(volume, adoption.refusal_patch(volume, refusal)) is None:
            return
        logger.warning("volume %s: not adopted: %s", volume.name, refusal.reason)
        self.event(
            volume_ref(volume),
            "Warning",
            "AdoptionRefused",
            adoption.refusal_message(volume, refusal),
        )

    async def record_policy(
        self, volume: core.Volume, policy: adoption.LegacyPolicy
    ) -> core.Volume | None:
        """Record the policy an adopted PV gets (resolved from its StorageClass as it is now) so
        every retry applies the same one. The PV often changes under us right then (the PV
        controller marks it Released): a conflict re-reads it, and the release decides again;
        None when the PV is gone."""
        patch = adoption.policy_patch(volume, policy)
        if not self.patch_volumes:
            recorded: core.Volume | None = self._keep_unrecorded(volume, patch)
        else:
            try:
                recorded = core.volume_from(await self.kube.patch_volume(volume.name, patch))
            except Conflict:
                fresh = await self.kube.get_volume(volume.name)
                recorded = None if fresh is None else core.volume_from(fresh)
                if recorded is not None:
                    self.cache.put_volume(recorded)
                return recorded
            except NotFound:
                return None
            self.cache.put_volume(recorded)
        logger.info("volume %s: on-delete %s: %s", volume.name, policy.on_delete, policy.basis)
        return recorded

    async def _record(self, volume: core.Volume, patch: dict[str, Any]) -> core.Volume | None:
        """Record ``patch`` (our annotations) on the PV, or in memory when PVs may not be
        patched; the volume as it now reads, None if the PV is gone. A conflict is retried
        with backoff: the watch brings the newer version meanwhile."""
        if not self.patch_volumes:
            return self._keep_unrecorded(volume, patch)
        try:
            saved = await self.kube.patch_volume(volume.name, patch)
        except NotFound:
            return None
        except Conflict as error:
            raise RetryLater(f"volume {volume.name}: changed while being patched") from error
        recorded = core.volume_from(saved)
        self.cache.put_volume(recorded)
        return recorded

    def _keep_unrecorded(self, volume: core.Volume, patch: dict[str, Any]) -> core.Volume:
        """Remember the annotations ``patch`` would have written on ``volume`` (PVs may not be
        patched), and return the volume as it would then read."""
        annotations: dict[str, str] = patch["metadata"]["annotations"]
        self._unrecorded.setdefault(volume.uid, (volume.name, {}))[1].update(annotations)
        return core.with_annotations(volume, annotations)
