"""Unit tests for the node profile's pure builders: no process is started, nothing is mounted.

Covers the node-profile arguments of controlplane.flags (ServiceAccount admission, the extra
controllers, kube-scheduler), the node's configs (controlplane.nodeconfig: containerd, CNI,
kubelet), its image metadata (controlplane.ocipack) and its host-state diff
(controlplane.hoststate), against what real-node.md found necessary.
"""

from __future__ import annotations

import io
import json
import tarfile
import tomllib
from pathlib import Path

import pytest

from controlplane import binaries, hoststate, node, nodeconfig, runner
from controlplane.binaries import Binaries, BinariesNotFoundError, resolve_binaries
from controlplane.flags import (
    KCM_CONTROLLERS,
    apiserver_args,
    controller_manager_args,
    scheduler_args,
)
from controlplane.hoststate import (
    HostState,
    diff_host_state,
    iptables_chains,
    node_scope,
    normalize_iptables_save,
    preflight_problems,
)
from controlplane.nodeconfig import (
    KubeletPorts,
    NodeLayout,
    cni_conflist,
    containerd_config,
    kubelet_args,
    kubelet_config,
    set_toml_key,
)
from controlplane.ocipack import image_blobs, oci_index, write_image_archive
from controlplane.pki import Pki


def _flags(argv: list[str]) -> dict[str, str]:
    out = {}
    for arg in argv:
        name, _, value = arg.removeprefix("--").partition("=")
        out[name] = value
    return out


PKI = Pki.in_dir(Path("/state/pki"))


def _apiserver(service_accounts: bool) -> dict[str, str]:
    return _flags(
        apiserver_args(
            etcd_url="http://127.0.0.1:1",
            secure_port=6443,
            cert_dir=Path("/state/certs"),
            pki=PKI,
            service_accounts=service_accounts,
        )
    )


def _kcm(node_pki: Pki | None) -> dict[str, str]:
    return _flags(
        controller_manager_args(
            kubeconfig=Path("/state/kubeconfig"),
            secure_port=10257,
            cert_dir=Path("/state/kcm"),
            node_pki=node_pki,
        )
    )


# ---------------------------------------------------------------- control plane, node profile


def test_default_apiserver_still_disables_service_account_admission() -> None:
    assert _apiserver(False)["disable-admission-plugins"] == "ServiceAccount"
    assert "allow-privileged" not in _apiserver(False)


def test_node_profile_apiserver_admits_privileged_containers_as_kubeadm_does() -> None:
    assert _apiserver(True)["allow-privileged"] == "true"


def test_node_profile_apiserver_keeps_every_default_admission_plugin() -> None:
    flags = _apiserver(True)
    assert "disable-admission-plugins" not in flags
    assert "enable-admission-plugins" not in flags
    # The TokenRequest signer that projected tokens need is there in both profiles.
    assert flags["service-account-signing-key-file"] == "/state/pki/sa.key"


def test_default_controller_manager_is_unchanged() -> None:
    flags = _kcm(None)
    assert flags["controllers"].split(",") == list(KCM_CONTROLLERS)
    assert "service-account-private-key-file" not in flags
    assert "root-ca-file" not in flags


def test_node_profile_controller_manager_adds_credentials_workloads_and_node_lifecycle() -> None:
    flags = _kcm(PKI)
    controllers = flags["controllers"].split(",")
    assert set(KCM_CONTROLLERS) <= set(controllers)
    for needed in (
        "serviceaccount-controller",
        "serviceaccount-token-controller",
        "root-ca-certificate-publisher-controller",
        "deployment-controller",
        "replicaset-controller",
        "statefulset-controller",
        "ephemeral-volume-controller",  # the claims of generic ephemeral volumes
        "node-lifecycle-controller",
        "garbage-collector-controller",  # rollouts and scale-down delete ReplicaSets' pods
    ):
        assert needed in controllers, needed
    assert len(controllers) == len(set(controllers))
    assert flags["service-account-private-key-file"] == "/state/pki/sa.key"
    assert flags["root-ca-file"] == "/state/pki/ca.crt"
    assert flags["bind-address"] == "127.0.0.1"


def test_scheduler_args_loopback_kubeconfig_no_leader_election() -> None:
    flags = _flags(
        scheduler_args(
            kubeconfig=Path("/state/kubeconfig"), secure_port=10259, cert_dir=Path("/state/s")
        )
    )
    assert flags == {
        "kubeconfig": "/state/kubeconfig",
        "leader-elect": "false",
        "bind-address": "127.0.0.1",
        "secure-port": "10259",
        "cert-dir": "/state/s",
    }


def test_node_profile_needs_a_scheduler_binary(tmp_path: Path) -> None:
    three = Binaries(Path("e"), Path("a"), Path("c"))
    with pytest.raises(ValueError, match="kube_scheduler"):
        runner.ControlPlane(tmp_path, three, node=True)
    plane = runner.ControlPlane(tmp_path, three)
    assert plane.components == binaries.COMPONENTS
    four = Binaries(Path("e"), Path("a"), Path("c"), Path("s"))
    assert runner.ControlPlane(tmp_path, four, node=True).components == (
        *binaries.COMPONENTS,
        "kube-scheduler",
    )
    with pytest.raises(BinariesNotFoundError):
        three.path("kube-scheduler")
    assert "kube_scheduler" not in three.as_dict()
    assert four.as_dict()["kube_scheduler"] == "s"


@pytest.fixture
def cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for var in (*binaries.ENV_OVERRIDES.values(), "KUBEBUILDER_ASSETS", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NFS_PROVISIONER_CACHE", str(tmp_path / "cache"))
    bin_dir = binaries.cache_bin_dir()
    bin_dir.mkdir(parents=True)
    for name in binaries.COMPONENTS:
        (bin_dir / name).write_text("#!/bin/sh\n")
    return bin_dir


def test_default_resolution_never_asks_for_the_scheduler(cache: Path) -> None:
    binaries = resolve_binaries(build=False)
    assert binaries.kube_scheduler is None


def test_node_resolution_names_the_missing_scheduler_and_how_to_build_it(cache: Path) -> None:
    with pytest.raises(BinariesNotFoundError) as info:
        resolve_binaries(build=False, node=True)
    assert "kube-scheduler" in str(info.value)
    assert "build.sh kube-scheduler" in str(info.value)
    (cache / "kube-scheduler").write_text("#!/bin/sh\n")
    assert resolve_binaries(build=False, node=True).kube_scheduler == cache / "kube-scheduler"


def test_kubelet_override_is_honoured(
    cache: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake = tmp_path / "my-kubelet"
    fake.write_text("#!/bin/sh\n")
    monkeypatch.setenv("TEST_ASSET_KUBELET", str(fake))
    assert node.kubelet_binary() == fake


# ---------------------------------------------------------------- containerd

DEFAULT_TOML = """\
version = 2
root = "/var/lib/containerd"
state = "/run/containerd"

[grpc]
  address = "/run/containerd/containerd.sock"
  tcp_address = ""

[debug]
  address = ""

[plugins]

  [plugins."io.containerd.grpc.v1.cri"]
    restrict_oom_score_adj = false
    sandbox_image = "registry.k8s.io/pause:3.6"

    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/opt/cni/bin"
      conf_dir = "/etc/cni/net.d"

    [plugins."io.containerd.grpc.v1.cri".containerd]
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          SystemdCgroup = true

  [plugins."io.containerd.internal.v1.opt"]
    path = "/opt/containerd"

[ttrpc]
  address = ""
"""
LAYOUT = NodeLayout(Path("/state/node"))


def test_containerd_config_moves_everything_under_state_and_sets_cri() -> None:
    config = tomllib.loads(containerd_config(DEFAULT_TOML, LAYOUT))
    assert config["root"] == "/state/node/containerd/root"
    assert config["state"] == "/state/node/containerd/state"
    assert config["grpc"]["address"] == "/state/node/containerd/containerd.sock"
    assert config["debug"]["address"] == ""  # only [grpc]'s address changes
    assert config["ttrpc"]["address"] == ""
    plugins = config["plugins"]
    assert plugins["io.containerd.internal.v1.opt"]["path"] == "/state/node/containerd/opt"
    cri = plugins["io.containerd.grpc.v1.cri"]
    assert cri["sandbox_image"] == "docker.io/local/pause:3.10"
    assert cri["restrict_oom_score_adj"] is True
    assert cri["cni"] == {"bin_dir": "/usr/lib/cni", "conf_dir": "/state/node/cni/net.d"}
    options = cri["containerd"]["runtimes"]["runc"]["options"]
    assert options["SystemdCgroup"] is False


def test_set_toml_key_refuses_a_missing_key_or_section() -> None:
    with pytest.raises(ValueError, match="nope"):
        set_toml_key(DEFAULT_TOML, "grpc", "nope", '"x"')
    with pytest.raises(ValueError, match=r"\[missing\]"):
        set_toml_key(DEFAULT_TOML, "missing", "address", '"x"')


def test_containerd_config_fails_loudly_if_the_default_changes_shape() -> None:
    with pytest.raises(ValueError, match="restrict_oom_score_adj"):
        containerd_config(DEFAULT_TOML.replace("restrict_oom_score_adj", "other"), LAYOUT)


# ---------------------------------------------------------------- CNI and kubelet


def test_cni_is_one_bridge_with_host_local_ipam_under_state_and_no_masquerade() -> None:
    conf = cni_conflist(LAYOUT)
    (bridge,) = conf["plugins"]
    assert bridge["type"] == "bridge"
    assert bridge["bridge"] == nodeconfig.BRIDGE
    assert bridge["ipMasq"] is False
    assert bridge["isGateway"] is True
    ipam = bridge["ipam"]
    assert ipam["type"] == "host-local"
    assert ipam["ranges"] == [[{"subnet": "10.244.0.0/24"}]]
    # Only the service range leaves the subnet: the node answers for the `kubernetes` Service.
    assert ipam["routes"] == [{"dst": "10.0.0.0/24"}]
    assert ipam["dataDir"] == "/state/node/cni/ipam"
    json.dumps(conf)


def test_kubelet_config_has_every_setting_this_machine_needs() -> None:
    config = kubelet_config(LAYOUT, KubeletPorts(server=20250, healthz=20248))
    assert config["failCgroupV1"] is False
    assert config["cgroupDriver"] == "cgroupfs"
    assert config["containerRuntimeEndpoint"] == "unix:///state/node/containerd/containerd.sock"
    assert config["authentication"]["anonymous"]["enabled"] is True
    assert config["authentication"]["webhook"]["enabled"] is False
    assert config["authorization"]["mode"] == "AlwaysAllow"
    assert config["address"] == config["healthzBindAddress"] == "127.0.0.1"
    assert (config["port"], config["healthzPort"], config["readOnlyPort"]) == (20250, 20248, 0)
    assert config["volumePluginDir"].startswith("/state/node/")
    assert config["podLogsDir"].startswith("/state/node/")
    assert config["imageGCHighThresholdPercent"] == 100
    assert config["imageGCLowThresholdPercent"] < 100
    assert config["makeIPTablesUtilChains"] is False
    for threshold in config["evictionHard"].values():
        assert threshold in {"1Mi", "1%"}


def test_kubelet_flags() -> None:
    flags = _flags(kubelet_args(LAYOUT, Path("/state/kubeconfig")))
    assert flags["kubeconfig"] == "/state/kubeconfig"
    assert flags["hostname-override"] == "localhost"
    assert flags["containerd"] == "/state/node/containerd/containerd.sock"
    assert flags["config"] == "/state/node/kubelet/config.yaml"
    for name in ("root-dir", "cert-dir"):
        assert flags[name].startswith("/state/node/")
    assert "node-ip" not in flags  # a loopback node IP is refused
    assert "pod-infra-container-image" not in flags  # gone in 1.36


def test_every_node_directory_is_under_its_state_dir() -> None:
    for directory in LAYOUT.directories():
        assert directory.is_relative_to(LAYOUT.state), directory


# ---------------------------------------------------------------- images


def test_image_blobs_reference_each_other_by_digest() -> None:
    layer = b"layer-bytes"
    config, manifest = image_blobs(layer, ["sleep", "2147483647"])
    parsed = json.loads(manifest.data)
    assert parsed["config"]["digest"] == config.digest
    assert parsed["config"]["size"] == len(config.data)
    assert parsed["layers"][0]["size"] == len(layer)
    conf = json.loads(config.data)
    assert conf["config"]["Cmd"] == ["sleep", "2147483647"]
    assert conf["rootfs"]["diff_ids"] == [parsed["layers"][0]["digest"]]
    assert (conf["os"], conf["architecture"]) == ("linux", "amd64")


def test_index_names_each_image_for_ctr_import() -> None:
    _, manifest = image_blobs(b"x", ["sh"])
    index = oci_index({nodeconfig.PAUSE_IMAGE: manifest})
    (entry,) = index["manifests"]
    assert entry["digest"] == manifest.digest
    assert entry["annotations"]["io.containerd.image.name"] == "docker.io/local/pause:3.10"
    assert entry["annotations"]["org.opencontainers.image.ref.name"] == "3.10"


def test_image_archive_is_a_complete_oci_layout(tmp_path: Path) -> None:
    archive = write_image_archive(
        tmp_path / "images.tar", b"layer", {"a:1": ["sh"], "b:2": ["sleep", "1"]}
    )
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
        index = json.load(io.BytesIO(tar.extractfile("index.json").read()))  # type: ignore[union-attr]
    assert {"oci-layout", "index.json"} <= names
    blobs = {n.removeprefix("blobs/sha256/") for n in names if n.startswith("blobs/")}
    assert len(blobs) == 5  # one shared layer, two configs, two manifests
    for entry in index["manifests"]:
        assert entry["digest"].removeprefix("sha256:") in blobs


# ---------------------------------------------------------------- host state

SAVE = """\
# Generated by iptables-nft-save v1.8.9 on Fri Dec  4 14:00:00 2026
*filter
:INPUT ACCEPT [10:2000]
:FORWARD ACCEPT [0:0]
:KUBE-FIREWALL - [0:0]
-A INPUT -j KUBE-FIREWALL
COMMIT
# Completed on Fri Dec  4 14:00:00 2026
"""


def test_iptables_save_is_compared_without_counters_and_comments() -> None:
    rules = normalize_iptables_save(SAVE)
    assert rules == (
        "*filter",
        ":INPUT ACCEPT",
        ":FORWARD ACCEPT",
        ":KUBE-FIREWALL -",
        "-A INPUT -j KUBE-FIREWALL",
        "COMMIT",
    )
    assert normalize_iptables_save(SAVE.replace("[10:2000]", "[99:1]")) == rules
    assert iptables_chains(rules) == {"filter": {"INPUT", "FORWARD", "KUBE-FIREWALL"}}


def test_same_host_has_no_differences() -> None:
    state = HostState(
        mounts=frozenset({"/ ext4 /dev/vda"}),
        sysctls={"net/ipv4/ip_forward": "0"},
        paths={"/var/lib/kubelet": False},
    )
    assert diff_host_state(state, state) == []


def test_every_kind_of_leftover_is_reported() -> None:
    before = HostState(
        mounts=frozenset({"/ ext4 /dev/vda"}),
        links=frozenset({"lo", "eth0"}),
        iptables=("*filter", ":INPUT ACCEPT", "COMMIT"),
        sysctls={"net/ipv4/ip_forward": "0", "kernel/panic": "1"},
        paths={"/var/lib/kubelet": False, "/run/containerd": False},
        listings={"/run/netns": frozenset()},
    )
    after = HostState(
        mounts=frozenset({"/ ext4 /dev/vda", "/var/lib/kubelet tmpfs tmpfs"}),
        links=frozenset({"lo", "eth0", "nfsp-e2e0"}),
        iptables=("*filter", ":INPUT ACCEPT", ":KUBE-FIREWALL -", "COMMIT"),
        ip6tables=(":KUBE-KUBELET-CANARY -",),
        sysctls={"net/ipv4/ip_forward": "1", "kernel/panic": "10"},
        listening=frozenset({"127.0.0.1:10250 kubelet"}),
        processes=frozenset({"containerd-shim (pid 42)"}),
        paths={"/var/lib/kubelet": True, "/run/containerd": False},
        listings={"/run/netns": frozenset({"cni-1234"})},
        cgroups=frozenset({"/sys/fs/cgroup/memory/kubepods"}),
    )
    report = diff_host_state(before, after)
    assert report == [
        "mount: new /var/lib/kubelet tmpfs tmpfs",
        "link: new nfsp-e2e0",
        "iptables: new :KUBE-FIREWALL -",
        "ip6tables: new :KUBE-KUBELET-CANARY -",
        "sysctl kernel/panic: was '1', is '10'",
        "sysctl net/ipv4/ip_forward: was '0', is '1'",
        "listening: new 127.0.0.1:10250 kubelet",
        "process: new containerd-shim (pid 42)",
        "path /var/lib/kubelet: exists now",
        "entry of /run/netns: new cni-1234",
        "cgroup: new /sys/fs/cgroup/memory/kubepods",
    ]
    assert diff_host_state(after, before)[0] == "mount: gone /var/lib/kubelet tmpfs tmpfs"


def test_preflight_refuses_another_node_or_leftovers_and_accepts_a_clean_host() -> None:
    assert preflight_problems(HostState(links=frozenset({"lo", "eth0"}))) == []
    assert preflight_problems(HostState(), ["containerd", "bash"]) == []  # a system containerd
    dirty = HostState(
        links=frozenset({"lo", nodeconfig.BRIDGE}),
        cgroups=frozenset({"/sys/fs/cgroup/pids/kubepods"}),
    )
    problems = preflight_problems(dirty, ["kubelet", "containerd"])
    assert len(problems) == 3
    assert any(nodeconfig.BRIDGE in p for p in problems)
    assert any("kubepods" in p for p in problems)
    assert any("kubelet is running" in p for p in problems)


def test_node_scope_keeps_what_a_node_touches_and_drops_docker() -> None:
    owner = Path("/tmp/run/node0")
    state = HostState(
        mounts=frozenset(
            {
                "/tmp/run/node0/kubelet/root ext4 /dev/vda",
                "/run/netns/cni-1 nsfs nsfs",
                "/var/lib/docker/overlay2/x/merged overlay overlay",
                "/tmp/run/node0x/other tmpfs tmpfs",  # a sibling directory, not ours
            }
        ),
        links=frozenset(
            {
                "lo",
                "docker0",
                "veth1 master=docker0",
                "veth2 master=nfsp-e2e0",
                "veth3",
                "nfsp-e2e0",
            }
        ),
        iptables=(":DOCKER -", ":KUBE-FIREWALL -", "-A POSTROUTING -s 10.244.0.0/24 -j CNI-x"),
        sysctls={"net/ipv4/ip_forward": "1"},
    )
    scoped = node_scope(state, owner)
    assert scoped.mounts == {
        "/tmp/run/node0/kubelet/root ext4 /dev/vda",
        "/run/netns/cni-1 nsfs nsfs",
    }
    assert scoped.links == {"veth2 master=nfsp-e2e0", "veth3", "nfsp-e2e0"}
    assert scoped.iptables == (":KUBE-FIREWALL -", "-A POSTROUTING -s 10.244.0.0/24 -j CNI-x")
    assert scoped.sysctls == state.sysctls  # host-wide values stay compared


def test_host_state_round_trips_through_the_state_file_form() -> None:
    state = HostState(
        mounts=frozenset({"/ ext4 /dev/vda"}),
        links=frozenset({"lo"}),
        iptables=("*filter", "COMMIT"),
        sysctls={"kernel/panic": "1"},
        paths={"/var/lib/kubelet": False},
        listings={"/run/netns": frozenset({"a"})},
        cgroups=frozenset({"/sys/fs/cgroup/pids/kubepods"}),
    )
    data = json.loads(json.dumps(hoststate.host_state_to_json(state)))
    assert hoststate.host_state_from_json(data) == state
