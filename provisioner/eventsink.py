"""Events posted as client-go posts them: correlated, and off the caller's path.

``EventRecorder`` asks ``events.Correlator`` whether an Event is new (POST), a repeat (PATCH its
count) or spam (dropped); ``EventSink`` queues Events so a reconcile never waits for one, and posts
them in order with its own budget. Both speak through a request callable (``kube.KubeClient``'s),
never the Kubernetes client itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import quote

from provisioner import events
from provisioner.api import JSON, ApiError, NotFound, ObjectRef
from provisioner.pacing import TokenBucket

logger = logging.getLogger(__name__)

Request = Callable[..., Awaitable[JSON]]


class EventRecorder:
    """Posts Events as client-go's recorder does (``events.Correlator`` decides): an Event
    identical to one posted within 10 minutes PATCHes that one's ``count`` and
    ``lastTimestamp``; an object over its spam limit (25, then 1 per 5 minutes) gets none; a
    PATCH that finds the Event expired (404) creates a new one.

    Not locked per key: Events about one object come from that object's reconcile, which the
    work queue never runs twice at once.
    """

    def __init__(
        self,
        request: Request,
        correlator: events.Correlator | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._request = request
        self._correlator = correlator or events.Correlator()
        self._clock = clock

    async def record(
        self, ref: ObjectRef, event_type: str, reason: str, message: str, component: str
    ) -> events.Action:
        message = message[:1024]
        namespace = ref.namespace or "default"
        key = events.EventKey(
            component=component,
            kind=ref.kind,
            namespace=ref.namespace or "",
            name=ref.name,
            uid=ref.uid,
            api_version=ref.api_version,
            event_type=event_type,
            reason=reason,
            message=message,
        )
        plan = self._correlator.plan(key, self._clock())
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        key = plan.key or key
        try:
            if plan.action is events.Action.DROP:
                logger.debug(
                    "event %s on %s %s dropped: over the spam limit", reason, ref.kind, ref.name
                )
                return plan.action
            if plan.action is events.Action.PATCH:
                try:
                    saved = await self._patch(namespace, plan, now)
                except NotFound:
                    self._correlator.expired(key)
                    saved = await self._create(ref, key, plan.message or message, now)
                    plan = events.Plan(events.Action.CREATE)
            else:
                saved = await self._create(ref, key, plan.message or message, now)
        except ApiError as error:
            logger.warning(
                "could not record event %s on %s %s: %s", reason, ref.kind, ref.name, error
            )
            return plan.action
        name = str((saved.get("metadata") or {}).get("name") or plan.name)
        count = int(saved.get("count") or plan.count)
        self._correlator.recorded(key, name, count, self._clock())
        return plan.action

    async def _patch(self, namespace: str, plan: events.Plan, now: str) -> JSON:
        # The fields client-go's correlator patches; a strategic merge patch as it sends.
        body = {"count": plan.count, "lastTimestamp": now}
        return await self._request(
            "PATCH",
            f"/api/v1/namespaces/{quote(namespace)}/events/{quote(plan.name)}",
            body,
            content_type="application/strategic-merge-patch+json",
        )

    async def _create(self, ref: ObjectRef, key: events.EventKey, message: str, now: str) -> JSON:
        namespace = ref.namespace or "default"
        involved: JSON = {
            "kind": ref.kind,
            "apiVersion": ref.api_version,
            "name": ref.name,
            "uid": ref.uid,
        }
        if ref.namespace:
            involved["namespace"] = ref.namespace
        if ref.resource_version:
            involved["resourceVersion"] = ref.resource_version
        body: JSON = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                "name": events.event_name(ref.name, secrets.token_hex(8)),
                "namespace": namespace,
            },
            "involvedObject": involved,
            "type": key.event_type,
            "reason": key.reason,
            "message": message,
            "source": {"component": key.component},
            "reportingComponent": key.component.split("_", maxsplit=1)[0][:128],
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        return await self._request("POST", f"/api/v1/namespaces/{quote(namespace)}/events", body)


EVENT_QUEUE = 1000
"""Events waiting for their budget before new ones are dropped (client-go ``maxQueuedEvents``)."""


@dataclass(frozen=True)
class PendingEvent:
    ref: ObjectRef
    event_type: str
    reason: str
    message: str
    component: str


Post = Callable[[ObjectRef, str, str, str, str], Awaitable[events.Action]]


class EventSink:
    """Takes Events off the caller's path, as client-go's broadcaster does.

    ``emit`` only queues: a reconcile never waits for an Event, whatever the API server or the
    budget do. One task posts them in order through ``post`` (which correlates, see
    ``EventRecorder``), paced by its own token bucket, so Events never spend the budget of
    PersistentVolume writes. A full queue drops the new Event; ``on_dropped(reason, cause)``
    counts every Event not sent (cause ``queue-full`` or ``spam``, the per-object limit).
    """

    def __init__(
        self,
        post: Post,
        qps: float,
        burst: int,
        capacity: int = EVENT_QUEUE,
        on_dropped: Callable[[str, str], None] | None = None,
    ) -> None:
        self._post = post
        self._bucket = TokenBucket(qps, burst)
        self._queue: asyncio.Queue[PendingEvent] = asyncio.Queue(capacity)
        self._on_dropped = on_dropped
        self._task: asyncio.Task[None] | None = None

    def emit(self, event: PendingEvent) -> None:
        """Queue ``event``; must be called from the event loop."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._drain(), name="events")
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            logger.debug(
                "event %s on %s %s dropped: %d Events wait already",
                event.reason,
                event.ref.kind,
                event.ref.name,
                self._queue.qsize(),
            )
            self._dropped(event.reason, "queue-full")

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    async def flush(self, timeout: float) -> None:  # noqa: ASYNC109 - a bound, not a deadline
        """Wait up to ``timeout`` seconds for the queued Events to be posted (shutdown)."""
        if self._task is None or self._task.done():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), timeout)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def _dropped(self, reason: str, cause: str) -> None:
        if self._on_dropped is not None:
            self._on_dropped(reason, cause)

    async def _drain(self) -> None:
        while True:
            event = await self._queue.get()
            try:
                await self._bucket.acquire()
                action = await self._post(
                    event.ref, event.event_type, event.reason, event.message, event.component
                )
                if action is events.Action.DROP:
                    self._dropped(event.reason, "spam")
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not silence every later Event
                logger.exception("could not post event %s on %s", event.reason, event.ref.name)
            finally:
                self._queue.task_done()
