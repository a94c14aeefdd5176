"""Assembles the running provisioner: API client, storage, cache, reconciler, kopf, HTTP, election.

Called by ``__main__`` after the settings are validated. It owns the lifetimes of the background
tasks (work queue, resync, HTTP server, leader election) and runs kopf standalone, cluster-wide.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from pathlib import Path

import kopf

from provisioner import handlers
from provisioner.cache import Cache
from provisioner.config import Settings
from provisioner.kube import KubeApi, load_api_client
from provisioner.metrics import Metrics
from provisioner.reconciler import Identity, Reconciler, resync_forever
from provisioner.storage import FaultInjectingFilesystem, Filesystem, LocalFilesystem, Storage

logger = logging.getLogger(__name__)

FAULTS_ENV = "NFS_PROVISIONER_UNSAFE_FAULTS_FILE"
"""Test seam: a JSON file of filesystem faults (see storage.FaultInjectingFilesystem). Never set
it in production; the name says so, like local-path-provisioner's ``unsafe`` options."""


def make_identity(provisioner_name: str) -> str:
    """``<hostname>_<random>``, as client-go's leader election and the upstream library use."""
    return f"{socket.gethostname()}_{secrets.token_hex(8)}"


def make_filesystem() -> Filesystem:
    faults = os.environ.get(FAULTS_ENV)
    if faults:
        logger.warning(
            "filesystem fault injection is ON (%s=%s): for tests only", FAULTS_ENV, faults
        )
        return FaultInjectingFilesystem(LocalFilesystem(), Path(faults))
    return LocalFilesystem()


class Provisioner:
    """One process worth of provisioner, built from validated settings."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.identity = make_identity(settings.provisioner_name)
        self.metrics = metrics or Metrics()
        self.kube = KubeApi(
            load_api_client(pool_size=settings.workers + 8),
            qps=settings.client_qps,
            burst=settings.client_burst,
            threads=settings.workers + 4,
        )
        # The pool is larger than the number of workers so that calls stuck on a hung mount
        # (which keep their thread after the timeout) leave room for the others.
        self.storage = Storage(
            Path(settings.mount_path),
            make_filesystem(),
            timeout=settings.fs_timeout,
            max_threads=settings.workers * 2 + 4,
            observe=self.metrics.observe_fs,
        )
        self.cache = Cache()
        self.reconciler = Reconciler(
            settings,
            self.cache,
            self.kube,
            self.storage,
            self.metrics,
            Identity(component=f"{settings.provisioner_name}_{self.identity}"),
        )
        self.registry = kopf.OperatorRegistry()
        handlers.register(self.registry, self.reconciler)

    async def run(self) -> int:
        kopf_settings = kopf.OperatorSettings()
        handlers.configure(kopf_settings)
        tasks: list[asyncio.Task[None]] = []
        self.metrics.leader.set(1)
        tasks.append(asyncio.create_task(self.reconciler.queue.run(), name="workers"))
        tasks.append(
            asyncio.create_task(
                resync_forever(self.reconciler, self.settings.resync_period), name="resync"
            )
        )
        logger.info(
            "provisioner %s starting as %s: export %s:%s mounted at %s",
            self.settings.provisioner_name,
            self.identity,
            self.settings.nfs_server,
            self.settings.nfs_path,
            self.settings.mount_path,
        )
        try:
            await kopf.operator(
                registry=self.registry,
                settings=kopf_settings,
                standalone=True,
                clusterwide=True,
            )
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            self.storage.close()
            self.kube.close()
        return 0
