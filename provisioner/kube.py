"""The only module that calls the Kubernetes API (watches aside, which kopf owns).

The reconciler, the leader elector and the preflight check call ``KubeApi``; it sends plain JSON
through the official client's transport (authentication, TLS, token refresh) without building
model objects, runs the blocking calls in a thread pool, and paces them with a token bucket
(client QPS/burst). API errors become the small exception set below; nothing else leaks out.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import kubernetes.client
import kubernetes.config

from provisioner import events
from provisioner.fence import Fence, Fenced

logger = logging.getLogger(__name__)

JSON = dict[str, Any]


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
                    saved = await self._create(ref, key, now)
                    plan = events.Plan(events.Action.CREATE)
            else:
                saved = await self._create(ref, key, now)
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

    async def _create(self, ref: ObjectRef, key: events.EventKey, now: str) -> JSON:
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
            "message": key.message,
            "source": {"component": key.component},
            "reportingComponent": key.component.split("_", maxsplit=1)[0][:128],
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        return await self._request("POST", f"/api/v1/namespaces/{quote(namespace)}/events", body)


class KubeApi:
    def __init__(
        self,
        client: kubernetes.client.ApiClient,
        qps: float,
        burst: int,
        threads: int,
        timeout: float = 30.0,
        fence: Fence | None = None,
    ) -> None:
        """``fence``: checked before every PersistentVolume write (leader.py moves it); None
        (no leader election) never refuses."""
        self._client = client
        self._fence = fence
        self._bucket = TokenBucket(qps, burst)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kube-api")
        self._timeout = timeout
        self._events = EventRecorder(self.request)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()

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
    ) -> JSON:
        """``timeout`` (seconds) replaces the client's request timeout for this one call."""
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

    async def delete_volume(self, name: str) -> JSON | None:
        """Delete a PV; returns it as the server left it (finalizers pending), None if gone."""
        self._fenced(f"delete PersistentVolume {name}")
        try:
            result = await self.request("DELETE", f"/api/v1/persistentvolumes/{quote(name)}")
        except NotFound:
            return None
        return result if result.get("kind") == "PersistentVolume" else None

    async def set_volume_finalizers(
        self, name: str, finalizers: list[str], resource_version: str
    ) -> JSON:
        """Replace the finalizer list only if the PV is unchanged since it was read (else 409)."""
        self._fenced(f"patch the finalizers of PersistentVolume {name}")
        patch = {"metadata": {"finalizers": finalizers, "resourceVersion": resource_version}}
        return await self.request(
            "PATCH",
            f"/api/v1/persistentvolumes/{quote(name)}",
            patch,
            content_type="application/merge-patch+json",
        )

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

    async def list_all(self, path: str, page: int = 500) -> list[JSON]:
        """Every item of a list, fetched in pages of ``page`` (limit/continue)."""
        items: list[JSON] = []
        query = {"limit": str(page)}
        while True:
            result = await self.request("GET", path, query=query)
            items.extend(result.get("items") or [])
            token = (result.get("metadata") or {}).get("continue")
            if not token:
                return items
            query = {"limit": str(page), "continue": str(token)}

    async def list_claims(self) -> list[JSON]:
        return await self.list_all("/api/v1/persistentvolumeclaims")

    async def list_volumes(self) -> list[JSON]:
        return await self.list_all("/api/v1/persistentvolumes")

    async def list_all_versioned(self, path: str, page: int = 500) -> tuple[list[JSON], str]:
        """Every item of a list, as ``list_all``, and the list's ``metadata.resourceVersion``.

        All pages of one list are a single snapshot (the continue token carries it), taken at
        the first page's resourceVersion. An expired continue token is an ApiError (410): the
        caller lists again from the start.
        """
        items: list[JSON] = []
        query = {"limit": str(page)}
        version = ""
        while True:
            result = await self.request("GET", path, query=query)
            metadata = result.get("metadata") or {}
            version = version or str(metadata.get("resourceVersion") or "")
            items.extend(result.get("items") or [])
            token = metadata.get("continue")
            if not token:
                return items, version
            query = {"limit": str(page), "continue": str(token)}

    async def list_claims_versioned(self) -> tuple[list[JSON], str]:
        return await self.list_all_versioned("/api/v1/persistentvolumeclaims")

    async def list_volumes_versioned(self) -> tuple[list[JSON], str]:
        return await self.list_all_versioned("/api/v1/persistentvolumes")

    async def list_classes_versioned(self) -> tuple[list[JSON], str]:
        return await self.list_all_versioned("/apis/storage.k8s.io/v1/storageclasses")

    # --- Events --------------------------------------------------------------------------------

    async def post_event(
        self, ref: ObjectRef, event_type: str, reason: str, message: str, component: str
    ) -> events.Action:
        """Record a core/v1 Event, correlated (see ``EventRecorder``); a failure is logged,
        never raised (events are best effort). Returns what was done: DROP when the object's
        spam limit held it back."""
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

    async def server_version(self) -> str:
        return str((await self.request("GET", "/version")).get("gitVersion", "unknown"))
