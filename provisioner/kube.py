"""The only module that imports the Kubernetes client (watches aside, which kopf owns).

``KubeClient`` implements ``api.KubeApi`` for the reconciler, the sweep and the leader elector,
and the few extra calls the commands make (preflight, handover, migration). It sends plain JSON
through the official client's transport (authentication, TLS, token refresh) without building
model objects, runs the blocking calls in a thread pool, and paces them with a token bucket
(client QPS/burst). API errors become ``api.ApiError`` and its subclasses; nothing else leaks out.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

import kubernetes.client
import kubernetes.config

from provisioner import core, events, identity
from provisioner.api import JSON, ApiError, Conflict, Forbidden, NotFound, NotLeader, ObjectRef
from provisioner.eventsink import EventRecorder, EventSink, PendingEvent
from provisioner.fence import Fence, Fenced
from provisioner.pacing import TokenBucket

logger = logging.getLogger(__name__)

T = TypeVar("T")


def _as_is(body: JSON) -> JSON:
    return body


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


class KubeClient:
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
