"""`python -m tests.bench.memory`: the provisioner's memory and start-up with a large cache.

Starts its own control plane (controlplane/runner.py), fills it quickly with bound claim/PV pairs
created directly through the API (raw ``ApiClient.call_api`` from a thread pool, the PV
controller paused meanwhile; most pairs of other provisioners, a few of ours), then runs the
provisioner under the rbac/ ServiceAccount at each population size, growing the same population
and restarting it, and reports its RSS once the cache is filled and steady, the slope in KiB per
cached object, start-up, sweep and gate timings from its log (JSON lines), and a leader change
at the largest size. Prints a table and writes JSON under bench-results/. Reports, never asserts.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controlplane.binaries import KUBE_CONTROLLER_MANAGER, resolve_binaries
from controlplane.processes import free_port
from controlplane.runner import ControlPlane
from tests.bench.rawapi import JSON, RawApi, kubectl

REPO = Path(__file__).resolve().parents[2]
PROVISIONER = "bench.nfs.io/nfs"
SERVER = "nfs.bench.local"
EXPORT_PATH = "/exports"
OUR_CLASS = "bench-nfs"
CSI = ("gp3", "ebs.csi.aws.com")  # most of the population: a CSI driver's volumes
SUBDIR = ("nfs-other", "cluster.local/nfs-subdir-external-provisioner")  # NFS, another server
SUBDIR_SERVER = "nas.other.example"
NAMESPACES = 50
SA_NAMESPACE = "nfs-provisioner"
STEADY_SAMPLES = 6  # RSS samples, half a second apart, once the cache is filled and steady
RELIST_WAIT = 40.0  # seconds to wait for the re-list that kopf's own start-up list triggers


# --- the population: bound claim/PV pairs, created directly ------------------------------------


class Api:
    """``RawApi`` (the generic call path, shared by threads) with retries: the population is
    created while the API server is busiest."""

    def __init__(self, kubeconfig: Path, threads: int) -> None:
        self.raw = RawApi(kubeconfig, pool=threads)

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        content_type: str = "application/json",
        attempts: int = 6,
    ) -> JSON:
        """The decoded response body; 404 and 409 raise ``Rejected`` at once, other 4xx (but
        429) fail at once, the rest (and connection errors) is retried with backoff."""
        for attempt in range(attempts):
            try:
                status, data = self.raw.call(method, path, body, content_type)
            except Exception as error:  # noqa: BLE001 - a connection error is retried
                status, data = 0, {"message": str(error)}
            if 200 <= status < 300:
                return data
            if status in (404, 409):
                raise Rejected(status, data)
            if 400 <= status < 500 and status != 429:
                raise RuntimeError(f"{method} {path}: {status} {str(data)[:300]}")
            time.sleep(0.2 * 2**attempt)
        raise RuntimeError(f"{method} {path}: still failing after {attempts} attempts")


class Rejected(Exception):
    def __init__(self, status: int, data: JSON) -> None:
        super().__init__(f"{status}: {str(data)[:200]}")
        self.status = status


def namespace_of(index: int) -> str:
    return f"team-{index % NAMESPACES:02d}"


def kind_of(index: int, ours_every: int) -> str:
    """ "ours" one pair in ``ours_every``, "subdir" (NFS, another server) one in ten, else "csi"."""
    if index % ours_every == 0:
        return "ours"
    return "subdir" if index % 10 == 1 else "csi"


def claim_body(index: int, kind: str, volume: str) -> dict[str, Any]:
    """A claim as `kubectl apply` and the PV controller leave it, already bound to ``volume``."""
    name = f"data-{kind}-{index:06d}"
    namespace = namespace_of(index)
    class_name, provisioner = {"ours": (OUR_CLASS, PROVISIONER), "subdir": SUBDIR, "csi": CSI}[kind]
    labels = {
        "app.kubernetes.io/name": f"app-{index % 200}",
        "app.kubernetes.io/instance": f"app-{index % 200}-{index % 7}",
        "team": namespace,
    }
    spec = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": "10Gi"}},
        "storageClassName": class_name,
    }
    applied = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"annotations": {}, "labels": labels, "name": name, "namespace": namespace},
        "spec": spec,
    }
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": labels,
            "annotations": {
                "kubectl.kubernetes.io/last-applied-configuration": json.dumps(
                    applied, separators=(",", ":")
                )
                + "\n",
                "pv.kubernetes.io/bind-completed": "yes",
                "pv.kubernetes.io/bound-by-controller": "yes",
                "volume.beta.kubernetes.io/storage-provisioner": provisioner,
                "volume.kubernetes.io/storage-provisioner": provisioner,
                "volume.kubernetes.io/selected-node": f"node-{index % 20:02d}",
            },
        },
        "spec": {**spec, "volumeMode": "Filesystem", "volumeName": volume},
    }


def volume_body(claim: dict[str, Any], uid: str, kind: str) -> dict[str, Any]:
    """The PV ``claim`` is bound to, as its provisioner wrote it."""
    meta = claim["metadata"]
    name = claim["spec"]["volumeName"]
    spec: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "capacity": {"storage": "10Gi"},
        "claimRef": {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "namespace": meta["namespace"],
            "name": meta["name"],
            "uid": uid,
        },
        "persistentVolumeReclaimPolicy": "Delete",
        "storageClassName": claim["spec"]["storageClassName"],
        "volumeMode": "Filesystem",
    }
    directory = f"{meta['namespace']}-{meta['name']}-{name}"
    finalizers = ["external-provisioner.volume.kubernetes.io/finalizer"]
    if kind == "ours":
        annotations = {
            "pv.kubernetes.io/provisioned-by": PROVISIONER,
            "nfs.provisioner.dev/directory": directory,
            "nfs.provisioner.dev/export-path": EXPORT_PATH,
            "nfs.provisioner.dev/on-delete": "archive",
        }
        spec["nfs"] = {"server": SERVER, "path": f"{EXPORT_PATH}/{directory}"}
    elif kind == "subdir":
        annotations = {"pv.kubernetes.io/provisioned-by": SUBDIR[1]}
        spec["nfs"] = {"server": SUBDIR_SERVER, "path": f"/srv/nfs/{directory}"}
        finalizers = []
    else:
        annotations = {
            "pv.kubernetes.io/provisioned-by": CSI[1],
            "volume.kubernetes.io/provisioner-deletion-secret-name": "",
            "volume.kubernetes.io/provisioner-deletion-secret-namespace": "",
        }
        spec["csi"] = {
            "driver": CSI[1],
            "fsType": "ext4",
            "volumeHandle": f"vol-{uuid.uuid4().hex[:17]}",
            "volumeAttributes": {
                "storage.kubernetes.io/csiProvisionerIdentity": "1733300000000-8081-" + CSI[1]
            },
        }
        spec["nodeAffinity"] = {
            "required": {
                "nodeSelectorTerms": [
                    {
                        "matchExpressions": [
                            {
                                "key": "topology.ebs.csi.aws.com/zone",
                                "operator": "In",
                                "values": [f"eu-west-1{'abc'[len(directory) % 3]}"],
                            }
                        ]
                    }
                ]
            }
        }
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": name, "annotations": annotations, "finalizers": finalizers},
        "spec": spec,
    }


def create_pair(api: Api, index: int, ours_every: int) -> None:
    """Claim first (bound to a PV name chosen here), then its PV, then both statuses Bound: the
    PV controller finds every pair bound already and writes nothing."""
    kind = kind_of(index, ours_every)
    claim = claim_body(index, kind, f"pvc-{uuid.uuid4()}")
    meta = claim["metadata"]
    claims = f"/api/v1/namespaces/{meta['namespace']}/persistentvolumeclaims"
    try:
        created = api.call("POST", claims, claim)
    except Rejected as error:
        if error.status != 409:
            raise
        created = api.call("GET", f"{claims}/{meta['name']}")  # an earlier attempt made it
        claim["spec"]["volumeName"] = created["spec"]["volumeName"]
    volume = volume_body(claim, created["metadata"]["uid"], kind)
    with contextlib.suppress(Rejected):  # 409: an earlier attempt made it
        api.call("POST", "/api/v1/persistentvolumes", volume)
    merge = "application/merge-patch+json"
    api.call(
        "PATCH",
        f"/api/v1/persistentvolumes/{volume['metadata']['name']}/status",
        {"status": {"phase": "Bound"}},
        merge,
    )
    api.call(
        "PATCH",
        f"{claims}/{meta['name']}/status",
        {
            "status": {
                "phase": "Bound",
                "accessModes": ["ReadWriteOnce"],
                "capacity": {"storage": "10Gi"},
            }
        },
        merge,
    )


@contextlib.contextmanager
def paused(plane: ControlPlane, component: str) -> Iterator[None]:
    """SIGSTOP one component of our control plane (by its recorded pid) for a while: the PV
    controller has nothing to do with pairs that are bound already, but its 1-s resync of every
    claim and PV takes most of a core of this machine while the population grows."""
    pids = [r.pid for r in plane.processes if r.component == component]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def grow(api: Api, start: int, stop: int, ours_every: int, threads: int) -> float:
    """Create pairs ``start`` .. ``stop - 1``; returns the seconds it took."""
    began = time.monotonic()
    done = 0
    lock = threading.Lock()

    def one(index: int) -> None:
        nonlocal done
        create_pair(api, index, ours_every)
        with lock:
            done += 1
            if done % 2000 == 0:
                rate = done / (time.monotonic() - began)
                print(f"bench: {start + done} pairs ({rate:.0f} pairs/s)", file=sys.stderr)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        for future in [pool.submit(one, i) for i in range(start, stop)]:
            future.result()
    return time.monotonic() - began


def revision(api: Api) -> int:
    """The store's current revision (a list's resourceVersion)."""
    return int(api.call("GET", "/api/v1/namespaces?limit=1")["metadata"]["resourceVersion"])


def settle(api: Api, timeout: float = 120.0) -> float:
    """Wait until the control plane stops writing (the PV controller catching up); seconds."""
    began = time.monotonic()
    last = revision(api)
    while time.monotonic() - began < timeout:
        time.sleep(3)
        now = revision(api)
        if now - last <= 2:  # the apiserver's own lease renewals
            break
        last = now
    return time.monotonic() - began


# --- the provisioner under test ---------------------------------------------------------------


@dataclass
class Replica:
    """One provisioner process: its log (JSON lines), /metrics and /proc status."""

    process: subprocess.Popen[bytes]
    port: int
    log: Path
    started: float  # wall clock, seconds
    _lines: list[dict[str, Any]] = field(default_factory=list)
    _read: int = 0

    def status(self, key: str) -> int:
        """VmRSS / VmHWM in KiB; 0 when the process is gone."""
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith(f"{key}:"):
                    return int(line.split()[1])
        return 0

    def metrics(self) -> dict[str, float]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=2) as r:
                text = r.read().decode()
        except OSError:
            return {}
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                samples[key] = float(value)
        return samples

    def lines(self) -> list[dict[str, Any]]:
        with self.log.open("rb") as handle:
            handle.seek(self._read)
            chunk = handle.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self._read += len(complete)
        for raw in complete.splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(raw)
                if isinstance(entry, dict) and "time" in entry:
                    entry["at"] = (
                        dt.datetime.strptime(entry["time"], "%Y-%m-%dT%H:%M:%S.%fZ")
                        .replace(tzinfo=dt.UTC)
                        .timestamp()
                    )
                    self._lines.append(entry)
        return self._lines

    def first(self, prefix: str, after: float = 0.0) -> float | None:
        """Wall-clock time of the first log line starting with ``prefix`` (at or after)."""
        for entry in self.lines():
            if str(entry.get("message", "")).startswith(prefix) and entry["at"] >= after:
                return float(entry["at"])
        return None

    def message(self, prefix: str) -> str:
        for entry in self.lines():
            if str(entry.get("message", "")).startswith(prefix):
                return str(entry["message"])
        return ""

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@dataclass
class Bench:
    plane: ControlPlane
    work: Path
    api: Api
    env: dict[str, str]
    cluster_uid: str
    replicas: list[Replica] = field(default_factory=list)

    def start(self, name: str) -> Replica:
        port = free_port()
        log = self.work / f"{name}.log"
        env = {**self.env, "HTTP_ADDRESS": f"127.0.0.1:{port}"}
        with log.open("wb") as out:
            started = time.time()
            process = subprocess.Popen(
                [sys.executable, "-m", "provisioner"], env=env, cwd=REPO, stdout=out, stderr=out
            )
        replica = Replica(process, port, log, started)
        self.replicas.append(replica)
        return replica

    def plant_intent(self, tag: str) -> None:
        """An intent whose claim never existed, so the sweep lists every claim and PV (without
        one it lists nothing) and logs one line when done."""
        export = Path(self.env["NFS_MOUNT_PATH"])
        directory = f"bench-orphan-{tag}"
        (export / directory).mkdir(exist_ok=True)
        intents = export / ".nfs-provisioner" / "intents"
        intents.mkdir(parents=True, exist_ok=True)
        record = {
            "version": 1,
            "volume": f"pvc-orphan-{tag}",
            "namespace": namespace_of(0),
            "claim": f"gone-{tag}",
            "claim_uid": str(uuid.uuid4()),
            "directory": directory,
            "cluster": self.cluster_uid,
            "provisioner": PROVISIONER,
            "since": "",
        }
        (intents / f"pvc-orphan-{tag}.json").write_text(json.dumps(record, sort_keys=True))


def wait_for(what: str, check: Callable[[], bool], timeout: float, replica: Replica) -> float:
    """Poll ``check`` every 0.2 s; the wall-clock time it first held."""
    deadline = time.monotonic() + timeout
    while not check():
        if replica.process.poll() is not None:
            tail = replica.log.read_text(errors="replace")[-2000:]
            raise SystemExit(f"bench: the provisioner exited while waiting for {what}:\n{tail}")
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: timed out waiting for {what}")
        time.sleep(0.2)
    return time.time()


def cached(replica: Replica, objects: int) -> bool:
    samples = replica.metrics()
    return (
        samples.get('nfs_provisioner_watched_objects{kind="claim"}') == objects
        and samples.get('nfs_provisioner_watched_objects{kind="volume"}') == objects
    )


def drained(replica: Replica) -> bool:
    samples = replica.metrics()
    return (
        samples.get("nfs_provisioner_queue_depth", 1) == 0
        and samples.get("nfs_provisioner_operations_in_flight", 1) == 0
    )


def steady_rss(replica: Replica) -> tuple[int, int]:
    """(VmRSS, VmHWM) in KiB: the last of a few samples after a short settle, and the peak."""
    time.sleep(2)
    rss = 0
    for _ in range(STEADY_SAMPLES):
        rss = replica.status("VmRSS")
        time.sleep(0.5)
    return rss, replica.status("VmHWM")


def seconds(later: float | None, earlier: float | None) -> float | None:
    return None if later is None or earlier is None else round(later - earlier, 2)


def became_leader(replica: Replica, after: float = 0.0) -> float | None:
    """Wall-clock time of the replica's "... became leader" line (at or after)."""
    return next(
        (
            float(e["at"])
            for e in replica.lines()
            if "became leader" in str(e.get("message", "")) and e["at"] >= after
        ),
        None,
    )


def first_times(
    replica: Replica, checks: dict[str, Callable[[], bool]], timeout: float
) -> dict[str, float]:
    """Poll every check every 0.2 s until all have held; the wall-clock time each first held."""
    seen: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < len(checks):
        for name, check in checks.items():
            if name not in seen and check():
                seen[name] = time.time()
        if replica.process.poll() is not None:
            tail = replica.log.read_text(errors="replace")[-2000:]
            raise SystemExit(f"bench: the provisioner exited while waiting:\n{tail}")
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: timed out waiting for {set(checks) - set(seen)}")
        time.sleep(0.2)
    return seen


def measure_leader(bench: Bench, pairs: int, timeout: float) -> tuple[Replica, dict[str, Any]]:
    """Start a replica that becomes leader; wait until it passed its gate with a full, drained
    cache and the re-list its start-up triggers is done; its RSS and timings (from its log)."""
    replica = bench.start(f"leader-{pairs}")
    seen = first_times(
        replica,
        {
            "gate": lambda: replica.first("start-up gate: listed") is not None,
            "cache": lambda: cached(replica, pairs),
        },
        timeout,
    )
    gate = replica.first("start-up gate: listed")
    relisted = after_relist(replica, gate or 0.0, pairs)
    wait_for("an empty work queue", lambda: drained(replica), timeout, replica)
    rss, hwm = steady_rss(replica)
    became = became_leader(replica)
    sweep = replica.first("orphan sweep")
    return replica, {
        "pairs": pairs,
        "objects": 2 * pairs,
        "rss_mib": round(rss / 1024, 1),
        "hwm_mib": round(hwm / 1024, 1),
        "start_to_leader_s": seconds(became, replica.started),
        "sweep_s": seconds(sweep, became),
        "sweep_to_gate_s": seconds(gate, sweep),
        "start_to_gate_s": seconds(gate, replica.started),
        "start_to_full_cache_s": seconds(seen["cache"], replica.started),
        "gate_to_relist_s": seconds(relisted, gate),
        "gate_line": replica.message("start-up gate: listed"),
        "sweep_line": replica.message("orphan sweep"),
    }


def after_relist(replica: Replica, gate: float, pairs: int) -> float | None:
    """Wait for the "watch re-listed" line after the gate: kopf's start-up list (events of type
    None) asks the reconciler for one more list of its own. None when none came in time."""
    deadline = time.monotonic() + (RELIST_WAIT if pairs else 0.0)
    while time.monotonic() < deadline:
        found = replica.first("watch re-listed", gate)
        if found is not None:
            return found
        time.sleep(0.5)
    return None


def take_over(
    bench: Bench, pairs: int, leader: Replica, sig: signal.Signals, timeout: float
) -> tuple[Replica, dict[str, Any]]:
    """Start a standby, wait for its full cache, stop ``leader`` with ``sig``; the standby (now
    leader) and how long it took until it held the lock and passed its start-up gate."""
    standby = bench.start(f"standby-{sig.name}")
    wait_for("the standby's full cache", lambda: cached(standby, pairs), timeout, standby)
    standby_rss, standby_hwm = steady_rss(standby)
    stopped = time.time()
    leader.stop(sig)
    gate = wait_for(
        "the standby's start-up gate",
        lambda: standby.first("start-up gate: listed", stopped) is not None,
        timeout,
        standby,
    )
    gate = standby.first("start-up gate: listed", stopped) or gate
    wait_for("the new leader's empty queue", lambda: drained(standby), timeout, standby)
    rss, hwm = steady_rss(standby)
    return standby, {
        "standby_rss_mib": round(standby_rss / 1024, 1),
        "standby_hwm_mib": round(standby_hwm / 1024, 1),
        "stop_to_leader_s": seconds(became_leader(standby, stopped), stopped),
        "stop_to_gate_s": seconds(gate, stopped),
        "new_leader_rss_mib": round(rss / 1024, 1),
        "new_leader_hwm_mib": round(hwm / 1024, 1),
    }


def leader_change(bench: Bench, pairs: int, leader: Replica, timeout: float) -> dict[str, Any]:
    """A standby with a full cache takes over from a leader stopped by SIGTERM, then another
    from that one killed by SIGKILL (the lease must expire first)."""
    result: dict[str, Any] = {"pairs": pairs, "objects": 2 * pairs}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        leader, result[sig.name] = take_over(bench, pairs, leader, sig, timeout)
    leader.stop()
    return result


def slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of y over x."""
    if len(points) < 2:
        return None
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    if spread == 0:
        return None
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / spread


# --- the run -------------------------------------------------------------------------------------


def _setup(plane: ControlPlane, work: Path, api: Api) -> Bench:
    kubectl(plane, "apply", "-k", str(REPO / "rbac"))
    for index in range(NAMESPACES):
        with contextlib.suppress(Rejected):
            api.call("POST", "/api/v1/namespaces", {"metadata": {"name": namespace_of(index)}})
    for name, provisioner in ((OUR_CLASS, PROVISIONER), CSI, SUBDIR):
        storage_class = {
            "apiVersion": "storage.k8s.io/v1",
            "kind": "StorageClass",
            "metadata": {"name": name},
            "provisioner": provisioner,
            "parameters": {"archiveOnDelete": "true"} if name == OUR_CLASS else {},
        }
        api.call("POST", "/apis/storage.k8s.io/v1/storageclasses", storage_class)
    export = work / "export"
    export.mkdir()
    sa = plane.service_account_kubeconfig(SA_NAMESPACE, "nfs-provisioner", work / "sa")
    env = {
        **os.environ,
        "KUBECONFIG": str(sa),
        "PROVISIONER_NAME": PROVISIONER,
        "NFS_SERVER": SERVER,
        "NFS_PATH": EXPORT_PATH,
        "NFS_MOUNT_PATH": str(export),
        "POD_NAMESPACE": SA_NAMESPACE,
        "ENABLE_LEADER_ELECTION": "true",
        "LEADER_ELECTION_LOCK": "leases",
        "KUBE_API_QPS": "1000",
        "KUBE_API_BURST": "2000",
        "LOG_LEVEL": "INFO",
        "LOG_FORMAT": "json",
    }
    cluster = api.call("GET", "/api/v1/namespaces/kube-system")["metadata"]["uid"]
    return Bench(plane, work, api, env, str(cluster))


def run(sizes: list[int], threads: int, ours_every: int, failover: bool) -> dict[str, Any]:
    binaries = resolve_binaries(build=True)
    with tempfile.TemporaryDirectory(prefix="nfs-bench-memory-") as tmp:
        work = Path(tmp)
        plane = ControlPlane(work / "controlplane", binaries)
        plane.start()
        bench: Bench | None = None
        try:
            api = Api(plane.admin_kubeconfig, threads)
            bench = _setup(plane, work, api)
            return _measure(bench, sizes, threads, ours_every, failover)
        finally:
            for replica in bench.replicas if bench is not None else ():
                replica.stop(signal.SIGKILL)
            plane.stop()


def _measure(
    bench: Bench, sizes: list[int], threads: int, ours_every: int, failover: bool
) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    builds: list[dict[str, Any]] = []
    created = 0
    leader: Replica | None = None
    for size in sizes:
        if size > created:
            with paused(bench.plane, KUBE_CONTROLLER_MANAGER):
                took = grow(bench.api, created, size, ours_every, threads)
            settled = settle(bench.api)
            builds.append(
                {
                    "pairs": f"{created}..{size}",
                    "seconds": round(took, 1),
                    "pairs_per_s": round((size - created) / took, 1),
                    "settle_s": round(settled, 1),
                }
            )
            created = size
        bench.plant_intent(str(size))
        timeout = max(180.0, created / 50)
        leader, row = measure_leader(bench, created, timeout)
        rows.append(row)
        print(f"bench: {json.dumps(row)}", file=sys.stderr)
        if not (failover and size == sizes[-1]):
            leader.stop()
    change = (
        leader_change(bench, created, leader, max(180.0, created / 50))
        if failover and leader
        else None
    )
    rss_slope = slope([(r["objects"], r["rss_mib"] * 1024) for r in rows])
    hwm_slope = slope([(r["objects"], r["hwm_mib"] * 1024) for r in rows])
    return {
        "rows": rows,
        "slope_kib_per_object": {
            "rss": None if rss_slope is None else round(rss_slope, 2),
            "hwm": None if hwm_slope is None else round(hwm_slope, 2),
        },
        "leader_change": change,
        "population_builds": builds,
        "population": (
            f"bound claim/PV pairs in {NAMESPACES} namespaces: one in {ours_every} of "
            f"{PROVISIONER} (NFS, our records), one in ten of {SUBDIR[1]} (NFS on "
            f"{SUBDIR_SERVER}), the rest of {CSI[1]} (CSI); claims carry kubectl's "
            "last-applied-configuration, 3 labels and the PV controller's annotations"
        ),
        "settings": "ENABLE_LEADER_ELECTION=true LEADER_ELECTION_LOCK=leases "
        "KUBE_API_QPS=1000 KUBE_API_BURST=2000, others default",
        "machine": f"{os.cpu_count()} cores",
        "python": sys.version.split()[0],
        "code": provenance(),
    }


def provenance() -> str:
    """The commit the provisioner ran from and the files changed since (read-only git)."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "-C", str(REPO), "status", "--short", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return f"{REPO} (not a git checkout)"
    modified = ", ".join(line[3:] for line in changed if line.strip())
    return f"{head}" + (f" with changes to {modified}" if modified else "")


def _table(result: dict[str, Any]) -> Iterator[str]:
    columns = (
        ("objects", "objects"),
        ("rss_mib", "VmRSS MiB"),
        ("hwm_mib", "VmHWM MiB"),
        ("start_to_leader_s", "leader s"),
        ("sweep_s", "sweep s"),
        ("sweep_to_gate_s", "gate s"),
        ("start_to_gate_s", "start->gate s"),
        ("start_to_full_cache_s", "start->cache s"),
        ("gate_to_relist_s", "gate->relist s"),
    )
    yield "  ".join(f"{title:>14}" for _, title in columns)
    for row in result["rows"]:
        yield "  ".join(f"{row[key]!s:>14}" for key, _ in columns)
    slopes = result["slope_kib_per_object"]
    yield (
        f"slope (least squares): {slopes['rss']} KiB/object VmRSS, {slopes['hwm']} KiB/object VmHWM"
    )
    change = result["leader_change"]
    if change:
        for sig in ("SIGTERM", "SIGKILL"):
            c = change[sig]
            yield (
                f"leader change at {change['objects']} objects, {sig}: standby "
                f"{c['standby_rss_mib']} MiB (peak {c['standby_hwm_mib']}); lock after "
                f"{c['stop_to_leader_s']} s, gate passed after {c['stop_to_gate_s']} s; new "
                f"leader {c['new_leader_rss_mib']} MiB (peak {c['new_leader_hwm_mib']})"
            )
    for build in result["population_builds"]:
        yield (
            f"population {build['pairs']}: {build['seconds']} s ({build['pairs_per_s']} pairs/s), "
            f"settled in {build['settle_s']} s"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--sizes",
        default="0,5000,10000,20000",
        help="claim/PV pairs at each measurement, ascending (objects cached = 2 x pairs)",
    )
    parser.add_argument("--threads", type=int, default=16, help="threads creating the pairs")
    parser.add_argument("--ours-every", type=int, default=50, help="one pair in N is ours")
    parser.add_argument("--no-failover", action="store_true", help="skip the leader change")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results")
    args = parser.parse_args()
    sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    began = time.monotonic()
    result = run(sizes, args.threads, args.ours_every, not args.no_failover)
    result["total_s"] = round(time.monotonic() - began, 1)
    args.out.mkdir(exist_ok=True)
    path = args.out / f"memory-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2))
    for line in _table(result):
        print(line)
    print(f"whole run: {result['total_s']} s; written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
