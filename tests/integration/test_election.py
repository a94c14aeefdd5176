"""Leader election against the real control plane: SIGTERM hands the lock over, a lost lock
ends the process (SPEC §8). test_observability.py covers failover of provisioning itself.

Nothing here measures how fast the test runs: the release is proved by the lock record alone
(the standby's acquireTime lies before the old lease could have expired).
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest

from tests.integration.conftest import SA_NAMESPACE, StartProvisioner
from tests.integration.harness import Kube, ProvisionerProcess, unique, wait_for
from tests.integration.test_observability import identity_of

pytestmark = pytest.mark.integration

LONG_LEASE = {"LEASE_DURATION": "60", "RENEW_DEADLINE": "40", "RETRY_PERIOD": "2"}


def lease_spec(admin: Kube, lock_name: str) -> dict[str, Any]:
    obj = admin.get("lease", lock_name, SA_NAMESPACE)
    return dict(obj.get("spec") or {}) if obj else {}


def parse_time(raw: str) -> dt.datetime:
    return dt.datetime.fromisoformat(raw.replace("Z", "+00:00"))


def test_sigterm_releases_the_lock_so_a_standby_takes_over_before_the_lease_ends(
    admin: Kube, provisioner: StartProvisioner
) -> None:
    name = f"test.nfs.io/{unique('release')}"
    lock_name = name.replace("/", "-")
    env = {"ENABLE_LEADER_ELECTION": "true", "LEADER_ELECTION_LOCK": "leases", **LONG_LEASE}
    leader = provisioner(name=name, **env)
    leader_id = identity_of(leader)
    wait_for(
        "the first replica to lead",
        lambda: lease_spec(admin, lock_name).get("holderIdentity") == leader_id,
        timeout=60,
    )
    standby = provisioner(name=name, export=leader.export, **env)
    standby_id = identity_of(standby)
    assert lease_spec(admin, lock_name)["holderIdentity"] == leader_id

    before = lease_spec(admin, lock_name)
    assert before["leaseDurationSeconds"] == 60
    last_renewal_seen = parse_time(before["renewTime"])
    assert leader.stop() == 0
    assert "released the lock" in leader.logs()

    after = wait_for(
        "the standby to acquire the lock",
        lambda: (spec := lease_spec(admin, lock_name)).get("holderIdentity") == standby_id and spec,
        timeout=120,
    )
    acquired = parse_time(after["acquireTime"])
    # Without the release the standby could only acquire once it had seen the record
    # unchanged for 60 s, i.e. after the leader's last renewal (>= the one we read) + 60 s.
    assert acquired < last_renewal_seen + dt.timedelta(seconds=60), (before, after)
    assert after["leaseTransitions"] == before["leaseTransitions"] + 1
    assert after["leaseDurationSeconds"] == 60


def overwrite_lease(admin: Kube, lock_name: str, holder: str) -> None:
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    patch = {
        "spec": {
            "holderIdentity": holder,
            "leaseDurationSeconds": 3600,
            "acquireTime": now,
            "renewTime": now,
        }
    }
    admin.run(
        "patch", "lease", lock_name, "-n", SA_NAMESPACE, "--type=merge", "-p", json.dumps(patch)
    )


def exited(process: ProvisionerProcess) -> int | None:
    assert process.process is not None
    return process.process.poll()


@pytest.mark.parametrize("lock", ["leases", "endpointsleases"])
def test_a_lost_lock_ends_the_process_with_exit_1(
    admin: Kube, provisioner: StartProvisioner, lock: str
) -> None:
    """An admin hands the Lease to someone else while ours leads. With ``endpointsleases`` only
    the Lease changes: the records then disagree, so the leader is unknown and ours must stop
    (it must not go on leading on the Endpoints record alone and write the Lease back)."""
    name = f"test.nfs.io/{unique('lost')}"
    lock_name = name.replace("/", "-")
    env = {
        "ENABLE_LEADER_ELECTION": "true",
        "LEADER_ELECTION_LOCK": lock,
        "LEASE_DURATION": "8",
        "RENEW_DEADLINE": "5",
        "RETRY_PERIOD": "1",
    }
    process = provisioner(name=name, **env)
    ours = identity_of(process)
    wait_for(
        "ours to lead on the Lease",
        lambda: lease_spec(admin, lock_name).get("holderIdentity") == ours,
        timeout=60,
    )
    overwrite_lease(admin, lock_name, "intruder")

    code = wait_for("the provisioner to exit", lambda: exited(process), timeout=60)
    assert code == 1
    logs = process.logs()
    assert f"{ours} could not renew lock {SA_NAMESPACE}/{lock_name}" in logs
    assert "exiting with code 1" in logs
    assert lease_spec(admin, lock_name)["holderIdentity"] == "intruder"  # never written back
