"""The only module that calls the Kubernetes API (watches aside, which kopf owns).

The reconciler, the leader elector and the preflight check call ``KubeApi``; it sends plain JSON
through the official client's transport (authentication, TLS, token refresh) without building
model objects, runs the blocking calls in a thread pool, and paces them with a token bucket
(client QPS/burst). API errors become the small exception set below; nothing else leaks out.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

import kubernetes.client
import kubernetes.config

from provisioner import core, events, identity
from provisioner.fence import Fence, Fenced

logger = logging.getLogger(__name__)

JSON = dict[str, Any]
T = TypeVar("T")


def _as_is(body: JSON) -> JSON:
    return body


class ApiError(Exception):
    """An API call failed; ``status`` is the HTTP status (0 when the server was not reached)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}" if status else message)
        self.status = status
        self.reason = reason
        self.message = message


class NotFound(ApiError):
    pass


class Conflict(ApiError):
    """409: the object exists already (create) or changed since it was read (update)."""


class Forbidden(ApiError):
    pass


class NotLeader(ApiError):
    """A PersistentVolume write refused by the fence (leader lease not known to be valid)."""


@dataclass(frozen=True)
class ObjectRef:
    """What an Event needs to point at its object."""

    kind: str
    name: str
    uid: str
    namespace: str | None = None
    api_version: str = "v1"
    resource_version: str = ""


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


def load_api_client(pool_size: int, config_file: str | None = None) -> kubernetes.client.ApiClient:
    """In-cluster configuration when running in a pod, else $KUBECONFIG / ~/.kube/config."""
    configuration = kubernetes.client.Configuration()
    if config_file is not None:
        kubernetes.config.load_kube_config(config_file, client_configuration=configuration)
    else:
        try:
            kubernetes.config.load_incluster_config(client_configuration=configuration)
        except kubernetes.config.ConfigException:
            kubernetes.config.load_kube_config(client_configuration=configuration)
    configuration.connection_pool_maxsize = pool_size
    return kubernetes.client.ApiClient(configuration)


_ERRORS: dict[int, type[ApiError]] = {404: NotFound, 409: Conflict, 403: Forbidden}


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


class KubeApi:
    def __init__(
        self,
        client: kubernetes.client.ApiClient,
        qps: float,
        burst: int,
        threads: int,
        timeout: float = 30.0,
        fence: Fence | None = None,
        event_qps: float = 10.0,
        event_burst: int = 50,
        on_event_dropped: Callable[[str, str], None] | None = None,
    ) -> None:
        """``fence``: checked before every PersistentVolume write (leader.py moves it); None
        (no leader election) never refuses. Events have their own budget (``event_qps``,
        ``event_burst``) and queue, see ``EventSink``."""
        self._client = client
        self._fence = fence
        self._bucket = TokenBucket(qps, burst)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kube-api")
        self._timeout = timeout
        self._events = EventRecorder(functools.partial(self.request, paced=False))
        # Bound on ``self``: a subclass that wraps ``post_event`` (tests' fault injection) sees
        # every Event the sink posts.
        self._sink = EventSink(
            self.post_event,
            event_qps,
            event_burst,
            on_dropped=on_event_dropped,
        )

    def close(self) -> None:
        self._sink.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()

    async def flush_events(self, timeout: float) -> None:  # noqa: ASYNC109
        """Give queued Events up to ``timeout`` seconds to be posted (before ``close``)."""
        await self._sink.flush(timeout)

    # --- transport ---------------------------------------------------------------------------

    def _call(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: Mapping[str, str] | None = None,
        content_type: str = "application/json",
        timeout: float | None = None,
    ) -> JSON:
        if query:
            path = f"{path}?{urlencode(query)}"
        _method, url, headers, serialized, _ = self._client.param_serialize(
            method=method,
            resource_path=path,
            header_params={"Accept": "application/json", "Content-Type": content_type},
            body=body,
            auth_settings=["BearerToken"],
        )
        try:
            response = self._client.call_api(
                method,
                url,
                header_params=headers,
                body=serialized,
                _request_timeout=self._timeout if timeout is None else timeout,
            )
            data = response.read()
            response.response.release_conn()
        except kubernetes.client.ApiException as error:
            raise ApiError(error.status or 0, str(error.reason), str(error.body)) from error
        except Exception as error:  # urllib3 connection errors, TLS failures, timeouts
            raise ApiError(0, "Unreachable", f"{method} {path}: {error}") from error
        decoded: JSON = json.loads(data) if data else {}
        if 200 <= response.status < 300:
            return decoded
        message = str(decoded.get("message", data[:200]))
        raise _ERRORS.get(response.status, ApiError)(
            response.status, str(decoded.get("reason", response.reason)), message
        )

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: Mapping[str, str] | None = None,
        content_type: str = "application/json",
        timeout: float | None = None,  # noqa: ASYNC109 - the HTTP client's, in its thread
        paced: bool = True,
    ) -> JSON:
        """``timeout`` (seconds) replaces the client's request timeout for this one call;
        ``paced=False`` leaves the client budget alone (Events: the sink paces them)."""
        if paced:
            await self._bucket.acquire()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._pool, lambda: self._call(method, path, body, query, content_type, timeout)
        )

    # --- PersistentVolumes and claims -----------------------------------------------------------

    def _fenced(self, action: str) -> None:
        """Refuse a PersistentVolume write unless the fence is valid (retried later)."""
        if self._fence is None:
            return
        try:
            self._fence.check(action)
        except Fenced as error:
            raise NotLeader(0, "NotLeader", str(error)) from None

    async def create_volume(self, body: JSON) -> JSON:
        self._fenced(f"create PersistentVolume {body.get('metadata', {}).get('name', '')}")
        return await self.request("POST", "/api/v1/persistentvolumes", body)

    async def get_volume(self, name: str) -> JSON | None:
        try:
            return await self.request("GET", f"/api/v1/persistentvolumes/{quote(name)}")
        except NotFound:
            return None

    async def delete_volume(self, name: str, uid: str = "") -> JSON | None:
        """Delete a PV (only the one of ``uid`` when given: else 409); returns it as the server
        left it (finalizers pending), None if gone."""
        self._fenced(f"delete PersistentVolume {name}")
        options = {"kind": "DeleteOptions", "apiVersion": "v1", "preconditions": {"uid": uid}}
        try:
            result = await self.request(
                "DELETE", f"/api/v1/persistentvolumes/{quote(name)}", options if uid else None
            )
        except NotFound:
            return None
        return result if result.get("kind") == "PersistentVolume" else None

    async def remove_volume_finalizer(self, name: str, finalizer: str, uid: str) -> JSON | None:
        """Remove ``finalizer`` from PV ``name`` in one request; None when the PV is gone.

        A strategic merge patch (``$deleteFromPrimitiveList``) without a resourceVersion: the
        server removes the entry from the list as it is then, so nothing another writer did in
        between (the PV controller's status, its own finalizer) makes it conflict, and nobody
        else's entry is touched. ``uid`` in the patch is immutable, so the patch fails rather
        than apply to a new PV of the same name.
        """
        self._fenced(f"remove the finalizer of PersistentVolume {name}")
        patch = {"metadata": {"uid": uid, "$deleteFromPrimitiveList/finalizers": [finalizer]}}
        try:
            return await self.request(
                "PATCH",
                f"/api/v1/persistentvolumes/{quote(name)}",
                patch,
                content_type="application/strategic-merge-patch+json",
            )
        except NotFound:
            return None

    async def patch_volume(self, name: str, patch: JSON) -> JSON:
        """JSON merge patch of a PV (annotations, finalizers); a ``metadata.resourceVersion``
        in the patch makes it apply only to the version that was read (else 409)."""
        self._fenced(f"patch PersistentVolume {name}")
        return await self.request(
            "PATCH",
            f"/api/v1/persistentvolumes/{quote(name)}",
            patch,
            content_type="application/merge-patch+json",
        )

    async def get_claim(self, namespace: str, name: str) -> JSON | None:
        path = f"/api/v1/namespaces/{quote(namespace)}/persistentvolumeclaims/{quote(name)}"
        try:
            return await self.request("GET", path)
        except NotFound:
            return None

    async def list_all(self, path: str, narrow: Callable[[JSON], T], page: int = 500) -> list[T]:
        """Every item of a list, fetched in pages of ``page`` (limit/continue), each narrowed as
        its page arrives: one page of bodies is alive at a time, never every claim or PV of the
        cluster as JSON (ten times their narrowed size and more)."""
        return (await self.list_all_versioned(path, narrow, page))[0]

    async def list_claims(self) -> list[core.Claim]:
        return await self.list_all("/api/v1/persistentvolumeclaims", core.claim_from)

    async def list_volumes(self) -> list[core.Volume]:
        return await self.list_all("/api/v1/persistentvolumes", core.volume_from)

    async def list_all_versioned(
        self, path: str, narrow: Callable[[JSON], T], page: int = 500
    ) -> tuple[list[T], str]:
        """Every item of a list, as ``list_all``, and the list's ``metadata.resourceVersion``.

        All pages of one list are a single snapshot (the continue token carries it), taken at
        the first page's resourceVersion. An expired continue token is an ApiError (410): the
        caller lists again from the start.
        """
        items: list[T] = []
        query = {"limit": str(page)}
        version = ""
        while True:
            result = await self.request("GET", path, query=query)
            metadata = result.get("metadata") or {}
            version = version or str(metadata.get("resourceVersion") or "")
            items.extend(map(narrow, result.pop("items", None) or ()))
            token = metadata.get("continue")
            if not token:
                return items, version
            query = {"limit": str(page), "continue": str(token)}

    async def list_claims_versioned(self) -> tuple[list[core.Claim], str]:
        return await self.list_all_versioned("/api/v1/persistentvolumeclaims", core.claim_from)

    async def list_volumes_versioned(self) -> tuple[list[core.Volume], str]:
        return await self.list_all_versioned("/api/v1/persistentvolumes", core.volume_from)

    async def list_classes_versioned(self) -> tuple[list[JSON], str]:
        return await self.list_all_versioned("/apis/storage.k8s.io/v1/storageclasses", _as_is)

    # --- Events --------------------------------------------------------------------------------

    def record_event(
        self, ref: ObjectRef, event_type: str, reason: str, message: str, component: str
    ) -> None:
        """Queue a core/v1 Event and return at once (see ``EventSink``); never raises."""
        self._sink.emit(PendingEvent(ref, event_type, reason, message, component))

    async def post_event(
        self, ref: ObjectRef, event_type: str, reason: str, message: str, component: str
    ) -> events.Action:
        """Post an Event now, correlated (see ``EventRecorder``); a failure is logged, never
        raised (events are best effort). Returns what was done: DROP when the object's spam
        limit held it back. The sink calls this; the reconciler uses ``record_event``."""
        return await self._events.record(ref, event_type, reason, message, component)

    # --- access checks (preflight) ---------------------------------------------------------------

    async def can_i(
        self,
        verb: str,
        resource: str,
        group: str = "",
        namespace: str | None = None,
        name: str | None = None,
    ) -> bool:
        attributes: JSON = {"verb": verb, "resource": resource, "group": group}
        if namespace:
            attributes["namespace"] = namespace
        if name:
            attributes["name"] = name
        review = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SelfSubjectAccessReview",
            "spec": {"resourceAttributes": attributes},
        }
        result = await self.request(
            "POST", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", review
        )
        return bool(result.get("status", {}).get("allowed"))

    async def cluster_uid(self) -> str:
        """The uid of the kube-system namespace: the conventional identity of a cluster, so
        records on an export shared by two clusters are told apart."""
        body = await self.request("GET", "/api/v1/namespaces/kube-system")
        return str((body.get("metadata") or {}).get("uid", ""))

    def ca_bundle(self) -> bytes | None:
        """The cluster CA certificates this client trusts (the pod's mounted ``ca.crt``, or
        the kubeconfig's), None when the configuration names none or it cannot be read."""
        path = self._client.configuration.ssl_ca_cert
        if not path:
            return None
        try:
            return Path(path).read_bytes()
        except OSError:
            return None

    async def cluster_identity(self) -> identity.ClusterIdentity:
        """kube-system's uid when this ServiceAccount may read it, else the CA certificate's
        fingerprint (identity.py); Forbidden when neither can be had."""
        bundle = self.ca_bundle()
        try:
            return identity.from_uid(await self.cluster_uid(), bundle)
        except Forbidden as error:
            if not bundle:
                raise
            try:
                return identity.from_ca(bundle)
            except identity.NoCertificate:
                raise error from None

    async def server_version(self) -> str:
        return str((await self.request("GET", "/version")).get("gitVersion", "unknown"))
