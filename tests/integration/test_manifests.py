"""The shipped ``manifests/`` against the real API server (SPEC §1, §2, §9, §10).

Every file is accepted by ``kubectl apply --dry-run=server`` (the API server's own validation,
defaulting and admission, without persisting anything); the kustomization renders exactly the
install set and applies; and the Deployment agrees with the code: its environment is parsed by
``provisioner.config.load_settings``, its probes hit the paths the HTTP server serves, and the
classes' parameters are ones the provisioner accepts. Only ``namespace.yaml`` is applied for
real (the same Namespace ``rbac/`` creates, so other tests are unaffected).
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from provisioner.config import (
    DEFAULT_MOUNT_PATH,
    build_arg_parser,
    load_settings,
    parse_class_parameters,
)
from tests.integration.harness import REPO, Kube
from tests.kubectl import kubectl

pytestmark = pytest.mark.integration

MANIFESTS = REPO / "manifests"
INSTALL_NAMESPACE = "nfs-provisioner"
PROVISIONER_NAME = "example.com/nfs"
CLASS_NAME = "nfs-client"
DEFAULT_CLASS_ANNOTATION = "storageclass.kubernetes.io/is-default-class"

MANIFEST_FILES = (
    "namespace.yaml",
    "deployment.yaml",
    "service.yaml",
    "storageclass.yaml",
    "storageclass-default.yaml",
    "test-claim.yaml",
    "test-pod.yaml",
    "statefulset.yaml",
    "kustomization.yaml",
)
USER_FILES = ("test-claim.yaml", "test-pod.yaml", "statefulset.yaml")
"""Examples without a namespace of their own: users apply them with ``-n``."""
OBJECT_FILES = tuple(name for name in MANIFEST_FILES if name != "kustomization.yaml")

INSTALL_SET = {
    ("Namespace", None, "nfs-provisioner"),
    ("ServiceAccount", INSTALL_NAMESPACE, "nfs-provisioner"),
    ("ClusterRole", None, "nfs-provisioner-runner"),
    ("ClusterRoleBinding", None, "run-nfs-provisioner"),
    ("Role", INSTALL_NAMESPACE, "leader-locking-nfs-provisioner"),
    ("RoleBinding", INSTALL_NAMESPACE, "leader-locking-nfs-provisioner"),
    ("Deployment", INSTALL_NAMESPACE, "nfs-provisioner"),
    ("Service", INSTALL_NAMESPACE, "nfs-provisioner"),
    ("StorageClass", None, CLASS_NAME),
}
"""What ``kubectl apply -k manifests/`` installs: rbac/ + Deployment + Service + plain class."""


def load_docs(text: str) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    return docs


def load_file(name: str) -> list[dict[str, Any]]:
    return load_docs((MANIFESTS / name).read_text(encoding="utf-8"))


def only(name: str, kind: str) -> dict[str, Any]:
    matching = [doc for doc in load_file(name) if doc["kind"] == kind]
    assert len(matching) == 1, f"{name} should hold exactly one {kind}"
    return matching[0]


def deployment() -> dict[str, Any]:
    return only("deployment.yaml", "Deployment")


def container() -> dict[str, Any]:
    containers: list[dict[str, Any]] = deployment()["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["nfs-provisioner"]
    return containers[0]


def identity(doc: dict[str, Any]) -> tuple[str, str | None, str]:
    meta = doc["metadata"]
    return doc["kind"], meta.get("namespace"), meta["name"]


@pytest.fixture(scope="module")
def install_namespace(admin: Kube) -> str:
    """``manifests/namespace.yaml`` applied for real: namespaced objects need it to exist.

    It is never deleted: it is the same Namespace ``rbac/`` creates for the other tests.
    """
    admin.run("apply", "-f", str(MANIFESTS / "namespace.yaml"))
    return INSTALL_NAMESPACE


def dry_run_apply(admin: Kube, *args: str) -> list[str]:
    """``kubectl apply --dry-run=server``; the objects kubectl reports, each checked server-side."""
    out = admin.run("apply", "--dry-run=server", *args)
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines, f"kubectl applied nothing: {out!r}"
    for line in lines:
        assert line.endswith("(server dry run)"), f"not a server dry run: {line!r}"
    return lines


def test_the_manifest_set_is_complete_and_every_file_says_what_it_is_for() -> None:
    assert sorted(p.name for p in MANIFESTS.iterdir()) == sorted(MANIFEST_FILES)
    for name in MANIFEST_FILES:
        text = (MANIFESTS / name).read_text(encoding="utf-8")
        assert text.startswith("# "), f"{name} must start with a comment saying what it is for"
        for doc in load_docs(text):
            assert {"apiVersion", "kind"} <= doc.keys(), name
    for name in USER_FILES:
        for doc in load_file(name):
            assert "namespace" not in doc["metadata"], f"{name} is applied with -n"
    for name in set(OBJECT_FILES) - set(USER_FILES):
        for doc in load_file(name):
            if doc["kind"] not in {"Namespace", "StorageClass"}:
                assert doc["metadata"].get("namespace") == INSTALL_NAMESPACE, name


@pytest.mark.parametrize("name", [n for n in OBJECT_FILES if n not in USER_FILES])
def test_install_files_pass_server_side_dry_run(
    admin: Kube, install_namespace: str, name: str
) -> None:
    applied = dry_run_apply(admin, "-f", str(MANIFESTS / name))
    assert len(applied) == len(load_file(name))


@pytest.mark.parametrize("name", USER_FILES)
def test_example_files_pass_server_side_dry_run_in_any_namespace(
    admin: Kube, namespace: str, name: str
) -> None:
    applied = dry_run_apply(admin, "-n", namespace, "-f", str(MANIFESTS / name))
    assert len(applied) == len(load_file(name))


def test_kustomization_renders_rbac_deployment_service_and_class(
    admin: Kube, install_namespace: str
) -> None:
    rendered = load_docs(admin.run("kustomize", str(MANIFESTS)))
    assert {identity(doc) for doc in rendered} == INSTALL_SET
    assert len(rendered) == len(INSTALL_SET)
    (storage_class,) = [doc for doc in rendered if doc["kind"] == "StorageClass"]
    assert DEFAULT_CLASS_ANNOTATION not in storage_class["metadata"].get("annotations", {})
    # The rbac/ base is rendered unchanged: the tests' ServiceAccount is the one users install.
    rbac = load_docs(admin.run("kustomize", str(REPO / "rbac")))
    assert all(doc in rendered for doc in rbac)
    # namespace.yaml is left out of the kustomization because rbac/ holds the same Namespace.
    assert load_file("namespace.yaml") == load_docs(
        (REPO / "rbac" / "namespace.yaml").read_text(encoding="utf-8")
    )

    applied = dry_run_apply(admin, "-k", str(MANIFESTS))
    assert len(applied) == len(INSTALL_SET)


def test_deployment_meets_pod_security_baseline_and_restricted_says_exactly_why_not(
    admin: Kube, namespace: str
) -> None:
    """The documented PodSecurity stance: enforce baseline passes (its capabilities are in
    baseline's default set); restricted warns of the inline ``nfs`` volume, root and the three
    capabilities, nothing else. The examples meet restricted except test-pod."""
    admin.run(
        "label",
        "namespace",
        namespace,
        "pod-security.kubernetes.io/enforce=baseline",
        "pod-security.kubernetes.io/warn=restricted",
    )
    moved = deployment()
    moved["metadata"]["namespace"] = namespace
    result = kubectl(
        "apply",
        "--dry-run=server",
        "-f",
        "-",
        kubeconfig=admin.kubeconfig,
        input=yaml.safe_dump(moved),
    )
    assert result.stdout.strip().endswith("(server dry run)")
    warnings = [line for line in result.stderr.splitlines() if line.startswith("Warning:")]
    assert warnings == [
        'Warning: would violate PodSecurity "restricted:latest": unrestricted capabilities '
        '(container "nfs-provisioner" must not include "CHOWN", "DAC_OVERRIDE", "FOWNER" in '
        "securityContext.capabilities.add), restricted volume types (volume "
        '"nfs-client-root" uses restricted volume type "nfs"), runAsNonRoot != true (pod must '
        "not set securityContext.runAsNonRoot=false), runAsUser=0 (pod must not set "
        "runAsUser=0)"
    ], "only the nfs volume, root and the three capabilities may violate restricted"

    admin.run(
        "label",
        "namespace",
        namespace,
        "pod-security.kubernetes.io/enforce=restricted",
        "--overwrite",
    )
    examples = kubectl(
        "apply",
        "--dry-run=server",
        "-n",
        namespace,
        "-f",
        str(MANIFESTS / "statefulset.yaml"),
        kubeconfig=admin.kubeconfig,
    )
    assert "Warning" not in examples.stderr, examples.stderr


def container_env() -> dict[str, str]:
    """The Deployment's env as the process would see it (downward API resolved)."""
    env: dict[str, str] = {}
    for entry in container()["env"]:
        if "value" in entry:
            env[entry["name"]] = str(entry["value"])
            continue
        field_path = entry["valueFrom"]["fieldRef"]["fieldPath"]
        assert field_path == "metadata.namespace", entry
        env[entry["name"]] = deployment()["metadata"]["namespace"]
    return env


def test_deployment_env_is_accepted_by_the_provisioner() -> None:
    env = container_env()
    known = set(vars(build_arg_parser().parse_args([])))
    assert set(env) <= known, f"unknown settings: {sorted(set(env) - known)}"
    (pod_namespace,) = [e for e in container()["env"] if e["name"] == "POD_NAMESPACE"]
    assert pod_namespace["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}

    command, settings = load_settings(container().get("args", []), env)

    assert command == "run"
    assert settings.provisioner_name == PROVISIONER_NAME
    assert settings.namespace == INSTALL_NAMESPACE
    assert settings.http_host == "0.0.0.0"  # noqa: S104 - the kubelet probes the pod IP
    assert settings.http_port == 8080
    assert settings.log_format == "json"
    assert settings.leader_election

    pod = deployment()["spec"]["template"]["spec"]
    (nfs_volume,) = [v for v in pod["volumes"] if "nfs" in v]
    assert nfs_volume["nfs"] == {"server": settings.nfs_server, "path": settings.nfs_path}
    assert (settings.nfs_server, settings.nfs_path) == ("10.0.0.5", "/exports")
    mounts = {m["name"]: m["mountPath"] for m in container()["volumeMounts"]}
    assert mounts[nfs_volume["name"]] == settings.mount_path == DEFAULT_MOUNT_PATH
    ports = {p["name"]: p["containerPort"] for p in container()["ports"]}
    assert ports == {"http": settings.http_port}
    assert pod["serviceAccountName"] == "nfs-provisioner"


def test_probes_use_healthz_and_readyz_on_the_named_port() -> None:
    probes = {
        kind: container()[kind]["httpGet"]
        for kind in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    assert probes == {
        "startupProbe": {"path": "/healthz", "port": "http"},
        "livenessProbe": {"path": "/healthz", "port": "http"},
        "readinessProbe": {"path": "/readyz", "port": "http"},
    }


def test_deployment_runs_as_root_with_only_the_capabilities_it_needs() -> None:
    """Root, so that a root-owned 0755 no_root_squash export (the seeds') works as shipped;
    only CHOWN, DAC_OVERRIDE and FOWNER, nothing else (make e2e proves it on real exports)."""
    spec = deployment()["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"]["type"] == "RollingUpdate"
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod_security = spec["template"]["spec"]["securityContext"]
    assert pod_security == {
        "runAsNonRoot": False,
        "runAsUser": 0,
        "runAsGroup": 0,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    security = container()["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["privileged"] is False
    assert security["capabilities"] == {
        "drop": ["ALL"],
        "add": ["CHOWN", "DAC_OVERRIDE", "FOWNER"],
    }
    resources = container()["resources"]
    assert resources["requests"] == {"cpu": "50m", "memory": "64Mi"}
    assert resources["limits"] == {"memory": "256Mi"}


def test_image_defaults_to_root_and_the_deployment_chooses_its_own_user() -> None:
    """`docker run` of the image is root, as nfs-subdir's image, so it works in nfs-subdir's own
    Deployment (no securityContext) on a root-owned no_root_squash export; our Deployment sets
    its user explicitly, and its comments give the non-root variant."""
    dockerfile = (REPO / "Dockerfile").read_text(encoding="utf-8")
    user = re.search(r"^USER (\d+):(\d+)$", dockerfile, re.MULTILINE)
    assert user is not None, "the Dockerfile must name its user numerically"
    assert user.groups() == ("0", "0")
    pod = deployment()["spec"]["template"]["spec"]["securityContext"]
    assert (pod["runAsUser"], pod["runAsGroup"], pod["runAsNonRoot"]) == (0, 0, False)
    text = (REPO / "manifests" / "deployment.yaml").read_text(encoding="utf-8")
    assert "runAsNonRoot: true, runAsUser: 65534, runAsGroup: 65534" in text
    assert '\nENTRYPOINT ["nfs-provisioner"]\n' in dockerfile


def test_metrics_service_selects_the_provisioner() -> None:
    service = only("service.yaml", "Service")
    labels = deployment()["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}
    ]
    assert service["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "8080",
        "prometheus.io/path": "/metrics",
    }


@pytest.mark.parametrize("name", ["storageclass.yaml", "storageclass-default.yaml"])
def test_storage_classes_name_the_provisioner_with_accepted_parameters(name: str) -> None:
    storage_class = only(name, "StorageClass")
    assert storage_class["metadata"]["name"] == CLASS_NAME
    assert storage_class["provisioner"] == container_env()["PROVISIONER_NAME"]
    assert storage_class["reclaimPolicy"] == "Delete"
    assert storage_class["volumeBindingMode"] == "Immediate"
    assert storage_class["parameters"] == {"archiveOnDelete": "true"}
    parse_class_parameters(CLASS_NAME, storage_class["parameters"])
    annotations = storage_class["metadata"].get("annotations", {})
    is_default = name == "storageclass-default.yaml"
    assert (annotations.get(DEFAULT_CLASS_ANNOTATION) == "true") is is_default


def test_default_class_differs_from_the_plain_one_only_by_the_annotation() -> None:
    plain = only("storageclass.yaml", "StorageClass")
    default = only("storageclass-default.yaml", "StorageClass")
    default["metadata"].pop("annotations")
    assert default == plain


def test_examples_use_the_class_as_the_seeds_do() -> None:
    test_claim = only("test-claim.yaml", "PersistentVolumeClaim")
    assert test_claim["metadata"]["name"] == "test-claim"
    assert test_claim["spec"] == {
        "storageClassName": CLASS_NAME,
        "accessModes": ["ReadWriteMany"],
        "resources": {"requests": {"storage": "1Mi"}},
    }

    pod = only("test-pod.yaml", "Pod")["spec"]
    (test_container,) = pod["containers"]
    script = " ".join([*test_container["command"], *test_container["args"]])
    assert script == "/bin/sh -c touch /mnt/SUCCESS && exit 0 || exit 1"
    assert test_container["image"].startswith("busybox:")
    assert test_container["volumeMounts"] == [{"name": "nfs-pvc", "mountPath": "/mnt"}]
    assert pod["volumes"] == [
        {"name": "nfs-pvc", "persistentVolumeClaim": {"claimName": "test-claim"}}
    ]
    assert pod["restartPolicy"] == "Never"

    stateful_set = only("statefulset.yaml", "StatefulSet")
    (template,) = stateful_set["spec"]["volumeClaimTemplates"]
    assert template["metadata"]["name"] == "data"
    assert template["spec"]["storageClassName"] == CLASS_NAME
    service = only("statefulset.yaml", "Service")
    assert stateful_set["spec"]["serviceName"] == service["metadata"]["name"]


def test_dockerignore_keeps_local_state_out_of_the_image() -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*"
    for excluded in (".venv", ".dev", ".git", ".pytest_cache", ".mypy_cache", "tests"):
        assert excluded in patterns
    assert "!provisioner/" in patterns
