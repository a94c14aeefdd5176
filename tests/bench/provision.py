"""`make bench`: provisioning throughput, latency and memory against a real control plane.

Starts its own control plane (the same runner as the tests), runs the provisioner as a
subprocess under the rbac/ ServiceAccount with default settings, creates N claims at once from a
thread pool and watches PVs and claims to time each one. Then it grows the population to
``--hold`` claims and samples the provisioner's RSS. Prints a table and writes JSON under
bench-results/. Never part of `make test`: figures are reported, not asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import kubernetes.client
import kubernetes.config
import kubernetes.watch

from controlplane.runner import ControlPlane, kubectl_binary, resolve_binaries
from provisioner.kube import KubeApi, load_api_client

REPO = Path(__file__).resolve().parents[2]
PROVISIONER = "bench.nfs.io/nfs"
CLASS = "bench"


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return 0


class Watcher:
    """Records the first time each PV exists and each claim is Bound (monotonic seconds)."""

    def __init__(self, api: kubernetes.client.CoreV1Api) -> None:
        self.api = api
        self.volume_seen: dict[str, float] = {}
        self.bound_seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._volumes, daemon=True),
            threading.Thread(target=self._claims, daemon=True),
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _volumes(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):  # a closed stream: start a new watch
                self._watch_volumes()

    def _watch_volumes(self) -> None:
        if not self._stop.is_set():
            stream = kubernetes.watch.Watch().stream(
                self.api.list_persistent_volume, timeout_seconds=30
            )
            for event in stream:
                name = event["object"].metadata.name  # pvc-<claim uid>
                self.volume_seen.setdefault(name.removeprefix("pvc-"), time.monotonic())

    def _claims(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                self._watch_claims()

    def _watch_claims(self) -> None:
        if not self._stop.is_set():
            stream = kubernetes.watch.Watch().stream(
                self.api.list_namespaced_persistent_volume_claim, "bench", timeout_seconds=30
            )
            for event in stream:
                claim = event["object"]
                if claim.status.phase == "Bound":
                    self.bound_seen.setdefault(claim.metadata.uid, time.monotonic())


def create_claims(kubeconfig: Path, names: Iterable[str]) -> dict[str, float]:
    """Create claims concurrently; returns uid -> monotonic time its create returned."""
    created: dict[str, float] = {}

    async def create_all() -> None:
        kube = KubeApi(load_api_client(16, str(kubeconfig)), qps=1000, burst=1000, threads=16)
        path = "/api/v1/namespaces/bench/persistentvolumeclaims"

        async def create(name: str) -> None:
            body = {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": {"name": name},
                "spec": {
                    "storageClassName": CLASS,
                    "accessModes": ["ReadWriteMany"],
                    "resources": {"requests": {"storage": "1Mi"}},
                },
            }
            result = await kube.request("POST", path, body)
            created[result["metadata"]["uid"]] = time.monotonic()

        try:
            await asyncio.gather(*(create(n) for n in names))
        finally:
            kube.close()

    asyncio.run(create_all())
    return created


def wait_until(what: str, done: Any, timeout: float, pid: int, samples: list[int]) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: timed out waiting for {what}")
        samples.append(rss_kib(pid))
        time.sleep(0.5)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def run(claims: int, hold: int, out_dir: Path) -> dict[str, Any]:
    binaries = resolve_binaries(build=True)
    with tempfile.TemporaryDirectory(prefix="nfs-bench-") as tmp:
        work = Path(tmp)
        plane = ControlPlane(work / "controlplane", binaries)
        plane.start()
        try:
            return _measure(plane, work, claims, hold, out_dir)
        finally:
            plane.stop()


def _kubectl(plane: ControlPlane, *args: str, stdin: str | None = None) -> None:
    subprocess.run(
        [str(kubectl_binary()), f"--kubeconfig={plane.admin_kubeconfig}", *args],
        input=stdin,
        text=True,
        check=True,
        capture_output=True,
    )


def _measure(
    plane: ControlPlane, work: Path, claims: int, hold: int, out_dir: Path
) -> dict[str, Any]:
    _kubectl(plane, "apply", "-k", str(REPO / "rbac"))
    _kubectl(plane, "create", "namespace", "bench")
    storage_class = {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {"name": CLASS},
        "provisioner": PROVISIONER,
        "parameters": {"archiveOnDelete": "false"},
    }
    _kubectl(plane, "apply", "-f", "-", stdin=json.dumps(storage_class))
    export = work / "export"
    export.mkdir()
    sa = plane.service_account_kubeconfig("nfs-provisioner", "nfs-provisioner", work / "sa")
    env = {
        **os.environ,
        "KUBECONFIG": str(sa),
        "PROVISIONER_NAME": PROVISIONER,
        "NFS_SERVER": "nfs.bench.local",
        "NFS_PATH": "/exports",
        "NFS_MOUNT_PATH": str(export),
        "POD_NAMESPACE": "nfs-provisioner",
        "HTTP_ADDRESS": "127.0.0.1:0",
        "LOG_LEVEL": "WARNING",
    }
    log = (work / "provisioner.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "provisioner"], env=env, stdout=log, stderr=log
    )
    try:
        api = kubernetes.client.CoreV1Api(
            kubernetes.config.new_client_from_config(str(plane.admin_kubeconfig))
        )
        watcher = Watcher(api)
        watcher.start()
        time.sleep(3)  # let the provisioner win the lock and list (nothing to measure yet)
        rss_samples: list[int] = []
        started = time.monotonic()
        created = create_claims(plane.admin_kubeconfig, (f"c{i:05d}" for i in range(claims)))
        created_at = time.monotonic() - started
        wait_until(
            f"{claims} PVs",
            lambda: all(uid in watcher.volume_seen for uid in created),
            timeout=max(300, claims),
            pid=process.pid,
            samples=rss_samples,
        )
        wait_until(
            f"{claims} claims Bound",
            lambda: all(uid in watcher.bound_seen for uid in created),
            timeout=max(300, claims),
            pid=process.pid,
            samples=rss_samples,
        )
        last_volume = max(watcher.volume_seen[u] for u in created) - started
        last_bound = max(watcher.bound_seen[u] for u in created) - started
        latencies = [watcher.volume_seen[u] - created[u] for u in created]
        peak_batch = rss_kib(process.pid, "VmHWM")

        hold_samples: list[int] = []
        if hold > claims:
            more = create_claims(
                plane.admin_kubeconfig, (f"h{i:05d}" for i in range(hold - claims))
            )
            wait_until(
                f"{hold} PVs",
                lambda: all(uid in watcher.volume_seen for uid in more),
                timeout=max(600, hold),
                pid=process.pid,
                samples=hold_samples,
            )
            for _ in range(20):  # a resync-free steady state with every claim held
                hold_samples.append(rss_kib(process.pid))
                time.sleep(0.5)
        watcher.stop()
        result: dict[str, Any] = {
            "claims": claims,
            "claims_created_in_s": round(created_at, 2),
            "claims_per_s_to_pv": round(claims / last_volume, 1),
            "claims_per_s_to_bound": round(claims / last_bound, 1),
            "latency_claim_to_pv_s": {
                "p50": round(percentile(latencies, 50), 3),
                "p95": round(percentile(latencies, 95), 3),
                "p99": round(percentile(latencies, 99), 3),
                "mean": round(statistics.fmean(latencies), 3),
            },
            "peak_rss_mib_during_batch": round(max([peak_batch, *rss_samples]) / 1024, 1),
            "held_claims": max(hold, claims),
            "peak_rss_mib_with_held_claims": round(max([0, *hold_samples]) / 1024, 1)
            if hold_samples
            else None,
            "settings": "defaults: WORKERS=16 KUBE_API_QPS=100 KUBE_API_BURST=200",
            "machine": f"{os.cpu_count()} cores",
        }
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()
    out_dir.mkdir(exist_ok=True)
    path = out_dir / f"provision-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2))
    result["written_to"] = str(path)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--claims", type=int, default=500, help="claims created at once")
    parser.add_argument("--hold", type=int, default=5000, help="claims held for the RSS figure")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results")
    args = parser.parse_args()
    result = run(args.claims, args.hold, args.out)
    latency = result["latency_claim_to_pv_s"]
    rows = [
        ("claims created at once", result["claims"]),
        ("claims/s until each PV exists", result["claims_per_s_to_pv"]),
        ("claims/s until each claim is Bound", result["claims_per_s_to_bound"]),
        (
            "claim -> PV latency p50 / p95 / p99 (s)",
            f"{latency['p50']} / {latency['p95']} / {latency['p99']}",
        ),
        ("provisioner peak RSS during the batch (MiB)", result["peak_rss_mib_during_batch"]),
        (
            f"provisioner peak RSS with {result['held_claims']} claims (MiB)",
            result["peak_rss_mib_with_held_claims"] or "not measured (--hold <= --claims)",
        ),
    ]
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    print(f"written to {result['written_to']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
