"""Leader election, metrics and probes against the real control plane (SPEC §8, §9).

Failover times are printed (run with `-s` to see them) and never asserted: speed is measured,
not tested.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from tests.faults import FaultRule, write_fault_rules
from tests.integration.conftest import SA_NAMESPACE, StartProvisioner, StorageClasses
from tests.integration.harness import (
    Kube,
    ProvisionerProcess,
    claim,
    unique,
    wait_for,
)

pytestmark = pytest.mark.integration

ANNOTATION = "control-plane.alpha.kubernetes.io/leader"


def identity_of(process: ProvisionerProcess) -> str:
    match = re.search(r"starting as (\S+):", process.logs())
    assert match, process.logs()
    return match.group(1)


def holder(admin: Kube, kind: str, lock_name: str) -> str | None:
    obj = admin.get(kind, lock_name, SA_NAMESPACE)
    if obj is None:
        return None
    if kind == "lease":
        return obj.get("spec", {}).get("holderIdentity") or None
    raw = obj["metadata"].get("annotations", {}).get(ANNOTATION)
    return json.loads(raw).get("holderIdentity") or None if raw else None


def provisioned_by(process: ProvisionerProcess, claim_name: str) -> bool:
    return re.search(rf"claim \S+/{claim_name}: provisioned volume", process.logs()) is not None


def wait_provisioned_by(process: ProvisionerProcess, claim_name: str) -> None:
    """Wait for ``process`` to log that it provisioned ``claim_name``.

    The claim can turn Bound a moment before the provisioner's own log line lands: the
    controller-manager binds as soon as the PersistentVolume exists, and on a loaded machine the
    provisioner's event loop may not have resumed after its create call yet.
    """
    wait_for(
        f"{process.name} to log provisioning {claim_name}",
        lambda: provisioned_by(process, claim_name),
        timeout=30,
    )


@pytest.mark.parametrize(
    ("lock", "kind", "stop"),
    [
        pytest.param("endpoints", "endpoints", "SIGKILL", id="endpoints-sigkill"),
        pytest.param("leases", "lease", "SIGTERM", id="leases-sigterm"),
        pytest.param("endpointsleases", "endpoints", "SIGTERM", id="endpointsleases-sigterm"),
    ],
)
def test_only_the_leader_provisions_and_a_standby_takes_over(
    admin: Kube,
    provisioner: StartProvisioner,
    namespace: str,
    tmp_path: Path,
    lock: str,
    kind: str,
    stop: str,
    storage_classes: StorageClasses,
) -> None:
    name = f"test.nfs.io/{unique('elect')}"
    lock_name = name.replace("/", "-")
    env = {"ENABLE_LEADER_ELECTION": "true", "LEADER_ELECTION_LOCK": lock}
    first = provisioner(name=name, **env)
    wait_for("a leader", lambda: holder(admin, kind, lock_name), timeout=60)
    second = provisioner(name=name, export=first.export, **env)
    processes = {identity_of(p): p for p in (first, second)}
    leader_id = wait_for("a leader", lambda: holder(admin, kind, lock_name))
    leader = processes[leader_id]
    standby = second if leader is first else first

    class_name = storage_classes(name, prefix="elect")
    admin.apply(claim("one", namespace, class_name))
    admin.wait_phase("pvc", "one", "Bound", namespace)
    wait_provisioned_by(leader, "one")
    assert not provisioned_by(standby, "one")

    # The standby's cache is warm, but it queues nothing until it leads: its queue-depth
    # metric is not the size of the cluster.
    def standby_cached_it() -> dict[str, float] | None:
        samples = scrape(standby)
        return samples if samples.get('nfs_provisioner_watched_objects{kind="claim"}') else None

    standby_samples = wait_for("the standby to cache the claim", standby_cached_it)
    assert standby_samples["nfs_provisioner_leader"] == 0
    assert standby_samples["nfs_provisioner_queue_depth"] == 0

    if kind == "endpoints":
        obj = admin.get("endpoints", lock_name, SA_NAMESPACE)
        assert obj is not None
        record = json.loads(obj["metadata"]["annotations"][ANNOTATION])
        assert set(record) == {
            "holderIdentity",
            "leaseDurationSeconds",
            "acquireTime",
            "renewTime",
            "leaderTransitions",
        }
        assert record["leaseDurationSeconds"] == 15
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", record["renewTime"])
    if lock == "endpointsleases":
        assert holder(admin, "lease", lock_name) == leader_id
    events = [e for e in admin.events(SA_NAMESPACE, lock_name) if e["reason"] == "LeaderElection"]
    assert f"{leader_id} became leader" in [e["message"] for e in events]

    started = time.monotonic()
    if stop == "SIGKILL":
        leader.kill()
    else:
        assert leader.stop() == 0
    standby_id = identity_of(standby)
    wait_for(
        "the standby to take over",
        lambda: holder(admin, kind, lock_name) == standby_id,
        timeout=60,
    )
    failover = time.monotonic() - started
    admin.apply(claim("two", namespace, class_name))
    admin.wait_phase("pvc", "two", "Bound", namespace)
    wait_provisioned_by(standby, "two")
    print(f"FAILOVER lock={lock} stop={stop}: standby holds the lock after {failover:.1f} s")


def scrape(process: ProvisionerProcess) -> dict[str, float]:
    status, body = process.get("/metrics")
    assert status == 200
    samples: dict[str, float] = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


def test_metrics_count_provisions_and_deletes_per_class(
    admin: Kube, provisioner: StartProvisioner, namespace: str, storage_classes: StorageClasses
) -> None:
    process = provisioner()
    classes = [
        storage_classes(process.name, {"onDelete": "delete"}, prefix=prefix)
        for prefix in ("m-a", "m-b")
    ]
    admin.apply(
        "\n---\n".join(
            [claim(f"a{i}", namespace, classes[0]) for i in range(3)]
            + [claim("b0", namespace, classes[1])]
        )
    )
    for name in ("a0", "a1", "a2", "b0"):
        admin.wait_phase("pvc", name, "Bound", namespace)
    admin.run("delete", "pvc", "a0", "a1", "-n", namespace, "--wait=false")

    def deletes_counted() -> dict[str, float] | None:
        samples = scrape(process)
        key = f'controller_persistentvolume_delete_total{{class="{classes[0]}"}}'
        return samples if samples.get(key) == 2 else None

    samples = wait_for("2 deletes counted", deletes_counted)
    a, b = classes
    assert samples[f'controller_persistentvolumeclaim_provision_total{{class="{a}"}}'] == 3
    assert samples[f'controller_persistentvolumeclaim_provision_total{{class="{b}"}}'] == 1
    assert f'controller_persistentvolume_delete_total{{class="{b}"}}' not in samples
    assert (
        samples[f'controller_persistentvolumeclaim_provision_duration_seconds_count{{class="{a}"}}']
        == 3
    )
    assert samples["nfs_provisioner_leader"] == 1
    assert samples['nfs_provisioner_watched_objects{kind="claim"}'] >= 2
    assert any(k.startswith("nfs_provisioner_filesystem_call_duration_seconds") for k in samples)


def test_readyz_flips_when_the_mount_becomes_unwritable(
    provisioner: StartProvisioner, tmp_path: Path
) -> None:
    faults = tmp_path / "faults.json"
    process = provisioner(NFS_PROVISIONER_UNSAFE_FAULTS_FILE=str(faults))
    assert process.get("/readyz") == (200, "ok\n")
    assert process.get("/healthz") == (200, "ok\n")
    write_fault_rules(
        faults, [FaultRule(op="open", match=".nfs-provisioner-probe-", errno="EROFS")]
    )

    def unready() -> str | None:
        status, body = process.get("/readyz")
        return body if status == 503 else None

    body = wait_for("/readyz to fail", unready, timeout=30)
    assert "not ready: export:" in body
    assert "read-only" in body
    assert process.get("/healthz")[0] == 200  # alive, just not ready
    write_fault_rules(faults, [])
    wait_for("/readyz to recover", lambda: process.get("/readyz")[0] == 200, timeout=30)
