"""Leader election compatible with client-go: Endpoints lock, Lease lock, or both (migration).

``app`` runs ``LeaderElector.run`` with the reconcile workers as the leading task: only the
leader reconciles. Every write carries the resourceVersion that was read, so two candidates can
never both win. As in client-go, a record held by another candidate expires by the time *we
observed* it change, never by its renewTime (clocks differ between nodes); the whole sequence of
renewal attempts is bounded by RENEW_DEADLINE and every API call of it gets a timeout that fits
in what is left. Losing the lock raises ``LeadershipLost`` (the process exits non-zero and the
pod restarts); ``release`` hands the lock over at once on SIGTERM.

The elector owns the ``Fence`` (fence.py): after every successful write of our record it is
valid until the moment the write was sent + LEASE_DURATION - margin, with margin =
LEASE_DURATION - RENEW_DEADLINE, so it ends at most RENEW_DEADLINE after the write was sent.
The margin stands for the clock-rate difference between our node and a standby over one lease
(the gap client-go relies on too) and for a side effect that was already under way when the
fence closed (an API request in flight). The fence closes at once when a read shows another
holder, when renewal gives up, and when the election ends. API calls go through ``kube``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, replace
from typing import Any, Protocol

from provisioner.api import ApiError, Conflict, KubeApi, NotFound, ObjectRef
from provisioner.config import LockKind, Settings
from provisioner.fence import Fence

logger = logging.getLogger(__name__)

ENDPOINTS_ANNOTATION = "control-plane.alpha.kubernetes.io/leader"
UNKNOWN_LEADER = "leaderelection.k8s.io/unknown"
"""client-go's holder for a multi-lock whose records disagree: nobody may lead on one alone."""

_EPOCH = dt.datetime.fromtimestamp(0, dt.UTC)


class LeadershipLost(Exception):
    """The lock could not be renewed within the renew deadline."""


class MalformedRecord(ValueError):
    """A lock object's record cannot be read (JSON, integer or time); the attempt fails."""


class Deadline:
    """A point on the monotonic clock; ``remaining`` is the timeout left for the next call."""

    def __init__(self, at: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.at = at
        self._clock = clock

    def remaining(self) -> float:
        left = self.at - self._clock()
        if left <= 0:
            raise TimeoutError("the leader-election deadline has passed")
        return left


@dataclass(frozen=True)
class LeaderRecord:
    """client-go's LeaderElectionRecord (resourcelock/interface.go), field for field."""

    holder_identity: str
    lease_duration_seconds: int
    acquire_time: dt.datetime
    renew_time: dt.datetime
    leader_transitions: int

    def to_annotation(self) -> str:
        return json.dumps(
            {
                "holderIdentity": self.holder_identity,
                "leaseDurationSeconds": self.lease_duration_seconds,
                "acquireTime": _rfc3339(self.acquire_time),
                "renewTime": _rfc3339(self.renew_time),
                "leaderTransitions": self.leader_transitions,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_annotation(cls, raw: str) -> LeaderRecord:
        try:
            data = json.loads(raw)
        except ValueError as error:
            raise MalformedRecord(f"the leader annotation is not JSON: {error}") from None
        if not isinstance(data, dict):
            raise MalformedRecord("the leader annotation is not a JSON object")
        return cls._from_fields(data, "leaderTransitions")

    def to_lease_spec(self) -> dict[str, Any]:
        return {
            "holderIdentity": self.holder_identity,
            "leaseDurationSeconds": self.lease_duration_seconds,
            "acquireTime": _micro_time(self.acquire_time),
            "renewTime": _micro_time(self.renew_time),
            "leaseTransitions": self.leader_transitions,
        }

    @classmethod
    def from_lease_spec(cls, spec: Any) -> LeaderRecord:
        if not isinstance(spec, dict):
            raise MalformedRecord("the Lease's spec is not an object")
        return cls._from_fields(spec, "leaseTransitions")

    @classmethod
    def _from_fields(cls, data: dict[str, Any], transitions: str) -> LeaderRecord:
        holder = data.get("holderIdentity") or ""
        if not isinstance(holder, str):
            raise MalformedRecord(f"holderIdentity {holder!r} is not a string")
        return cls(
            holder_identity=holder,
            lease_duration_seconds=_parse_int(data.get("leaseDurationSeconds"), "leaseDuration"),
            acquire_time=_parse_time(data.get("acquireTime")),
            renew_time=_parse_time(data.get("renewTime")),
            leader_transitions=_parse_int(data.get(transitions), transitions),
        )


def _parse_int(raw: Any, name: str) -> int:
    if raw is None:
        return 0
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise MalformedRecord(f"{name} {raw!r} is not an integer")
    return raw


def _rfc3339(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _micro_time(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_time(raw: Any) -> dt.datetime:
    if not raw:
        return _EPOCH
    if not isinstance(raw, str):
        raise MalformedRecord(f"time {raw!r} is not a string")
    try:
        parsed = dt.datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise MalformedRecord(f"time {raw!r} is not RFC 3339") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class Found:
    """A lock read: the record, an opaque version for the next write, and what was read (any
    change of ``raw`` restarts the expiry clock, as client-go's observedRawRecord)."""

    record: LeaderRecord
    version: Any
    raw: Any


class Lock(Protocol):
    """One lock; every call stops at ``deadline`` (each API call's timeout fits in it)."""

    ref_kind: str

    async def get(self, deadline: Deadline) -> Found | None: ...
    async def create(self, record: LeaderRecord, deadline: Deadline) -> None: ...
    async def update(self, record: LeaderRecord, version: Any, deadline: Deadline) -> None: ...


class EndpointsLock:
    ref_kind = "Endpoints"

    def __init__(self, kube: KubeApi, namespace: str, name: str) -> None:
        self.kube, self.namespace, self.name = kube, namespace, name
        self.path = f"/api/v1/namespaces/{namespace}/endpoints"

    async def get(self, deadline: Deadline) -> Found | None:
        try:
            obj = await self.kube.request(
                "GET", f"{self.path}/{self.name}", timeout=deadline.remaining()
            )
        except NotFound:
            return None
        annotations = (obj.get("metadata") or {}).get("annotations") or {}
        raw = annotations.get(ENDPOINTS_ANNOTATION)
        record = (
            LeaderRecord.from_annotation(raw) if raw else LeaderRecord("", 0, _EPOCH, _EPOCH, 0)
        )
        return Found(record, obj, raw)

    def _body(self, record: LeaderRecord, obj: dict[str, Any] | None) -> dict[str, Any]:
        body: dict[str, Any] = dict(obj) if obj else {"apiVersion": "v1", "kind": "Endpoints"}
        meta = dict(body.get("metadata", {}))
        meta.update({"name": self.name, "namespace": self.namespace})
        meta["annotations"] = {
            **(meta.get("annotations") or {}),
            ENDPOINTS_ANNOTATION: record.to_annotation(),
        }
        body["metadata"] = meta
        return body

    async def create(self, record: LeaderRecord, deadline: Deadline) -> None:
        await self.kube.request(
            "POST", self.path, self._body(record, None), timeout=deadline.remaining()
        )

    async def update(self, record: LeaderRecord, version: Any, deadline: Deadline) -> None:
        await self.kube.request(
            "PUT",
            f"{self.path}/{self.name}",
            self._body(record, version),
            timeout=deadline.remaining(),
        )


class LeaseLock:
    ref_kind = "Lease"

    def __init__(self, kube: KubeApi, namespace: str, name: str) -> None:
        self.kube, self.namespace, self.name = kube, namespace, name
        self.path = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"

    async def get(self, deadline: Deadline) -> Found | None:
        try:
            obj = await self.kube.request(
                "GET", f"{self.path}/{self.name}", timeout=deadline.remaining()
            )
        except NotFound:
            return None
        spec = obj.get("spec") or {}
        return Found(LeaderRecord.from_lease_spec(spec), obj, json.dumps(spec, sort_keys=True))

    async def create(self, record: LeaderRecord, deadline: Deadline) -> None:
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": record.to_lease_spec(),
        }
        await self.kube.request("POST", self.path, body, timeout=deadline.remaining())

    async def update(self, record: LeaderRecord, version: Any, deadline: Deadline) -> None:
        body = dict(version)
        body["spec"] = record.to_lease_spec()
        await self.kube.request(
            "PUT", f"{self.path}/{self.name}", body, timeout=deadline.remaining()
        )


class MultiLock:
    """``endpointsleases``, as client-go's MultiLock: both records must name the same holder,
    otherwise the holder is ``UNKNOWN_LEADER`` and nobody leads until that disagreement expires
    by observed time (unchanged for the longer of the two leases). A missing Lease with an
    Endpoints record held by someone else is an old, Endpoints-only leader (a migration) and is
    honoured. A write succeeds only if both objects were written; a Conflict on either is never
    swallowed."""

    ref_kind = "Endpoints"

    def __init__(self, primary: Lock, secondary: Lock) -> None:
        self.primary, self.secondary = primary, secondary

    async def get(self, deadline: Deadline) -> Found | None:
        first = await self.primary.get(deadline)
        if first is None:
            return None  # create both; the Lease's create fails if someone holds it
        second = await self.secondary.get(deadline)
        if second is None:
            return Found(first.record, (first.version, None), (first.raw, None))
        record = first.record
        if record.holder_identity != second.record.holder_identity:
            # The longer of the two leases: a released Endpoints record (1 s) must not let
            # anyone take a Lease that its holder keeps renewing.
            record = replace(
                record,
                holder_identity=UNKNOWN_LEADER,
                lease_duration_seconds=max(
                    record.lease_duration_seconds, second.record.lease_duration_seconds
                ),
            )
        return Found(record, (first.version, second.version), (first.raw, second.raw))

    async def create(self, record: LeaderRecord, deadline: Deadline) -> None:
        await self.primary.create(record, deadline)
        await self.secondary.create(record, deadline)

    async def update(self, record: LeaderRecord, version: Any, deadline: Deadline) -> None:
        primary_version, secondary_version = version
        await self.primary.update(record, primary_version, deadline)
        if secondary_version is None:
            await self.secondary.create(record, deadline)
        else:
            await self.secondary.update(record, secondary_version, deadline)


def make_lock(kube: KubeApi, settings: Settings) -> Lock:
    name, namespace = settings.lock_name, settings.namespace
    if settings.lock_kind is LockKind.LEASES:
        return LeaseLock(kube, namespace, name)
    if settings.lock_kind is LockKind.ENDPOINTS_LEASES:
        return MultiLock(EndpointsLock(kube, namespace, name), LeaseLock(kube, namespace, name))
    return EndpointsLock(kube, namespace, name)


class LeaderElector:
    def __init__(
        self,
        lock: Lock,
        identity: str,
        settings: Settings,
        announce: Callable[[ObjectRef, str], Awaitable[None]],
        on_change: Callable[[bool], None] = lambda leading: None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        wall: Callable[[], dt.datetime] = _now,
        fence: Fence | None = None,
    ) -> None:
        self.lock = lock
        self.identity = identity
        self.lease_duration = settings.lease_duration
        self.renew_deadline = settings.renew_deadline
        self.retry_period = settings.retry_period
        # Written as whole seconds, rounded up: others never see a shorter lease than ours.
        self.lease_seconds = math.ceil(settings.lease_duration)
        self.fence_margin = settings.lease_duration - settings.renew_deadline
        self.lock_name, self.namespace = settings.lock_name, settings.namespace
        self._announce = announce
        self._on_change = on_change
        self._clock, self._sleep, self._wall = clock, sleep, wall
        self.fence = fence if fence is not None else Fence(clock)
        self._observed: LeaderRecord | None = None
        self._observed_raw: Any = None
        self._observed_at = 0.0
        self.leading = False

    def _deadline(self, seconds: float) -> Deadline:
        return Deadline(self._clock() + seconds, self._clock)

    async def try_acquire_or_renew(self, deadline: Deadline) -> bool:
        """One round of client-go's tryAcquireOrRenew; every call stops at ``deadline``."""
        now = self._wall()
        fresh = LeaderRecord(self.identity, self.lease_seconds, now, now, 0)
        found = await self.lock.get(deadline)
        if found is None:
            sent = self._clock()
            try:
                await self.lock.create(fresh, deadline)
            except Conflict:
                return False
            self._written(fresh, sent)
            return True
        record = found.record
        if self._observed is None or found.raw != self._observed_raw or record != self._observed:
            self._observe(record, found.raw)
        if record.holder_identity not in ("", self.identity):
            self.fence.revoke()  # someone else's record: whatever our clock says, we do not lead
            if self._clock() < self._observed_at + record.lease_duration_seconds:
                return False
        if record.holder_identity == self.identity:
            desired = replace(
                fresh,
                acquire_time=record.acquire_time,
                leader_transitions=record.leader_transitions,
            )
        else:
            desired = replace(fresh, leader_transitions=record.leader_transitions + 1)
        sent = self._clock()
        try:
            await self.lock.update(desired, found.version, deadline)
        except Conflict:
            return False  # someone else wrote first: optimistic concurrency, never two winners
        self._written(desired, sent)
        return True

    def _observe(self, record: LeaderRecord, raw: Any) -> None:
        self._observed, self._observed_raw = record, raw
        self._observed_at = self._clock()

    def _written(self, record: LeaderRecord, sent: float) -> None:
        """Our record is stored: others may count its lease from ``sent`` at the earliest."""
        self._observe(record, None)  # the next read differs in form: it restarts the clock
        self.fence.extend(sent + self.lease_duration - self.fence_margin)

    async def _attempt(self, deadline: Deadline) -> bool:
        try:
            left = deadline.remaining()
            return await asyncio.wait_for(self.try_acquire_or_renew(deadline), left)
        except (ApiError, TimeoutError, MalformedRecord) as error:
            logger.warning("leader election: %s: %s", self.lock_name, error)
            return False

    async def _pause(self, leading: asyncio.Task[None] | None, seconds: float) -> None:
        """Sleep ``seconds``; wake early if ``leading`` ends."""
        if leading is None:
            await self._sleep(seconds)
            return
        sleeper = asyncio.ensure_future(self._sleep(seconds))
        try:
            await asyncio.wait({leading, sleeper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()

    async def run(self, lead: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Acquire, then run ``lead`` while renewing; raise LeadershipLost if renewal fails."""
        logger.info(
            "leader election: %s waiting for lock %s/%s",
            self.identity,
            self.namespace,
            self.lock_name,
        )
        while not await self._attempt(self._deadline(self.renew_deadline)):
            await self._pause(None, self.retry_period)
        self._set_leading(True)
        logger.info("leader election: %s became leader", self.identity)
        await self._announce(
            ObjectRef(
                kind=self.lock.ref_kind, name=self.lock_name, uid="", namespace=self.namespace
            ),
            f"{self.identity} became leader",
        )
        leading = asyncio.create_task(lead(), name="leading")
        try:
            await self._renew_until_lost(leading)
        finally:
            self.fence.revoke()
            leading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await leading

    async def _renew_until_lost(self, leading: asyncio.Task[None]) -> None:
        """client-go's renew: every RETRY_PERIOD, a sequence of attempts bounded as a whole by
        RENEW_DEADLINE; the first sequence that does not succeed in time ends leadership."""
        while True:
            await self._pause(leading, self.retry_period)
            if leading.done():
                break
            deadline = self._deadline(self.renew_deadline)
            while not await self._attempt(deadline):
                if self._clock() + self.retry_period >= deadline.at:
                    self.fence.revoke()
                    self._set_leading(False)
                    raise LeadershipLost(
                        f"{self.identity} could not renew lock {self.namespace}/{self.lock_name} "
                        f"within {self.renew_deadline:g} s"
                    )
                await self._pause(leading, self.retry_period)
                if leading.done():
                    break
        leading.result()

    def _set_leading(self, leading: bool) -> None:
        self.leading = leading
        self._on_change(leading)

    async def release(self) -> None:
        """Give the lock up (client-go ReleaseOnCancel) so a standby takes over at once."""
        self.fence.revoke()
        if not self.leading:
            return
        self._set_leading(False)
        deadline = self._deadline(self.renew_deadline)
        try:
            found = await self.lock.get(deadline)
            if found is None or found.record.holder_identity != self.identity:
                return
            now = self._wall()
            released = LeaderRecord("", 1, now, now, found.record.leader_transitions)
            await self.lock.update(released, found.version, deadline)
            logger.info("leader election: %s released the lock", self.identity)
        except (ApiError, TimeoutError, MalformedRecord) as error:
            logger.warning("leader election: could not release the lock: %s", error)
