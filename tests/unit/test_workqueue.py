"""The work queue: de-duplication, per-key serialisation, backoff that never gives up."""

from __future__ import annotations

import asyncio

import pytest

from provisioner.workqueue import Backoff, WorkQueue


def test_backoff_doubles_and_is_capped() -> None:
    backoff = Backoff(base=1.0, cap=8.0, jitter=0.0)
    assert [backoff.delay(n) for n in range(1, 7)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]


@pytest.mark.parametrize("failures", [1, 5, 50])
def test_backoff_jitter_stays_within_ten_percent(failures: int) -> None:
    backoff = Backoff(base=1.0, cap=300.0)
    plain = min(300.0, 2.0 ** (failures - 1))
    assert plain <= backoff.delay(failures) <= plain * 1.1


async def _drive(queue: WorkQueue, until: asyncio.Event) -> None:
    runner = asyncio.create_task(queue.run())
    try:
        await asyncio.wait_for(until.wait(), timeout=5)
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


def test_failed_key_is_retried_until_it_succeeds() -> None:
    attempts: list[str] = []
    retries: list[int] = []
    done = asyncio.Event()

    async def process(key: str) -> None:
        attempts.append(key)
        if len(attempts) < 4:
            raise RuntimeError("not yet")
        done.set()

    async def scenario() -> None:
        queue = WorkQueue(
            process,
            workers=2,
            backoff=Backoff(0.001, 0.004, 0),
            on_retry=lambda k, n, e: retries.append(n),
        )
        queue.add("claim:a")
        await _drive(queue, done)
        assert queue.failures("claim:a") == 0

    asyncio.run(scenario())
    assert attempts == ["claim:a"] * 4
    assert retries == [1, 2, 3]


def test_one_key_is_never_processed_twice_at_once() -> None:
    active: set[str] = set()
    overlaps: list[str] = []
    seen: list[str] = []
    done = asyncio.Event()

    async def process(key: str) -> None:
        if key in active:
            overlaps.append(key)
        active.add(key)
        await asyncio.sleep(0.01)
        active.discard(key)
        seen.append(key)
        if len(seen) == 3:
            done.set()

    async def scenario() -> None:
        queue = WorkQueue(process, workers=4, backoff=Backoff())
        runner = asyncio.create_task(queue.run())
        queue.add("a")
        while "a" not in active:  # noqa: ASYNC110 - polling a plain set the worker fills
            await asyncio.sleep(0.001)
        queue.add("a")  # while "a" runs: runs once more afterwards, not in parallel
        queue.add("a")  # de-duplicated
        queue.add("b")
        try:
            await asyncio.wait_for(done.wait(), timeout=5)
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)

    asyncio.run(scenario())
    assert overlaps == []
    assert sorted(seen) == ["a", "a", "b"]
