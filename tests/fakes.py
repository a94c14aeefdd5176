"""In-memory stand-ins for the seams of the control loop; fakes, not mocks.

``FakeKube`` implements ``provisioner.api.KubeApi`` over dictionaries: PersistentVolumes,
claims, StorageClasses, Events and the leader-election objects reached through ``request``. It
keeps resourceVersions like the API server does (one counter, bumped on every write), answers a
stale conditional write with ``Conflict`` and a missing object with ``NotFound`` (or ``None``
where the real client does), and never touches the network. ``before`` lets a test change the
world or fail a call just before it happens, to play the races a real cluster has.
"""

from __future__ import annotations

import copy
import datetime as dt
import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from provisioner import core
from provisioner.api import JSON, ApiError, Conflict, NotFound, ObjectRef


@dataclass(frozen=True)
class PostedEvent:
    kind: str
    name: str
    namespace: str | None
    event_type: str
    reason: str
    message: str


def _merge(target: JSON, patch: Mapping[str, Any]) -> None:
    """RFC 7386 JSON merge patch, in place."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


class FakeKube:
    def __init__(self) -> None:
        self.volumes: dict[str, JSON] = {}
        self.claims: dict[tuple[str, str], JSON] = {}
        self.classes: dict[str, JSON] = {}
        self.objects: dict[str, JSON] = {}
        """Objects reached through ``request`` (Endpoints, Leases), keyed by their path."""
        self.events: list[PostedEvent] = []
        self.calls: list[str] = []
        self.before: dict[str, Callable[[], None]] = {}
        """Method name -> hook run before that call; it may change objects or raise."""
        self._versions = itertools.count(1)
        self._uids = itertools.count(1)

    # --- test helpers ------------------------------------------------------------------------

    def _bump(self, obj: JSON) -> JSON:
        obj.setdefault("metadata", {})["resourceVersion"] = str(next(self._versions))
        return obj

    def _enter(self, method: str) -> None:
        self.calls.append(method)
        hook = self.before.get(method)
        if hook is not None:
            hook()

    def add_claim(self, body: JSON) -> JSON:
        stored = self._bump(copy.deepcopy(body))
        meta = stored["metadata"]
        meta.setdefault("uid", f"uid-{next(self._uids)}")
        self.claims[(meta["namespace"], meta["name"])] = stored
        return copy.deepcopy(stored)

    def delete_claim(self, namespace: str, name: str) -> None:
        del self.claims[(namespace, name)]

    def add_class(self, body: JSON) -> JSON:
        stored = self._bump(copy.deepcopy(body))
        self.classes[stored["metadata"]["name"]] = stored
        return copy.deepcopy(stored)

    def update_volume(self, name: str, change: Callable[[JSON], None]) -> JSON:
        """A write by someone else (the PV controller, an admin): a new resourceVersion."""
        stored = self.volumes[name]
        change(stored)
        return copy.deepcopy(self._bump(stored))

    def reasons(self, name: str) -> list[str]:
        return [event.reason for event in self.events if event.name == name]

    # --- KubeApi: leader-election objects -----------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: Mapping[str, str] | None = None,
        content_type: str = "application/json",
        timeout: float | None = None,  # noqa: ASYNC109 - in memory, nothing to time out
    ) -> JSON:
        self._enter(f"request {method}")
        if method == "GET":
            if path not in self.objects:
                raise NotFound(404, "NotFound", f"{path} not found")
            return copy.deepcopy(self.objects[path])
        if method == "POST":
            key = f"{path}/{body['metadata']['name']}"
            if key in self.objects:
                raise Conflict(409, "AlreadyExists", f"{key} already exists")
            self.objects[key] = self._bump(copy.deepcopy(body))
            return copy.deepcopy(self.objects[key])
        if method == "PUT":
            if path not in self.objects:
                raise NotFound(404, "NotFound", f"{path} not found")
            current = self.objects[path]["metadata"]["resourceVersion"]
            if body.get("metadata", {}).get("resourceVersion") != current:
                raise Conflict(409, "Conflict", f"{path} changed")
            self.objects[path] = self._bump(copy.deepcopy(body))
            return copy.deepcopy(self.objects[path])
        raise NotImplementedError(f"FakeKube.request {method} {path}")

    # --- KubeApi: PersistentVolumes and claims -----------------------------------------------

    async def create_volume(self, body: JSON) -> JSON:
        self._enter("create_volume")
        name = body["metadata"]["name"]
        if name in self.volumes:
            raise Conflict(409, "AlreadyExists", f'persistentvolumes "{name}" already exists')
        stored = self._bump(copy.deepcopy(body))
        stored["metadata"].setdefault("uid", f"uid-{next(self._uids)}")
        stored.setdefault("status", {"phase": "Available"})
        self.volumes[name] = stored
        return copy.deepcopy(stored)

    async def get_volume(self, name: str) -> JSON | None:
        self._enter("get_volume")
        found = self.volumes.get(name)
        return copy.deepcopy(found) if found is not None else None

    async def delete_volume(self, name: str, uid: str = "") -> JSON | None:
        self._enter("delete_volume")
        stored = self.volumes.get(name)
        if stored is None:
            return None
        if uid and stored["metadata"].get("uid", "") != uid:
            raise Conflict(409, "Conflict", f'persistentvolumes "{name}": uid precondition')
        if not stored["metadata"].get("finalizers"):
            return copy.deepcopy(self.volumes.pop(name))
        if "deletionTimestamp" not in stored["metadata"]:
            stored["metadata"]["deletionTimestamp"] = dt.datetime.now(dt.UTC).isoformat()
            self._bump(stored)
        return copy.deepcopy(stored)

    def _write_volume(self, name: str, patch: Mapping[str, Any]) -> JSON:
        stored = self.volumes.get(name)
        if stored is None:
            raise NotFound(404, "NotFound", f'persistentvolumes "{name}" not found')
        wanted = (patch.get("metadata") or {}).get("resourceVersion")
        if wanted is not None and wanted != stored["metadata"]["resourceVersion"]:
            raise Conflict(409, "Conflict", f'persistentvolumes "{name}" changed')
        _merge(stored, patch)
        self._bump(stored)
        meta = stored["metadata"]
        if "deletionTimestamp" in meta and not meta.get("finalizers"):
            del self.volumes[name]
        return copy.deepcopy(stored)

    async def remove_volume_finalizer(self, name: str, finalizer: str, uid: str) -> JSON | None:
        self._enter("remove_volume_finalizer")
        stored = self.volumes.get(name)
        if stored is None:
            return None
        if stored["metadata"].get("uid", "") != uid:
            raise ApiError(422, "Invalid", f'persistentvolumes "{name}": uid is immutable')
        finalizers = [f for f in stored["metadata"].get("finalizers") or [] if f != finalizer]
        return self._write_volume(name, {"metadata": {"finalizers": finalizers}})

    async def patch_volume(self, name: str, patch: JSON) -> JSON:
        self._enter("patch_volume")
        return self._write_volume(name, patch)

    async def get_claim(self, namespace: str, name: str) -> JSON | None:
        self._enter("get_claim")
        found = self.claims.get((namespace, name))
        return copy.deepcopy(found) if found is not None else None

    # --- KubeApi: lists ----------------------------------------------------------------------

    def _version(self) -> str:
        return str(next(self._versions))

    async def list_claims(self) -> list[core.Claim]:
        self._enter("list_claims")
        return [core.claim_from(body) for body in self.claims.values()]

    async def list_volumes(self) -> list[core.Volume]:
        self._enter("list_volumes")
        return [core.volume_from(body) for body in self.volumes.values()]

    async def list_claims_versioned(self) -> tuple[list[core.Claim], str]:
        self._enter("list_claims_versioned")
        return [core.claim_from(body) for body in self.claims.values()], self._version()

    async def list_volumes_versioned(self) -> tuple[list[core.Volume], str]:
        self._enter("list_volumes_versioned")
        return [core.volume_from(body) for body in self.volumes.values()], self._version()

    async def list_classes_versioned(self) -> tuple[list[JSON], str]:
        self._enter("list_classes_versioned")
        return copy.deepcopy(list(self.classes.values())), self._version()

    # --- KubeApi: Events ---------------------------------------------------------------------

    def record_event(
        self, ref: ObjectRef, event_type: str, reason: str, message: str, component: str
    ) -> None:
        self._enter("record_event")
        self.events.append(
            PostedEvent(ref.kind, ref.name, ref.namespace, event_type, reason, message)
        )
