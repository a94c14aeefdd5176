"""Assembles the running provisioner: API client, storage, cache, reconciler, kopf, HTTP, election.

Called by ``__main__`` after the settings are validated. It owns the lifetimes of the background
tasks (work queue, resync, HTTP server, leader election) and runs kopf standalone, cluster-wide.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
import socket
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import kopf

from provisioner import core, handlers, kopfcompat, permissions
from provisioner.api import ApiError, ObjectRef
from provisioner.cache import Cache
from provisioner.config import Settings
from provisioner.fence import Fence
from provisioner.httpserver import Readiness, make_app, serve
from provisioner.kube import KubeClient, load_api_client
from provisioner.leader import LeaderElector, LeadershipLost, make_lock
from provisioner.metrics import Metrics
from provisioner.reconciler import Identity, Reconciler
from provisioner.resync import gate, resync_forever
from provisioner.safefs import LocalSyscalls, Syscalls
from provisioner.storage import Storage
from provisioner.sweep import sweep

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

EVENT_FLUSH = 2.0
"""Seconds a stopping process gives its queued Events to be posted."""


def make_identity() -> str:
    """``<hostname>_<random>``, as client-go's leader election and the upstream library use."""
    return f"{socket.gethostname()}_{secrets.token_hex(8)}"


class Provisioner:
    """One process worth of provisioner, built from validated settings."""

    def __init__(
        self,
        settings: Settings,
        calls: Syscalls | None = None,
        metrics: Metrics | None = None,
        api_class: type[KubeClient] | None = None,
    ) -> None:
        """``calls`` and ``api_class`` replace the filesystem calls and the API client (tests
        inject faults through them)."""
        self.settings = settings
        self.identity = make_identity()
        self.metrics = metrics or Metrics()
        # Checked before every side effect of the reconciler (PV writes, filesystem changes):
        # closed until the elector has written our record, always open without election.
        self.fence = Fence() if settings.leader_election else Fence.always()
        self.kube = (api_class or KubeClient)(
            load_api_client(pool_size=settings.workers + 8),
            qps=settings.client_qps,
            burst=settings.client_burst,
            threads=settings.workers + 4,
            fence=self.fence,
            event_qps=settings.event_qps,
            event_burst=settings.event_burst,
            on_event_dropped=self.metrics.event_dropped,
        )
        self.storage = self._storage(calls or LocalSyscalls())
        self.cache = Cache(core.Export(settings.nfs_server, settings.nfs_path))
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
        self.readiness = Readiness(self.storage.check_writable)
        self.exit_code = 0
        self._stepping_down: asyncio.Task[None] | None = None
        self.election_kube: KubeClient | None = None
        self.elector: LeaderElector | None = None
        if settings.leader_election:
            self.election_kube, self.elector = self._election()

    def _storage(self, calls: Syscalls) -> Storage:
        # The pool is larger than the number of workers so that calls stuck on a hung mount
        # (which keep their thread after the timeout) leave room for the others.
        return Storage(
            Path(self.settings.mount_path),
            calls,
            timeout=self.settings.fs_timeout,
            max_threads=self.settings.workers * 2 + 4,
            observe=self.metrics.observe_fs,
            fence=self.fence,
        )

    def _election(self) -> tuple[KubeClient, LeaderElector]:
        """Election traffic has its own client and pace, so a busy reconciler never delays a
        renewal past the renew deadline."""
        client = KubeClient(
            load_api_client(pool_size=2),
            qps=10,
            burst=10,
            threads=2,
            timeout=5,
            on_event_dropped=self.metrics.event_dropped,
        )
        elector = LeaderElector(
            make_lock(client, self.settings),
            self.identity,
            self.settings,
            announce=self._announce,
            on_change=lambda leading: self.metrics.leader.set(1 if leading else 0),
            fence=self.fence,
        )
        return client, elector

    async def _announce(self, ref: ObjectRef, message: str) -> None:
        assert self.election_kube is not None
        self.election_kube.record_event(
            ref, "Normal", "LeaderElection", message, self.reconciler.identity.component
        )

    async def _asked(self, what: str, ask: Callable[[], Awaitable[_T]]) -> _T:
        """``ask()``, asked again with backoff until the API answers."""
        delay = self.settings.backoff_base
        while True:
            try:
                return await ask()
            except ApiError as error:
                logger.warning("cannot read %s yet: %s; retrying", what, error)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.settings.backoff_max)

    async def _learn_grants(self) -> None:
        """The cluster's identity and whether PVs may be patched, each a wanted permission
        (permissions.py): without it a feature steps down, said once here. Asked at each
        leadership, not taken from the start-up check: a standby may lead much later."""
        cluster = await self._asked("the cluster's identity", self.kube.cluster_identity)
        patch = permissions.PATCH_VOLUMES.permission
        may_patch = await self._asked(
            "whether PersistentVolumes may be patched",
            lambda: self.kube.can_i(patch.verb, patch.resource, patch.group),
        )
        for grant, granted in (
            (permissions.READ_CLUSTER_UID, not cluster.from_ca),
            (permissions.PATCH_VOLUMES, may_patch),
        ):
            if not granted:
                logger.warning("%s", permissions.degraded_line(grant).replace("\n", " "))
        logger.info("cluster identity on the export: %s", cluster.describe())
        self.reconciler.cluster = cluster.primary
        self.reconciler.patch_volumes = may_patch
        self.storage.set_writer(cluster.primary, self.settings.provisioner_name, cluster.aliases)

    async def _lead(self) -> None:
        """What only the leader does: reconcile, from watch events and the periodic resync."""
        # Before any worker runs, so no provisioning of ours races the sweep (see sweep.py).
        await self._learn_grants()
        await sweep(
            self.storage,
            self.kube,
            self.reconciler.export,
            self.reconciler.cluster,
            self.settings.provisioner_name,
        )
        # The gate: our own complete lists before the first reconcile (see resync.gate).
        await gate(self.reconciler)
        self.reconciler.lead()  # queue from now on, starting with all the cache gathered
        await asyncio.gather(
            self.reconciler.queue.run(),
            resync_forever(self.reconciler, self.settings.resync_period),
        )

    async def _elect(self, stop: asyncio.Event) -> None:
        """Lead (after winning the election, if enabled) until cancelled. Any other end - the
        lock lost, a bug in the election or in leading, even a normal return - stops the process
        with exit code 1, so that the pod restarts instead of staying up without a leader."""
        try:
            if self.elector is None:
                self.metrics.leader.set(1)
                await self._lead()
            else:
                await self.elector.run(self._lead)
            reason = "the election ended without an error, which it never should"
        except asyncio.CancelledError:
            raise  # shutdown: _stop_leading cancels us
        except LeadershipLost as error:
            reason = str(error)
        except Exception as error:  # any end of the election ends the process
            logger.exception("leader election failed")
            reason = f"the election failed: {type(error).__name__}: {error}"
        logger.error("leader election: %s; exiting with code 1 so that the pod restarts", reason)
        self.exit_code = 1
        stop.set()

    async def _watch_ready(
        self, ready: asyncio.Event, stop: asyncio.Event, election: asyncio.Task[None]
    ) -> None:
        await ready.wait()
        self.readiness.watching = True
        self._take_over_signals(stop, election)

    def _take_over_signals(self, stop: asyncio.Event, election: asyncio.Task[None]) -> None:
        """Handle SIGTERM/SIGINT ourselves once kopf runs (kopf installs its own on start-up).

        On its own, kopf would first wait up to 5 s for our reconciling tasks (its "hung tasks")
        and only then return, so the lock would be released - and a standby could take over -
        5 s late. We stop reconciling and release the lock first, then let kopf shut down.
        """
        if threading.current_thread() is not threading.main_thread():
            return  # signals reach only the main thread's loop; kopf's handlers stay
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum, stop, election)

    def _on_signal(self, signum: int, stop: asyncio.Event, election: asyncio.Task[None]) -> None:
        if self._stepping_down is not None:
            return
        logger.info("%s received: stopping", signal.Signals(signum).name)
        self._stepping_down = asyncio.create_task(self._step_down(stop, election), name="stop")

    async def _step_down(self, stop: asyncio.Event, election: asyncio.Task[None]) -> None:
        await self._stop_leading([election])
        stop.set()

    async def _stop_leading(self, tasks: list[asyncio.Task[None]]) -> None:
        """Cancel ``tasks`` (the election among them: reconciling stops with it), then release
        the lock. Safe to repeat: a finished task ignores cancel, a released lock stays so."""
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.elector is not None:
            await self.elector.release()

    def _before_scrape(self) -> None:
        claims, volumes = self.cache.counts()
        self.metrics.watched.labels("claim").set(claims)
        self.metrics.watched.labels("volume").set(volumes)
        self.metrics.queue_depth.set(self.reconciler.queue.depth)

    async def run(self) -> int:
        kopf_settings = kopf.OperatorSettings()
        handlers.configure(kopf_settings)
        stop, ready = asyncio.Event(), asyncio.Event()
        http = await serve(
            make_app(self.metrics, self.readiness, self._before_scrape),
            self.settings.http_host,
            self.settings.http_port,
        )
        election = asyncio.create_task(self._elect(stop), name="election")
        tasks = [
            election,
            asyncio.create_task(self._watch_ready(ready, stop, election), name="readiness"),
        ]
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
                stop_flag=stop,
                ready_flag=ready,
                memories=kopfcompat.memories(),
            )
        finally:
            await self._stop_leading(tasks)
            await http.cleanup()
            # What was queued before the stop still reaches the API server, briefly bounded.
            await self.kube.flush_events(EVENT_FLUSH)
            if self.election_kube is not None:
                await self.election_kube.flush_events(EVENT_FLUSH)
            self.storage.close()
            self.kube.close()
            if self.election_kube is not None:
                self.election_kube.close()
        return self.exit_code
