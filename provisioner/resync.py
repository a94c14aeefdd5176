"""The leader's lists: the start-up gate, the periodic resync and the re-list after a watch gap.

kopf's watches feed the cache event by event; these complete lists are what make it whole. The
gate holds the first reconcile until claims, PVs and classes are all listed (SPEC §4); the resync
lists again every ``RESYNC_PERIOD`` and re-queues everything; a re-list by kopf (after 410 Gone)
triggers a list of our own a few seconds later. Each list is merged into the cache
(``cache.plan_merge`` keeps the newer version of each object) and prunes what it proves gone,
which the reconciler then forgets. Typed against ``api.KubeApi`` through the reconciler.
"""

from __future__ import annotations

import asyncio
import logging

from provisioner import core
from provisioner.api import ApiError
from provisioner.cache import Merged
from provisioner.reconciler import Reconciler

logger = logging.getLogger(__name__)


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
