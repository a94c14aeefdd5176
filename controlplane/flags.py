"""Command lines and health probes of the control-plane components.

What: the flags of etcd, kube-apiserver, kube-controller-manager and kube-scheduler in both
profiles (the default one of the integration tests, the node profile of ``make e2e``), the
controllers each profile runs, and the probe :class:`controlplane.runner.ControlPlane` polls
until a component is healthy.

Why apart: the flags are pure and are where each setting's reason is written down; they are
tested without starting anything (``tests/unit/test_runner.py``,
``tests/unit/test_node_args.py``). The runner only chooses ports and directories and passes
them in.
"""

from __future__ import annotations

import json
import ssl
from pathlib import Path

from controlplane.network import LOOPBACK, SERVICE_CLUSTER_IP_RANGE
from controlplane.pki import Pki
from controlplane.processes import _http_status

SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
ETCD_MEMBER = "controlplane"
KCM_CONTROLLERS = (
    "persistentvolume-binder-controller",
    "persistentvolume-protection-controller",
    "persistentvolumeclaim-protection-controller",
    "persistentvolume-expander-controller",
    # Tests delete their namespaces; without these two, deletion hangs in Terminating.
    "namespace-controller",
    "garbage-collector-controller",
)
# Added by the node profile, for pods on a real kubelet.
NODE_KCM_CONTROLLERS = (
    # In-cluster credentials: the `default` ServiceAccount of each namespace, the
    # kube-root-ca.crt ConfigMap the projected token volume mounts, and (legacy) token Secrets.
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "root-ca-certificate-publisher-controller",
    # Workloads: the provisioner ships as a Deployment; tests may use StatefulSets' claims.
    "deployment-controller",
    "replicaset-controller",
    "statefulset-controller",
    # Generic ephemeral volumes: the claim of a pod's `ephemeral` volume (the storage suite).
    "ephemeral-volume-controller",
    # Lifts node.kubernetes.io/not-ready:NoSchedule once the kubelet reports Ready, so the
    # scheduler places pods (the kubelet registers with that taint).
    "node-lifecycle-controller",
)


# --------------------------------------------------------------------------- flags


def etcd_args(*, data_dir: Path, client_port: int, peer_port: int) -> list[str]:
    """etcd's flags: single member on loopback, no fsync (test data only)."""
    client = f"http://{LOOPBACK}:{client_port}"
    peer = f"http://{LOOPBACK}:{peer_port}"
    return [
        f"--name={ETCD_MEMBER}",
        f"--data-dir={data_dir}",
        f"--listen-client-urls={client}",
        f"--advertise-client-urls={client}",
        f"--listen-peer-urls={peer}",
        f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster={ETCD_MEMBER}={peer}",
        "--unsafe-no-fsync=true",
    ]


def apiserver_args(
    *,
    etcd_url: str,
    secure_port: int,
    cert_dir: Path,
    pki: Pki,
    audit: tuple[Path, Path] | None = None,
    service_accounts: bool = False,
) -> list[str]:
    """kube-apiserver's flags: loopback, own certs, RBAC, default admission minus ServiceAccount.

    ``audit`` is ``(policy file, log file)``: an audit log of JSON lines, one per request stage
    the policy keeps (the RBAC test records what the provisioner calls). Off by default.
    ``service_accounts`` (the node profile) keeps the ServiceAccount admission plugin on, so
    pods get a ServiceAccount and its projected token; the controller manager must then run
    the serviceaccount controllers, or pods are refused until a `default` SA exists. It also
    admits privileged containers, as kubeadm's clusters do.
    """
    audit_args = (
        [
            f"--audit-policy-file={audit[0]}",
            f"--audit-log-path={audit[1]}",
            "--audit-log-format=json",
        ]
        if audit is not None
        else []
    )
    return [
        f"--bind-address={LOOPBACK}",
        f"--advertise-address={LOOPBACK}",
        f"--secure-port={secure_port}",
        f"--etcd-servers={etcd_url}",
        f"--cert-dir={cert_dir}",
        f"--tls-cert-file={pki.serving_cert}",
        f"--tls-private-key-file={pki.serving_key}",
        f"--client-ca-file={pki.ca_cert}",
        f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
        f"--service-account-key-file={pki.sa_pub}",
        f"--service-account-signing-key-file={pki.sa_key}",
        f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
        "--authorization-mode=RBAC",
        # The `kubernetes` Service's Endpoints may not point at loopback (validation refuses
        # 127.0.0.0/8 and logs an error every few seconds); nothing here needs them.
        "--endpoint-reconciler-type=none",
        # The default plugin set stays on (DefaultStorageClass, StorageObjectInUseProtection, ...);
        # ServiceAccount goes because no serviceaccount controller creates `default` SAs.
        *([] if service_accounts else ["--disable-admission-plugins=ServiceAccount"]),
        # The node profile admits privileged containers, as kubeadm's and kind's clusters do:
        # Kubernetes' storage tests (make e2e-storage) run some (subPath) privileged.
        *(["--allow-privileged=true"] if service_accounts else []),
        *audit_args,
    ]


def controller_manager_args(
    *,
    kubeconfig: Path,
    secure_port: int,
    cert_dir: Path,
    node_pki: Pki | None = None,
) -> list[str]:
    """kube-controller-manager's flags: the PV controllers (+ namespace/GC), no leader election.

    No --authentication/authorization-kubeconfig: only /healthz is probed and it is always
    allowed; with them, the lookup of a requestheader CA this apiserver does not have logs an
    error many times a second.

    ``node_pki`` (the node profile) adds :data:`NODE_KCM_CONTROLLERS` and the keys the token
    controller signs with and the CA it publishes.
    """
    controllers = KCM_CONTROLLERS if node_pki is None else (*KCM_CONTROLLERS, *NODE_KCM_CONTROLLERS)
    node_args = (
        []
        if node_pki is None
        else [
            f"--service-account-private-key-file={node_pki.sa_key}",
            f"--root-ca-file={node_pki.ca_cert}",
        ]
    )
    return [
        f"--kubeconfig={kubeconfig}",
        f"--controllers={','.join(controllers)}",
        "--leader-elect=false",
        "--use-service-account-credentials=false",
        f"--bind-address={LOOPBACK}",
        f"--secure-port={secure_port}",
        f"--cert-dir={cert_dir}",
        # Default 15s. The binder is event-driven, but a claim whose PV arrives while a sync is
        # in flight waits for the next resync; 1s keeps tests and benchmarks from waiting on it.
        "--pvclaimbinder-sync-period=1s",
        *node_args,
    ]


def scheduler_args(*, kubeconfig: Path, secure_port: int, cert_dir: Path) -> list[str]:
    """kube-scheduler's flags (node profile): the admin kubeconfig, loopback, no leader election.

    Like the controller manager, no --authentication/authorization-kubeconfig: /healthz is
    always allowed and is all that is probed.
    """
    return [
        f"--kubeconfig={kubeconfig}",
        "--leader-elect=false",
        f"--bind-address={LOOPBACK}",
        f"--secure-port={secure_port}",
        f"--cert-dir={cert_dir}",
    ]


# --------------------------------------------------------------------------- health probes


def etcd_healthy(port: int) -> bool:
    result = _http_status(port, "/health")
    if result is None or result[0] != 200:
        return False
    try:
        return bool(json.loads(result[1]).get("health") == "true")
    except ValueError:
        return False


def apiserver_ready(port: int, pki: Pki) -> bool:
    # As admin: anonymous /readyz is only allowed once the RBAC bootstrap policy exists.
    context = ssl.create_default_context(cafile=str(pki.ca_cert))
    context.load_cert_chain(str(pki.admin_cert), str(pki.admin_key))
    result = _http_status(port, "/readyz", context)
    return result is not None and result[0] == 200


def controller_manager_healthy(port: int) -> bool:
    # kube-controller-manager (and kube-scheduler) serve a self-signed certificate they
    # generate themselves; this probe (and only this one) skips verification. It reads nothing
    # but the status code.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    result = _http_status(port, "/healthz", context)
    return result is not None and result[0] == 200
