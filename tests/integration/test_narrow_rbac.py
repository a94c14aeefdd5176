"""The provisioner under nfs-subdir's own RBAC, on the real control plane (issue: "swap the image").

An admin who swaps the image keeps nfs-subdir's ``deploy/rbac.yaml``: a ClusterRole with PVs
get/list/watch/create/delete (no ``patch``), nothing on namespaces, and an Endpoints Role for
the leader lock. Applied rule for rule (tests/upstream.py, under fresh names) to a
ServiceAccount whose token the provisioner uses, with leader election on the Endpoints lock, it
must:

- pass ``check`` (exit 0) with the two degraded features named, each with the rule to add;
- provision a claim (its PV without our finalizer), and release it by the class;
- adopt a PV the old provisioner wrote without patching it, and release it by the old rules;
- name the cluster in the export's records by its CA certificate, and make no request the
  API server refuses (every refusal would be a step that did not step down).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from controlplane.runner import ControlPlane
from provisioner import identity
from tests.integration.conftest import StorageClasses
from tests.integration.harness import (
    Kube,
    ProvisionerProcess,
    check_env,
    claim,
    run_cli,
    unique,
    wait_for,
)
from tests.integration.test_migration import old_volume
from tests.upstream import NAMESPACE_RULE, PATCH_RULE, rbac_documents

pytestmark = pytest.mark.integration

FINALIZER = "external-provisioner.volume.kubernetes.io/finalizer"
PREFIX = "nfs.provisioner.dev/"


@pytest.fixture
def upstream_kubeconfig(
    admin: Kube, control_plane: ControlPlane, tmp_path: Path
) -> Iterator[tuple[Path, str]]:
    """A ServiceAccount with nfs-subdir's RBAC in a namespace of its own: (kubeconfig, ns)."""
    name = unique("nfs-client-provisioner")
    admin.run("create", "namespace", name)
    admin.apply(yaml.safe_dump_all(rbac_documents(name, name)))
    try:
        yield control_plane.service_account_kubeconfig(name, name, tmp_path / "kubeconfig"), name
    finally:
        admin.run("delete", "clusterrole,clusterrolebinding", name, check=False)
        admin.run("delete", "namespace", name, "--wait=false", check=False)


def test_check_passes_and_names_what_steps_down(
    upstream_kubeconfig: tuple[Path, str], tmp_path: Path
) -> None:
    kubeconfig, namespace = upstream_kubeconfig
    export = tmp_path / "export"
    export.mkdir()
    result = run_cli(
        "check",
        env=check_env(
            kubeconfig,
            export,
            PROVISIONER_NAME="k8s-sigs.io/nfs-subdir-external-provisioner",
            POD_NAMESPACE=namespace,
        ),
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "FAILED" not in out
    assert "preflight: ok: every RBAC permission the provisioner needs is granted" in out
    assert (
        "preflight: degraded: without the PersistentVolume finalizer and the adoption records: "
        in out
    )
    assert PATCH_RULE in out
    assert "preflight: degraded: without the cluster's identity from kube-system's uid: " in out
    assert NAMESPACE_RULE in out


def test_provisions_adopts_and_releases_with_nothing_refused(
    admin: Kube,
    control_plane: ControlPlane,
    upstream_kubeconfig: tuple[Path, str],
    namespace: str,
    tmp_path: Path,
    storage_classes: StorageClasses,
) -> None:
    kubeconfig, lock_namespace = upstream_kubeconfig
    name = f"test.nfs.io/{unique('swap')}"
    export = tmp_path / "export"
    export.mkdir()
    class_name = storage_classes(name, {"archiveOnDelete": "false"})
    # Made by the old provisioner before the swap: bound, with data.
    old = old_volume(
        admin, export, provisioner=name, namespace=namespace, name="old", class_name=class_name
    )
    process = ProvisionerProcess(
        kubeconfig=kubeconfig,
        name=name,
        export=export,
        log_path=tmp_path / "provisioner.log",
        extra_env={
            "ENABLE_LEADER_ELECTION": "true",
            "LEADER_ELECTION_LOCK": "endpoints",
            "POD_NAMESPACE": lock_namespace,
        },
    ).start()
    try:
        wait_for(
            "the old volume to be adopted",
            lambda: any(e.get("reason") == "VolumeAdopted" for e in admin.events(None, old.volume)),
        )
        pv = admin.get("pv", old.volume)
        assert pv is not None
        assert not [k for k in pv["metadata"].get("annotations", {}) if k.startswith(PREFIX)]
        assert FINALIZER not in (pv["metadata"].get("finalizers") or [])

        admin.apply(claim("fresh", namespace, class_name, "1Mi"))
        bound = admin.wait_phase("pvc", "fresh", "Bound", namespace)
        volume = bound["spec"]["volumeName"]
        body = admin.get("pv", volume)
        assert body is not None
        assert FINALIZER not in (body["metadata"].get("finalizers") or [])
        directory = export / f"{namespace}-fresh-{volume}"
        assert directory.is_dir()
        owner = json.loads(
            (
                export / ".nfs-provisioner" / "owners" / f"d{directory.name}" / "owner.json"
            ).read_text()
        )
        ca = identity.ca_fingerprints(control_plane.ca_file.read_bytes())[0]
        assert owner["cluster"] == ca

        for pvc, pv_name, path in (
            ("fresh", volume, directory),
            (old.name, old.volume, old.directory),
        ):
            admin.run("delete", "pvc", pvc, "-n", namespace)
            admin.wait_gone("pv", pv_name)
            assert not path.exists(), f"{path} was not deleted (class archiveOnDelete false)"
        deleted = [e for e in admin.events(None, old.volume) if e.get("reason") == "VolumeDeleted"]
        assert deleted and "Adopted volume" in deleted[-1]["message"], deleted
        logs = process.logs()
        assert "without the PersistentVolume finalizer" in logs
        assert "without the cluster's identity from kube-system's uid" in logs
        assert "403 Forbidden" not in logs, logs[-5000:]
    finally:
        process.stop()
        print(f"--- provisioner log ---\n{process.logs()[-20000:]}")
