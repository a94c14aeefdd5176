"""The HTTP endpoint on HTTP_ADDRESS: ``/metrics``, ``/healthz`` and ``/readyz``.

``app`` starts it before leader election, so standbys are observable and ready too. ``/healthz``
answers from the event loop itself (a blocked loop fails the probe); ``/readyz`` needs the
watches started and the export writable (probed at most every few seconds).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from provisioner.metrics import Metrics

logger = logging.getLogger(__name__)


class Readiness:
    """Readiness facts, with the mount probe cached so probes cannot hammer a slow export."""

    def __init__(self, check_mount: Callable[[], Awaitable[None]], ttl: float = 5.0) -> None:
        self.watching = False
        self._check_mount = check_mount
        self._ttl = ttl
        self._checked_at = float("-inf")
        self._mount_error: str | None = "not probed yet"

    async def problems(self) -> list[str]:
        found: list[str] = []
        if not self.watching:
            found.append("watches are not established yet")
        if time.monotonic() - self._checked_at > self._ttl:
            self._checked_at = time.monotonic()
            try:
                await self._check_mount()
            except Exception as error:  # noqa: BLE001 - every failure makes the pod unready
                self._mount_error = str(error)
            else:
                self._mount_error = None
        if self._mount_error is not None:
            found.append(f"export: {self._mount_error}")
        return found


def make_app(
    metrics: Metrics, readiness: Readiness, before_scrape: Callable[[], None]
) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        problems = await readiness.problems()
        if problems:
            return web.Response(status=503, text="".join(f"not ready: {p}\n" for p in problems))
        return web.Response(text="ok\n")

    async def scrape(_: web.Request) -> web.Response:
        before_scrape()
        body = generate_latest(metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", scrape)
    return app


async def serve(app: web.Application, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    for address in runner.addresses:
        logger.info("serving /metrics, /healthz and /readyz on http://%s:%s", *address[:2])
    return runner
