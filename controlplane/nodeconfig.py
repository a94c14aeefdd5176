"""Where a kubelet node keeps its files, and what its containerd, CNI and kubelet are told.

What: :class:`NodeLayout` (every path of one node, under its state directory), containerd's
config (``containerd config default`` with our settings), the CNI bridge conflist, the
KubeletConfiguration and the kubelet's flags, and ``ctr``'s argv; and the names the node goes
by (node, bridge, links, network, images' namespace). All pure: they return text, dicts and
lists, and :class:`controlplane.node.Node` writes them.

Why: what a kubelet needs on this machine (cgroup v1, no CAP_SYS_RESOURCE, loopback-only
control plane) is recorded in ``reference/real-node.md``, and each setting here answers one of
its findings; being pure, they are tested without root (``tests/unit/test_node_args.py``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controlplane.network import LOOPBACK, SERVICE_CLUSTER_IP_RANGE

NODE_NAME = "localhost"  # --hostname-override: the apiserver then dials "localhost" for logs
BRIDGE = "nfsp-e2e0"
SERVICE_LINK = "nfsp-e2e-svc"
"""A port-less bridge holding the ``kubernetes`` Service's ClusterIP as a local address (the
CNI bridge plugin refuses a bridge with an address it did not set; no dummy links here)."""
CNI_NETWORK = "nfsp-e2e"
POD_SUBNET = "10.244.0.0/24"
K8S_NAMESPACE = "k8s.io"  # containerd namespace of the CRI plugin
PAUSE_IMAGE = "docker.io/local/pause:3.10"


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
