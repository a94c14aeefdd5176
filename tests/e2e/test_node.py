"""End-to-end: a real kubelet node (containerd, CNI bridge) under the node-profile control plane.

What it proves: the node goes Ready and runs pods the way the provisioner's will run: a pod
with an automounted ServiceAccount token (the provisioner's in-cluster credentials) can read
it, and a Deployment gets a Running pod through kube-scheduler and the workload controllers.
Last, everything is stopped and the host must be as it was before (mounts, links, iptables,
sysctls, listeners, processes, paths, cgroups).

Runs as root under ``make e2e`` only (``-m e2e``); not as root it fails with the reason,
never skips. The tests share one node and run in file order; the last one tears down.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from controlplane.binaries import kubectl_binary, resolve_binaries
from controlplane.node import Node, kubelet_binary
from controlplane.nodeconfig import NODE_NAME
from controlplane.runner import ControlPlane
from tests.kubectl import kubectl

pytestmark = pytest.mark.e2e

BUSYBOX = "local/busybox:latest"
NAMESPACE = "e2e-node"
TIMEOUT = 120.0


class Cluster:
    """The node-profile control plane and the node, with their teardown."""

    def __init__(self, plane: ControlPlane, node: Node) -> None:
        self.plane = plane
        self.node = node
        self.stopped = False

    @property
    def kubeconfig(self) -> Path:
        return self.plane.admin_kubeconfig

    def stop(self) -> list[str]:
        """Stop the node, then the control plane; return what still differs on the host."""
        if self.stopped:
            return self.node.host_differences()
        self.stopped = True
        try:
            self.node.stop()
        finally:
            self.plane.stop()
        return self.node.host_differences()


def wait_for(
    what: str, probe: Callable[[], bool], cluster: Cluster, timeout: float = TIMEOUT
) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() >= deadline:
            pytest.fail(
                f"{what}: not within {timeout:.0f} s\n{cluster.node.logs_tail()}\n"
                f"{cluster.plane.logs_tail()}",
                pytrace=False,
            )
        time.sleep(0.5)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if os.geteuid() != 0:
        pytest.fail(
            "the e2e node needs root (containerd, kubelet, mounts, cgroups); run `make e2e` "
            "as root",
            pytrace=False,
        )
    problem = None
    try:
        binaries = resolve_binaries(build=False, node=True)
        kubelet = kubelet_binary(build=False)
        plane = ControlPlane(tmp_path_factory.mktemp("controlplane"), binaries, node=True)
        plane.start()
    except RuntimeError as exc:
        problem = f"the node-profile control plane did not start: {exc}"
    if problem is not None:
        pytest.fail(problem, pytrace=False)
    node = Node(tmp_path_factory.mktemp("node"), plane.admin_kubeconfig, kubelet=kubelet)
    try:
        node.start()
    except RuntimeError as exc:
        problem = f"the node did not start: {exc}"
    if problem is not None:
        plane.stop()
        pytest.fail(problem, pytrace=False)
    state = Cluster(plane, node)
    try:
        yield state
    finally:
        state.stop()


def _json(cluster: Cluster, *args: str) -> dict[str, object]:
    result = kubectl(*args, "-o", "json", kubeconfig=cluster.kubeconfig)
    loaded = json.loads(result.stdout)
    assert isinstance(loaded, dict)
    return loaded


def _pod_phase(cluster: Cluster, name: str) -> str:
    result = kubectl(
        "get",
        "pod",
        name,
        "-n",
        NAMESPACE,
        "-o",
        "jsonpath={.status.phase}",
        kubeconfig=cluster.kubeconfig,
        check=False,
    )
    return result.stdout.strip()


def test_node_is_ready_and_schedulable(cluster: Cluster) -> None:
    node = _json(cluster, "get", "node", NODE_NAME)
    status = node["status"]
    assert isinstance(status, dict)
    ready = [c for c in status["conditions"] if c["type"] == "Ready"]
    assert ready and ready[0]["status"] == "True", ready
    # node-lifecycle-controller lifts the not-ready taint the kubelet registers with.
    wait_for(
        "the node.kubernetes.io/not-ready taint to be lifted",
        lambda: (
            "not-ready"
            not in kubectl(
                "get",
                "node",
                NODE_NAME,
                "-o",
                "jsonpath={.spec.taints}",
                kubeconfig=cluster.kubeconfig,
            ).stdout
        ),
        cluster,
    )
    kubectl("create", "namespace", NAMESPACE, kubeconfig=cluster.kubeconfig)
    # The ServiceAccount admission plugin refuses pods until the controller made `default`.
    wait_for(
        "the default ServiceAccount",
        lambda: (
            kubectl(
                "get",
                "serviceaccount",
                "default",
                "-n",
                NAMESPACE,
                kubeconfig=cluster.kubeconfig,
                check=False,
            ).returncode
            == 0
        ),
        cluster,
    )


SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


TOKEN_READER = f"""
apiVersion: v1
kind: Pod
metadata: {{name: token-reader, namespace: {NAMESPACE}}}
spec:
  automountServiceAccountToken: true
  hostNetwork: true  # as the provisioner's pod: the Service IP does not route here
  terminationGracePeriodSeconds: 1
  restartPolicy: Never
  containers:
  - name: main
    image: {BUSYBOX}
    imagePullPolicy: Never
    env: [{{name: D, value: {SA_DIR}}}]
    command: ["sh", "-c", "cat $D/namespace && echo && head -c 3 $D/token && echo && sleep 3600"]
"""


def test_pod_reads_its_service_account_token(cluster: Cluster) -> None:
    kubectl("apply", "-f", "-", input=TOKEN_READER, kubeconfig=cluster.kubeconfig)
    wait_for(
        "token-reader Running", lambda: _pod_phase(cluster, "token-reader") == "Running", cluster
    )
    pod = _json(cluster, "get", "pod", "token-reader", "-n", NAMESPACE)
    spec = pod["spec"]
    assert isinstance(spec, dict)
    assert spec["serviceAccountName"] == "default"
    assert spec["nodeName"] == NODE_NAME  # placed by kube-scheduler

    def log() -> list[str]:
        return kubectl(
            "logs", "token-reader", "-n", NAMESPACE, kubeconfig=cluster.kubeconfig, check=False
        ).stdout.splitlines()

    wait_for("token-reader's log", lambda: len(log()) >= 2, cluster, timeout=30)
    assert log()[:2] == [NAMESPACE, "eyJ"]  # the container read its namespace and a JWT

    def read(name: str) -> str:
        return kubectl(
            "exec",
            "token-reader",
            "-n",
            NAMESPACE,
            "--",
            "cat",
            f"{SA_DIR}/{name}",
            kubeconfig=cluster.kubeconfig,
        ).stdout

    token = read("token")
    # kube-root-ca.crt, published by root-ca-certificate-publisher-controller.
    assert read("ca.crt") == cluster.plane.ca_file.read_text(encoding="utf-8")
    # The token is a credential the apiserver accepts, as the pod's ServiceAccount. (Asked
    # from the host: busybox wget's built-in TLS fails the apiserver's handshake, alert 40.)
    whoami = subprocess.run(
        [
            str(kubectl_binary()),
            f"--server={cluster.plane.server}",
            f"--certificate-authority={cluster.plane.ca_file}",
            f"--token={token}",
            "auth",
            "whoami",
            "-o",
            "jsonpath={.status.userInfo.username}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert whoami.stdout == f"system:serviceaccount:{NAMESPACE}:default", whoami.stderr


DEPLOYMENT = f"""
apiVersion: apps/v1
kind: Deployment
metadata: {{name: sleeper, namespace: {NAMESPACE}}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: sleeper}}}}
  template:
    metadata: {{labels: {{app: sleeper}}}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: main
        image: {BUSYBOX}
        imagePullPolicy: Never
        command: ["sleep", "3600"]
"""


def test_deployment_gets_a_running_pod(cluster: Cluster) -> None:
    kubectl("apply", "-f", "-", input=DEPLOYMENT, kubeconfig=cluster.kubeconfig)
    kubectl(
        "rollout",
        "status",
        "deployment/sleeper",
        "-n",
        NAMESPACE,
        "--timeout=120s",
        kubeconfig=cluster.kubeconfig,
        timeout=150,
    )
    pods = _json(cluster, "get", "pods", "-n", NAMESPACE, "-l", "app=sleeper")
    items = pods["items"]
    assert isinstance(items, list) and len(items) == 1
    assert items[0]["status"]["phase"] == "Running"
    assert items[0]["spec"]["nodeName"] == NODE_NAME
    ip = items[0]["status"]["podIP"]
    assert ip.startswith("10.244.0."), ip  # from the CNI bridge's host-local range
    # The host check sees the node: without this, an empty diff could mean a blind check.
    during = "\n".join(cluster.node.host_differences())
    for expected in ("link: new nfsp-e2e0", "process: new kubelet", "cgroup: new"):
        assert expected in during, during
    kubectl(
        "delete",
        "deployment",
        "sleeper",
        "-n",
        NAMESPACE,
        "--wait=true",
        "--timeout=60s",
        kubeconfig=cluster.kubeconfig,
        timeout=90,
    )


def test_teardown_leaves_the_host_as_it_was(cluster: Cluster) -> None:
    differences = cluster.stop()
    timings = ", ".join(f"{k} {v:.2f} s" for k, v in cluster.node.timings.items())
    print(f"control plane up in {cluster.plane.startup_seconds:.1f} s; node: {timings}")
    # Informational: host-wide, others' changes (Docker, other tests) show up here too.
    for line in cluster.node.host_differences(host_wide=True):
        print(f"host-wide difference (not asserted): {line}")
    assert differences == [], "\n".join(differences)
