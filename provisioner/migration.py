"""``nfs-provisioner check --migration``: what adoption would do, before the image swap.

Lists every PersistentVolume that names our PROVISIONER_NAME without our records: those the
running provisioner would adopt (directory, claim, and what releasing it would do with its
StorageClass as it is now) and those it would refuse, with why. Reads the API and walks the
export without following symlinks, exactly as adoption does; changes nothing (no patch, no
record, no Event). The decisions are adoption.py's; this module only gathers the inputs.
"""

from __future__ import annotations

from pathlib import Path

from provisioner import adoption, core
from provisioner.api import ApiError
from provisioner.config import Settings
from provisioner.kube import KubeClient, load_api_client
from provisioner.safefs import Redirected, Syscalls
from provisioner.storage import Storage, StorageError


async def run(settings: Settings, calls: Syscalls) -> tuple[int, str]:
    """(exit code, report): 0 with the listing, 1 when the PVs or classes cannot be listed."""
    try:
        kube = KubeClient(load_api_client(pool_size=2), qps=20, burst=20, threads=2)
    except Exception as error:  # noqa: BLE001 - any config failure is reported, not raised
        return 1, f"migration: no Kubernetes configuration: {error}"
    try:
        listed = await kube.list_volumes()
        class_bodies, _ = await kube.list_classes_versioned()
    except ApiError as error:
        return 1, f"migration: cannot list PersistentVolumes and StorageClasses: {error}"
    finally:
        kube.close()
    classes = {
        storage_class.name: storage_class
        for storage_class in (core.storage_class_from(body) for body in class_bodies)
    }
    volumes = sorted(listed, key=lambda v: v.name)
    export = core.Export(settings.nfs_server, settings.nfs_path)
    storage = Storage(Path(settings.mount_path), calls, timeout=settings.fs_timeout)
    rows: list[adoption.Row] = []
    refused: list[tuple[str, str]] = []
    ours = adopted = 0
    try:
        for volume in volumes:
            standing = adoption.standing(volume, settings.provisioner_name)
            if standing is adoption.Standing.OURS:
                ours += 1
                adopted += volume.adopted is not None
            elif standing is adoption.Standing.NOT_ADOPTED:
                refused.append((volume.name, f"refused earlier: {volume.not_adopted}"))
            elif standing is adoption.Standing.ADOPT:
                found = await _candidate(volume, export, storage, classes)
                if isinstance(found, adoption.Refusal):
                    refused.append((volume.name, found.reason))
                else:
                    rows.append(found)
    finally:
        storage.close()
    report = adoption.render_report(
        settings.provisioner_name, export, rows, refused, ours=ours, adopted=adopted
    )
    return 0, report


async def _candidate(
    volume: core.Volume,
    export: core.Export,
    storage: Storage,
    classes: dict[str, core.StorageClass],
) -> adoption.Row | adoption.Refusal:
    located = adoption.locate(volume, export)
    if isinstance(located, adoption.Refusal):
        return located
    try:
        exists = (await storage.inspect(located.directory)).exists
        state = "" if exists else "; the directory does not exist now"
    except Redirected as error:
        return adoption.Refusal(adoption.redirected_reason(error.where, error.what))
    except StorageError as error:
        state = f"; the directory could not be checked ({error}): adoption decides when it can"
    policy = adoption.legacy_policy(volume.storage_class, classes.get(volume.storage_class))
    claim = (
        f"{volume.claim_namespace}/{volume.claim_name}"
        if volume.claim_namespace and volume.claim_name
        else "none"
    )
    return adoption.Row(
        volume=volume.name,
        directory=str(located.directory),
        claim=claim,
        phase=f"{volume.phase or 'unknown phase'}, reclaim policy {volume.reclaim_policy}{state}",
        release=adoption.release_preview(volume, located.directory, policy),
    )
