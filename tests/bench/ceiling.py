"""The control plane's own ceiling: the same requests as a claim and a release, from a bare client.

Called by provision.py, on the control plane its runs use, so that their claims/s and deletes/s
can be given as a fraction of what this API server (and this machine) can take at all. A "claim"
is what the provisioner must write for one: a PV create and the Events it posts
(:data:`EVENTS_PER_CLAIM`); a "delete" is DELETE of a PV that carries our finalizer, the
strategic-merge patch that removes it, and one Event. Many threads, the cheap call path
(rawapi.py), the provisioner's ServiceAccount (same RBAC and audit cost). No binder is involved,
so this is the API server's ceiling, not the cluster's. Reports, never asserts.
"""

from __future__ import annotations

import datetime as dt
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from provisioner.core import FINALIZER
from tests.bench.rawapi import RawApi

EVENTS_PER_CLAIM = 2
"""Events posted per provisioned claim: Provisioning and ProvisioningSucceeded."""
EVENTS_PER_RELEASE = 1
"""VolumeDeleted (or VolumeArchived)."""
THREADS = (16, 32)
CLASS = "bench-ceiling"
DROP_FINALIZER = {"metadata": {"$deleteFromPrimitiveList/finalizers": [FINALIZER]}}
COMPONENT = "bench.nfs.io/nfs_ceiling"


@dataclass
class Ceiling:
    """One thread count's figures."""

    threads: int
    claims: int
    claims_per_s: float
    deletes_per_s: float
    failed: Counter[str] = field(default_factory=Counter)
    """``"409 POST /api/v1/persistentvolumes"`` -> count; a clean run has none."""
    windows: dict[str, tuple[float, float]] = field(default_factory=dict)
    """``provision``/``release`` -> (start, end) in epoch seconds, for the audit log."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "threads": self.threads,
            "claims": self.claims,
            "claims_per_s": round(self.claims_per_s, 1),
            "deletes_per_s": round(self.deletes_per_s, 1),
            "requests_per_claim": 1 + EVENTS_PER_CLAIM,
            "requests_per_delete": 2 + EVENTS_PER_RELEASE,
            "not_2xx_counts": dict(self.failed),
        }


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def event(
    namespace: str, kind: str, name: str, uid: str, reason: str, message: str
) -> dict[str, Any]:
    """An Event shaped as provisioner/eventsink.py's EventRecorder posts it."""
    involved: dict[str, Any] = {"kind": kind, "apiVersion": "v1", "name": name, "uid": uid}
    if kind == "PersistentVolumeClaim":
        involved["namespace"] = namespace
    now = _now()
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{name}.{secrets.token_hex(8)}", "namespace": namespace},
        "involvedObject": involved,
        "type": "Normal",
        "reason": reason,
        "message": message,
        "source": {"component": COMPONENT},
        "reportingComponent": COMPONENT.split("_", maxsplit=1)[0],
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }


def volume(name: str, claim_namespace: str, claim: str) -> dict[str, Any]:
    """A PV shaped as provisioner/core.py's build_volume makes it, minus the claimRef (there is
    no claim: the binder only marks it Available)."""
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {
            "name": name,
            "annotations": {
                "pv.kubernetes.io/provisioned-by": "bench.nfs.io/ceiling",
                "nfs.provisioner.dev/directory": f"{claim_namespace}-{claim}-{name}",
                "nfs.provisioner.dev/export-path": "/exports",
                "nfs.provisioner.dev/on-delete": "delete",
            },
            "finalizers": [FINALIZER],
        },
        "spec": {
            "capacity": {"storage": "1Mi"},
            "accessModes": ["ReadWriteMany"],
            "persistentVolumeReclaimPolicy": "Delete",
            "storageClassName": CLASS,
            "volumeMode": "Filesystem",
            "nfs": {"server": "nfs.bench.local", "path": f"/exports/{claim_namespace}-{claim}"},
        },
    }


class _Client:
    """Counts what did not come back 2xx."""

    def __init__(self, api: RawApi) -> None:
        self.api = api
        self.failed: Counter[str] = Counter()
        self._lock = threading.Lock()

    def send(
        self, method: str, path: str, body: Any, content_type: str = "application/json"
    ) -> None:
        status, _ = self.api.call(method, path, body, content_type)
        if not 200 <= status < 300:
            with self._lock:
                self.failed[f"{status} {method} {path.rsplit('/', 1)[0]}"] += 1


def _timed(threads: int, count: int, task: Callable[[int], None]) -> tuple[float, float]:
    """Run ``task(0..count-1)`` on ``threads`` threads: (start, end), epoch seconds."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        started = time.time()
        list(pool.map(task, range(count)))
        return started, time.time()


def _wait_gone(api: RawApi, prefix: str, timeout: float = 300) -> None:
    """Until kube-controller-manager has dropped its pv-protection finalizer from every PV
    (it adds one to each): the next measurement should not share the machine with that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, body = api.call("GET", "/api/v1/persistentvolumes")
        names = [item["metadata"]["name"] for item in body.get("items") or []]
        if status == 200 and not any(name.startswith(prefix) for name in names):
            return
        time.sleep(0.5)
    raise SystemExit(f"bench: the ceiling's PVs {prefix}-* were not gone after {timeout:.0f} s")


def measure(kubeconfig: Path, namespace: str, claims: int, threads: int) -> Ceiling:
    """``claims`` claims' worth of writes on ``threads`` threads, then as many deletes."""
    api = RawApi(kubeconfig, pool=threads)
    client = _Client(api)
    prefix = f"ceiling-{threads}-{secrets.token_hex(3)}"
    claim_uid = {i: f"00000000-0000-0000-0000-{i:012d}" for i in range(claims)}

    def provision(i: int) -> None:
        name, claim = f"{prefix}-{i:05d}", f"c{i:05d}"
        client.send("POST", "/api/v1/persistentvolumes", volume(name, namespace, claim))
        ref = ("PersistentVolumeClaim", claim, claim_uid[i])
        client.send(
            "POST",
            f"/api/v1/namespaces/{namespace}/events",
            event(
                namespace, *ref, "Provisioning", f'External provisioner is provisioning "{claim}"'
            ),
        )
        client.send(
            "POST",
            f"/api/v1/namespaces/{namespace}/events",
            event(namespace, *ref, "ProvisioningSucceeded", f"Successfully provisioned {name}"),
        )

    def release(i: int) -> None:
        name = f"{prefix}-{i:05d}"
        path = f"/api/v1/persistentvolumes/{name}"
        client.send("DELETE", path, None)
        client.send("PATCH", path, DROP_FINALIZER, "application/strategic-merge-patch+json")
        client.send(
            "POST",
            "/api/v1/namespaces/default/events",
            event("default", "PersistentVolume", name, "", "VolumeDeleted", f"{name} deleted"),
        )

    try:
        # Open the connections first: a TLS handshake per thread is not what is measured.
        _timed(threads, threads, lambda _: client.send("GET", "/version", None))
        created = _timed(threads, claims, provision)
        deleted = _timed(threads, claims, release)
        _wait_gone(api, prefix)
    finally:
        api.close()
    return Ceiling(
        threads,
        claims,
        claims / (created[1] - created[0]),
        claims / (deleted[1] - deleted[0]),
        client.failed,
        {"provision": created, "release": deleted},
    )


def measure_best(
    kubeconfig: Path, namespace: str, claims: int, thread_counts: tuple[int, ...] = THREADS
) -> tuple[Ceiling, Ceiling, list[Ceiling]]:
    """Every thread count in turn; (best for claims, best for deletes, all)."""
    runs = [measure(kubeconfig, namespace, claims, threads) for threads in thread_counts]
    best_claims = max(runs, key=lambda run: run.claims_per_s)
    best_deletes = max(runs, key=lambda run: run.deletes_per_s)
    return best_claims, best_deletes, runs
