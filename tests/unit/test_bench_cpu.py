"""The bench's CPU instruments (tests/bench/cpu.py): the arithmetic and the profile summary.

The bench reports figures and asserts none; these tests check that what it reports is computed
as its legend says (idle subtracted, per item; samples grouped by the innermost frame).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.bench import cpu


def test_cpu_seconds_of_this_process_grows_with_work() -> None:
    before = cpu.cpu_seconds(os.getpid())
    deadline = cpu.cpu_seconds(os.getpid()) + 0.05
    while cpu.cpu_seconds(os.getpid()) < deadline:
        sum(range(10_000))
    assert cpu.cpu_seconds(os.getpid()) >= before + 0.05


def test_cpu_seconds_of_a_missing_process_is_zero() -> None:
    assert cpu.cpu_seconds(2**22 + 12345) == 0.0


def test_per_item_subtracts_the_idle_rate_over_the_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    readings = iter(
        [
            (100.0, {"a": 10.0, "b": 1.0}),  # start
            (110.0, {"a": 12.5, "b": 1.0}),  # mark: 10 s later
        ]
    )
    meter = cpu.CpuMeter({"a": 1, "b": 2})
    monkeypatch.setattr(meter, "_now", lambda: next(readings))
    meter.idle_rate = {"a": 0.05, "b": 0.0}  # 5 % of a core while idle
    meter.start()
    meter.mark("done")
    found = meter.per(100)
    # a: 2.5 s spent, 0.5 s of it idle -> 2.0 s over 100 items = 20 ms each
    assert found["done"] == {"a": 20.0, "b": 0.0}
    assert found["idle_percent"] == {"a": 5.0, "b": 0.0}


def test_summary_groups_samples_by_the_innermost_frame(tmp_path: Path) -> None:
    raw = tmp_path / "raw.txt"
    raw.write_text(
        "main (provisioner/__main__.py:10);process (kopf/_core/reactor/processing.py:80) 6\n"
        "main (provisioner/__main__.py:10);decide (provisioner/core.py:300) 3\n"
        "main (provisioner/__main__.py:10);loads (json/__init__.py:346) 1\n"
        "garbage line\n"
    )
    summary = cpu.summarize(raw)
    assert summary.samples == 10
    assert summary.areas == {"kopf": 60.0, "our code": 30.0, "HTTP client, JSON": 10.0}
    assert summary.top[0] == ("process (kopf/_core/reactor/processing.py)", 60.0)


def test_an_unknown_frame_is_other() -> None:
    assert cpu.area_of("select (<built-in>)") == "other"
