"""``nfs-provisioner handover``: an admin gives an existing directory to a namespace.

A leftover directory is reused only by a claim of the namespace that owns it (ownership.py);
when the data really is meant for another namespace, or has no owner record and a path outside
the claim's namespace, an admin runs this inside the provisioner's pod (so only whoever may exec
there, or write the export, can do it). It refuses a directory that a PersistentVolume uses (or
one inside or around it): handing over a live volume would move it to another tenant under its
pods. It records the new owner through the same no-follow walk, under the same reservation and
export lock as every other write, and prints what it did.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from provisioner import core, journal
from provisioner.api import ApiError
from provisioner.config import Handover, Settings
from provisioner.journal import Owner
from provisioner.kube import KubeClient, load_api_client
from provisioner.paths import RelativeDir
from provisioner.reservations import Busy
from provisioner.safefs import Redirected, Syscalls
from provisioner.storage import Storage, StorageError


def in_use(
    directory: RelativeDir, volumes: Iterable[core.Volume], export: core.Export
) -> list[str]:
    """The PVs (ours, nfs-subdir's, made by hand) whose directory is ``directory``, inside it or
    around it."""
    return sorted(
        volume.name
        for volume in volumes
        if any(
            core.dirs_overlap(used, str(directory))
            for used in core.volume_directories(volume, export)
        )
    )


async def run(settings: Settings, request: Handover, calls: Syscalls) -> tuple[int, str]:
    """Record ``request.namespace`` as the owner of ``request.directory``; (exit code, line)."""
    try:
        kube = KubeClient(load_api_client(pool_size=1), qps=5, burst=5, threads=1)
    except Exception as error:  # noqa: BLE001 - any config failure is reported, not raised
        return 1, f"handover: no Kubernetes configuration: {error}"
    try:
        cluster = await kube.cluster_identity()
        volumes = await kube.list_volumes()
    except ApiError as error:
        return 1, f"handover: cannot read the cluster's identity or its PersistentVolumes: {error}"
    finally:
        kube.close()
    users = in_use(request.directory, volumes, core.Export(settings.nfs_server, settings.nfs_path))
    if users:
        return 1, (
            f'handover: directory "{request.directory}" is used by PersistentVolume '
            f"{', '.join(users)} (the same directory, inside it or around it); a directory in "
            "use is not handed over, or its volume would change tenants under its pods. Delete "
            "those claims first (with onDelete: retain to keep the data), then hand it over"
        )
    storage = Storage(Path(settings.mount_path), calls, timeout=settings.fs_timeout)
    # Its own writer name: the provisioner's sweep removes only its own instances' locks.
    storage.set_writer(cluster.primary, f"{settings.provisioner_name} (handover)", cluster.aliases)
    owner = Owner(
        cluster=cluster.primary,
        namespace=request.namespace,
        provisioner=settings.provisioner_name,
        since=journal.timestamp(),
    )
    try:
        await storage.record_owner(request.directory, owner)
    except (StorageError, Redirected, Busy) as error:
        return 1, f'handover: directory "{request.directory}": {error}'
    finally:
        storage.close()
    return 0, (
        f'handover: directory "{request.directory}" now belongs to namespace '
        f'"{request.namespace}"; its claims may reuse it'
    )
