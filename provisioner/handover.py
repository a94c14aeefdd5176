"""``nfs-provisioner handover``: an admin gives an existing directory to a namespace.

A leftover directory is reused only by a claim of the namespace that owns it (ownership.py);
when the data really is meant for another namespace, or has no owner record and a path outside
the claim's namespace, an admin runs this inside the provisioner's pod (so only whoever may exec
there, or write the export, can do it). It records the new owner through the same no-follow
walk as every other write, and prints what it did.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from provisioner.config import Handover, Settings
from provisioner.journal import Owner
from provisioner.kube import ApiError, KubeApi, load_api_client
from provisioner.reservations import Busy
from provisioner.safefs import Redirected, Syscalls
from provisioner.storage import Storage, StorageError


async def run(settings: Settings, request: Handover, calls: Syscalls) -> tuple[int, str]:
    """Record ``request.namespace`` as the owner of ``request.directory``; (exit code, line)."""
    try:
        kube = KubeApi(load_api_client(pool_size=1), qps=5, burst=5, threads=1)
    except Exception as error:  # noqa: BLE001 - any config failure is reported, not raised
        return 1, f"handover: no Kubernetes configuration: {error}"
    try:
        cluster = await kube.cluster_uid()
    except ApiError as error:
        return 1, f"handover: cannot read the cluster's identity (kube-system's uid): {error}"
    finally:
        kube.close()
    storage = Storage(Path(settings.mount_path), calls, timeout=settings.fs_timeout)
    # Its own writer name: the provisioner's sweep removes only its own instances' locks.
    storage.set_writer(cluster, f"{settings.provisioner_name} (handover)")
    owner = Owner(
        cluster=cluster,
        namespace=request.namespace,
        provisioner=settings.provisioner_name,
        since=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
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
