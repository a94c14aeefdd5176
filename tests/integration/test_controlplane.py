"""The test control plane behaves like a real cluster where the provisioner depends on it.

Driven with kubectl as a user would: YAML on stdin, `kubectl wait` with deadlines. Every test
works in its own namespace or on cluster-scoped objects with a unique suffix, and cleans up.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kopf
import kubernetes
import pytest

from controlplane.runner import ControlPlane
from tests.kubectl import kubectl

pytestmark = pytest.mark.integration

WAIT = 60  # seconds: deadline for anything the controllers do asynchronously


@pytest.fixture
def admin(control_plane: ControlPlane) -> Path:
    return control_plane.admin_kubeconfig


@pytest.fixture
def suffix() -> str:
    return uuid.uuid4().hex[:8]


@pytest.fixture
def namespace(admin: Path, suffix: str) -> Iterator[str]:
    name = f"cp-test-{suffix}"
    kubectl("create", "namespace", name, kubeconfig=admin)
    yield name
    kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found", kubeconfig=admin)


@pytest.fixture
def cleanup(admin: Path) -> Iterator[list[str]]:
    """Cluster-scoped objects (``kind/name``) to delete after the test, last added first."""
    objects: list[str] = []
    yield objects
    for obj in reversed(objects):
        kubectl("delete", obj, "--ignore-not-found", "--wait=false", kubeconfig=admin, check=False)


def get(admin: Path, resource: str, namespace: str | None = None) -> dict[str, Any]:
    ns = [f"--namespace={namespace}"] if namespace else []
    out = kubectl("get", resource, *ns, "-o", "json", kubeconfig=admin).stdout
    obj: dict[str, Any] = json.loads(out)
    return obj


def wait_for(
    admin: Path, resource: str, condition: str, namespace: str | None = None, timeout: int = WAIT
) -> None:
    """``kubectl wait --for=<condition>``; on timeout, fail showing the object as it is."""
    ns = [f"--namespace={namespace}"] if namespace else []
    result = kubectl(
        "wait",
        resource,
        *ns,
        f"--for={condition}",
        f"--timeout={timeout}s",
        kubeconfig=admin,
        check=False,
        timeout=timeout + 30,
    )
    if result.returncode != 0:
        now = kubectl("get", resource, *ns, "-o", "yaml", kubeconfig=admin, check=False)
        pytest.fail(
            f"{resource}: no {condition} within {timeout}s: {result.stderr.strip()}\n"
            f"{now.stdout}{now.stderr}"
        )


def claim_yaml(name: str, namespace: str, storage_class: str | None = "") -> str:
    class_line = "" if storage_class is None else f'  storageClassName: "{storage_class}"\n'
    return (
        "apiVersion: v1\n"
        "kind: PersistentVolumeClaim\n"
        "metadata:\n"
        f"  name: {name}\n"
        f"  namespace: {namespace}\n"
        "spec:\n"
        "  accessModes: [ReadWriteOnce]\n"
        f"{class_line}"
        "  resources:\n"
        "    requests:\n"
        "      storage: 1Gi\n"
    )


def volume_yaml(name: str, claim_ref: str = "") -> str:
    return (
        "apiVersion: v1\n"
        "kind: PersistentVolume\n"
        "metadata:\n"
        f"  name: {name}\n"
        "spec:\n"
        "  capacity:\n"
        "    storage: 1Gi\n"
        "  accessModes: [ReadWriteOnce]\n"
        '  storageClassName: ""\n'
        "  persistentVolumeReclaimPolicy: Retain\n"
        "  nfs:\n"
        "    server: nfs.example.invalid\n"
        f"    path: /exports/{name}\n"
        f"{claim_ref}"
    )


def create_bound_pair(
    admin: Path, namespace: str, suffix: str, cleanup: list[str]
) -> tuple[str, str, str]:
    """A claim and a PV pre-bound to it through spec.claimRef; waits until both are Bound.

    Returns (pv name, claim name, claim uid).
    """
    claim, pv = "data", f"pv-{suffix}"
    kubectl("apply", "-f", "-", kubeconfig=admin, input=claim_yaml(claim, namespace))
    uid = get(admin, f"pvc/{claim}", namespace)["metadata"]["uid"]
    claim_ref = (
        "  claimRef:\n"
        "    apiVersion: v1\n"
        "    kind: PersistentVolumeClaim\n"
        f"    namespace: {namespace}\n"
        f"    name: {claim}\n"
        f"    uid: {uid}\n"
    )
    cleanup.append(f"pv/{pv}")
    kubectl("apply", "-f", "-", kubeconfig=admin, input=volume_yaml(pv, claim_ref))
    wait_for(admin, f"pv/{pv}", "jsonpath={.status.phase}=Bound")
    wait_for(admin, f"pvc/{claim}", "jsonpath={.status.phase}=Bound", namespace)
    return pv, claim, uid


def test_server_is_v1_36(admin: Path) -> None:
    version = json.loads(kubectl("version", "-o", "json", kubeconfig=admin).stdout)
    assert version["serverVersion"]["gitVersion"].startswith("v1.36"), version


def test_prebound_pv_and_claim_become_bound(
    admin: Path, namespace: str, suffix: str, cleanup: list[str]
) -> None:
    pv, claim, uid = create_bound_pair(admin, namespace, suffix, cleanup)

    claim_obj = get(admin, f"pvc/{claim}", namespace)
    pv_obj = get(admin, f"pv/{pv}")
    assert claim_obj["spec"]["volumeName"] == pv
    assert claim_obj["metadata"]["annotations"]["pv.kubernetes.io/bind-completed"] == "yes"
    assert claim_obj["status"]["capacity"]["storage"] == "1Gi"
    assert pv_obj["spec"]["claimRef"]["uid"] == uid
    # StorageObjectInUseProtection admission is on, as in real clusters.
    assert "kubernetes.io/pvc-protection" in claim_obj["metadata"]["finalizers"]
    assert "kubernetes.io/pv-protection" in pv_obj["metadata"]["finalizers"]


def test_deleting_a_bound_claim_releases_its_volume(
    admin: Path, namespace: str, suffix: str, cleanup: list[str]
) -> None:
    pv, claim, _ = create_bound_pair(admin, namespace, suffix, cleanup)

    # Waits for pvc-protection to drop its finalizer (no pod uses the claim).
    kubectl("delete", f"pvc/{claim}", f"--namespace={namespace}", "--timeout=60s", kubeconfig=admin)

    wait_for(admin, f"pv/{pv}", "jsonpath={.status.phase}=Released")
    assert get(admin, f"pv/{pv}")["spec"]["claimRef"]["name"] == claim


def test_default_storage_class_is_assigned_by_admission(
    admin: Path, namespace: str, suffix: str, cleanup: list[str]
) -> None:
    name, provisioner = f"default-{suffix}", f"example.com/test-{suffix}"
    storage_class = (
        "apiVersion: storage.k8s.io/v1\n"
        "kind: StorageClass\n"
        "metadata:\n"
        f"  name: {name}\n"
        "  annotations:\n"
        '    storageclass.kubernetes.io/is-default-class: "true"\n'
        f"provisioner: {provisioner}\n"
        "reclaimPolicy: Delete\n"
        "volumeBindingMode: Immediate\n"
    )
    try:
        kubectl("apply", "-f", "-", kubeconfig=admin, input=storage_class)
        kubectl("apply", "-f", "-", kubeconfig=admin, input=claim_yaml("claim", namespace, None))

        assert get(admin, "pvc/claim", namespace)["spec"]["storageClassName"] == name
        # The binder hands the claim to the external provisioner named by the class.
        wait_for(
            admin,
            "pvc/claim",
            "jsonpath={.metadata.annotations.volume\\.kubernetes\\.io/storage-provisioner}"
            f"={provisioner}",
            namespace,
        )
    finally:
        # A default class left behind would change every later claim without a class.
        kubectl("delete", f"storageclass/{name}", "--ignore-not-found", kubeconfig=admin)


def test_service_account_token_is_subject_to_rbac(
    control_plane: ControlPlane,
    admin: Path,
    namespace: str,
    suffix: str,
    cleanup: list[str],
    tmp_path: Path,
) -> None:
    kubectl("create", "serviceaccount", "prov", f"--namespace={namespace}", kubeconfig=admin)
    sa = control_plane.service_account_kubeconfig(namespace, "prov", tmp_path / "sa.kubeconfig")
    pv = f"rbac-{suffix}"
    cleanup.append(f"pv/{pv}")

    refused = kubectl("create", "-f", "-", kubeconfig=sa, input=volume_yaml(pv), check=False)
    assert refused.returncode != 0
    assert "Forbidden" in refused.stderr, refused.stderr
    assert f"system:serviceaccount:{namespace}:prov" in refused.stderr

    role = f"pv-creator-{suffix}"
    cleanup += [f"clusterrole/{role}", f"clusterrolebinding/{role}"]
    rbac = (
        "apiVersion: rbac.authorization.k8s.io/v1\n"
        "kind: ClusterRole\n"
        "metadata:\n"
        f"  name: {role}\n"
        "rules:\n"
        "- apiGroups: ['']\n"
        "  resources: [persistentvolumes]\n"
        "  verbs: [create, get]\n"
        "---\n"
        "apiVersion: rbac.authorization.k8s.io/v1\n"
        "kind: ClusterRoleBinding\n"
        "metadata:\n"
        f"  name: {role}\n"
        "roleRef:\n"
        "  apiGroup: rbac.authorization.k8s.io\n"
        "  kind: ClusterRole\n"
        f"  name: {role}\n"
        "subjects:\n"
        "- kind: ServiceAccount\n"
        "  name: prov\n"
        f"  namespace: {namespace}\n"
    )
    kubectl("apply", "-f", "-", kubeconfig=admin, input=rbac)

    # The authorizer sees new bindings through its informer: poll briefly, with a deadline.
    deadline = time.monotonic() + WAIT
    while True:
        allowed = kubectl("create", "-f", "-", kubeconfig=sa, input=volume_yaml(pv), check=False)
        if allowed.returncode == 0:
            break
        assert "Forbidden" in allowed.stderr, allowed.stderr
        assert time.monotonic() < deadline, f"still refused after {WAIT}s: {allowed.stderr}"
        time.sleep(0.2)
    assert get(admin, f"pv/{pv}")["metadata"]["name"] == pv
    # The role grants create and get, nothing else.
    denied = kubectl("delete", f"pv/{pv}", kubeconfig=sa, check=False)
    assert denied.returncode != 0
    assert "Forbidden" in denied.stderr, denied.stderr


def test_admin_kubeconfig_works_for_the_python_client(
    control_plane: ControlPlane, namespace: str
) -> None:
    api = kubernetes.config.new_client_from_config(  # type: ignore[no-untyped-call]
        config_file=str(control_plane.admin_kubeconfig)
    )
    try:
        found = kubernetes.client.CoreV1Api(api).read_namespace(namespace)
        assert found.metadata is not None
        assert found.metadata.name == namespace
    finally:
        api.close()


@pytest.mark.parametrize("route", ["login_with_kubeconfig", "login_via_client"])
def test_admin_kubeconfig_works_for_kopf(
    control_plane: ControlPlane, namespace: str, monkeypatch: pytest.MonkeyPatch, route: str
) -> None:
    """Both ways kopf logs in from a kubeconfig: its own parser and the kubernetes client's."""
    kubeconfig = str(control_plane.admin_kubeconfig)
    monkeypatch.setenv("KUBECONFIG", kubeconfig)
    # The kubernetes client reads $KUBECONFIG once, when it is imported.
    monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", kubeconfig)
    registry = kopf.OperatorRegistry()
    seen = threading.Event()

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        if route == "login_via_client":
            return kopf.login_via_client(**kwargs)
        return kopf.login_with_kubeconfig(**kwargs)

    @kopf.on.event("namespaces", registry=registry)
    def on_namespace(name: str, **_: Any) -> None:
        if name == namespace:
            seen.set()

    settings = kopf.OperatorSettings()
    settings.posting.enabled = False
    stop = threading.Event()

    def run() -> None:
        asyncio.run(
            kopf.operator(
                registry=registry,
                settings=settings,
                standalone=True,
                clusterwide=True,
                stop_flag=stop,
            )
        )

    thread = threading.Thread(target=run, name=f"kopf-{route}", daemon=True)
    thread.start()
    try:
        assert seen.wait(WAIT), f"kopf ({route}) never saw the test namespace"
    finally:
        stop.set()
        thread.join(WAIT)
    assert not thread.is_alive()
