"""Where a claim's CPU goes: per-process CPU time around a phase, and a py-spy profile.

``CpuMeter`` reads user+system time of named processes (the provisioner, kube-apiserver, etcd,
kube-controller-manager) from ``/proc/<pid>/stat`` at the start and end of a window, so the
bench can print milliseconds of CPU per claim for each of them: on a small machine the control
plane and the provisioner share the cores, and what the provisioner spends is what the API
server cannot. ``Profile`` attaches ``py-spy record --gil`` (the ``bench`` extra; only the
thread holding the GIL is sampled, so waiting in epoll or in a blocking syscall is not counted)
to the provisioner for one window and sums its samples by where the innermost frame is: the
framework (kopf), the event loop and thread hand-offs, our code, the HTTP client and JSON,
logging, and the rest.
Figures only: nothing here asserts.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")

AREAS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("kopf", ("kopf/",)),
    ("our code", ("provisioner/",)),
    ("HTTP client, JSON", ("aiohttp/", "urllib3/", "kubernetes/", "json/", "http/", "ssl.py")),
    ("logging", ("logging/",)),
    ("event loop, threads", ("asyncio/", "concurrent/", "threading.py", "selectors.py")),
)
"""Areas by the innermost frame's file; the first match wins, anything else is "other"."""


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far (0.0 once it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


class CpuMeter:
    """CPU seconds each named process spent from ``start()`` to each ``mark()``, net of what it
    spends idle (measured by ``idle()`` just before: lease renewals, watches, timers)."""

    def __init__(self, pids: Mapping[str, int]) -> None:
        self.pids = dict(pids)
        self.idle_rate: dict[str, float] = dict.fromkeys(self.pids, 0.0)
        self._start: tuple[float, dict[str, float]] = (0.0, {})
        self.marks: dict[str, tuple[float, dict[str, float]]] = {}

    def _now(self) -> tuple[float, dict[str, float]]:
        return time.monotonic(), {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def idle(self, seconds: float) -> None:
        """Each process's CPU per second while nothing is asked of it."""
        began, before = self._now()
        time.sleep(seconds)
        ended, after = self._now()
        self.idle_rate = {name: (after[name] - before[name]) / (ended - began) for name in after}

    def start(self) -> None:
        self._start = self._now()

    def mark(self, label: str) -> None:
        self.marks[label] = self._now()

    def per(self, count: int) -> dict[str, dict[str, float]]:
        """For each mark: milliseconds of CPU per item (claim, release) for each process."""
        began, before = self._start
        found = {}
        for label, (at, after) in self.marks.items():
            spent = {
                name: after[name] - before[name] - self.idle_rate[name] * (at - began)
                for name in after
            }
            found[label] = {name: round(1000 * cpu / count, 2) for name, cpu in spent.items()}
        found["idle_percent"] = {name: round(100 * r, 1) for name, r in self.idle_rate.items()}
        return found


def py_spy() -> str | None:
    """The py-spy of this interpreter's environment, else one on PATH."""
    local = Path(sys.executable).with_name("py-spy")
    return str(local) if local.exists() else shutil.which("py-spy")


@dataclass
class Summary:
    samples: int
    areas: dict[str, float]
    """Share of samples (percent) by area of the innermost frame."""
    top: list[tuple[str, float]]
    """The innermost functions with the most samples, percent each."""


class Profile:
    """``py-spy record`` attached to ``pid`` from ``start()`` until ``stop()``."""

    def __init__(self, pid: int, output: Path, rate: int = 250) -> None:
        self.pid = pid
        self.output = output
        self.rate = rate
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = py_spy()
        if binary is None:
            raise SystemExit("bench --profile: py-spy is missing (pip install -e '.[bench]')")
        self._process = subprocess.Popen(
            [
                *(binary, "record", "--pid", str(self.pid), "--rate", str(self.rate)),
                *("--format", "raw", "--output", str(self.output), "--nonblocking", "--gil"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        time.sleep(0.5)  # attached before the window's work begins
        if self._process.poll() is not None:
            error = self._process.stderr.read().decode() if self._process.stderr else ""
            raise SystemExit(f"bench --profile: py-spy did not attach: {error.strip()}")

    def stop(self) -> Summary | None:
        if self._process is None:
            return None
        self._process.send_signal(signal.SIGINT)
        try:
            self._process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None
        return summarize(self.output) if self.output.exists() else None


def _leaf(stack: str) -> str:
    """The innermost frame of one collapsed stack: ``function (file:line)``."""
    return stack.rsplit(";", 1)[-1]


def area_of(frame: str) -> str:
    for area, markers in AREAS:
        if any(marker in frame for marker in markers):
            return area
    return "other"


def summarize(raw: Path, top: int = 12) -> Summary:
    """Sum py-spy's collapsed stacks (``frame;frame;... count``) by area and by function."""
    areas: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        leaf = _leaf(stack)
        total += count
        areas[area_of(leaf)] += count
        leaves[leaf.split(":")[0] + ")" if ":" in leaf else leaf] += count

    def share(count: int) -> float:
        return round(100 * count / total, 1) if total else 0.0

    return Summary(
        samples=total,
        areas={area: share(count) for area, count in areas.most_common()},
        top=[(leaf, share(count)) for leaf, count in leaves.most_common(top)],
    )
