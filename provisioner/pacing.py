"""Client-side pacing of API requests: a token bucket, as client-go's QPS/burst limiter.

``kube.KubeClient`` paces its requests with one bucket and ``eventsink.EventSink`` its Events with
another, so Events never spend the budget of PersistentVolume writes.
"""

from __future__ import annotations

import asyncio
import time


class TokenBucket:
    """Client-side pacing: ``qps`` requests per second on average, bursts up to ``burst``."""

    def __init__(self, qps: float, burst: int) -> None:
        self._rate = qps
        self._capacity = float(burst)
        self._tokens = float(burst)
        self._stamp = time.monotonic()
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        async with self._lock:
            now = time.monotonic()
            self._tokens = min(self._capacity, self._tokens + (now - self._stamp) * self._rate)
            self._stamp = now
            if self._tokens < 1:
                wait = (1 - self._tokens) / self._rate
                await asyncio.sleep(wait)
                self._stamp = time.monotonic()
                self._tokens = 1.0
            self._tokens -= 1
