"""The Kubernetes API as the control loop sees it: the seam between decisions and the wire.

``reconciler``, ``resync``, ``sweep`` and the leader-election locks are typed against the
``KubeApi`` Protocol and catch the errors defined here; ``kube.KubeClient`` is the real
implementation and ``tests/fakes.FakeKube`` an in-memory one. The Protocol lists exactly the calls
those modules make, nothing more. Nothing here imports the Kubernetes client, so a module that
only needs the seam (import-linter's ``seam`` contract) never loads it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from provisioner.core import Claim, Volume

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


class KubeApi(Protocol):
    """Errors are ``ApiError`` and its subclasses (``NotFound``, ``Conflict``, ...)."""

    # --- leader-election locks: plain requests on Endpoints and Leases ---------------------------

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: Mapping[str, str] | None = None,
        content_type: str = "application/json",
        timeout: float | None = None,  # noqa: ASYNC109 - the HTTP client's, in its thread
    ) -> JSON:
        """``timeout`` (seconds) bounds this one call (the elector's renew deadline)."""
        ...

    # --- PersistentVolumes and claims (reconciler) -----------------------------------------------

    async def create_volume(self, body: JSON) -> JSON:
        """Conflict when a PV of that name exists."""
        ...

    async def get_volume(self, name: str) -> JSON | None:
        """None when the PV does not exist."""
        ...

    async def delete_volume(self, name: str, uid: str = "") -> JSON | None:
        """The PV as the server left it (finalizers pending), None if it is gone at once;
        Conflict when ``uid`` is given and the PV of that name has another."""
        ...

    async def remove_volume_finalizer(self, name: str, finalizer: str, uid: str) -> JSON | None:
        """Removes the entry wherever it is, never a Conflict; None when the PV is gone."""
        ...

    async def patch_volume(self, name: str, patch: JSON) -> JSON:
        """JSON merge patch; a ``metadata.resourceVersion`` in it makes it conditional."""
        ...

    async def get_claim(self, namespace: str, name: str) -> JSON | None:
        """None when the claim does not exist."""
        ...

    # --- lists (resync, sweep) ----------------------------------------------------------------

    async def list_claims(self) -> list[Claim]: ...
    async def list_volumes(self) -> list[Volume]: ...
    async def list_claims_versioned(self) -> tuple[list[Claim], str]: ...
    async def list_volumes_versioned(self) -> tuple[list[Volume], str]: ...
    async def list_classes_versioned(self) -> tuple[list[JSON], str]: ...

    # --- Events ----------------------------------------------------------------------------------

    def record_event(
        self, ref: ObjectRef, event_type: str, reason: str, message: str, component: str
    ) -> None:
        """Queue the Event and return at once: never waits, never raises (``eventsink.EventSink``
        posts it with its own budget, correlated; what it cannot send is counted)."""
        ...
