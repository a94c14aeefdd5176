"""leader.py and the fence, on a fake clock: an in-memory lock (behind leader.Lock) for the
elector's decisions, and an in-memory API (resourceVersion, 404, 409) for the real lock classes.

Time is the fake clock's only: sleeping advances it, a slow call advances it, so every bound
below is exact and no test waits or measures real time.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import datetime as dt
import errno
import os
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from provisioner.api import ApiError, Conflict, NotFound, NotLeader, ObjectRef
from provisioner.app import Provisioner
from provisioner.config import LockKind, Settings, load_settings
from provisioner.fence import Fence, Fenced
from provisioner.kube import KubeClient
from provisioner.leader import (
    ENDPOINTS_ANNOTATION,
    UNKNOWN_LEADER,
    Deadline,
    EndpointsLock,
    Found,
    LeaderElector,
    LeaderRecord,
    LeadershipLost,
    LeaseLock,
    MalformedRecord,
    MultiLock,
    make_lock,
)
from provisioner.safefs import LocalSyscalls
from provisioner.storage import Storage, StorageError, _Cancellable

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


class FakeClock:
    """Monotonic seconds. A day of fake time means a loop that never ends: it fails the test
    (from the lock's calls, which the elector does not catch) instead of hanging it."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.limit = self.now + 86400

    def __call__(self) -> float:
        return self.now

    def check(self) -> None:
        if self.now > self.limit:
            raise AssertionError("fake time ran away: a loop that should have ended did not")

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        await asyncio.sleep(0)

    def wall(self) -> dt.datetime:
        return T0 + dt.timedelta(seconds=self.now)


class FakeLock:
    """A lock object in memory. ``latency`` seconds pass in each call (a call slower than its
    deadline uses the rest of it and times out, as the API client's timeout does); ``errors``
    are raised by the next calls, in order; ``timeouts`` records what each call was given."""

    ref_kind = "Lease"

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.record: LeaderRecord | None = None
        self.version = 0
        self.latency = 0.0
        self.errors: list[Exception] = []
        self.timeouts: list[float] = []
        self.malformed = False

    def _call(self, deadline: Deadline) -> None:
        self.clock.check()
        left = deadline.remaining()
        self.timeouts.append(left)
        if self.latency >= left:
            self.clock.now += left
            raise ApiError(0, "Unreachable", "timed out")
        self.clock.now += self.latency
        if self.errors:
            raise self.errors.pop(0)

    def write(self, record: LeaderRecord) -> None:
        """Someone else (another candidate, an admin) writes the lock."""
        self.record = record
        self.version += 1

    async def get(self, deadline: Deadline) -> Found | None:
        self._call(deadline)
        if self.malformed:
            raise MalformedRecord("leaseDuration 'x' is not an integer")
        if self.record is None:
            return None
        return Found(self.record, self.version, (self.version, self.record))

    async def create(self, record: LeaderRecord, deadline: Deadline) -> None:
        self._call(deadline)
        if self.record is not None:
            raise Conflict(409, "AlreadyExists", "exists")
        self.write(record)

    async def update(self, record: LeaderRecord, version: Any, deadline: Deadline) -> None:
        self._call(deadline)
        if version != self.version:
            raise Conflict(409, "Conflict", "changed")
        self.write(record)


def settings(**changes: Any) -> Settings:
    env = {"PROVISIONER_NAME": "example.com/nfs", "NFS_SERVER": "h", "NFS_PATH": "/e"}
    return dataclasses.replace(load_settings([], env)[1], **changes)


async def no_announce(ref: ObjectRef, message: str) -> None:
    pass


def elector(lock: Any, clock: FakeClock, identity: str = "me", **changes: Any) -> LeaderElector:
    return LeaderElector(
        lock,
        identity,
        settings(**changes),
        no_announce,
        clock=clock,
        sleep=clock.sleep,
        wall=clock.wall,
    )


def held_by(holder: str, clock: FakeClock, renewed: dt.datetime | None = None) -> LeaderRecord:
    moment = renewed or clock.wall()
    return LeaderRecord(holder, 15, moment, moment, 3)


def attempt(elect: LeaderElector, seconds: float = 10.0) -> bool:
    return asyncio.run(elect._attempt(elect._deadline(seconds)))


def run(coroutine: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coroutine)


async def forever() -> None:
    await asyncio.Event().wait()


# --- expiry by observed time ---------------------------------------------------------------------


def test_another_holder_expires_by_when_we_observed_it_not_by_its_renew_time() -> None:
    clock = FakeClock()
    lock = FakeLock(clock)
    # renewTime an hour old (a skewed clock, or a paused leader): it does not count.
    lock.write(held_by("other", clock, renewed=clock.wall() - dt.timedelta(hours=1)))
    elect = elector(lock, clock)
    assert not attempt(elect)  # observed now: valid for 15 s from here
    clock.now += 14.9
    assert not attempt(elect)
    clock.now += 0.2
    assert attempt(elect)
    assert lock.record is not None
    assert lock.record.holder_identity == "me"
    assert lock.record.leader_transitions == 4


def test_a_record_that_changes_restarts_the_observed_lease() -> None:
    clock = FakeClock()
    lock = FakeLock(clock)
    # renewTime in the future (the other node's clock is ahead): it does not count either.
    lock.write(held_by("other", clock, renewed=clock.wall() + dt.timedelta(hours=1)))
    elect = elector(lock, clock)
    assert not attempt(elect)
    clock.now += 10
    lock.write(held_by("other", clock))  # the other leader renews
    assert not attempt(elect)
    clock.now += 10  # 20 s after the first read, 10 s after the renewal
    assert not attempt(elect)
    clock.now += 5.1
    assert attempt(elect)


def test_a_released_record_is_taken_at_once() -> None:
    clock = FakeClock()
    lock = FakeLock(clock)
    lock.write(LeaderRecord("", 1, clock.wall(), clock.wall(), 7))
    elect = elector(lock, clock)
    assert attempt(elect)
    assert lock.record is not None
    assert lock.record.leader_transitions == 8


def test_lease_duration_is_written_rounded_up() -> None:
    clock = FakeClock()
    lock = FakeLock(clock)
    assert attempt(elector(lock, clock, lease_duration=2.5, renew_deadline=2, retry_period=1))
    assert lock.record is not None
    assert lock.record.lease_duration_seconds == 3


# --- conflicts -----------------------------------------------------------------------------------


def test_a_conflict_is_a_lost_round_and_never_two_winners() -> None:
    clock = FakeClock()
    lock = FakeLock(clock)
    lock.errors = [Conflict(409, "AlreadyExists", "created by another candidate")]
    elect = elector(lock, clock)
    assert not attempt(elect)
    assert not elect.fence.valid()
    lock.write(LeaderRecord("", 1, clock.wall(), clock.wall(), 0))
    first, second = elector(lock, clock, "first"), elector(lock, clock, "second")
    found = run(lock.get(Deadline(clock() + 1, clock)))
    # Both read the same version; the first write wins, the second is refused.
    assert found is not None
    run(lock.update(LeaderRecord("first", 15, T0, T0, 1), found.version, Deadline(2e9, clock)))
    assert not attempt(second)
    assert attempt(first)


# --- malformed records ---------------------------------------------------------------------------


class FakeApi:
    """The API server's part that locks use: objects by path, resourceVersion, 404 and 409."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}
        self.revision = 0
        self.timeouts: list[float | None] = []

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        timeout: float | None = None,  # noqa: ASYNC109 - KubeClient.request's signature
    ) -> Any:
        self.timeouts.append(timeout)
        if method == "GET":
            if path not in self.objects:
                raise NotFound(404, "NotFound", path)
            return copy.deepcopy(self.objects[path])
        if method == "POST":
            path = f"{path}/{body['metadata']['name']}"
            if path in self.objects:
                raise Conflict(409, "AlreadyExists", path)
        elif self.objects[path]["metadata"]["resourceVersion"] != body["metadata"].get(
            "resourceVersion"
        ):
            raise Conflict(409, "Conflict", path)
        self.revision += 1
        stored = copy.deepcopy(body)
        stored["metadata"]["resourceVersion"] = str(self.revision)
        self.objects[path] = stored
        return copy.deepcopy(stored)

    def put_endpoints(self, annotation: str | None) -> None:
        annotations = {} if annotation is None else {ENDPOINTS_ANNOTATION: annotation}
        self.revision += 1
        self.objects[ENDPOINTS] = {
            "metadata": {"name": NAME, "resourceVersion": str(self.revision)},
            "annotations": None,
        }
        self.objects[ENDPOINTS]["metadata"]["annotations"] = annotations

    def put_lease(self, spec: Any) -> None:
        self.revision += 1
        self.objects[LEASE] = {
            "metadata": {"name": NAME, "resourceVersion": str(self.revision)},
            "spec": spec,
        }

    def holder(self, path: str) -> str:
        if path == LEASE:
            return str(self.objects[path]["spec"]["holderIdentity"])
        annotation = self.objects[path]["metadata"]["annotations"][ENDPOINTS_ANNOTATION]
        return LeaderRecord.from_annotation(annotation).holder_identity


NAME = "example.com-nfs"
ENDPOINTS = f"/api/v1/namespaces/default/endpoints/{NAME}"
LEASE = f"/apis/coordination.k8s.io/v1/namespaces/default/leases/{NAME}"


def real_lock(api: FakeApi, kind: LockKind) -> Any:
    return make_lock(api, settings(lock_kind=kind))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "annotation",
    [
        "{not json",
        "[]",
        '{"holderIdentity": 5}',
        '{"holderIdentity": "x", "leaseDurationSeconds": "15"}',
        '{"holderIdentity": "x", "leaseDurationSeconds": 1.5}',
        '{"holderIdentity": "x", "renewTime": "yesterday"}',
        '{"holderIdentity": "x", "acquireTime": 12}',
        '{"holderIdentity": "x", "leaderTransitions": null, "renewTime": "2026-13-01T00:00:00Z"}',
    ],
)
def test_a_malformed_endpoints_record_fails_the_round_and_is_left_alone(annotation: str) -> None:
    clock = FakeClock()
    api = FakeApi()
    api.put_endpoints(annotation)
    elect = elector(real_lock(api, LockKind.ENDPOINTS), clock)
    assert not attempt(elect)
    assert api.objects[ENDPOINTS]["metadata"]["annotations"][ENDPOINTS_ANNOTATION] == annotation


@pytest.mark.parametrize(
    "spec",
    [
        "not an object",
        {"holderIdentity": "x", "leaseDurationSeconds": "15"},
        {"holderIdentity": "x", "renewTime": "2026-01-01 nonsense"},
        {"holderIdentity": ["x"]},
    ],
)
def test_a_malformed_lease_fails_the_round(spec: Any) -> None:
    api = FakeApi()
    api.put_lease(spec)
    assert not attempt(elector(real_lock(api, LockKind.LEASES), FakeClock()))


def test_a_malformed_record_keeps_the_election_waiting_not_dead() -> None:
    clock = FakeClock()
    lock = FakeLock(clock)
    lock.malformed = True
    elect = elector(lock, clock)

    async def scenario() -> None:
        task = asyncio.create_task(elect.run(forever))
        for _ in range(50):
            await asyncio.sleep(0)
        assert not task.done()
        assert clock.now > 1000 + 10 * elect.retry_period  # it kept trying
        lock.malformed = False  # an admin repairs the record
        for _ in range(20):
            await asyncio.sleep(0)
        assert elect.leading
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(scenario())


def test_a_missing_annotation_is_an_empty_record() -> None:
    api = FakeApi()
    api.put_endpoints(None)
    assert attempt(elector(real_lock(api, LockKind.ENDPOINTS), FakeClock()))
    assert api.holder(ENDPOINTS) == "me"


# --- renew deadline ------------------------------------------------------------------------------


def lead_until_lost(elect: LeaderElector, clock: FakeClock) -> tuple[float, float]:
    """Run the elector; return (when it first held the lock, when it reported the loss)."""
    acquired: list[float] = []

    async def lead() -> None:
        acquired.append(clock.now)
        await forever()

    async def scenario() -> float:
        with pytest.raises(LeadershipLost):
            await elect.run(lead)
        return clock.now

    lost = run(scenario())
    assert not elect.leading
    assert not elect.fence.valid()
    return acquired[0], lost


def test_the_whole_renew_sequence_is_bounded_by_the_renew_deadline() -> None:
    clock = FakeClock()
    lock = FakeLock(clock)
    elect = elector(lock, clock)  # lease 15, renew deadline 10, retry 2 (the defaults)

    # After the acquisition every call hangs: each one is cut at what is left of the deadline.
    original = lock._call

    def hang_after_acquiring(deadline: Deadline) -> None:
        if lock.record is not None:
            lock.latency = 1e9
        original(deadline)

    lock._call = hang_after_acquiring  # type: ignore[method-assign]
    acquired, lost = lead_until_lost(elect, clock)
    # client-go: the sequence starts RETRY_PERIOD after the last renewal and ends with it.
    assert lost - acquired == pytest.approx(2 + 10)
    assert lost - acquired < elect.lease_duration
    assert lock.timeouts[-1] == pytest.approx(10)  # the first call had the whole deadline


def test_slow_calls_cannot_stretch_the_renew_sequence() -> None:
    """Before: a deadline checked only between attempts, each attempt up to 2 x RETRY_PERIOD,
    let the loss be noticed after the lease had expired (the issue's 16 s and 29 s)."""
    clock = FakeClock()
    lock = FakeLock(clock)
    # Settings config accepts: a long retry period against a short renew deadline.
    elect = elector(lock, clock, lease_duration=15, renew_deadline=14, retry_period=11)
    renewals = 0
    original = lock._call

    def slow_after_acquiring(deadline: Deadline) -> None:
        nonlocal renewals
        if lock.record is not None:
            renewals += 1
            lock.latency = 9.0  # each call takes 9 s: a get and an update are 18 s
        original(deadline)

    lock._call = slow_after_acquiring  # type: ignore[method-assign]
    acquired, lost = lead_until_lost(elect, clock)
    assert lost - acquired <= 11 + 14
    # Every call got a timeout that fits in what was left of its sequence.
    sequence_start = acquired + 11
    assert lock.timeouts[-2:] == [pytest.approx(14), pytest.approx(14 - 9)]
    assert lost == pytest.approx(sequence_start + 14)


def test_a_renewal_that_succeeds_within_the_deadline_keeps_leading() -> None:
    clock = FakeClock()
    lock = FakeLock(clock)
    elect = elector(lock, clock)

    async def scenario() -> None:
        led = asyncio.Event()

        async def lead() -> None:
            led.set()
            await forever()

        task = asyncio.create_task(elect.run(lead))
        await led.wait()
        # Four failed rounds (8 s of the 10 s deadline), then the API answers again.
        lock.errors = [ApiError(503, "ServiceUnavailable", "")] * 4
        start = clock.now
        while clock.now < start + 60:  # noqa: ASYNC110 - fake time passes as the loop runs
            await asyncio.sleep(0)
        assert not task.done()
        assert elect.leading
        assert elect.fence.valid()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not elect.fence.valid()

    run(scenario())


def test_an_admin_overwrite_closes_the_fence_at_once_and_ends_leadership() -> None:
    clock = FakeClock()
    lock = FakeLock(clock)
    elect = elector(lock, clock)
    seen: list[bool] = []

    async def lead() -> None:
        lock.write(held_by("admin", clock))
        seen.append(elect.fence.valid())
        calls = len(lock.timeouts)
        # Until the next renewal round has read the lock (fake time: nothing to wait for).
        while len(lock.timeouts) == calls:  # noqa: ASYNC110
            await asyncio.sleep(0)
        seen.append(elect.fence.valid())
        await forever()

    async def scenario() -> None:
        with pytest.raises(LeadershipLost, match="could not renew"):
            await elect.run(lead)

    run(scenario())
    assert seen == [True, False]
    assert lock.record is not None
    assert lock.record.holder_identity == "admin"  # never overwritten back before expiry


def test_a_failing_leader_task_ends_the_election_with_its_error() -> None:
    clock = FakeClock()
    elect = elector(FakeLock(clock), clock)

    async def lead() -> None:
        raise RuntimeError("bug")

    with pytest.raises(RuntimeError, match="bug"):
        run(elect.run(lead))
    assert not elect.fence.valid()


# --- the fence -----------------------------------------------------------------------------------


def test_the_fence_lasts_lease_minus_margin_from_when_the_write_was_sent() -> None:
    clock = FakeClock()
    lock = FakeLock(clock)
    elect = elector(lock, clock)
    assert not elect.fence.valid()  # closed until we hold the lock
    lock.latency = 0.5
    start = clock.now
    assert attempt(elect)
    sent = start + 0.5  # the get took 0.5 s; the create was sent then
    # margin = LEASE_DURATION - RENEW_DEADLINE = 5 s: valid until sent + 10 s.
    assert elect.fence_margin == 5
    clock.now = sent + 9.99
    assert elect.fence.valid()
    clock.now = sent + 10
    assert not elect.fence.valid()


def test_release_closes_the_fence_and_frees_the_lock() -> None:
    clock = FakeClock()
    lock = FakeLock(clock)
    elect = elector(lock, clock)
    elect.leading = True
    assert attempt(elect)
    run(elect.release())
    assert not elect.fence.valid()
    assert lock.record is not None
    assert (lock.record.holder_identity, lock.record.lease_duration_seconds) == ("", 1)


def test_fence_without_election_is_always_valid() -> None:
    fence = Fence.always()
    assert fence.valid()
    fence.check("mkdir")
    closed = Fence(clock=lambda: 5.0)
    with pytest.raises(Fenced, match="refused to mkdir"):
        closed.check("mkdir")
    closed.extend(5.0)
    assert not closed.valid()
    closed.extend(5.1)
    assert closed.valid()


class Recording:
    """Syscalls that record the calls that reach them."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            self.calls.append(name)
            return [] if name == "listdir" else 3

        return call


MUTATING: list[tuple[str, tuple[Any, ...]]] = [
    ("mkdir", (3, "d", "w")),
    ("chmod", (3, 0o755, "w")),
    ("chown", (3, 0, 0, "w")),
    ("rename", (3, "a", 3, "b", "w", False)),
    ("unlink", (3, "f", "w")),
    ("rmdir", (3, "d", "w")),
    ("write", (3, b"x", "w")),
    ("open", (3, "f", os.O_WRONLY | os.O_CREAT | os.O_EXCL, "w")),
]
READING: list[tuple[str, tuple[Any, ...]]] = [
    ("open", (3, "d", os.O_RDONLY | os.O_DIRECTORY, "w")),
    ("stat", (3, "d", "w")),
    ("listdir", (3, "w")),
    ("fsync", (3, "w")),
]


@pytest.mark.parametrize(("name", "args"), MUTATING)
def test_a_closed_fence_refuses_every_mutating_filesystem_call(
    name: str, args: tuple[Any, ...]
) -> None:
    inner = Recording()
    gate = _Cancellable(inner, Fence())
    with pytest.raises(OSError, match="refused to") as caught:
        getattr(gate, name)(*args)
    assert caught.value.errno == errno.ECANCELED
    assert inner.calls == []
    getattr(_Cancellable(inner, Fence.always()), name)(*args)
    getattr(_Cancellable(inner), name)(*args)
    assert inner.calls == [name, name]


@pytest.mark.parametrize(("name", "args"), READING)
def test_a_closed_fence_lets_reads_through(name: str, args: tuple[Any, ...]) -> None:
    inner = Recording()
    getattr(_Cancellable(inner, Fence()), name)(*args)
    assert inner.calls == [name]


def test_cancel_still_refuses_everything() -> None:
    inner = Recording()
    gate = _Cancellable(inner, Fence.always())
    gate.cancel()
    for name, args in [*MUTATING, *READING]:
        with pytest.raises(OSError, match="abandoned"):
            getattr(gate, name)(*args)
    assert inner.calls == []


def test_storage_behind_a_closed_fence_changes_nothing(tmp_path: Path) -> None:
    (tmp_path / "ns-claim").mkdir()
    fence = Fence()
    storage = Storage(tmp_path, LocalSyscalls(), timeout=5, max_threads=2, fence=fence)
    try:
        with pytest.raises(StorageError, match="leader lease"):
            run(storage.archive_dir("ns-claim"))
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ns-claim"]
        fence.extend(float("inf"))
        assert run(storage.archive_dir("ns-claim")) is not None
        assert "ns-claim" not in [p.name for p in tmp_path.iterdir()]
    finally:
        storage.close()


@pytest.mark.parametrize(
    "call",
    [
        lambda kube: kube.create_volume({"metadata": {"name": "pv"}}),
        lambda kube: kube.delete_volume("pv"),
        lambda kube: kube.remove_volume_finalizer("pv", "f", "u"),
        lambda kube: kube.patch_volume("pv", {"metadata": {}}),
    ],
    ids=["create", "delete", "finalizers", "patch"],
)
def test_a_closed_fence_refuses_every_volume_write(
    call: Callable[[KubeClient], Coroutine[Any, Any, Any]],
) -> None:
    kube = KubeClient(None, qps=1, burst=1, threads=1, fence=Fence())  # type: ignore[arg-type]
    sent: list[str] = []

    async def request(method: str, path: str, *args: Any, **kwargs: Any) -> Any:
        sent.append(method)
        return {}

    kube.request = request  # type: ignore[method-assign]
    try:
        with pytest.raises(NotLeader, match="leader lease") as caught:
            run(call(kube))
        assert isinstance(caught.value, ApiError)  # the reconciler retries ApiErrors later
        assert sent == []
        kube._fence = Fence.always()
        run(call(kube))
        assert len(sent) == 1
    finally:
        kube._pool.shutdown()


# --- the multi-lock ------------------------------------------------------------------------------


def spec(holder: str, clock: FakeClock) -> dict[str, Any]:
    return held_by(holder, clock).to_lease_spec()


def test_multilock_records_that_disagree_name_an_unknown_leader() -> None:
    clock = FakeClock()
    api = FakeApi()
    api.put_endpoints(LeaderRecord("", 1, T0, T0, 0).to_annotation())  # released...
    api.put_lease(spec("other", clock))  # ...but the Lease is held
    lock = real_lock(api, LockKind.ENDPOINTS_LEASES)
    found = run(lock.get(Deadline(clock() + 5, clock)))
    assert found.record.holder_identity == UNKNOWN_LEADER
    elect = elector(lock, clock)
    assert not attempt(elect)
    clock.now += 10
    api.put_lease(spec("other", clock))  # the Lease's holder renews: still unknown, still valid
    assert not attempt(elect)
    clock.now += 14
    assert not attempt(elect)
    assert api.holder(LEASE) == "other"
    clock.now += 1.1  # the disagreement has not changed for a whole lease: both are taken
    assert attempt(elect)
    assert (api.holder(ENDPOINTS), api.holder(LEASE)) == ("me", "me")


def test_multilock_create_does_not_swallow_a_conflict_on_the_lease() -> None:
    clock = FakeClock()
    api = FakeApi()
    api.put_lease(spec("other", clock))
    elect = elector(real_lock(api, LockKind.ENDPOINTS_LEASES), clock)
    assert not attempt(elect)
    assert not elect.fence.valid()
    assert api.holder(LEASE) == "other"


def test_multilock_update_does_not_swallow_a_conflict_creating_the_lease() -> None:
    clock = FakeClock()
    api = FakeApi()
    api.put_endpoints(LeaderRecord("", 1, T0, T0, 0).to_annotation())
    lock = real_lock(api, LockKind.ENDPOINTS_LEASES)
    found = run(lock.get(Deadline(clock() + 5, clock)))
    api.put_lease(spec("other", clock))  # created between our read and our write
    with pytest.raises(Conflict):
        run(lock.update(held_by("me", clock), found.version, Deadline(clock() + 5, clock)))


def test_multilock_honours_an_endpoints_only_leader_and_renews_both() -> None:
    clock = FakeClock()
    api = FakeApi()
    api.put_endpoints(held_by("old", clock).to_annotation())  # an old, Endpoints-only replica
    elect = elector(real_lock(api, LockKind.ENDPOINTS_LEASES), clock)
    assert not attempt(elect)
    assert LEASE not in api.objects
    clock.now += 15.1
    assert attempt(elect)
    assert (api.holder(ENDPOINTS), api.holder(LEASE)) == ("me", "me")
    clock.now += 2
    assert attempt(elect)  # both agree on us: renewing works
    assert elect.fence.valid()


def test_lock_calls_get_timeouts_that_fit_the_deadline() -> None:
    clock = FakeClock()
    api = FakeApi()
    lock = real_lock(api, LockKind.ENDPOINTS_LEASES)
    assert isinstance(lock, MultiLock)
    assert isinstance(lock.primary, EndpointsLock)
    assert isinstance(lock.secondary, LeaseLock)
    assert attempt(elector(lock, clock), seconds=7)
    assert api.timeouts and all(t is not None and 0 < t <= 7 for t in api.timeouts)
    with pytest.raises(TimeoutError):
        run(lock.get(Deadline(clock(), clock)))


# --- the process ends with the election ---------------------------------------------------------


class FailingElector:
    def __init__(self, error: BaseException | None) -> None:
        self.error = error

    async def run(self, lead: Any) -> None:
        if self.error is not None:
            raise self.error


@pytest.mark.parametrize(
    ("error", "logged"),
    [
        (LeadershipLost("me could not renew lock"), "could not renew lock"),
        (MalformedRecord("bad"), "the election failed: MalformedRecord: bad"),
        (KeyError("x"), "the election failed: KeyError"),
        (None, "ended without an error"),
    ],
    ids=["lost", "malformed", "bug", "returned"],
)
def test_any_end_of_the_election_exits_1_with_a_reason(
    error: BaseException | None, logged: str, caplog: pytest.LogCaptureFixture
) -> None:
    provisioner = Provisioner.__new__(Provisioner)
    provisioner.elector = FailingElector(error)  # type: ignore[assignment]
    provisioner.exit_code = 0
    stop = asyncio.Event()

    async def scenario() -> None:
        await provisioner._elect(stop)

    run(scenario())
    assert provisioner.exit_code == 1
    assert stop.is_set()
    assert logged in caplog.text
    assert "exiting with code 1" in caplog.text


def test_cancelling_the_election_is_a_normal_stop() -> None:
    provisioner = Provisioner.__new__(Provisioner)
    provisioner.elector = FailingElector(asyncio.CancelledError())  # type: ignore[assignment]
    provisioner.exit_code = 0
    stop = asyncio.Event()
    with pytest.raises(asyncio.CancelledError):
        run(provisioner._elect(stop))
    assert provisioner.exit_code == 0
    assert not stop.is_set()
