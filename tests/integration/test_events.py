"""Events and the failure metric under repetition: correlated Events, names for long claims,
and ``provision_failed_total`` counting attempts, not resyncs.

Each test starts its own provisioner with a StorageClass of it (the ``install`` fixture); the
hung-export test uses the fault seam (``tests/faults.py``) to make the claim's mkdir hang on every
attempt.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from typing import Any

import pytest

from tests.faults import FaultRule, write_fault_rules
from tests.integration.conftest import Install
from tests.integration.harness import Kube, ProvisionerProcess, claim, wait_for

pytestmark = pytest.mark.integration

SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def metric(process: ProvisionerProcess, name: str, labels: dict[str, str]) -> float | None:
    """One sample of ``name`` with exactly ``labels`` from /metrics; None when absent."""
    status, body = process.get("/metrics")
    assert status == 200, body
    rendered = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    for line in body.splitlines():
        sample, _, value = line.rpartition(" ")
        if sample == f"{name}{{{rendered}}}":
            return float(value)
    return None


def metric_sum(process: ProvisionerProcess, name: str) -> float:
    """The sum of every sample of ``name`` (all label values) from /metrics."""
    status, body = process.get("/metrics")
    assert status == 200, body
    return sum(
        float(line.rpartition(" ")[2]) for line in body.splitlines() if line.startswith(name + "{")
    )


def events_from(
    process: ProvisionerProcess, admin: Kube, namespace: str, name: str
) -> list[dict[str, Any]]:
    """The Events this provisioner posted about the object (not kube-controller-manager's)."""
    return [
        e
        for e in admin.events(namespace, name)
        if str(e.get("source", {}).get("component", "")).startswith(f"{process.name}_")
    ]


def test_refused_claim_with_the_longest_name_gets_its_event(
    admin: Kube, install: Install, namespace: str
) -> None:
    process, class_name = install({"onDelete": "shred"}, prefix="long")
    # 253 characters, the longest claim name the API accepts; a dot near the cut point.
    name = ("a" * 60 + ".") * 3 + "b" * 70
    assert len(name) == 253
    admin.apply(claim(name, namespace, class_name))
    message = admin.wait_event(namespace, name, "ProvisioningFailed")
    assert 'parameter onDelete="shred" is invalid' in message
    ours = events_from(process, admin, namespace, name)
    assert ours
    for event in ours:
        assert len(event["metadata"]["name"]) <= 253, event["metadata"]["name"]
        assert SUBDOMAIN.fullmatch(event["metadata"]["name"])
        assert event["metadata"]["name"].startswith(name[:100])


def test_refusal_is_counted_once_across_resyncs(
    admin: Kube, install: Install, namespace: str
) -> None:
    process, class_name = install({"archiveOnDelte": "false"}, prefix="count", RESYNC_PERIOD="2")
    admin.apply(claim("refused", namespace, class_name))
    admin.wait_event(namespace, "refused", "ProvisioningFailed")
    seen = process.logs().count("resync: re-queueing")
    # Three resyncs after the refusal: the second one's reconciles are surely done by the third.
    wait_for(
        "three resyncs after the refusal",
        lambda: process.logs().count("resync: re-queueing") >= seen + 3,
        timeout=60,
    )
    failed = metric(
        process, "controller_persistentvolumeclaim_provision_failed_total", {"class": class_name}
    )
    assert failed == 1.0, process.logs()[-5000:]
    failures = [
        e for e in admin.events(namespace, "refused") if e["reason"] == "ProvisioningFailed"
    ]
    assert len(failures) == 1
    assert failures[0].get("count", 1) == 1, "a refusal is not re-posted on resync"


def _occurrences(events: list[dict[str, Any]]) -> Counter[tuple[str, str]]:
    """How many Event objects exist per (reason, message)."""
    return Counter((str(e.get("reason")), str(e.get("message"))) for e in events)


def test_hung_export_retries_patch_one_event_instead_of_creating_many(
    admin: Kube, install: Install, namespace: str
) -> None:
    process, class_name = install(
        prefix="hung",
        faults=[FaultRule(op="mkdir", match="-hung-", effect="hang")],
        FS_TIMEOUT="1",
        RETRY_BACKOFF_BASE="0.2",
        RETRY_BACKOFF_MAX="0.5",
    )
    started = time.monotonic()  # before the claim, so before its first Event
    try:
        admin.apply(claim("hung", namespace, class_name))

        def failed_count() -> int | None:
            counts = [
                int(e.get("count") or 1)
                for e in events_from(process, admin, namespace, "hung")
                if e.get("reason") == "ProvisioningFailed"
            ]
            return max(counts) if counts and max(counts) > 3 else None

        wait_for("a ProvisioningFailed Event with count > 3", failed_count, timeout=120)
        attempts = len(re.findall(r"attempt \d+ failed", process.logs()))
        assert attempts > 3
        events = events_from(process, admin, namespace, "hung")
        occurrences = _occurrences(events)
        # One Event object per distinct reason and message, however many attempts failed.
        assert all(n == 1 for n in occurrences.values()), occurrences
        # Provisioning, and ProvisioningFailed naming the call that timed out (create_dir; or
        # inspect, once every storage thread is stuck in an earlier attempt's mkdir).
        assert len(events) <= 3, occurrences
        provisioning = [e for e in events if e["reason"] == "Provisioning"]
        assert provisioning and int(provisioning[0].get("count") or 1) > 1
        # The spam limit (burst 25 per object, then 1 per 5 minutes) ends the series; the
        # Events it holds back are counted.
        wait_for(
            "Events dropped by the spam limit",
            lambda: metric_sum(process, "nfs_provisioner_events_dropped_total") > 0,
            timeout=120,
        )
        refills = int((time.monotonic() - started) / 300) + 1
        posted = sum(
            int(e.get("count") or 1) for e in events_from(process, admin, namespace, "hung")
        )
        assert posted <= 25 + refills
    finally:
        write_fault_rules(install.faults_file, [])  # the stuck threads finish
