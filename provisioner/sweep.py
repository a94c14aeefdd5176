"""Remove the empty directories a crash left behind, once each time this process becomes leader.

SPEC §11: a crash at any point of provisioning must converge with no orphans. The one case the
claim reconcile cannot reach is a directory created just before a crash whose claim was deleted
while no provisioner ran: no claim or PV will ever name it again. ``app`` calls ``sweep`` before
the work queue starts, so no provisioning of ours runs concurrently; ``orphans`` decides, and
``Storage.remove_empty_dir`` (rmdir, never recursive) makes sure nothing with data is removed.
A failed sweep is logged and retried at the next leadership; it never blocks provisioning.
"""

from __future__ import annotations

import logging

from provisioner import core, orphans
from provisioner.kube import ApiError, KubeApi
from provisioner.paths import RelativeDir, UnsafePathError
from provisioner.storage import Storage, StorageError

logger = logging.getLogger(__name__)


async def sweep(storage: Storage, kube: KubeApi, export_path: str) -> list[str]:
    """Remove orphaned empty directories; returns the names removed. Never raises: the sweep
    is housekeeping, and a bug in it must not keep the leader from provisioning."""
    try:
        return await _sweep(storage, kube, export_path)
    except Exception:
        logger.exception("orphan sweep failed; provisioning goes on without it")
        return []


async def _sweep(storage: Storage, kube: KubeApi, export_path: str) -> list[str]:
    try:
        # The directory listing first, then the claims and PVs: any directory seen here whose
        # claim is alive was made after that claim existed, so the later list includes it.
        names = await storage.list_top_dirs()
        if not any(orphans.claim_uid_of(name) for name in names):
            return []
        claims = [core.claim_from(body) for body in await kube.list_claims()]
        volumes = [core.volume_from(body) for body in await kube.list_volumes()]
    except (StorageError, ApiError) as error:
        logger.warning("orphan sweep skipped: %s", error)
        return []
    candidates = orphans.orphaned(
        names,
        claim_uids={claim.uid for claim in claims},
        volume_names={volume.name for volume in volumes},
        used_dirs=orphans.used_top_dirs(volumes, export_path),
    )
    removed = []
    for name in candidates:
        try:
            if await storage.remove_empty_dir(RelativeDir((name,))):
                removed.append(name)
                logger.info(
                    "orphan sweep: removed empty directory %s: its claim and PV no longer exist "
                    "(left by a crash between creating it and saving the PV)",
                    name,
                )
            else:
                logger.debug(
                    "orphan sweep: kept %s: its claim and PV no longer exist, but it is not "
                    "empty; remove or archive it by hand if it is not needed",
                    name,
                )
        except (StorageError, UnsafePathError) as error:
            logger.warning("orphan sweep: could not remove %s: %s", name, error)
    return removed
