"""What the provisioner asked of the API server, read from kube-apiserver's audit log.

The bench starts its control plane with :data:`POLICY` (Metadata level, only the provisioner's
ServiceAccount), follows the log while it runs (to see when the provisioner has gone quiet) and
afterwards attributes every completed request to a phase by the time the server received it.
Only ``ResponseComplete`` entries count: one per request (a watch's comes when it ends). Leader
election (Endpoints and Leases) is kept apart, since it runs whether or not there is work.
Reports, never asserts.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

SA_NAMESPACE = "nfs-provisioner"
SA_NAME = "nfs-provisioner"
SA_USER = f"system:serviceaccount:{SA_NAMESPACE}:{SA_NAME}"
"""The rbac/ ServiceAccount the provisioner (and the bare client of the ceiling) runs as."""

POLICY = f"""\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
  - level: Metadata
    users: ["{SA_USER}"]
  - level: None
"""

ELECTION_RESOURCES = frozenset({"endpoints", "leases"})
"""The leader lock's resources: the election's own traffic, reported apart from the work."""


@dataclass(frozen=True)
class Request:
    """One completed request: when the server received it (epoch seconds), what, and how it
    ended."""

    received: float
    verb: str
    resource: str
    """``persistentvolumes``, ``persistentvolumes/status``, or the path of a non-resource URL."""
    code: int

    @property
    def key(self) -> str:
        return f"{self.verb} {self.resource}"

    @property
    def election(self) -> bool:
        return self.resource in ELECTION_RESOURCES

    @property
    def busy(self) -> bool:
        """Work, as opposed to the election's renewals and the watches that are always open."""
        return not self.election and self.verb != "watch"


def parse(line: str, user: str = SA_USER) -> Request | None:
    """The request of one audit log line, None unless it is ``user``'s ResponseComplete."""
    entry = json.loads(line)
    if entry.get("stage") != "ResponseComplete":
        return None
    if (entry.get("user") or {}).get("username") != user:
        return None
    ref = entry.get("objectRef") or {}
    if ref.get("resource"):
        resource = ref["resource"] + (f"/{ref['subresource']}" if ref.get("subresource") else "")
    else:
        resource = urlsplit(entry.get("requestURI", "")).path
    received = dt.datetime.fromisoformat(entry["requestReceivedTimestamp"]).timestamp()
    code = int((entry.get("responseStatus") or {}).get("code") or 0)
    return Request(received, entry.get("verb", ""), resource, code)


class AuditLog:
    """Follows the audit log file; :attr:`requests` grows with each :meth:`poll`."""

    def __init__(self, path: Path, user: str = SA_USER) -> None:
        self.path = path
        self.user = user
        self.requests: list[Request] = []
        self._offset = 0
        self._partial = b""
        self._last_busy = 0.0

    def poll(self) -> None:
        if not self.path.exists():
            return
        with self.path.open("rb") as log:
            log.seek(self._offset)
            data = log.read()
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()  # an incomplete last line waits for the next poll
        for line in lines:
            request = parse(line.decode(), self.user) if line.strip() else None
            if request is not None:
                self.requests.append(request)
                if request.busy:
                    self._last_busy = max(self._last_busy, request.received)

    def between(self, start: float, end: float) -> list[Request]:
        """Requests received in [start, end) (epoch seconds)."""
        return [r for r in self.requests if start <= r.received < end]

    def wait_quiet(self, since: float, quiet: float, limit: float) -> bool:
        """Wait until the provisioner has sent no work (see :attr:`Request.busy`) for ``quiet``
        seconds, counted from ``since`` at the earliest. False when ``limit`` seconds passed
        first (it was still busy)."""
        deadline = time.time() + limit
        while True:
            self.poll()
            idle_from = max(since, self._last_busy)
            now = time.time()
            if now - idle_from >= quiet:
                return True
            if now >= deadline:
                return False
            time.sleep(0.25)


@dataclass
class Breakdown:
    """A phase's requests by ``verb resource``, the election's apart, and what was not 2xx."""

    work: Counter[str] = field(default_factory=Counter)
    election: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)
    """``"409 patch persistentvolumes"`` -> count (election included, labelled as such)."""

    @property
    def total(self) -> int:
        return sum(self.work.values())

    def as_dict(self, per: float) -> dict[str, object]:
        """Counts divided by ``per`` (claims, or resyncs), and as counted; failures as counts."""
        return {
            "per": per,
            "requests": {k: round(v / per, 3) for k, v in sorted(self.work.items())},
            "total": round(self.total / per, 3),
            "leader_election_not_in_total": {
                k: round(v / per, 3) for k, v in sorted(self.election.items())
            },
            "counted": {**dict(sorted(self.work.items())), "total": self.total},
            "not_2xx_counts": dict(sorted(self.failed.items())),
        }


def breakdown(requests: Iterable[Request]) -> Breakdown:
    result = Breakdown()
    for request in requests:
        (result.election if request.election else result.work)[request.key] += 1
        if not 200 <= request.code < 300:
            result.failed[f"{request.code} {request.key}"] += 1
    return result
