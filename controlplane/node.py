"""A real one-node Kubernetes node for ``make e2e``: containerd, a CNI bridge and a kubelet.

What: starts containerd (Debian's 1.6, configured from ``containerd config default`` with
everything it can move placed under a state directory), writes a CNI bridge config, imports two
images packed here from busybox-static (``local/pause:3.10``, the sandbox image, and
``local/busybox``) and starts the kubelet built by ``controlplane/build.sh kubelet``, registered
as node ``localhost`` against the control plane of ``controlplane.runner`` (its node profile).
Stopping drains the node, stops both and then undoes what they leave on the host.

Why it is code we own: there is no registry and no kind here; what a kubelet needs on this
machine (cgroup v1, no CAP_SYS_RESOURCE, loopback-only control plane) is recorded in
``reference/real-node.md``, and each setting below answers one of its findings.

Host-global effects and how they are undone: a kubelet and containerd cannot be fully confined
to a directory. They create ``/run/containerd``, ``/run/netns/cni-*``, ``/var/lib/cni``,
``/var/lib/kubelet``, ``/var/log/containers``, a bridge link, ``kubepods`` cgroups, sometimes
``KUBE-*`` iptables chains, and the kubelet rewrites sysctls at start (``vm.overcommit_memory``
0->1, ``kernel.panic`` 1->10, ``kernel.panic_on_oops`` 0->1 here) as the bridge plugin does
``ip_forward``. :func:`capture_host_state` records all of that before the start;
:func:`restore_host` removes what is new and writes the recorded values back;
:func:`diff_host_state` says what still differs (:meth:`Node.host_differences`, limited by
:func:`node_scope` to what a node can touch, so Docker next door is not blamed), so a test can
assert nothing does.

Who calls it: ``tests/e2e/test_node.py`` (``make e2e``), and by hand ``python -m
controlplane.node up --state DIR --kubeconfig FILE`` / ``down --state DIR`` after ``python -m
controlplane.runner up --node``. The state file (``DIR/node.json``: pids, the host as found)
lets ``down`` clean up after a run that was killed, pods included.

Layout: pure builders first (paths, configs, argv, image metadata, state diff), then I/O.
Processes are stopped by recorded pid (see ``controlplane.runner.stop_processes``), never by
name; the exceptions are tied to this node: shims whose argv names its socket, and processes
in ``kubepods`` cgroups that did not exist before it started.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from controlplane.runner import (
    KUBELET,
    KUBERNETES_SERVICE_IP,
    KUBERNETES_SERVICE_PORT,
    LOOPBACK,
    SERVICE_CLUSTER_IP_RANGE,
    ProcessRecord,
    _http_status,
    _is_running,
    _proc_stat,
    free_ports,
    kubectl_binary,
    resolve_paths,
    spawn_logged,
    stop_processes,
    tail_lines,
)

NODE_NAME = "localhost"  # --hostname-override: the apiserver then dials "localhost" for logs
BRIDGE = "nfsp-e2e0"
SERVICE_LINK = "nfsp-e2e-svc"
"""A port-less bridge holding the ``kubernetes`` Service's ClusterIP as a local address (the
CNI bridge plugin refuses a bridge with an address it did not set; no dummy links here)."""
CNI_NETWORK = "nfsp-e2e"
POD_SUBNET = "10.244.0.0/24"
K8S_NAMESPACE = "k8s.io"  # containerd namespace of the CRI plugin
PAUSE_IMAGE = "docker.io/local/pause:3.10"
BUSYBOX_IMAGE = "docker.io/local/busybox:latest"
SEEDS_BUSYBOX_IMAGE = "docker.io/library/busybox:1.36"  # what the seeds' test-pod names
SERVICE_PROXY = "service-proxy"
"""Pods refer to it as ``local/busybox:latest`` with ``imagePullPolicy: Never``."""
BUSYBOX_BINARY = Path("/bin/busybox")  # Debian busybox-static
PAUSE_COMMAND = ("sleep", "2147483647")
CONTAINERD = "containerd"
STATE_FILE = "node.json"  # pids, the host as found, the kubeconfig: what `down` needs
START_TIMEOUT = 60.0
DRAIN_TIMEOUT = 90.0

# Host paths the node may create; each is removed afterwards if it did not exist before.
HOST_PATHS = (
    "/run/containerd",
    "/run/netns",
    "/var/lib/cni",
    "/var/lib/kubelet",
    "/var/log/containers",
    "/var/log/pods",
    "/usr/libexec/kubernetes",
    "/var/lib/containerd",
)
# Directories whose entries are compared one by one (they may exist before, shared).
HOST_LISTED_DIRS = ("/run/netns", "/run/containerd", "/run/containerd/runc")
# Entries of those a node's containerd creates (shim sockets, runc state, fifos), removed when
# new; other new entries belong to someone else and are only reported.
NODE_ENTRIES = {"/run/containerd": {"s", "runc", "fifo"}, "/run/containerd/runc": {"k8s.io"}}
# Written by the kubelet at start (setupKernelTunables) or by the CNI bridge plugin.
HOST_SYSCTLS = (
    "net/ipv4/ip_forward",
    "net/ipv6/conf/all/forwarding",
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
)
# Processes the node starts (``comm``, 15 characters at most).
NODE_COMMS = frozenset({"containerd", "containerd-shim", "kubelet", "runc"})
CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_PREFIX = "kubepods"


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class NodeLayout:
    """Where everything of one node lives, under ``state``."""

    state: Path

    @property
    def log_dir(self) -> Path:
        return self.state / "logs"

    @property
    def containerd_dir(self) -> Path:
        return self.state / "containerd"

    @property
    def containerd_config(self) -> Path:
        return self.containerd_dir / "config.toml"

    @property
    def containerd_root(self) -> Path:
        return self.containerd_dir / "root"

    @property
    def containerd_state(self) -> Path:
        return self.containerd_dir / "state"

    @property
    def containerd_opt(self) -> Path:
        return self.containerd_dir / "opt"

    @property
    def containerd_socket(self) -> Path:
        return self.containerd_dir / "containerd.sock"

    @property
    def cni_conf_dir(self) -> Path:
        return self.state / "cni" / "net.d"

    @property
    def cni_ipam_dir(self) -> Path:
        return self.state / "cni" / "ipam"

    @property
    def kubelet_dir(self) -> Path:
        return self.state / "kubelet"

    @property
    def kubelet_root(self) -> Path:
        return self.kubelet_dir / "root"

    @property
    def kubelet_certs(self) -> Path:
        return self.kubelet_dir / "pki"

    @property
    def kubelet_config(self) -> Path:
        return self.kubelet_dir / "config.yaml"

    @property
    def volume_plugin_dir(self) -> Path:
        return self.kubelet_dir / "volume-plugins"

    @property
    def pod_logs_dir(self) -> Path:
        return self.kubelet_dir / "pod-logs"

    @property
    def images_dir(self) -> Path:
        return self.state / "images"

    def directories(self) -> tuple[Path, ...]:
        """The directories to create before anything starts."""
        return (
            self.log_dir,
            self.containerd_root,
            self.containerd_state,
            self.containerd_opt,
            self.cni_conf_dir,
            self.cni_ipam_dir,
            self.kubelet_root,
            self.kubelet_certs,
            self.volume_plugin_dir,
            self.pod_logs_dir,
            self.images_dir,
        )


# --------------------------------------------------------------------------- pure builders


def _toml_string(value: str) -> str:
    return json.dumps(value)  # a TOML basic string is a JSON string for these paths


def set_toml_key(text: str, section: str, key: str, value: str) -> str:
    """Replace ``key = ...`` directly inside ``[section]`` of TOML ``text`` (``value`` is TOML).

    ``section`` is the header as written (``""`` for the top level). Only that table's own
    lines are searched, up to the next header; a missing key or section raises ValueError,
    so a changed ``containerd config default`` fails loudly instead of being ignored.
    """
    lines = text.splitlines(keepends=True)
    header = re.compile(r"^\s*\[\[?(.+?)\]\]?\s*$")
    current = ""
    for index, line in enumerate(lines):
        match = header.match(line)
        if match:
            current = match.group(1).strip()
            continue
        if current != section:
            continue
        key_match = re.match(rf"^(\s*){re.escape(key)}\s*=", line)
        if key_match:
            lines[index] = f"{key_match.group(1)}{key} = {value}\n"
            return "".join(lines)
    where = f"[{section}]" if section else "the top level"
    raise ValueError(f"no key {key!r} in {where} of the containerd config")


CRI = 'plugins."io.containerd.grpc.v1.cri"'


def containerd_config(default: str, layout: NodeLayout) -> str:
    """containerd's config: ``default`` (``containerd config default``) with our settings.

    Root, state, socket and opt under the state directory; the local pause image (kubelet
    1.36 has no --pod-infra-container-image); ``restrict_oom_score_adj`` because root lacks
    CAP_SYS_RESOURCE here and the kubelet asks for -998 (runc fails without it); Debian's CNI
    plugins and our conf dir; cgroupfs (the kubelet's driver on cgroup v1).
    """
    edits: Sequence[tuple[str, str, str]] = (
        ("", "root", _toml_string(str(layout.containerd_root))),
        ("", "state", _toml_string(str(layout.containerd_state))),
        ("grpc", "address", _toml_string(str(layout.containerd_socket))),
        (
            'plugins."io.containerd.internal.v1.opt"',
            "path",
            _toml_string(str(layout.containerd_opt)),
        ),
        (CRI, "sandbox_image", _toml_string(PAUSE_IMAGE)),
        (CRI, "restrict_oom_score_adj", "true"),
        (f"{CRI}.cni", "bin_dir", _toml_string("/usr/lib/cni")),
        (f"{CRI}.cni", "conf_dir", _toml_string(str(layout.cni_conf_dir))),
        (f"{CRI}.containerd.runtimes.runc.options", "SystemdCgroup", "false"),
    )
    text = default
    for section, key, value in edits:
        text = set_toml_key(text, section, key, value)
    return text


def cni_conflist(layout: NodeLayout) -> dict[str, Any]:
    """One bridge network with host-local IPAM on :data:`POD_SUBNET`, IP data under state.

    No masquerading and one route: the service range, through the bridge (the gateway), where
    the node answers for the ``kubernetes`` Service (``controlplane.service_proxy``); nothing
    is added to iptables.
    """
    return {
        "cniVersion": "1.0.0",
        "name": CNI_NETWORK,
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_SUBNET}]],
                    "routes": [{"dst": SERVICE_CLUSTER_IP_RANGE}],
                    "dataDir": str(layout.cni_ipam_dir),
                },
            }
        ],
    }


@dataclass(frozen=True)
class KubeletPorts:
    """The kubelet's server and healthz ports (free ones, not 10250/10248)."""

    server: int
    healthz: int


def kubelet_config(layout: NodeLayout, ports: KubeletPorts) -> dict[str, Any]:
    """KubeletConfiguration for this machine (each setting is a finding of real-node.md)."""
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        # Otherwise: "kubelet is configured to not run on a host using cgroup v1" (exit 1).
        "failCgroupV1": False,
        # containerd 1.6 does not answer RuntimeConfig, so the kubelet cannot ask it.
        "cgroupDriver": "cgroupfs",
        "containerRuntimeEndpoint": f"unix://{layout.containerd_socket}",
        # The apiserver has no kubelet client certificate: logs/exec arrive anonymous.
        "authentication": {
            "anonymous": {"enabled": True},
            "webhook": {"enabled": False},
        },
        "authorization": {"mode": "AlwaysAllow"},
        "address": LOOPBACK,
        "port": ports.server,
        "healthzBindAddress": LOOPBACK,
        "healthzPort": ports.healthz,
        "readOnlyPort": 0,
        "volumePluginDir": str(layout.volume_plugin_dir),
        "podLogsDir": str(layout.pod_logs_dir),
        # Local images cannot be pulled again: never collect them, evict only when desperate.
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {
            "memory.available": "1Mi",
            "nodefs.available": "1%",
            "nodefs.inodesFree": "1%",
            "imagefs.available": "1%",
            "imagefs.inodesFree": "1%",
        },
        # Else KUBE-FIREWALL, KUBE-KUBELET-CANARY and KUBE-IPTABLES-HINT (v4 and v6).
        "makeIPTablesUtilChains": False,
        "failSwapOn": False,
        "serializeImagePulls": False,
    }


def kubelet_args(layout: NodeLayout, kubeconfig: Path) -> list[str]:
    """The kubelet's flags besides its config file."""
    return [
        f"--config={layout.kubelet_config}",
        f"--kubeconfig={kubeconfig}",
        f"--root-dir={layout.kubelet_root}",
        f"--cert-dir={layout.kubelet_certs}",
        # --node-ip=127.0.0.1 is refused; with this the apiserver dials "localhost" first.
        f"--hostname-override={NODE_NAME}",
        # cadvisor's own flag; otherwise it dials /run/containerd/containerd.sock.
        f"--containerd={layout.containerd_socket}",
        "--v=2",
    ]


def ctr_argv(layout: NodeLayout, *args: str) -> list[str]:
    """``ctr`` against our containerd, in the CRI namespace."""
    return ["ctr", f"--address={layout.containerd_socket}", f"--namespace={K8S_NAMESPACE}", *args]


# --------------------------------------------------------------------------- images (pure part)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
PLATFORM = {"architecture": "amd64", "os": "linux"}


@dataclass(frozen=True)
class Blob:
    """Content-addressed bytes of an OCI layout."""

    media_type: str
    data: bytes

    @property
    def digest(self) -> str:
        return f"sha256:{hashlib.sha256(self.data).hexdigest()}"

    def descriptor(self, **extra: Any) -> dict[str, Any]:
        return {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": len(self.data),
            **extra,
        }


def _canonical(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Image:
    """An image to pack: its layers (uncompressed tars, lowest first) and what it runs."""

    layers: tuple[bytes, ...]
    cmd: tuple[str, ...] = ()
    entrypoint: tuple[str, ...] = ()


def image_blobs(layer: bytes, cmd: Sequence[str]) -> tuple[Blob, Blob]:
    """(config, manifest) of a one-layer linux/amd64 image running ``cmd``."""
    return layered_image_blobs(Image((layer,), tuple(cmd)))


def layered_image_blobs(image: Image) -> tuple[Blob, Blob]:
    """(config, manifest) of a linux/amd64 ``image``."""
    layer_blobs = [Blob(OCI_LAYER, layer) for layer in image.layers]
    runs: dict[str, Any] = {"Cmd": list(image.cmd), "Env": ["PATH=/bin"], "WorkingDir": "/"}
    if image.entrypoint:
        runs["Entrypoint"] = list(image.entrypoint)
    config = Blob(
        OCI_CONFIG,
        _canonical(
            {
                **PLATFORM,
                "config": runs,
                "rootfs": {"type": "layers", "diff_ids": [blob.digest for blob in layer_blobs]},
                "history": [{"created_by": "controlplane.node: busybox-static"}],
            }
        ),
    )
    manifest = Blob(
        OCI_MANIFEST,
        _canonical(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": config.descriptor(),
                "layers": [blob.descriptor() for blob in layer_blobs],
            }
        ),
    )
    return config, manifest


def oci_index(manifests: Mapping[str, Blob]) -> dict[str, Any]:
    """``index.json`` naming each manifest (image name -> manifest) for ``ctr images import``."""
    return {
        "schemaVersion": 2,
        "manifests": [
            blob.descriptor(
                platform=PLATFORM,
                annotations={
                    "io.containerd.image.name": name,
                    "org.opencontainers.image.ref.name": name.rsplit(":", 1)[-1],
                },
            )
            for name, blob in manifests.items()
        ],
    }


# --------------------------------------------------------------------------- host state (pure part)


@dataclass(frozen=True)
class HostState:
    """What of the host a node can change, as comparable values."""

    mounts: frozenset[str] = frozenset()
    links: frozenset[str] = frozenset()
    iptables: tuple[str, ...] = ()
    ip6tables: tuple[str, ...] = ()
    sysctls: Mapping[str, str] = field(default_factory=dict)
    listening: frozenset[str] = frozenset()
    processes: frozenset[str] = frozenset()
    paths: Mapping[str, bool] = field(default_factory=dict)
    listings: Mapping[str, frozenset[str]] = field(default_factory=dict)
    cgroups: frozenset[str] = frozenset()


def normalize_iptables_save(text: str) -> tuple[str, ...]:
    """iptables-save output without comments and packet counters, to compare two runs."""
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        out.append(re.sub(r"\s*\[\d+:\d+\]", "", line))
    return tuple(out)


def iptables_chains(rules: Iterable[str]) -> dict[str, set[str]]:
    """table -> chain names, from normalized iptables-save lines."""
    chains: dict[str, set[str]] = {}
    table = ""
    for line in rules:
        if line.startswith("*"):
            table = line[1:]
            chains.setdefault(table, set())
        elif line.startswith(":"):
            chains.setdefault(table, set()).add(line[1:].split()[0])
    return chains


def _set_diff(label: str, before: Iterable[str], after: Iterable[str]) -> list[str]:
    b, a = set(before), set(after)
    return [f"{label}: new {item}" for item in sorted(a - b)] + [
        f"{label}: gone {item}" for item in sorted(b - a)
    ]


def diff_host_state(before: HostState, after: HostState) -> list[str]:
    """Human-readable differences; empty when the host is as it was."""
    problems: list[str] = []
    problems += _set_diff("mount", before.mounts, after.mounts)
    problems += _set_diff("link", before.links, after.links)
    problems += _set_diff("iptables", before.iptables, after.iptables)
    problems += _set_diff("ip6tables", before.ip6tables, after.ip6tables)
    for key in sorted(set(before.sysctls) | set(after.sysctls)):
        if before.sysctls.get(key) != after.sysctls.get(key):
            problems.append(
                f"sysctl {key}: was {before.sysctls.get(key)!r}, is {after.sysctls.get(key)!r}"
            )
    problems += _set_diff("listening", before.listening, after.listening)
    problems += _set_diff("process", before.processes, after.processes)
    for path in sorted(set(before.paths) | set(after.paths)):
        if before.paths.get(path) != after.paths.get(path):
            state = "exists" if after.paths.get(path) else "is missing"
            problems.append(f"path {path}: {state} now")
    for directory in sorted(set(before.listings) | set(after.listings)):
        problems += _set_diff(
            f"entry of {directory}",
            before.listings.get(directory, frozenset()),
            after.listings.get(directory, frozenset()),
        )
    problems += _set_diff("cgroup", before.cgroups, after.cgroups)
    return problems


def host_state_to_json(state: HostState) -> dict[str, Any]:
    """A JSON-able form of ``state`` (sets become sorted lists), for the state file."""
    return {
        "mounts": sorted(state.mounts),
        "links": sorted(state.links),
        "iptables": list(state.iptables),
        "ip6tables": list(state.ip6tables),
        "sysctls": dict(state.sysctls),
        "listening": sorted(state.listening),
        "processes": sorted(state.processes),
        "paths": dict(state.paths),
        "listings": {k: sorted(v) for k, v in state.listings.items()},
        "cgroups": sorted(state.cgroups),
    }


def host_state_from_json(data: Mapping[str, Any]) -> HostState:
    """The inverse of :func:`host_state_to_json`."""
    return HostState(
        mounts=frozenset(data["mounts"]),
        links=frozenset(data["links"]),
        iptables=tuple(data["iptables"]),
        ip6tables=tuple(data["ip6tables"]),
        sysctls=dict(data["sysctls"]),
        listening=frozenset(data["listening"]),
        processes=frozenset(data["processes"]),
        paths={k: bool(v) for k, v in data["paths"].items()},
        listings={k: frozenset(v) for k, v in data["listings"].items()},
        cgroups=frozenset(data["cgroups"]),
    )


# What of the host-wide state a node can touch (see :func:`node_scope`).
NODE_MOUNT_PREFIXES = (
    "/run/netns",
    "/run/containerd",
    "/var/lib/kubelet",
    "/var/lib/containerd",
    "/var/lib/cni",
    "/sys/fs/cgroup",
)
NODE_IPTABLES_MARKS = ("KUBE-", "CNI-", BRIDGE, POD_SUBNET.rsplit(".", 1)[0] + ".")


def link_name(entry: str) -> str:
    """The link name of a :attr:`HostState.links` entry (``name`` or ``name master=X``)."""
    return entry.split(" ", 1)[0]


def node_scope(state: HostState, owner: Path, bridge: str = BRIDGE) -> HostState:
    """``state`` reduced to what a node under ``owner`` can change: mounts under ``owner`` or
    :data:`NODE_MOUNT_PREFIXES`; our bridge, veths on it and masterless veths; iptables lines
    naming KUBE-/CNI- chains, the bridge or the pod subnet. The rest (sysctls, paths, cgroups,
    processes and listeners, already owner-scoped) is kept.

    Why: Docker or another test on the same host mounts overlays and adds veths and DOCKER
    chains while a node runs; a host-wide diff would blame the node for them.
    """
    roots = [str(owner).rstrip("/"), *NODE_MOUNT_PREFIXES]

    def our_mount(entry: str) -> bool:
        point = entry.split(" ", 1)[0]
        return any(point == r or point.startswith(r + "/") for r in roots)

    def our_link(entry: str) -> bool:
        name, _, master = entry.partition(" master=")
        return bool({bridge, SERVICE_LINK} & {name, master}) or (
            name.startswith("veth") and not master
        )

    def our_rule(line: str) -> bool:
        return any(mark in line for mark in NODE_IPTABLES_MARKS)

    return dataclasses.replace(
        state,
        mounts=frozenset(filter(our_mount, state.mounts)),
        links=frozenset(filter(our_link, state.links)),
        iptables=tuple(filter(our_rule, state.iptables)),
        ip6tables=tuple(filter(our_rule, state.ip6tables)),
    )


def preflight_problems(
    state: HostState, running: Iterable[str] = (), bridge: str = BRIDGE
) -> list[str]:
    """Why a node must not start on a host in ``state`` with processes ``running`` (comms):
    another kubelet, or a killed run's leftovers (which would be taken for the host's own and
    never cleaned)."""
    problems = []
    if bridge in {link_name(entry) for entry in state.links}:
        problems.append(f"link {bridge} exists (a node is running or a killed run left it)")
    problems += [
        f"cgroup {c} exists (another kubelet, or leftovers)" for c in sorted(state.cgroups)
    ]
    if KUBELET in set(running):
        problems.append("a kubelet is running (another node?)")
    return problems


# --------------------------------------------------------------------------- host state (I/O)


def _mounts() -> frozenset[str]:
    found = set()
    for line in Path("/proc/self/mountinfo").read_text(encoding="utf-8").splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        found.add(f"{fields[4]} {tail[0] if tail else '?'} {tail[1] if len(tail) > 1 else '?'}")
    return frozenset(found)


def _mountpoints() -> list[str]:
    return [m.split(" ", 1)[0] for m in _mounts()]


def _run(argv: Sequence[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)


def node_processes(owner: Path | None = None) -> dict[int, str]:
    """pid -> comm of the processes a node starts (:data:`NODE_COMMS`); with ``owner``, only
    those whose command line names it (each of ours names its state directory: containerd's
    and the kubelet's --config, the shims' -address), so another run's are not counted."""
    found = {}
    needle = None if owner is None else str(owner).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text(encoding="utf-8").strip()
            if comm not in NODE_COMMS:
                continue
            if needle is not None and needle not in (entry / "cmdline").read_bytes():
                continue
        except OSError:
            continue
        found[int(entry.name)] = comm
    return found


def _listening(pids: Mapping[int, str]) -> frozenset[str]:
    """TCP listeners owned by ``pids``."""
    result = _run(["ss", "-ltnpH"])
    found = set()
    for line in result.stdout.splitlines():
        parts = line.split()
        for pid in (int(p) for p in re.findall(r"pid=(\d+)", line)):
            if pid in pids and len(parts) >= 4:
                found.add(f"{parts[3]} {pids[pid]}")
    return frozenset(found)


def _cgroups() -> frozenset[str]:
    found: set[str] = set()
    if CGROUP_ROOT.is_dir():
        for hierarchy in CGROUP_ROOT.iterdir():
            with contextlib.suppress(OSError):
                found.update(str(p) for p in hierarchy.glob(f"{CGROUP_PREFIX}*"))
    return frozenset(found)


def _read_sysctl(name: str) -> str | None:
    try:
        return (Path("/proc/sys") / name).read_text(encoding="utf-8").strip()
    except OSError:
        return None


def _links() -> frozenset[str]:
    """Network links, each as ``name`` or ``name master=BRIDGE``."""
    net = Path("/sys/class/net")
    found = set()
    for name in os.listdir(net):
        master = net / name / "master"
        found.add(f"{name} master={master.resolve().name}" if master.exists() else name)
    return frozenset(found)


def capture_host_state(owner: Path | None = None) -> HostState:
    """Record what a node can change on this host (see the module docstring).

    ``owner`` (a node's state directory) limits processes and listeners to that node's; the
    rest is host-wide.
    """
    processes = node_processes(owner)
    sysctls = {name: value for name in HOST_SYSCTLS if (value := _read_sysctl(name)) is not None}
    listings = {}
    for directory in HOST_LISTED_DIRS:
        with contextlib.suppress(OSError):
            listings[directory] = frozenset(os.listdir(directory))
    return HostState(
        mounts=_mounts(),
        links=_links(),
        iptables=normalize_iptables_save(_run(["iptables-save"]).stdout),
        ip6tables=normalize_iptables_save(_run(["ip6tables-save"]).stdout),
        sysctls=sysctls,
        listening=_listening(processes),
        processes=frozenset(f"{comm} (pid {pid})" for pid, comm in processes.items()),
        paths={path: os.path.lexists(path) for path in HOST_PATHS},
        listings=listings,
        cgroups=_cgroups(),
    )


def unmount_under(prefixes: Sequence[Path | str], keep: Iterable[str] = ()) -> list[str]:
    """Unmount every mount at or below one of ``prefixes`` (deepest first), except ``keep``."""
    kept = set(keep)
    roots = [str(p).rstrip("/") for p in prefixes]
    targets = [
        point
        for point in _mountpoints()
        if point not in kept and any(point == r or point.startswith(r + "/") for r in roots)
    ]
    failed = []
    for point in sorted(set(targets), key=lambda p: p.count("/"), reverse=True):
        if _run(["umount", point]).returncode != 0 and _run(["umount", "-l", point]).returncode:
            failed.append(point)
    return failed


def _remove_iptables_chains(
    tool: str, before: Sequence[str], prefixes: tuple[str, ...] = ("KUBE-", "CNI-")
) -> None:
    """Delete chains named ``prefixes*`` that ``tool`` (iptables/ip6tables) did not have before
    (the kubelet's utility chains; CNI's, should masquerading be turned on)."""
    old = iptables_chains(before)
    now = iptables_chains(normalize_iptables_save(_run([f"{tool}-save"]).stdout))
    for table, chains in now.items():
        new = {c for c in chains if c.startswith(prefixes) and c not in old.get(table, set())}
        if not new:
            continue
        rules = _run([tool, "-t", table, "-S"]).stdout.splitlines()
        for rule in rules:  # first the jumps into them, from any chain
            words = rule.split()
            if rule.startswith("-A ") and any(
                words[i] in {"-j", "-g"} and words[i + 1] in new for i in range(len(words) - 1)
            ):
                _run([tool, "-t", table, "-D", *words[1:]])
        for chain in new:
            _run([tool, "-t", table, "-F", chain])
        for chain in new:
            _run([tool, "-t", table, "-X", chain])


def _kill_cgroup_members(before: frozenset[str]) -> None:
    """SIGKILL processes left in ``kubepods`` cgroups that are new since ``before`` (pods of a
    node whose containerd died: a dead shim leaves its container running). Only cgroups this
    node created are touched."""
    killed = False
    for path in sorted(_cgroups() - before):
        for procs in Path(path).rglob("cgroup.procs"):
            with contextlib.suppress(OSError, ValueError):
                for pid in {int(p) for p in procs.read_text(encoding="utf-8").split()}:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                        killed = True
    if killed:
        time.sleep(0.5)  # let them exit so their cgroups can be removed


def _remove_cgroups(before: frozenset[str]) -> None:
    for path in sorted(_cgroups() - before):
        for directory in sorted(
            (p for p in Path(path).rglob("*") if p.is_dir()),
            key=lambda p: len(p.parts),
            reverse=True,
        ):
            with contextlib.suppress(OSError):
                directory.rmdir()
        with contextlib.suppress(OSError):
            Path(path).rmdir()


def _remove_netns_and_links(before: HostState, bridge: str) -> None:
    netns = Path("/run/netns")
    old_netns = before.listings.get(str(netns), frozenset())
    if netns.is_dir():
        for entry in netns.iterdir():
            if entry.name.startswith("cni-") and entry.name not in old_netns:
                with contextlib.suppress(OSError):
                    entry.unlink()
    net = Path("/sys/class/net")
    for link in sorted(set(os.listdir(net)) - {link_name(entry) for entry in before.links}):
        master = net / link / "master"
        if master.exists() and master.resolve().name == bridge:
            _run(["ip", "link", "delete", link])
    for ours in (bridge, SERVICE_LINK):
        if ours not in {link_name(entry) for entry in before.links} and (net / ours).exists():
            _run(["ip", "link", "delete", ours])


def _restore_sysctls(before: HostState) -> None:
    for name, value in before.sysctls.items():
        if _read_sysctl(name) != value:
            with contextlib.suppress(OSError):
                (Path("/proc/sys") / name).write_text(value + "\n", encoding="utf-8")


def _remove_new_paths(before: HostState) -> None:
    for directory, ours in NODE_ENTRIES.items():
        old = before.listings.get(directory)
        if old is None or not Path(directory).is_dir():
            continue  # absent before: the whole path goes below
        for entry in (set(os.listdir(directory)) - old) & ours:
            shutil.rmtree(Path(directory) / entry, ignore_errors=True)
    for name, existed in before.paths.items():
        path = Path(name)
        if existed or not os.path.lexists(path):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def restore_host(before: HostState, bridge: str = BRIDGE) -> None:
    """Undo what a node left on the host since ``before`` (after its processes stopped).

    First any process still in a new ``kubepods`` cgroup (a pod of a node that died), then in
    real-node.md's order: mounts (network namespaces, the kubelet's and containerd's),
    network namespaces and links (veths on our bridge, then the bridge), KUBE-* chains,
    sysctls (ip_forward and the kubelet's tunables), paths that did not exist, then the
    empty ``kubepods`` cgroups. What existed before is left alone.
    """
    _kill_cgroup_members(before.cgroups)
    unmount_under(
        ["/run/netns", "/run/containerd", "/var/lib/kubelet"],
        keep=(m.split(" ", 1)[0] for m in before.mounts),
    )
    _remove_netns_and_links(before, bridge)
    _remove_iptables_chains("iptables", before.iptables)
    _remove_iptables_chains("ip6tables", before.ip6tables)
    _restore_sysctls(before)
    _remove_new_paths(before)
    _remove_cgroups(before.cgroups)


# --------------------------------------------------------------------------- images (I/O)


def busybox_layer(busybox: Path = BUSYBOX_BINARY) -> bytes:
    """A deterministic tar: /bin/busybox, a link per applet, /etc/passwd|group, /tmp."""
    applets = _run([str(busybox), "--list"]).stdout.split()
    if not applets:
        raise RuntimeError(f"{busybox} --list printed no applets; is busybox-static installed?")
    buf = io.BytesIO()

    def add(name: str, kind: bytes, mode: int, data: bytes = b"", link: str = "") -> None:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.mtime, info.linkname = kind, mode, 0, link
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data) if data else None)

    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for directory, mode in (("bin", 0o755), ("etc", 0o755), ("tmp", 0o1777)):
            add(directory, tarfile.DIRTYPE, mode)
        add("bin/busybox", tarfile.REGTYPE, 0o755, busybox.read_bytes())
        for applet in sorted(set(applets) - {"busybox"}):
            add(f"bin/{applet}", tarfile.SYMTYPE, 0o777, link="busybox")
        add(
            "etc/passwd",
            tarfile.REGTYPE,
            0o644,
            b"root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
        )
        add("etc/group", tarfile.REGTYPE, 0o644, b"root:x:0:\nnogroup:x:65534:\n")
    return buf.getvalue()


def write_image_archive(path: Path, layer: bytes, images: Mapping[str, Sequence[str]]) -> Path:
    """An OCI image-layout tar holding one image per name (name -> command), sharing ``layer``."""
    return write_images_archive(
        path, {name: Image((layer,), tuple(cmd)) for name, cmd in images.items()}
    )


def write_images_archive(path: Path, images: Mapping[str, Image]) -> Path:
    """An OCI image-layout tar holding one image per name; equal layers are stored once."""
    blobs: dict[str, Blob] = {}
    manifests: dict[str, Blob] = {}
    for name, image in images.items():
        for layer in image.layers:
            layer_blob = Blob(OCI_LAYER, layer)
            blobs[layer_blob.digest] = layer_blob
        config, manifest = layered_image_blobs(image)
        blobs[config.digest] = config
        blobs[manifest.digest] = manifest
        manifests[name] = manifest
    files = {
        "oci-layout": _canonical({"imageLayoutVersion": "1.0.0"}),
        "index.json": _canonical(oci_index(manifests)),
        **{f"blobs/sha256/{d.split(':', 1)[1]}": b.data for d, b in blobs.items()},
    }
    with tarfile.open(path, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    return path


# --------------------------------------------------------------------------- the node


class Node:
    """containerd + CNI bridge + kubelet under ``state_dir``, registered as ``localhost``.

    Use :meth:`start` and :meth:`stop` (or ``with``). ``kubeconfig`` is the control plane's
    admin kubeconfig (``ControlPlane.admin_kubeconfig``, node profile). ``detach=True`` (the
    CLI's ``up``) leaves containerd and the kubelet running when this process exits; otherwise
    Linux SIGKILLs them if it dies (the state file lets ``down`` clean up either way).
    """

    def __init__(
        self,
        state_dir: Path,
        kubeconfig: Path,
        *,
        kubelet: Path | None = None,
        start_timeout: float = START_TIMEOUT,
        detach: bool = False,
        apiserver_port: int | None = None,
        path_prefix: Path | None = None,
    ) -> None:
        self.layout = NodeLayout(Path(state_dir).absolute())
        self.detach = detach
        self.kubeconfig = Path(kubeconfig).absolute()
        self.kubelet_binary = kubelet
        self.start_timeout = start_timeout
        self.apiserver_port = apiserver_port
        """When set, pods reach kube-apiserver (127.0.0.1:port) as the ``kubernetes`` Service."""
        self.path_prefix = path_prefix
        """A directory put first in the kubelet's PATH (the ``mount`` wrapper for ``nfs:``)."""
        self.host_before: HostState | None = None
        """The host as :meth:`start` found it; :meth:`stop` restores it."""
        self.timings: dict[str, float] = {}
        """Seconds per start step (containerd, images, kubelet, ready)."""
        self.ports: KubeletPorts | None = None
        self._records: list[ProcessRecord] = []
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    # ------------------------------------------------------------------ public

    def start(self) -> None:
        """Start containerd, import the images, start the kubelet; return once node is Ready.

        On failure everything started is stopped, the host restored, and RuntimeError names
        the step and carries the log tail.
        """
        if self._records:
            raise RuntimeError("the node is already started")
        if os.geteuid() != 0:
            raise RuntimeError("a kubelet node needs root (mounts, cgroups, network namespaces)")
        kubelet = self.kubelet_binary or resolve_paths([KUBELET], build=False)[KUBELET]
        before = capture_host_state(self.layout.state)
        problems = preflight_problems(before, node_processes().values())
        if problems:
            raise RuntimeError(
                "node: the host is not clean, refusing to start:\n  " + "\n  ".join(problems)
            )
        self.host_before = before
        for directory in self.layout.directories():
            directory.mkdir(parents=True, exist_ok=True)
        self._write_state()
        try:
            self._step("containerd", self._start_containerd)
            if self.apiserver_port is not None:
                self._step("service", self._start_service_proxy)
            self._step("images", self._import_images)
            self._step("kubelet", lambda: self._start_kubelet(kubelet))
            self._step("ready", self._wait_ready)
        except BaseException:
            with contextlib.suppress(Exception):
                self.stop()
            raise

    def stop(self) -> None:
        """Drain and stop the kubelet, stop containerd, then restore the host. Idempotent."""
        began = time.monotonic()
        try:
            if self._records:
                if self._is_running(KUBELET):
                    with contextlib.suppress(Exception):
                        self._drain()
                self._stop_component(KUBELET)
                unmount_under([self.layout.kubelet_root])
                if self._is_running(CONTAINERD):
                    self._remove_containers()
                self._stop_component(CONTAINERD)
                self._kill_leftover_shims()
                self._stop_component(SERVICE_PROXY)
        finally:
            self._records = []
            self._children = {}
            unmount_under([self.layout.state])
            if self.host_before is not None:
                restore_host(self.host_before)
            (self.layout.state / STATE_FILE).unlink(missing_ok=True)
            self.timings["stop"] = time.monotonic() - began

    def is_running(self) -> bool:
        """containerd and the kubelet it started are both alive."""
        return self._is_running(CONTAINERD) and self._is_running(KUBELET)

    @classmethod
    def from_state(cls, state_dir: Path) -> Node:
        """Re-attach to a node started by another process (``up``, or a killed test run)."""
        path = Path(state_dir).absolute() / STATE_FILE
        data = json.loads(path.read_text(encoding="utf-8"))
        node = cls(Path(state_dir), Path(data["kubeconfig"]), detach=bool(data["detach"]))
        node._records = [ProcessRecord(**r) for r in data["processes"]]
        before = data.get("host_before")
        node.host_before = None if before is None else host_state_from_json(before)
        ports = data.get("ports")
        node.ports = None if ports is None else KubeletPorts(**ports)
        return node

    def host_differences(self, *, host_wide: bool = False) -> list[str]:
        """What differs from the host as :meth:`start` found it (empty after :meth:`stop`).

        Limited to what this node can touch (:func:`node_scope`), unless ``host_wide``.
        """
        if self.host_before is None:
            return []
        before, after = self.host_before, capture_host_state(self.layout.state)
        if not host_wide:
            before = node_scope(before, self.layout.state)
            after = node_scope(after, self.layout.state)
        return diff_host_state(before, after)

    def kubectl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """``kubectl`` with the admin kubeconfig."""
        return _run([str(kubectl_binary()), f"--kubeconfig={self.kubeconfig}", *args], timeout)

    def ctr(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``ctr`` against this node's containerd, CRI namespace."""
        return _run(ctr_argv(self.layout, *args))

    def logs_tail(self, lines: int = 40) -> str:
        parts = []
        for name in (CONTAINERD, KUBELET):
            path = self.layout.log_dir / f"{name}.log"
            body = "\n".join(tail_lines(path, lines)) or "(empty)"
            parts.append(f"===== {name}: last {lines} lines of {path} =====\n{body}")
        return "\n".join(parts)

    def __enter__(self) -> Node:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ internals

    def _step(self, name: str, action: Callable[[], None]) -> None:
        began = time.monotonic()
        action()
        self.timings[name] = time.monotonic() - began

    def _spawn(
        self, component: str, argv: list[str], env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        proc, record = spawn_logged(
            component,
            argv,
            self.layout.log_dir / f"{component}.log",
            cwd=self.layout.state,
            detach=self.detach,
            who="controlplane.node",
            env=env,
        )
        self._records.append(record)
        self._children[proc.pid] = proc
        self._write_state()
        return proc

    def _write_state(self) -> None:
        state = {
            "kubeconfig": str(self.kubeconfig),
            "detach": self.detach,
            "processes": [
                {"component": r.component, "pid": r.pid, "start_ticks": r.start_ticks}
                for r in self._records
            ],
            "host_before": None
            if self.host_before is None
            else host_state_to_json(self.host_before),
            "ports": None
            if self.ports is None
            else {"server": self.ports.server, "healthz": self.ports.healthz},
        }
        path = self.layout.state / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
        tmp.replace(path)

    def _record(self, component: str) -> ProcessRecord | None:
        return next((r for r in self._records if r.component == component), None)

    def _is_running(self, component: str) -> bool:
        record = self._record(component)
        if record is None:
            return False
        proc = self._children.get(record.pid)
        if proc is not None:
            return proc.poll() is None
        return _is_running(record)  # started by another process: same pid and start time

    def _stop_component(self, component: str) -> None:
        record = self._record(component)
        if record is None:
            return
        child = self._children.pop(record.pid, None)
        stop_processes([record], None if child is None else {record.pid: child}, grace=15)
        self._records.remove(record)

    def _wait(self, what: str, component: str, probe: Callable[[], bool]) -> None:
        deadline = time.monotonic() + self.start_timeout
        record = self._record(component)
        while True:
            if record is not None and not self._is_running(component):
                raise RuntimeError(f"node: {component} exited while {what}\n{self.logs_tail()}")
            if probe():
                return
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"node: {what}: not within {self.start_timeout:.0f} s\n{self.logs_tail()}"
                )
            time.sleep(0.2)

    def _start_containerd(self) -> None:
        default = _run(["containerd", "config", "default"])
        if default.returncode != 0:
            raise RuntimeError(f"containerd config default failed: {default.stderr}")
        self.layout.containerd_config.write_text(
            containerd_config(default.stdout, self.layout), encoding="utf-8"
        )
        conflist = self.layout.cni_conf_dir / f"10-{CNI_NETWORK}.conflist"
        conflist.write_text(json.dumps(cni_conflist(self.layout), indent=2), encoding="utf-8")
        self._spawn(CONTAINERD, ["containerd", f"--config={self.layout.containerd_config}"])
        self._wait(
            "waiting for containerd's socket",
            CONTAINERD,
            lambda: self.layout.containerd_socket.exists() and self.ctr("version").returncode == 0,
        )

    def _start_service_proxy(self) -> None:
        """Make the ``kubernetes`` Service answer: its ClusterIP as a local address of a link
        of ours (pods reach it through their gateway, the CNI bridge) and a forwarder to the
        apiserver. Both go with the link and the process on the way down."""
        for argv in (
            ["ip", "link", "add", SERVICE_LINK, "type", "bridge"],
            ["ip", "link", "set", SERVICE_LINK, "up"],
            ["ip", "addr", "add", f"{KUBERNETES_SERVICE_IP}/32", "dev", SERVICE_LINK],
        ):
            result = _run(argv)
            if result.returncode != 0:
                raise RuntimeError(f"node: {' '.join(argv)} failed: {result.stderr.strip()}")
        listen = f"{KUBERNETES_SERVICE_IP}:{KUBERNETES_SERVICE_PORT}"
        self._spawn(
            SERVICE_PROXY,
            [
                sys.executable,
                "-m",
                "controlplane.service_proxy",
                f"--listen={listen}",
                f"--to={LOOPBACK}:{self.apiserver_port}",
            ],
            {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
        )
        self._wait(
            "waiting for the service proxy",
            SERVICE_PROXY,
            lambda: _accepts(KUBERNETES_SERVICE_IP, KUBERNETES_SERVICE_PORT),
        )

    def _import_images(self) -> None:
        archive = write_image_archive(
            self.layout.images_dir / "local-images.tar",
            busybox_layer(),
            {PAUSE_IMAGE: PAUSE_COMMAND, BUSYBOX_IMAGE: ("sh",), SEEDS_BUSYBOX_IMAGE: ("sh",)},
        )
        result = self.ctr("images", "import", str(archive))
        if result.returncode != 0:
            raise RuntimeError(f"ctr images import failed: {result.stderr.strip()}")

    def _start_kubelet(self, kubelet: Path) -> None:
        server, healthz = free_ports(2)
        self.ports = KubeletPorts(server=server, healthz=healthz)
        self._write_state()
        self.layout.kubelet_config.write_text(
            yaml.safe_dump(kubelet_config(self.layout, self.ports), sort_keys=False),
            encoding="utf-8",
        )
        env = dict(os.environ)
        if self.path_prefix is not None:
            env["PATH"] = f"{self.path_prefix}:{env.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
        self._spawn(KUBELET, [str(kubelet), *kubelet_args(self.layout, self.kubeconfig)], env)
        port = self.ports.healthz
        self._wait(
            "waiting for the kubelet's /healthz",
            KUBELET,
            lambda: (r := _http_status(port, "/healthz")) is not None and r[0] == 200,
        )

    def _node_ready(self) -> bool:
        result = self.kubectl(
            "get",
            "node",
            NODE_NAME,
            "-o",
            'jsonpath={.status.conditions[?(@.type=="Ready")].status}',
        )
        return result.returncode == 0 and result.stdout.strip() == "True"

    def _wait_ready(self) -> None:
        self._wait("waiting for node Ready", KUBELET, self._node_ready)

    def _drain(self) -> None:
        """Cordon, delete this node's pods (1 s grace) and wait for their sandboxes to go."""
        self.kubectl("cordon", NODE_NAME)
        self.kubectl(
            "delete",
            "pods",
            "--all-namespaces",
            f"--field-selector=spec.nodeName={NODE_NAME}",
            "--grace-period=1",
            "--wait=true",
            f"--timeout={int(DRAIN_TIMEOUT)}s",
            timeout=DRAIN_TIMEOUT + 30,
        )
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while time.monotonic() < deadline:
            if not self.ctr("tasks", "ls", "-q").stdout.split():
                return
            time.sleep(0.5)

    def _remove_containers(self) -> None:
        """Kill and delete whatever containers the kubelet left (shims exit with them)."""
        for task in self.ctr("tasks", "ls", "-q").stdout.split():
            self.ctr("tasks", "kill", "--signal=SIGKILL", task)
        deadline = time.monotonic() + 10
        while self.ctr("tasks", "ls", "-q").stdout.split() and time.monotonic() < deadline:
            for task in self.ctr("tasks", "ls", "-q").stdout.split():
                self.ctr("tasks", "delete", "--force", task)
            time.sleep(0.2)
        for container in self.ctr("containers", "ls", "-q").stdout.split():
            self.ctr("containers", "delete", container)

    def _kill_leftover_shims(self) -> None:
        """SIGKILL shims still serving our containerd (their argv names our socket)."""
        socket = str(self.layout.containerd_socket)
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                comm = (entry / "comm").read_text(encoding="utf-8").strip()
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if comm == "containerd-shim" and socket.encode() in argv:
                stat = _proc_stat(int(entry.name))
                if stat is not None:
                    record = ProcessRecord("containerd-shim", int(entry.name), stat[1])
                    with contextlib.suppress(RuntimeError):
                        stop_processes([record], grace=5)


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def kubelet_binary(build: bool = False) -> Path:
    """The kubelet from ``TEST_ASSET_KUBELET``, ``$KUBEBUILDER_ASSETS`` or build.sh's cache."""
    return resolve_paths([KUBELET], build=build)[KUBELET]


# --------------------------------------------------------------------------- CLI


def _cmd_up(args: argparse.Namespace) -> int:
    state_dir = Path(args.state).absolute()
    if (state_dir / STATE_FILE).exists():
        existing = Node.from_state(state_dir)
        if existing.is_running():
            print(f"node: already running in {state_dir}", file=sys.stderr)
            return 0
        print("node: cleaning up a stale node", file=sys.stderr)
        existing.stop()
    node = Node(state_dir, Path(args.kubeconfig), detach=True)
    try:
        node.start()
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 1
    steps = ", ".join(f"{k} {v:.2f} s" for k, v in node.timings.items())
    print(
        f"node: {NODE_NAME} Ready ({steps}); logs in {node.layout.log_dir}; stop with "
        f"`python -m controlplane.node down --state {args.state}`",
        file=sys.stderr,
    )
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    state_dir = Path(args.state).absolute()
    if not (state_dir / STATE_FILE).exists():
        print(f"node: nothing recorded in {state_dir}", file=sys.stderr)
        return 0
    node = Node.from_state(state_dir)
    node.stop()
    left = node.host_differences()
    print(f"node: stopped the node in {state_dir}", file=sys.stderr)
    for line in left:
        print(f"node: still differs: {line}", file=sys.stderr)
    return 1 if left else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m controlplane.node",
        description="A kubelet node (containerd, CNI bridge) for the node-profile control plane "
        "(`python -m controlplane.runner up --node`). Needs root.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start detached; returns once the node is Ready")
    up.add_argument("--state", required=True, help="state directory (configs, logs, roots)")
    up.add_argument("--kubeconfig", required=True, help="the control plane's admin kubeconfig")
    down = sub.add_parser("down", help="drain, stop and restore the host as `up` found it")
    down.add_argument("--state", required=True, help="the directory given to `up`")
    args = parser.parse_args(argv)
    handler = _cmd_up if args.command == "up" else _cmd_down
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
