"""SPEC §11 "API server restarts / watch expires (410)": watches resume, nothing lost or duplicated.

kube-apiserver of the session's control plane is restarted (same argv, port and etcd) under a
running provisioner. Afterwards every watched resource has to be seen again: new claims (claim
watch), a new StorageClass (class watch) and a released volume (volume watch); the periodic
resync only re-queues what the watches put in the cache, so it cannot stand in for them.

A restarted apiserver fills its watch cache at the current etcd revision, so a watch resumed at
a resourceVersion from before the restart (all the provisioner can hold) is answered with an
ERROR event, code 410 ("too old resource version"). The test checks that answer for a version
read just before the restart: the restart exercises kopf's re-list on 410, not only its
reconnect. kopf logs that branch at DEBUG, which the provisioner's logging caps at WARNING, so
it is not visible in the provisioner's log. Right after the restart the apiserver may also
answer 403 for a moment (its RBAC caches are still filling); kopf retries those.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from controlplane.binaries import KUBE_APISERVER, KUBE_CONTROLLER_MANAGER
from controlplane.runner import ControlPlane
from tests.integration.conftest import StartProvisioner, StorageClasses
from tests.integration.harness import (
    Kube,
    claim,
    claims_resource_version,
    entries,
    wait_for,
    wait_for_410_after_restart,
)

pytestmark = pytest.mark.integration

N = 5  # claims created after the restart
WAIT = 120  # seconds: the provisioner's reconnect backoff grows to 21 s while the server is down


def _heal(control_plane: ControlPlane, server: str) -> None:
    """Leave the shared control plane running at the same address, whatever happened here.

    restart() also starts a component that is down; etcd is never touched by this test.
    """
    for component in (KUBE_APISERVER, KUBE_CONTROLLER_MANAGER):
        if not control_plane.is_running():
            control_plane.restart(component)
    assert control_plane.is_running(), control_plane.logs_tail()
    assert control_plane.server == server


def _volumes_of(admin: Kube, provisioner_name: str) -> list[dict[str, Any]]:
    return [
        pv
        for pv in admin.items("pv")
        if pv["metadata"].get("annotations", {}).get("pv.kubernetes.io/provisioned-by")
        == provisioner_name
    ]


def test_apiserver_restart_resumes_watches_and_loses_or_duplicates_nothing(
    admin: Kube,
    provisioner: StartProvisioner,
    namespace: str,
    control_plane: ControlPlane,
    tmp_path: Path,
    storage_classes: StorageClasses,
) -> None:
    server = control_plane.server
    export = tmp_path / "export"
    process = provisioner()
    assert process.process is not None
    params = {"onDelete": "delete"}
    try:
        before_class = storage_classes(process.name, params, prefix="restart")
        admin.apply(claim("first", namespace, before_class))
        first = admin.wait_phase("pvc", "first", "Bound", namespace, timeout=WAIT)
        first_pv = first["spec"]["volumeName"]
        first_dir = export / f"{namespace}-first-{first_pv}"
        assert first_dir.is_dir()
        # Its Event is posted just after the PV is saved; let it land before the server goes down.
        admin.wait_event(namespace, "first", "ProvisioningSucceeded", timeout=WAIT)
        old_rv = claims_resource_version(admin)
        control_plane.restart(KUBE_APISERVER)  # nothing is created while it is down
        assert control_plane.server == server
        # What a watch resumed from before the restart gets: 410 Gone, so kopf has to re-list.
        wait_for_410_after_restart(admin, old_rv, timeout=WAIT)

        after_class = storage_classes(process.name, params, prefix="after-restart")
        classes = [before_class, after_class]
        names = [f"c{i}" for i in range(N)]
        admin.apply(
            "\n---\n".join(claim(n, namespace, classes[i % 2]) for i, n in enumerate(names))
        )
        admin.run("delete", "pvc", "first", "-n", namespace, "--wait=false")

        def all_bound() -> list[dict[str, Any]] | None:
            claims = admin.items("pvc", namespace)  # "first" included until it is gone
            bound = all(c.get("status", {}).get("phase") == "Bound" for c in claims)
            return (
                claims if bound and sorted(c["metadata"]["name"] for c in claims) == names else None
            )

        claims = wait_for(f"{N} new claims Bound and the first one gone", all_bound, WAIT)
        admin.wait_gone("pv", first_pv, timeout=WAIT)
        wait_for(f"{first_dir.name} to be removed", lambda: not first_dir.exists(), WAIT)

        expected_dirs = {
            f"{namespace}-{c['metadata']['name']}-pvc-{c['metadata']['uid']}" for c in claims
        }
        assert {p.name for p in entries(export)} == expected_dirs  # one each, no orphans
        volumes = _volumes_of(admin, process.name)
        assert sorted(pv["spec"]["claimRef"]["uid"] for pv in volumes) == sorted(
            c["metadata"]["uid"] for c in claims
        )  # one PV per live claim, none twice
        for c in claims:
            assert c["spec"]["volumeName"] == f"pvc-{c['metadata']['uid']}"
        # The re-list after the restart provisioned nothing twice, the first claim included.
        # (A claim's Event trails its Bound phase by a moment, so wait for each one first.)
        for name in ["first", *names]:
            admin.wait_event(namespace, name, "ProvisioningSucceeded", timeout=WAIT)
            succeeded = [
                e for e in admin.events(namespace, name) if e["reason"] == "ProvisioningSucceeded"
            ]
            assert sum(e.get("count", 1) for e in succeeded) == 1, (name, succeeded)

        assert process.process.poll() is None, process.logs()[-5000:]
        wait_for("the provisioner to be ready", process.ready, timeout=WAIT)
    finally:
        _heal(control_plane, server)
