"""A bare provisioner: the least a provisioner can do per claim, as a yardstick for ours.

``python -m tests.bench.bare``: one raw watch of claims, and for each new claim of the bench's
class a PV create and the two Events ours posts, from 16 threads over the cheap call path
(rawapi.py) - no kopf, no cache, no workqueue, no filesystem, no retries, no leader election.
provision.py runs it like a provisioner run (the claims created at once by the bench) so that
its claims/s show what this machine reaches when the claims themselves, kube-controller-manager's
reaction to them and the watch are part of the work, which the ceiling (ceiling.py: writes only)
leaves out. It is not a product: it provisions nothing on disk and releases nothing.
"""

from __future__ import annotations

import argparse
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tests.bench import ceiling
from tests.bench.rawapi import JSON, RawApi

THREADS = 16
READY = "bare: watching"
LABEL = "bench.nfs.io/bare"
"""On every PV it makes, so the bench can delete them afterwards."""


def volume(claim: JSON, storage_class: str) -> JSON:
    """The PV ours would write (ceiling.volume's shape) bound to ``claim``, label and all."""
    meta = claim["metadata"]
    name = f"pvc-{meta['uid']}"
    body: dict[str, Any] = ceiling.volume(name, meta["namespace"], meta["name"])
    body["metadata"]["labels"] = {LABEL: "true"}
    body["metadata"]["finalizers"] = []
    body["spec"]["storageClassName"] = storage_class
    body["spec"]["persistentVolumeReclaimPolicy"] = "Retain"
    body["spec"]["claimRef"] = {
        "kind": "PersistentVolumeClaim",
        "apiVersion": "v1",
        "namespace": meta["namespace"],
        "name": meta["name"],
        "uid": meta["uid"],
    }
    return body


class Bare:
    def __init__(self, api: RawApi, storage_class: str) -> None:
        self.api = api
        self.storage_class = storage_class
        self.pool = ThreadPoolExecutor(max_workers=THREADS)
        self.seen: set[str] = set()
        self.failed = 0
        self._lock = threading.Lock()

    def claim(self, claim: JSON) -> None:
        meta, spec = claim["metadata"], claim.get("spec") or {}
        if spec.get("storageClassName") != self.storage_class or spec.get("volumeName"):
            return
        if meta["uid"] in self.seen:
            return
        self.seen.add(meta["uid"])
        self.pool.submit(self.provision, claim)

    def provision(self, claim: JSON) -> None:
        meta = claim["metadata"]
        namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
        events = f"/api/v1/namespaces/{namespace}/events"
        ref = ("PersistentVolumeClaim", name, uid)
        sent = [
            self.api.call(
                "POST",
                events,
                ceiling.event(namespace, *ref, "Provisioning", f'Provisioning "{name}"'),
            ),
            self.api.call("POST", "/api/v1/persistentvolumes", volume(claim, self.storage_class)),
            self.api.call(
                "POST",
                events,
                ceiling.event(namespace, *ref, "ProvisioningSucceeded", f"Provisioned pvc-{uid}"),
            ),
        ]
        if any(not 200 <= status < 300 for status, _ in sent):
            with self._lock:
                self.failed += 1

    def run(self) -> None:
        path = "/api/v1/persistentvolumeclaims"
        status, body = self.api.call("GET", path)
        if status != 200:
            raise SystemExit(f"bare: GET {path}: {status} {body.get('message')}")
        for item in body.get("items") or []:
            self.claim(item)
        version = str(body["metadata"]["resourceVersion"])
        print(READY, flush=True)
        while True:
            for event in self.api.watch(path, version, 300):
                if event["type"] == "ERROR":
                    raise SystemExit(f"bare: watch ended: {event['object'].get('message')}")
                version = str(event["object"]["metadata"]["resourceVersion"])
                if event["type"] in ("ADDED", "MODIFIED"):
                    self.claim(event["object"])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--kubeconfig", type=Path, required=True)
    parser.add_argument("--storage-class", required=True)
    args = parser.parse_args(argv)
    Bare(RawApi(args.kubeconfig, pool=THREADS + 1), args.storage_class).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
