"""`make bench`: throughput, latency, API requests and memory of provisioning and release.

Starts ONE control plane (the tests' runner, with an audit log of the provisioner's
ServiceAccount), measures its ceiling with a bare client (ceiling.py), then runs the provisioner
as a subprocess under the rbac/ ServiceAccount once per client budget (QPS 5/10 as upstream,
1000/2000, the shipped defaults). Each run, in a fresh namespace: N claims created at once from
many threads, until every PV exists and every claim is Bound; a separate short run with a short
RESYNC_PERIOD for the resyncs; then every claim deleted at once, until every PV is gone. The
provisioner is stopped between phases and runs. Timing comes from raw watches of claims and PVs
(rawapi.py), requests from the audit log (audit.py). Prints a markdown table and writes JSON
under bench-results/. Never part of `make test`: figures are reported, not asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controlplane.binaries import pinned_versions, resolve_binaries
from controlplane.runner import ControlPlane
from provisioner.core import FINALIZER
from tests.bench import audit, bare, ceiling, cpu
from tests.bench.rawapi import JSON, RawApi, kubectl

REPO = Path(__file__).resolve().parents[2]
PROVISIONER = "bench.nfs.io/nfs"
CLASS = "bench"
CLIENT_THREADS = 32
"""Threads that create (and delete) the claims at once."""
QUIET = 2.0
"""Seconds without a request of the provisioner (election and watches aside) that end a phase."""
SETTLE_LIMIT = 180.0
"""Seconds a phase may stay busy after its last object is done before its window is closed."""
IDLE_SAMPLE = 3.0
"""Seconds of a quiet provisioner and control plane whose CPU is subtracted as idle."""
STARTUP_RELIST = 8.0
"""Seconds after the start-up gate within which the provisioner's second list is awaited."""
RESYNC_PERIOD = 5
"""RESYNC_PERIOD of the resync phase's provisioner; only resyncs after its start-up count."""
RESYNCS = 2
"""Resyncs the resync window waits for."""
PROVISIONER_ENV = frozenset(
    {
        *("PROVISIONER_NAME", "NFS_SERVER", "NFS_PATH", "NFS_MOUNT_PATH", "POD_NAMESPACE"),
        *("ENABLE_LEADER_ELECTION", "LEADER_ELECTION_LOCK"),
        *("LEASE_DURATION", "RENEW_DEADLINE", "RETRY_PERIOD", "HTTP_ADDRESS"),
        *("KUBE_API_QPS", "KUBE_API_BURST", "EVENTS_QPS", "EVENTS_BURST", "WORKERS"),
        *("RESYNC_PERIOD", "FS_TIMEOUT", "RETRY_BACKOFF_BASE", "RETRY_BACKOFF_MAX"),
        *("LOG_FORMAT", "LOG_LEVEL", "KUBECONFIG"),
    }
)
"""Settings a caller's environment must not leak into a run (each run says what it sets)."""


@dataclass(frozen=True)
class RunSpec:
    name: str
    label: str
    env: dict[str, str]


RUNS = (
    RunSpec("qps5", "QPS 5/10", {"KUBE_API_QPS": "5", "KUBE_API_BURST": "10"}),
    RunSpec("qps1000", "QPS 1000/2000", {"KUBE_API_QPS": "1000", "KUBE_API_BURST": "2000"}),
    RunSpec("defaults", "shipped defaults", {}),
)


# --------------------------------------------------------------------------- observing


@dataclass
class Timeline:
    """When the bench first saw each claim's milestones (epoch seconds), keyed by claim uid
    (the PV is ``pvc-<uid>``)."""

    volume: dict[str, float] = field(default_factory=dict)
    bound: dict[str, float] = field(default_factory=dict)
    released: dict[str, float] = field(default_factory=dict)
    unfinalized: dict[str, float] = field(default_factory=dict)
    """Deleted and without our finalizer: what is left is kube-controller-manager's
    pv-protection finalizer (or nothing: the PV is gone)."""
    gone: dict[str, float] = field(default_factory=dict)
    relists: int = 0
    """Watches restarted from a fresh list (410 Gone): milestones in the gap are late."""


class Watcher:
    """Raw watches of every PV and claim, recording :class:`Timeline` as events arrive."""

    def __init__(self, api: RawApi) -> None:
        self.api = api
        self.timeline = Timeline()
        self._stop = threading.Event()
        self._ready = threading.Barrier(3)
        self._threads = [
            threading.Thread(target=self._follow, args=(path, handle), daemon=True)
            for path, handle in (
                ("/api/v1/persistentvolumes", self._volume),
                ("/api/v1/persistentvolumeclaims", self._claim),
            )
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()
        self._ready.wait(timeout=60)

    def stop(self) -> None:
        self._stop.set()

    def _list(self, path: str, handle: Callable[[str, JSON, float], None]) -> str:
        status, body = self.api.call("GET", path)
        if status != 200:
            raise RuntimeError(f"GET {path}: {status} {body.get('message')}")
        now = time.time()
        for item in body.get("items") or []:
            handle("ADDED", item, now)
        return str(body["metadata"]["resourceVersion"])

    def _follow(self, path: str, handle: Callable[[str, JSON, float], None]) -> None:
        version = self._list(path, handle)
        self._ready.wait(timeout=60)
        while not self._stop.is_set():
            try:
                for event in self.api.watch(path, version, 60):
                    kind, item = event["type"], event["object"]
                    if kind == "ERROR":  # 410 Gone: start again from a list
                        self.timeline.relists += 1
                        version = self._list(path, handle)
                        break
                    version = str(item["metadata"]["resourceVersion"])
                    if kind != "BOOKMARK":
                        handle(kind, item, time.time())
            except Exception:  # noqa: BLE001 - a dropped stream: watch again from `version`
                time.sleep(0.2)

    def _volume(self, kind: str, item: JSON, now: float) -> None:
        name = str(item["metadata"]["name"])
        if not name.startswith("pvc-"):
            return  # the ceiling's
        uid = name.removeprefix("pvc-")
        line = self.timeline
        if kind == "DELETED":
            line.unfinalized.setdefault(uid, now)
            line.gone.setdefault(uid, now)
            return
        line.volume.setdefault(uid, now)
        if (item.get("status") or {}).get("phase") == "Released":
            line.released.setdefault(uid, now)
        meta = item["metadata"]
        if meta.get("deletionTimestamp") and FINALIZER not in (meta.get("finalizers") or ()):
            line.unfinalized.setdefault(uid, now)

    def _claim(self, kind: str, item: JSON, now: float) -> None:
        if kind != "DELETED" and (item.get("status") or {}).get("phase") == "Bound":
            self.timeline.bound.setdefault(str(item["metadata"]["uid"]), now)


def wait_all(
    what: str, seen: dict[str, float], uids: Sequence[str], timeout: float, by: Provisioner
) -> float:
    """Wait until every uid is in ``seen``; the latest of their times."""
    deadline = time.monotonic() + timeout
    while True:
        missing = [uid for uid in uids if uid not in seen]
        if not missing:
            return max(seen[uid] for uid in uids)
        if by.exited() or time.monotonic() > deadline:
            why = "the provisioner exited" if by.exited() else f"timed out ({timeout:.0f} s)"
            raise SystemExit(
                f"bench: {why} waiting for {what}, {len(missing)} missing\n{by.tail()}"
            )
        time.sleep(0.1)


# --------------------------------------------------------------------------- acting


def in_parallel(work: Callable[[str], tuple[str, float]], names: Sequence[str]) -> dict[str, float]:
    with ThreadPoolExecutor(max_workers=CLIENT_THREADS) as pool:
        return dict(pool.map(work, names))


def create_claims(api: RawApi, namespace: str, names: Sequence[str]) -> dict[str, float]:
    """Create every claim at once; uid -> when its create returned."""

    def create(name: str) -> tuple[str, float]:
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
        status, result = api.call(
            "POST", f"/api/v1/namespaces/{namespace}/persistentvolumeclaims", body
        )
        if status != 201:
            raise SystemExit(f"bench: creating claim {name}: {status} {result.get('message')}")
        return str(result["metadata"]["uid"]), time.time()

    return in_parallel(create, names)


def delete_claims(api: RawApi, namespace: str, uids: dict[str, str]) -> dict[str, float]:
    """Delete every claim (name -> uid) at once; uid -> when its delete returned."""

    def delete(name: str) -> tuple[str, float]:
        status, result = api.call(
            "DELETE", f"/api/v1/namespaces/{namespace}/persistentvolumeclaims/{name}"
        )
        if status not in (200, 202):
            raise SystemExit(f"bench: deleting claim {name}: {status} {result.get('message')}")
        return uids[name], time.time()

    return in_parallel(delete, list(uids))


def kib(pid: int, field_name: str) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith(f"{field_name}:"):
            return int(line.split()[1])
    return 0


class Provisioner:
    """``python -m provisioner`` under the ServiceAccount, logging (INFO) to a file."""

    command: tuple[str, ...] = (sys.executable, "-m", "provisioner")
    ready = "start-up gate:"

    def __init__(self, base_env: dict[str, str], env: dict[str, str], log: Path) -> None:
        self.env = {**base_env, **env}
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None
        self.peak_rss_kib = 0

    def _spawn(self, timeout: float) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                self.command, env=self.env, stdout=out, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while self.ready not in self.text():
            if self.exited() or time.monotonic() > deadline:
                raise SystemExit(f"bench: {self.command[-1]} did not get ready:\n{self.tail()}")
            time.sleep(0.1)

    def start(self, audit_log: audit.AuditLog, timeout: float = 120) -> None:
        """Start; return once it leads, has reconciled what exists, and has gone quiet."""
        self._spawn(timeout)
        # kopf's own first lists arrive around the gate; the reconciler then lists again
        # (resync.RELIST_SETTLE, 5 s, later: "watch re-listed"). That is start-up too.
        gate = time.time()
        while "watch re-listed" not in self.text() and time.time() < gate + STARTUP_RELIST:
            time.sleep(0.1)
        audit_log.wait_quiet(gate, QUIET, timeout)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def tail(self, lines: int = 30) -> str:
        return f"----- last {lines} lines of {self.log} -----\n" + "\n".join(
            self.text().splitlines()[-lines:]
        )

    def exited(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    def resyncs(self) -> int:
        return self.text().count("resync: re-queueing")

    def stop(self) -> None:
        """SIGTERM (the lock is released), after reading its VmHWM."""
        if self.process is None:
            return
        self.peak_rss_kib = kib(self.process.pid, "VmHWM")
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


class BareProvisioner(Provisioner):
    """bare.py, the yardstick: ready once it watches."""

    command: tuple[str, ...] = (sys.executable, "-m", "tests.bench.bare", "--storage-class", CLASS)
    ready = bare.READY

    def start(self, audit_log: audit.AuditLog, timeout: float = 120) -> None:
        self.command = (*type(self).command, "--kubeconfig", self.env["KUBECONFIG"])
        self._spawn(timeout)


# --------------------------------------------------------------------------- one run


def percentiles(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"p50": None, "p99": None, "n": 0}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))], 3)

    return {"p50": at(50), "p99": at(99), "n": len(ordered)}


@dataclass
class Window:
    start: float
    end: float
    settled: bool
    """False: the provisioner was still sending when the window was closed (SETTLE_LIMIT)."""

    def as_dict(self) -> dict[str, Any]:
        return {"seconds": round(self.end - self.start, 1), "settled": self.settled}


@dataclass
class Bench:
    """What every run shares: the control plane, its clients, the audit log, the watches."""

    plane: ControlPlane
    work: Path
    admin: RawApi
    sa_kubeconfig: Path
    audit_log: audit.AuditLog
    watcher: Watcher
    base_env: dict[str, str]
    claims: int

    rss_kib: dict[str, dict[str, int]] = field(default_factory=dict)
    """Run -> phase -> the VmHWM of that phase's provisioner."""
    profile: frozenset[str] = frozenset()
    """Runs whose provision phase py-spy records (``--profile``)."""

    @contextlib.contextmanager
    def running(
        self, spec: RunSpec, phase: str, extra: dict[str, str] | None = None
    ) -> Iterator[Provisioner]:
        """A provisioner with the run's settings, started and quiet; stopped afterwards."""
        log = self.work / f"provisioner-{spec.name}-{phase}.log"
        provisioner = Provisioner(self.base_env, {**spec.env, **(extra or {})}, log)
        try:
            provisioner.start(self.audit_log)
            yield provisioner
        finally:
            provisioner.stop()
            self.rss_kib.setdefault(spec.name, {})[phase] = provisioner.peak_rss_kib

    @contextlib.contextmanager
    def measured(
        self, provisioner: Provisioner, spec: RunSpec, phase: str, into: dict[str, Any]
    ) -> Iterator[cpu.CpuMeter]:
        """CPU time of the provisioner and of each control-plane process over the block, and a
        py-spy profile of the provisioner when ``--profile`` names this run (provision only)."""
        assert provisioner.process is not None
        pids = {"provisioner": provisioner.process.pid}
        pids |= {record.component: record.pid for record in self.plane.processes}
        meter = cpu.CpuMeter(pids)
        meter.idle(IDLE_SAMPLE)
        profile = None
        if spec.name in self.profile and phase == "provision":
            profile = cpu.Profile(pids["provisioner"], self.work / f"py-spy-{spec.name}.txt")
            profile.start()
        meter.start()
        try:
            yield meter
        finally:
            meter.mark("settled")
            into[f"cpu_ms_per_{phase}"] = meter.per(self.claims)
            summary = profile.stop() if profile is not None else None
            if summary is not None:
                into["profile"] = dataclasses.asdict(summary)

    def wait_timeout(self) -> float:
        """For every PV of a run (or every PV gone): generous even at QPS 5."""
        return 120.0 + 2.0 * self.claims


def run_one(bench: Bench, spec: RunSpec) -> dict[str, Any]:
    namespace = f"bench-{spec.name}"
    status, body = bench.admin.call("POST", "/api/v1/namespaces", {"metadata": {"name": namespace}})
    if status != 201:
        raise SystemExit(f"bench: creating namespace {namespace}: {status} {body.get('message')}")
    names = [f"c{i:05d}" for i in range(bench.claims)]
    line = bench.watcher.timeline
    log = bench.audit_log
    timeout = bench.wait_timeout()

    # Provision: claims created at once, until every claim is Bound and the provisioner is quiet.
    print(f"bench: {spec.label}: provisioning {bench.claims} claims", file=sys.stderr)
    measured: dict[str, Any] = {}
    with (
        bench.running(spec, "provision") as provisioner,
        bench.measured(provisioner, spec, "provision", measured) as meter,
    ):
        started = time.time()
        created = create_claims(bench.admin, namespace, names)
        uids = list(created)
        last_volume = wait_all("every PV", line.volume, uids, timeout, provisioner)
        meter.mark("every PV")
        last_bound = wait_all("every claim Bound", line.bound, uids, timeout, provisioner)
        settled = log.wait_quiet(time.time(), QUIET, SETTLE_LIMIT)
        provision = Window(started, time.time(), settled)

    # Resync: a provisioner with a short period, every claim held; whole resyncs in the window.
    print(f"bench: {spec.label}: resyncs with {bench.claims} claims held", file=sys.stderr)
    with bench.running(spec, "resync", {"RESYNC_PERIOD": str(RESYNC_PERIOD)}) as provisioner:
        resync_start, before = time.time(), provisioner.resyncs()
        deadline = time.monotonic() + RESYNC_PERIOD * (RESYNCS + 1) + 60
        while provisioner.resyncs() < before + RESYNCS and time.monotonic() < deadline:
            time.sleep(0.2)
        settled = log.wait_quiet(time.time(), QUIET, SETTLE_LIMIT)
        resync = Window(resync_start, time.time(), settled)
        resyncs = provisioner.resyncs() - before

    # Release: every claim deleted at once, until every PV is gone and the provisioner is quiet.
    print(f"bench: {spec.label}: deleting {bench.claims} claims", file=sys.stderr)
    with (
        bench.running(spec, "release") as provisioner,
        bench.measured(provisioner, spec, "release", measured) as meter,
    ):
        deleting = time.time()
        deleted = delete_claims(bench.admin, namespace, dict(zip(names, uids, strict=True)))
        last_gone = wait_all("every PV gone", line.gone, uids, timeout, provisioner)
        settled = log.wait_quiet(time.time(), QUIET, SETTLE_LIMIT)
        release = Window(deleting, time.time(), settled)

    released = [u for u in uids if u in line.released]
    last_released = max((line.released[u] for u in released), default=deleting)
    return {
        "label": spec.label,
        "env": spec.env,
        "claims": bench.claims,
        "claims_per_s_to_pv": round(bench.claims / (last_volume - started), 2),
        "claims_per_s_to_bound": round(bench.claims / (last_bound - started), 2),
        "claim_to_pv_s": percentiles([line.volume[u] - created[u] for u in uids]),
        "pv_to_bound_s_kcm": percentiles([line.bound[u] - line.volume[u] for u in uids]),
        "deletes_per_s_to_pv_gone": round(bench.claims / (last_gone - deleting), 2),
        "released_per_s_kcm": round(len(released) / (last_released - deleting), 2)
        if released
        else None,
        "delete_to_released_s_kcm": percentiles([line.released[u] - deleted[u] for u in released]),
        "released_to_gone_s": percentiles([line.gone[u] - line.released[u] for u in released]),
        "released_to_finalizer_off_s": percentiles(
            [line.unfinalized[u] - line.released[u] for u in released]
        ),
        "finalizer_off_to_gone_s_kcm": percentiles(
            [line.gone[u] - line.unfinalized[u] for u in uids]
        ),
        "windows": {
            "provision": provision.as_dict(),
            "resync": {**resync.as_dict(), "resyncs": resyncs},
            "release": release.as_dict(),
        },
        "requests": {
            "provision": window_requests(bench, provision, bench.claims),
            "release": window_requests(bench, release, bench.claims),
            "resync": window_requests(bench, resync, resyncs),
        },
        "peak_rss_kib": bench.rss_kib.get(spec.name, {}),
        **measured,
    }


def window_requests(bench: Bench, window: Window, per: int) -> dict[str, Any]:
    """The audit log's requests in ``window``, divided by ``per`` (claims, or resyncs). Read
    once the window's provisioner has stopped: a watch's entry comes when it ends."""
    bench.audit_log.poll()
    found = audit.breakdown(bench.audit_log.between(window.start, window.end))
    return found.as_dict(per) if per else {"per": 0, "total": None}


# --------------------------------------------------------------------------- the report


def _p(stat: dict[str, Any]) -> str:
    if not stat.get("n"):
        return "-"
    return f"{stat['p50']:.2f} / {stat['p99']:.2f}"


def _per(value: float) -> str:
    """Per claim: two decimals, three for what is rare but not absent."""
    return "0" if value == 0 else f"{value:.2f}" if value >= 0.01 else f"{value:.3f}"


def _n(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


CPU_COLUMNS = ("provisioner", "kube-apiserver", "etcd", "kube-controller-manager")


def _cpu(run: dict[str, Any], phase: str, mark: str) -> str:
    per = run.get(f"cpu_ms_per_{phase}", {}).get(mark)
    return " / ".join(f"{per.get(name, 0):.1f}" for name in CPU_COLUMNS) if per else "-"


def _ratio(mine: float | None, best: float | None) -> str:
    return f"{mine / best:.0%}" if mine and best else "-"


def markdown(result: dict[str, Any]) -> str:
    runs: dict[str, dict[str, Any]] = result["runs"]
    top = result.get("ceiling") or {}
    claims_best = (top.get("claims") or {}).get("claims_per_s")
    deletes_best = (top.get("deletes") or {}).get("deletes_per_s")
    yardstick = result.get("bare")
    columns = [
        "figure",
        "ceiling (writes only)",
        "bare provisioner",
        *(run["label"] for run in runs.values()),
    ]

    def row(
        name: str,
        ceiling_cell: str,
        cell: Callable[[dict[str, Any]], str],
        bare_cell: Callable[[dict[str, Any]], str] | None = None,
    ) -> str:
        at_bare = bare_cell(yardstick) if bare_cell is not None and yardstick else "-"
        return (
            "| "
            + " | ".join([name, ceiling_cell, at_bare, *(cell(r) for r in runs.values())])
            + " |"
        )

    def requests(phase: str) -> Callable[[dict[str, Any]], str]:
        def cell(run: dict[str, Any]) -> str:
            found = run["requests"][phase]
            if found.get("total") is None:
                return "-"
            return f"{found['total']:.2f}" + ("" if run["windows"][phase]["settled"] else " *")

        return cell

    def audited(phase: str) -> str:
        found = (top.get("requests") or {}).get(phase)
        return f"{found['total']:.2f}" if found else "-"

    threads = (
        f" ({top['claims']['threads']} threads)" if claims_best else "",
        f" ({top['deletes']['threads']} threads)" if deletes_best else "",
    )
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
        row(
            "claims/s until every PV exists",
            f"{_n(claims_best)}{threads[0]}" if claims_best else "-",
            lambda r: _n(r["claims_per_s_to_pv"]),
            lambda r: _n(r["claims_per_s_to_pv"]),
        ),
        row("claims/s until every claim Bound", "-", lambda r: _n(r["claims_per_s_to_bound"])),
        row(
            "claim → PV p50 / p99 (s, ours)",
            "-",
            lambda r: _p(r["claim_to_pv_s"]),
            lambda r: _p(r["claim_to_pv_s"]),
        ),
        row("PV → Bound p50 / p99 (s, KCM)", "-", lambda r: _p(r["pv_to_bound_s_kcm"])),
        row(
            "deletes/s until every PV is gone",
            f"{_n(deletes_best)}{threads[1]}" if deletes_best else "-",
            lambda r: _n(r["deletes_per_s_to_pv_gone"]),
        ),
        row("PVs Released/s (KCM's binder)", "-", lambda r: _n(r["released_per_s_kcm"])),
        row(
            "delete → Released p50 / p99 (s, KCM)", "-", lambda r: _p(r["delete_to_released_s_kcm"])
        ),
        row(
            "Released → our finalizer off p50 / p99 (s, ours)",
            "-",
            lambda r: _p(r["released_to_finalizer_off_s"]),
        ),
        row(
            "finalizer off → PV gone p50 / p99 (s, KCM)",
            "-",
            lambda r: _p(r["finalizer_off_to_gone_s_kcm"]),
        ),
        row("requests per provision", audited("provision"), requests("provision")),
        row("requests per release", audited("release"), requests("release")),
        row(
            f"requests per resync ({result['claims']} claims held)",
            "-",
            requests("resync"),
        ),
        row(
            "claims/s to PV vs ceiling",
            "100%" if claims_best else "-",
            lambda r: _ratio(r["claims_per_s_to_pv"], claims_best),
            lambda r: _ratio(r["claims_per_s_to_pv"], claims_best),
        ),
        row(
            "claims/s to PV vs the bare provisioner",
            "-",
            lambda r: _ratio(r["claims_per_s_to_pv"], (yardstick or {}).get("claims_per_s_to_pv")),
            lambda r: "100%",
        ),
        row(
            "deletes/s vs ceiling",
            "100%" if deletes_best else "-",
            lambda r: _ratio(r["deletes_per_s_to_pv_gone"], deletes_best),
        ),
        row(
            "deletes/s vs KCM's Released/s (the bound)",
            "-",
            lambda r: _ratio(r["deletes_per_s_to_pv_gone"], r["released_per_s_kcm"]),
        ),
        row(
            "CPU ms per claim until every PV exists: " + " / ".join(CPU_COLUMNS),
            "-",
            lambda r: _cpu(r, "provision", "every PV"),
            lambda r: _cpu(r, "provision", "every PV"),
        ),
        row(
            "CPU ms per claim, provisioning until quiet: " + " / ".join(CPU_COLUMNS),
            "-",
            lambda r: _cpu(r, "provision", "settled"),
        ),
        row(
            "CPU ms per claim, release until quiet: " + " / ".join(CPU_COLUMNS),
            "-",
            lambda r: _cpu(r, "release", "settled"),
        ),
        row(
            "peak RSS (MiB, VmHWM)",
            "-",
            lambda r: f"{max(r['peak_rss_kib'].values()) / 1024:.0f}",
        ),
    ]
    return "\n".join(lines)


def markdown_requests(run: dict[str, Any]) -> str:
    """One run's requests by verb and resource: per claim (provision, release), per resync."""
    phases = ("provision", "release", "resync")
    found = {phase: run["requests"][phase] for phase in phases}
    keys = sorted({k for f in found.values() for k in f.get("requests", {})})
    election = sorted(
        {k for f in found.values() for k in f.get("leader_election_not_in_total", {})}
    )
    lines = [
        f"| {run['label']}: requests | per provision | per release | per resync |",
        "|---|---|---|---|",
    ]

    def cells(section: str, key: str) -> str:
        """Each phase's ``section[key]`` (``total``: its total), per claim or per resync."""
        values = []
        for phase in phases:
            if found[phase].get("total") is None:
                values.append("-")
                continue
            value = found[phase]["total"] if key == "total" else found[phase][section].get(key, 0)
            values.append(_per(value))
        return " | ".join(values)

    lines += [f"| {k} | {cells('requests', k)} |" for k in keys]
    lines.append(f"| **total** | {cells('requests', 'total')} |")
    lines += [
        f"| leader election, not in total: {k} | {cells('leader_election_not_in_total', k)} |"
        for k in election
    ]
    failures = []
    for phase in phases:
        for what, count in found[phase].get("not_2xx_counts", {}).items():
            failures.append(f"{phase}: {what}: {count}")
    lines.append(f"| not 2xx (counts) | {'; '.join(failures) or 'none'} | | |")
    return "\n".join(lines)


def _compact(requests: dict[str, float]) -> str:
    return ", ".join(f"{key} {_per(value)}" for key, value in requests.items()) or "none"


def print_report(result: dict[str, Any]) -> None:
    machine = result["machine"]
    print(
        f"\n## make bench: {result['claims']} claims per run, one control plane "
        f"(kube {result['kubernetes']}), {machine['cores']} cores, load average "
        f"{machine['load_before']} before, {machine['load_after']} after\n"
    )
    print(markdown(result))
    print(
        "\n- claims/s: claims / (last PV seen - first create sent); to Bound adds "
        "kube-controller-manager's binder (PV → Bound). deletes/s: claims / (last PV gone - "
        "first delete sent), bounded by KCM marking PVs Released. Times: bench's watch arrivals."
        f"\n- requests: audit log, ResponseComplete of {audit.SA_USER}, by time received within "
        "each phase's window (until quiet); per claim, per resync; leader election apart."
        "\n- bare provisioner: tests/bench/bare.py (one raw watch, PV + 2 Events per claim from 16"
        " threads; no kopf, cache, queue, filesystem, retries or election): what this machine"
        " allows once the claims' own creation, KCM's reaction and the watch share it."
        "\n- CPU: user+system time of each process (/proc/PID/stat) from the phase's first request"
        f" to the mark, less its idle rate over {IDLE_SAMPLE:.0f} s just before, per claim; "
        "KCM = kube-controller-manager (the binder, pv-protection, garbage collection)."
        "\n- settings: "
        + "; ".join(
            f"{run['label']}: {' '.join(f'{k}={v}' for k, v in run['env'].items()) or 'none set'}"
            for run in result["runs"].values()
        )
        + "; otherwise shipped defaults (WORKERS 16, EVENTS_QPS etc.), LOG_LEVEL=INFO."
        "\n- for reference (not measured here): nfs-subdir-external-provisioner at QPS 5/10 with"
        " 300 claims: 2.03 claims/s, 1.99 deletes/s."
        f"\n- `*`: still sending when the window was closed ({SETTLE_LIMIT:.0f} s after the last "
        "object was done)."
    )
    top = result.get("ceiling")
    if top:
        each = ", ".join(
            f"{c['threads']} threads: {c['claims_per_s']} claims/s, {c['deletes_per_s']} deletes/s"
            for c in top["all"]
        )
        failed = [c["not_2xx_counts"] for c in top["all"] if c["not_2xx_counts"]]
        audited = top["requests"]
        print(
            f"- ceiling: {each}{'; not 2xx: ' + str(failed) if failed else ''}. Audited per claim:"
            f" {_compact(audited['provision']['requests'])}; per delete: "
            f"{_compact(audited['release']['requests'])}."
        )
    for run in result["runs"].values():
        windows = run["windows"]
        print(
            f"\n{markdown_requests(run)}\n\nwindows: provision {windows['provision']['seconds']} s,"
            f" release {windows['release']['seconds']} s, resync "
            f"{windows['resync']['seconds']} s with {windows['resync']['resyncs']} resyncs"
            f" (RESYNC_PERIOD={RESYNC_PERIOD}); peak RSS KiB by phase {run['peak_rss_kib']}"
        )
        profile = run.get("profile")
        if profile:
            areas = ", ".join(f"{area} {share}%" for area, share in profile["areas"].items())
            print(
                f"\npy-spy, {run['label']}, provisioning ({profile['samples']} samples, by the "
                f"innermost frame): {areas}\n"
                + "\n".join(f"  {share:5.1f}%  {leaf}" for leaf, share in profile["top"])
            )
    print(f"\nwatch re-lists (milestones late): {result['watch_relists']}")


# --------------------------------------------------------------------------- orchestration


def setup(plane: ControlPlane, work: Path, claims: int) -> Bench:
    kubectl(plane, "apply", "-k", str(REPO / "rbac"))
    storage_class = {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {"name": CLASS},
        "provisioner": PROVISIONER,
        "parameters": {"archiveOnDelete": "false"},
    }
    kubectl(plane, "apply", "-f", "-", stdin=json.dumps(storage_class))
    export = work / "export"
    export.mkdir()
    sa = plane.service_account_kubeconfig(audit.SA_NAMESPACE, audit.SA_NAME, work / "sa")
    base_env = {k: v for k, v in os.environ.items() if k not in PROVISIONER_ENV}
    base_env |= {
        "KUBECONFIG": str(sa),
        "PROVISIONER_NAME": PROVISIONER,
        "NFS_SERVER": "nfs.bench.local",
        "NFS_PATH": "/exports",
        "NFS_MOUNT_PATH": str(export),
        "POD_NAMESPACE": audit.SA_NAMESPACE,
        "HTTP_ADDRESS": "127.0.0.1:0",
        "LOG_LEVEL": "INFO",
    }
    assert plane.audit_log is not None
    admin = RawApi(plane.admin_kubeconfig, pool=CLIENT_THREADS + 4)
    return Bench(
        plane=plane,
        work=work,
        admin=admin,
        sa_kubeconfig=sa,
        audit_log=audit.AuditLog(plane.audit_log),
        watcher=Watcher(admin),
        base_env=base_env,
        claims=claims,
    )


def measure_ceiling(bench: Bench) -> dict[str, Any]:
    namespace = "bench-ceiling"
    bench.admin.call("POST", "/api/v1/namespaces", {"metadata": {"name": namespace}})
    print(f"bench: ceiling: {bench.claims} claims with {ceiling.THREADS} threads", file=sys.stderr)
    best_claims, best_deletes, runs = ceiling.measure_best(
        bench.sa_kubeconfig, namespace, bench.claims
    )
    # The instrument checks itself: the audit log must count what the bare client sent.
    bench.audit_log.poll()
    audited = {
        phase: audit.breakdown(bench.audit_log.between(*best.windows[phase])).as_dict(bench.claims)
        for phase, best in (("provision", best_claims), ("release", best_deletes))
    }
    return {
        "claims": best_claims.as_dict(),
        "deletes": best_deletes.as_dict(),
        "all": [run.as_dict() for run in runs],
        "requests": audited,
    }


def measure_bare(bench: Bench) -> dict[str, Any]:
    """bare.py in a run's place: claims created at once, until every PV exists. Run last: it
    leaves its claims and PVs (Retain) to the control plane's end."""
    namespace = "bench-bare"
    bench.admin.call("POST", "/api/v1/namespaces", {"metadata": {"name": namespace}})
    print(f"bench: bare provisioner: {bench.claims} claims", file=sys.stderr)
    provisioner = BareProvisioner(bench.base_env, {}, bench.work / "bare.log")
    spec = RunSpec("bare", "bare provisioner", {})
    measured: dict[str, Any] = {}
    try:
        provisioner.start(bench.audit_log)
        with bench.measured(provisioner, spec, "provision", measured) as meter:
            started = time.time()
            created = create_claims(
                bench.admin, namespace, [f"c{i:05d}" for i in range(bench.claims)]
            )
            uids = list(created)
            last_volume = wait_all(
                "every PV", bench.watcher.timeline.volume, uids, bench.wait_timeout(), provisioner
            )
            meter.mark("every PV")
    finally:
        provisioner.stop()
    line = bench.watcher.timeline
    return {
        "claims_per_s_to_pv": round(bench.claims / (last_volume - started), 2),
        "claim_to_pv_s": percentiles([line.volume[u] - created[u] for u in uids]),
        "cpu_ms_per_provision": {
            key: value
            for key, value in measured["cpu_ms_per_provision"].items()
            if key != "settled"
        },
    }


def run(
    claims: int,
    names: Sequence[str],
    out_dir: Path,
    keep: Path | None,
    profile: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    specs = [spec for spec in RUNS if spec.name in names]
    load_before = os.getloadavg()
    with contextlib.ExitStack() as stack:
        if keep is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nfs-bench-")))
        else:
            work = keep.absolute()
            work.mkdir(parents=True)
        policy = work / "audit-policy.yaml"
        policy.write_text(audit.POLICY)
        plane = ControlPlane(
            work / "controlplane", resolve_binaries(build=True), audit_policy=policy
        )
        plane.start()
        try:
            bench = setup(plane, work, claims)
            bench.profile = profile
            try:
                top = measure_ceiling(bench) if "ceiling" in names else None
                bench.watcher.start()
                runs = {}
                for spec in specs:
                    runs[spec.name] = run_one(bench, spec)
                yardstick = measure_bare(bench) if "bare" in names else None
            finally:
                bench.watcher.stop()
                bench.admin.close()
        finally:
            plane.stop()
    result: dict[str, Any] = {
        "claims": claims,
        "kubernetes": pinned_versions()[0],
        "machine": {
            "cores": os.cpu_count(),
            "load_before": [round(x, 2) for x in load_before],
            "load_after": [round(x, 2) for x in os.getloadavg()],
        },
        "ceiling": top,
        "bare": yardstick,
        "runs": runs,
        "watch_relists": bench.watcher.timeline.relists,
        "settings": {
            "workers": "16 (default)",
            "quiet_s": QUIET,
            "resync_period_of_the_resync_phase_s": RESYNC_PERIOD,
        },
    }
    out_dir.mkdir(exist_ok=True)
    path = out_dir / f"provision-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    result["written_to"] = str(path)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--claims", type=int, default=300, help="claims per run (default 300)")
    parser.add_argument(
        "--runs",
        default=",".join(["ceiling", *(spec.name for spec in RUNS), "bare"]),
        help="comma-separated subset of: ceiling, "
        + ", ".join(spec.name for spec in RUNS)
        + ", bare (run last whatever the order)",
    )
    parser.add_argument(
        "--profile",
        default="",
        help="comma-separated runs whose provisioning py-spy records and summarises (needs the"
        " bench extra), e.g. qps1000",
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench-results")
    parser.add_argument(
        "--keep",
        type=Path,
        help="a new directory to work in and keep (logs, audit log) instead of a temporary one",
    )
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.runs.split(",") if name.strip()]
    known = {"ceiling", "bare", *(spec.name for spec in RUNS)}
    if unknown := sorted(set(names) - known):
        parser.error(f"unknown run(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    started = time.monotonic()
    profile = frozenset(name.strip() for name in args.profile.split(",") if name.strip())
    if unknown := sorted(profile - known):
        parser.error(f"--profile: unknown run(s) {', '.join(unknown)}")
    result = run(args.claims, names, args.out, args.keep, profile)
    print_report(result)
    print(f"\nwritten to {result['written_to']} in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
