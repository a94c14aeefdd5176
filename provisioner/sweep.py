"""Finish what a crash interrupted, once each time this process becomes leader.

SPEC §11: a crash at any point of provisioning must converge with no orphans. A provisioner
that dies after creating a claim's directory but before saving its PV leaves the directory and
its intent (journal.py); if the claim is deleted before any provisioner runs again, no claim or
PV will ever name it. A process killed while writing a record leaves a temporary file in the
journal's scratch directory; those of this cluster's provisioner are removed first.
``app`` calls ``sweep`` before the work queue starts, so no provisioning
of ours runs concurrently; ``orphans.judge`` decides per intent, and
``Storage.discard_created_dir`` (rmdir, never recursive) makes sure nothing with data is lost.
A failed sweep is logged and retried at the next leadership; it never blocks provisioning.
"""

from __future__ import annotations

import logging

from provisioner import core, orphans
from provisioner.api import ApiError, KubeApi
from provisioner.paths import UnsafePathError, parse_relative
from provisioner.reservations import Busy
from provisioner.safefs import Redirected
from provisioner.storage import Storage, StorageError

logger = logging.getLogger(__name__)


async def sweep(
    storage: Storage, kube: KubeApi, export: core.Export, cluster: str, provisioner: str
) -> list[str]:
    """Settle every intent of ours; returns the directories removed. Never raises: the sweep
    is housekeeping, and a bug in it must not keep the leader from provisioning."""
    try:
        return await _sweep(storage, kube, export, cluster, provisioner)
    except Exception:
        logger.exception("orphan sweep failed; provisioning goes on without it")
        return []


async def _remove_leftovers(storage: Storage, cluster: str, provisioner: str) -> None:
    """No write of ours is in flight yet: any lock or temporary file of ours that an earlier
    instance of this cluster's provisioner left (under any name of this cluster) is a dead one."""
    locks = await storage.remove_locks_left()
    if locks:
        logger.info(
            "export locks: dropped %d lock(s) an earlier run of ours left when killed: %s",
            len(locks),
            ", ".join(sorted(locks)),
        )
    leftovers: list[str] = []
    for name in sorted({cluster} | storage.aliases):
        leftovers += await storage.remove_temporaries(name, provisioner)
    if leftovers:
        logger.info(
            "orphan sweep: removed %d half-written record file(s) of an earlier run",
            len(leftovers),
        )


async def _sweep(
    storage: Storage, kube: KubeApi, export: core.Export, cluster: str, provisioner: str
) -> list[str]:
    try:
        await _remove_leftovers(storage, cluster, provisioner)
        # Intents first, then claims and PVs: an intent seen here whose claim is alive was
        # written after that claim existed, so the later list includes it.
        intents, unreadable = await storage.read_intents()
        for name in unreadable:
            logger.warning("orphan sweep: intent record %s is unreadable; left alone", name)
        if not intents:
            return []
        claims = await kube.list_claims()
        volumes = await kube.list_volumes()
    except (StorageError, Redirected, ApiError) as error:
        logger.warning("orphan sweep skipped: %s", error)
        return []
    claim_uids = {claim.uid for claim in claims}
    volume_names = {volume.name for volume in volumes}
    used = orphans.used_dirs(volumes, export)
    removed = []
    for intent in intents:
        action = orphans.judge(intent, cluster, provisioner, claim_uids, volume_names, used)
        try:
            if action is orphans.Action.CLEAR:
                await storage.clear_intent(intent.volume)
            elif action is orphans.Action.REMOVE:
                directory = parse_relative(intent.directory)
                outcome = await storage.discard_created_dir(directory, intent.volume)
                claim = f"{intent.namespace}/{intent.claim} (uid {intent.claim_uid})"
                if outcome == "removed":
                    removed.append(intent.directory)
                    logger.info(
                        "orphan sweep: removed empty directory %s: claim %s is gone and its PV "
                        "was never saved",
                        intent.directory,
                        claim,
                    )
                elif outcome == "missing":
                    logger.info(
                        "orphan sweep: directory %s of claim %s was never made or is gone "
                        "already; dropped its intent",
                        intent.directory,
                        claim,
                    )
                else:
                    logger.warning(
                        "orphan sweep: kept %s: claim %s is gone, but the directory is not "
                        "empty; it stays as a leftover of namespace %s",
                        intent.directory,
                        claim,
                        intent.namespace,
                    )
        except (StorageError, Redirected, UnsafePathError, Busy) as error:
            logger.warning("orphan sweep: could not settle %s: %s", intent.directory, error)
    return removed
