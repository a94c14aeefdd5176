"""Leader election compatible with client-go: Endpoints lock, Lease lock, or both (migration).

``app`` runs ``LeaderElector.run`` with the reconcile workers as the leading task: only the
leader reconciles. Every write carries the resourceVersion that was read, so two candidates can
never both win. Losing the lock raises ``LeadershipLost`` (the process exits non-zero and the pod
restarts); ``release`` hands the lock over at once on SIGTERM. API calls go through ``kube``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, replace
from typing import Any, Protocol

from provisioner.config import LockKind, Settings
from provisioner.kube import ApiError, Conflict, KubeApi, NotFound, ObjectRef

logger = logging.getLogger(__name__)

ENDPOINTS_ANNOTATION = "control-plane.alpha.kubernetes.io/leader"


class LeadershipLost(Exception):
    """The lock could not be renewed within the renew deadline."""


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
        data = json.loads(raw)
        return cls(
            holder_identity=str(data.get("holderIdentity", "")),
            lease_duration_seconds=int(data.get("leaseDurationSeconds", 0)),
            acquire_time=_parse_time(data.get("acquireTime")),
            renew_time=_parse_time(data.get("renewTime")),
            leader_transitions=int(data.get("leaderTransitions", 0)),
        )

    def to_lease_spec(self) -> dict[str, Any]:
        return {
            "holderIdentity": self.holder_identity,
            "leaseDurationSeconds": self.lease_duration_seconds,
            "acquireTime": _micro_time(self.acquire_time),
            "renewTime": _micro_time(self.renew_time),
            "leaseTransitions": self.leader_transitions,
        }

    @classmethod
    def from_lease_spec(cls, spec: dict[str, Any]) -> LeaderRecord:
        return cls(
            holder_identity=str(spec.get("holderIdentity") or ""),
            lease_duration_seconds=int(spec.get("leaseDurationSeconds") or 0),
            acquire_time=_parse_time(spec.get("acquireTime")),
            renew_time=_parse_time(spec.get("renewTime")),
            leader_transitions=int(spec.get("leaseTransitions") or 0),
        )


def _rfc3339(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _micro_time(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_time(raw: Any) -> dt.datetime:
    if not raw:
        return dt.datetime.fromtimestamp(0, dt.UTC)
    return dt.datetime.fromisoformat(str(raw).replace("Z", "+00:00"))


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Lock(Protocol):
    """One lock object; ``get`` returns the record and an opaque version for the next write."""

    ref_kind: str

    async def get(self) -> tuple[LeaderRecord, Any] | None: ...
    async def create(self, record: LeaderRecord) -> Any: ...
    async def update(self, record: LeaderRecord, version: Any) -> Any: ...


class EndpointsLock:
    ref_kind = "Endpoints"

    def __init__(self, kube: KubeApi, namespace: str, name: str) -> None:
        self.kube, self.namespace, self.name = kube, namespace, name
        self.path = f"/api/v1/namespaces/{namespace}/endpoints"

    async def get(self) -> tuple[LeaderRecord, Any] | None:
        try:
            obj = await self.kube.request("GET", f"{self.path}/{self.name}")
        except NotFound:
            return None
        raw = obj.get("metadata", {}).get("annotations", {}).get(ENDPOINTS_ANNOTATION)
        record = (
            LeaderRecord.from_annotation(raw) if raw else LeaderRecord("", 0, _now(), _now(), 0)
        )
        return record, obj

    def _body(self, record: LeaderRecord, obj: dict[str, Any] | None) -> dict[str, Any]:
        body: dict[str, Any] = dict(obj) if obj else {"apiVersion": "v1", "kind": "Endpoints"}
        meta = dict(body.get("metadata", {}))
        meta.update({"name": self.name, "namespace": self.namespace})
        meta["annotations"] = {
            **meta.get("annotations", {}),
            ENDPOINTS_ANNOTATION: record.to_annotation(),
        }
        body["metadata"] = meta
        return body

    async def create(self, record: LeaderRecord) -> Any:
        return await self.kube.request("POST", self.path, self._body(record, None))

    async def update(self, record: LeaderRecord, version: Any) -> Any:
        return await self.kube.request(
            "PUT", f"{self.path}/{self.name}", self._body(record, version)
        )


class LeaseLock:
    ref_kind = "Lease"

    def __init__(self, kube: KubeApi, namespace: str, name: str) -> None:
        self.kube, self.namespace, self.name = kube, namespace, name
        self.path = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"

    async def get(self) -> tuple[LeaderRecord, Any] | None:
        try:
            obj = await self.kube.request("GET", f"{self.path}/{self.name}")
        except NotFound:
            return None
        return LeaderRecord.from_lease_spec(obj.get("spec", {})), obj

    async def create(self, record: LeaderRecord) -> Any:
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": record.to_lease_spec(),
        }
        return await self.kube.request("POST", self.path, body)

    async def update(self, record: LeaderRecord, version: Any) -> Any:
        body = dict(version)
        body["spec"] = record.to_lease_spec()
        return await self.kube.request("PUT", f"{self.path}/{self.name}", body)


class MultiLock:
    """``endpointsleases``: the Endpoints record decides, both objects are written (client-go)."""

    ref_kind = "Endpoints"

    def __init__(self, primary: EndpointsLock, secondary: LeaseLock) -> None:
        self.primary, self.secondary = primary, secondary

    async def get(self) -> tuple[LeaderRecord, Any] | None:
        found = await self.primary.get()
        if found is None:
            return None
        second = await self.secondary.get()
        return found[0], (found[1], second[1] if second else None)

    async def create(self, record: LeaderRecord) -> Any:
        first = await self.primary.create(record)
        with contextlib.suppress(Conflict):
            await self.secondary.create(record)
        return first

    async def update(self, record: LeaderRecord, version: Any) -> Any:
        primary_version, secondary_version = version
        result = await self.primary.update(record, primary_version)
        if secondary_version is None:
            with contextlib.suppress(Conflict):
                await self.secondary.create(record)
        else:
            await self.secondary.update(record, secondary_version)
        return result


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
    ) -> None:
        self.lock = lock
        self.identity = identity
        self.lease_duration = settings.lease_duration
        self.renew_deadline = settings.renew_deadline
        self.retry_period = settings.retry_period
        self.lock_name, self.namespace = settings.lock_name, settings.namespace
        self._announce = announce
        self._on_change = on_change
        self._observed: LeaderRecord | None = None
        self._observed_at = 0.0
        self._version: Any = None
        self.leading = False

    async def try_acquire_or_renew(self) -> bool:
        """One round of client-go's tryAcquireOrRenew."""
        now = _now()
        fresh = LeaderRecord(self.identity, int(self.lease_duration), now, now, 0)
        found = await self.lock.get()
        if found is None:
            try:
                self._version = await self.lock.create(fresh)
            except Conflict:
                return False
            self._observe(fresh)
            return True
        record, version = found
        if record != self._observed:
            self._observe(record)
        held_by_other = record.holder_identity not in ("", self.identity)
        if held_by_other and time.monotonic() < self._observed_at + record.lease_duration_seconds:
            return False
        if record.holder_identity == self.identity:
            desired = replace(
                fresh,
                acquire_time=record.acquire_time,
                leader_transitions=record.leader_transitions,
            )
        else:
            desired = replace(fresh, leader_transitions=record.leader_transitions + 1)
        try:
            self._version = await self.lock.update(desired, version)
        except Conflict:
            return False  # someone else wrote first: optimistic concurrency, never two winners
        self._observe(desired)
        return True

    def _observe(self, record: LeaderRecord) -> None:
        self._observed = record
        self._observed_at = time.monotonic()

    async def _attempt(self) -> bool:
        try:
            return await asyncio.wait_for(self.try_acquire_or_renew(), self.retry_period * 2)
        except (ApiError, TimeoutError) as error:
            logger.warning("leader election: %s: %s", self.lock_name, error)
            return False

    async def run(self, lead: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Acquire, then run ``lead`` while renewing; raise LeadershipLost if renewal fails."""
        logger.info(
            "leader election: %s waiting for lock %s/%s",
            self.identity,
            self.namespace,
            self.lock_name,
        )
        while not await self._attempt():  # noqa: ASYNC110 - polling the API, not a local flag
            await asyncio.sleep(self.retry_period)
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
            leading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await leading

    async def _renew_until_lost(self, leading: asyncio.Task[None]) -> None:
        last_renew = time.monotonic()
        while not leading.done():
            await asyncio.sleep(self.retry_period)
            if await self._attempt():
                last_renew = time.monotonic()
            elif time.monotonic() - last_renew > self.renew_deadline:
                self._set_leading(False)
                raise LeadershipLost(
                    f"{self.identity} could not renew lock {self.namespace}/{self.lock_name} "
                    f"within {self.renew_deadline:g} s"
                )
        leading.result()

    def _set_leading(self, leading: bool) -> None:
        self.leading = leading
        self._on_change(leading)

    async def release(self) -> None:
        """Give the lock up (client-go ReleaseOnCancel) so a standby takes over at once."""
        if not self.leading:
            return
        self._set_leading(False)
        found = await self.lock.get()
        if found is None or found[0].holder_identity != self.identity:
            return
        now = _now()
        released = LeaderRecord("", 1, now, now, found[0].leader_transitions)
        try:
            await self.lock.update(released, found[1])
            logger.info("leader election: %s released the lock", self.identity)
        except ApiError as error:
            logger.warning("leader election: could not release the lock: %s", error)
