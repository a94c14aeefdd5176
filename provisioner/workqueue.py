"""A keyed asyncio work queue: de-duplication, one worker per key, bounded parallelism, backoff.

The reconciler puts claim and volume keys here from watch events and the periodic resync; the
queue calls ``process(key)`` so that work for one object is serialised while different objects
proceed in parallel (SPEC §7). A failed key is retried with capped exponential backoff, forever.
It knows nothing of Kubernetes.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)


class RetryLater(Exception):
    """The attempt failed for a reason that may pass; the queue retries with backoff."""


@dataclass(frozen=True)
class Backoff:
    base: float = 1.0
    cap: float = 300.0
    jitter: float = 0.1

    def delay(self, failures: int) -> float:
        """Seconds before retry number ``failures`` (1-based): base, 2*base, 4*base, ... cap."""
        raw = min(self.cap, self.base * 2.0 ** max(0, failures - 1))
        return raw * (1 + random.uniform(0, self.jitter))  # noqa: S311 - jitter, not crypto


class WorkQueue:
    def __init__(
        self,
        process: Callable[[str], Awaitable[None]],
        workers: int,
        backoff: Backoff,
        on_retry: Callable[[str, int, BaseException], None] | None = None,
    ) -> None:
        self._process = process
        self._workers = workers
        self._backoff = backoff
        self._on_retry = on_retry
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._queued: set[str] = set()
        self._active: set[str] = set()
        self._dirty: set[str] = set()  # added again while being processed: run once more after
        self._failures: dict[str, int] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}

    def add(self, key: str) -> None:
        if key in self._active:
            self._dirty.add(key)
            return
        if key in self._queued:
            return
        self._queued.add(key)
        self._queue.put_nowait(key)

    def add_after(self, key: str, delay: float) -> None:
        previous = self._timers.pop(key, None)
        if previous is not None:
            previous.cancel()
        loop = asyncio.get_running_loop()
        self._timers[key] = loop.call_later(delay, self._fire, key)

    def _fire(self, key: str) -> None:
        self._timers.pop(key, None)
        self.add(key)

    def forget(self, key: str) -> None:
        """Drop the retry state of a key whose object is gone."""
        self._failures.pop(key, None)
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()

    @property
    def depth(self) -> int:
        return len(self._queued)

    @property
    def in_flight(self) -> int:
        return len(self._active)

    def failures(self, key: str) -> int:
        return self._failures.get(key, 0)

    async def run(self) -> None:
        """Run the workers until cancelled."""
        workers = [asyncio.create_task(self._worker(i)) for i in range(self._workers)]
        try:
            await asyncio.gather(*workers)
        finally:
            for worker in workers:
                worker.cancel()
            for timer in self._timers.values():
                timer.cancel()

    async def _worker(self, _index: int) -> None:
        while True:
            key = await self._queue.get()
            self._queued.discard(key)
            self._active.add(key)
            try:
                await self._process(key)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - every failure is retried, never dropped
                failures = self._failures.get(key, 0) + 1
                self._failures[key] = failures
                delay = self._backoff.delay(failures)
                if self._on_retry is not None:
                    self._on_retry(key, failures, error)
                logger.debug("%s: attempt %d failed; retrying in %.1f s", key, failures, delay)
                self.add_after(key, delay)
            else:
                self._failures.pop(key, None)
            finally:
                self._active.discard(key)
                if key in self._dirty:
                    self._dirty.discard(key)
                    self.add(key)
