"""Unit tests for the pure parts of controlplane.runner and the modules it starts with
(binaries, flags, pki, processes): no control plane is started."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from controlplane import processes, runner
from controlplane.binaries import (
    BUILD_SCRIPT,
    ENV_OVERRIDES,
    Binaries,
    BinariesNotFoundError,
    cache_bin_dir,
    find_binaries,
    pinned_versions,
    resolve_binaries,
)
from controlplane.flags import (
    SERVICE_ACCOUNT_ISSUER,
    apiserver_args,
    controller_manager_args,
    etcd_args,
)
from controlplane.pki import Pki, generate_pki, kubeconfig_dict, render_kubeconfig
from controlplane.processes import (
    ProcessRecord,
    free_port,
    free_ports,
    stop_processes,
    tail_lines,
)

NAMES = ("etcd", "kube-apiserver", "kube-controller-manager")


# ---------------------------------------------------------------- ports


@pytest.mark.parametrize("count", [1, 2, 5])
def test_free_ports_are_distinct_and_bindable_on_loopback(count: int) -> None:
    ports = free_ports(count)
    assert len(set(ports)) == count
    for port in ports:
        assert 1024 <= port <= 65535
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", port))


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()


# ---------------------------------------------------------------- kubeconfig

CA = b"-----BEGIN CERTIFICATE-----\nca\n-----END CERTIFICATE-----\n"
CERT = b"-----BEGIN CERTIFICATE-----\nadmin\n-----END CERTIFICATE-----\n"
KEY = b"-----BEGIN PRIVATE KEY-----\nkey\n-----END PRIVATE KEY-----\n"


@pytest.mark.parametrize(
    ("kwargs", "user_fields"),
    [
        (
            {"client_cert_pem": CERT, "client_key_pem": KEY},
            {"client-certificate-data": CERT, "client-key-data": KEY},
        ),
        ({"token": "abc.def.ghi"}, {"token": "abc.def.ghi"}),
        (
            {"token": "t", "user": "system:serviceaccount:ns:sa", "namespace": "ns"},
            {"token": "t"},
        ),
    ],
)
def test_kubeconfig_round_trips_through_yaml(
    kwargs: dict[str, object], user_fields: dict[str, object]
) -> None:
    config = kubeconfig_dict("https://127.0.0.1:6443", CA, **kwargs)  # type: ignore[arg-type]
    text = render_kubeconfig(config)
    assert yaml.safe_load(text) == config

    cluster = config["clusters"][0]["cluster"]
    assert cluster["server"] == "https://127.0.0.1:6443"
    assert base64.b64decode(cluster["certificate-authority-data"]) == CA
    contexts = {c["name"]: c["context"] for c in config["contexts"]}
    current = contexts[config["current-context"]]
    users = {u["name"]: u["user"] for u in config["users"]}
    user = users[current["user"]]
    assert current["cluster"] == config["clusters"][0]["name"]
    assert current.get("namespace") == kwargs.get("namespace")
    for field, expected in user_fields.items():
        value = user[field]
        assert (base64.b64decode(value) if isinstance(expected, bytes) else value) == expected
    assert set(user) == set(user_fields)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"token": "t", "client_cert_pem": CERT, "client_key_pem": KEY},
        {"client_cert_pem": CERT},
        {"client_key_pem": KEY},
        {"token": "t", "client_key_pem": KEY},
    ],
)
def test_kubeconfig_needs_exactly_one_kind_of_credential(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="either a token"):
        kubeconfig_dict("https://127.0.0.1:1", CA, **kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------- argv

PKI = Pki.in_dir(Path("/state/pki"))


def _flags(argv: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for arg in argv:
        assert arg.startswith("--") and "=" in arg, arg
        name, value = arg[2:].split("=", 1)
        assert name not in out, f"duplicate flag --{name}"
        out[name] = value
    return out


ETCD = etcd_args(data_dir=Path("/dev/shm/etcd-x"), client_port=23790, peer_port=23800)
APISERVER = apiserver_args(
    etcd_url="http://127.0.0.1:23790", secure_port=6443, cert_dir=Path("/state/certs"), pki=PKI
)
KCM = controller_manager_args(
    kubeconfig=Path("/state/kubeconfig"), secure_port=10257, cert_dir=Path("/state/kcm")
)


@pytest.mark.parametrize(
    ("argv", "required"),
    [
        (
            ETCD,
            {
                "data-dir": "/dev/shm/etcd-x",
                "listen-client-urls": "http://127.0.0.1:23790",
                "advertise-client-urls": "http://127.0.0.1:23790",
                "listen-peer-urls": "http://127.0.0.1:23800",
                "initial-advertise-peer-urls": "http://127.0.0.1:23800",
                "name": "controlplane",
                "initial-cluster": "controlplane=http://127.0.0.1:23800",
                "unsafe-no-fsync": "true",
            },
        ),
        (
            APISERVER,
            {
                "bind-address": "127.0.0.1",
                "secure-port": "6443",
                "etcd-servers": "http://127.0.0.1:23790",
                "cert-dir": "/state/certs",
                "tls-cert-file": "/state/pki/apiserver.crt",
                "tls-private-key-file": "/state/pki/apiserver.key",
                "client-ca-file": "/state/pki/ca.crt",
                "service-account-key-file": "/state/pki/sa.pub",
                "service-account-signing-key-file": "/state/pki/sa.key",
                "service-account-issuer": SERVICE_ACCOUNT_ISSUER,
                "service-cluster-ip-range": "10.0.0.0/24",
                "authorization-mode": "RBAC",
                "disable-admission-plugins": "ServiceAccount",
            },
        ),
        (
            KCM,
            {
                "kubeconfig": "/state/kubeconfig",
                "leader-elect": "false",
                "bind-address": "127.0.0.1",
                "secure-port": "10257",
                "pvclaimbinder-sync-period": "1s",
            },
        ),
    ],
    ids=["etcd", "kube-apiserver", "kube-controller-manager"],
)
def test_argv_has_the_required_flags(argv: list[str], required: dict[str, str]) -> None:
    flags = _flags(argv)
    for name, value in required.items():
        assert flags.get(name) == value, f"--{name}"


def test_apiserver_keeps_the_default_admission_plugins_on() -> None:
    flags = _flags(APISERVER)
    assert "enable-admission-plugins" not in flags
    assert "admission-control" not in flags
    disabled = flags["disable-admission-plugins"].split(",")
    assert disabled == ["ServiceAccount"]


def test_controller_manager_runs_exactly_the_pv_namespace_and_gc_controllers() -> None:
    assert set(_flags(KCM)["controllers"].split(",")) == {
        "persistentvolume-binder-controller",
        "persistentvolume-protection-controller",
        "persistentvolumeclaim-protection-controller",
        "persistentvolume-expander-controller",
        "namespace-controller",
        "garbage-collector-controller",
    }


@pytest.mark.parametrize("argv", [ETCD, APISERVER, KCM], ids=["etcd", "apiserver", "kcm"])
def test_nothing_listens_beyond_loopback(argv: list[str]) -> None:
    listen = {
        name: value
        for name, value in _flags(argv).items()
        if name.endswith("address") or name.startswith("listen-")
    }
    assert listen
    for name, value in listen.items():
        assert value.removeprefix("http://").startswith("127.0.0.1"), name


# ---------------------------------------------------------------- binaries resolution


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """No overrides, and a private empty cache: returns the cache's bin dir."""
    for var in (*ENV_OVERRIDES.values(), "KUBEBUILDER_ASSETS", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NFS_PROVISIONER_CACHE", str(tmp_path / "cache"))
    yield cache_bin_dir()


def _fake(directory: Path, name: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


# (binaries put in the overrides dir via TEST_ASSET_*, in KUBEBUILDER_ASSETS, in the cache)
# -> where each binary must be resolved from.
@pytest.mark.parametrize(
    ("overrides", "assets", "cache", "expected"),
    [
        (NAMES, (), (), dict.fromkeys(NAMES, "override")),
        ((), NAMES, (), dict.fromkeys(NAMES, "assets")),
        ((), (), NAMES, dict.fromkeys(NAMES, "cache")),
        (
            ("etcd",),
            NAMES,
            NAMES,
            {"etcd": "override", "kube-apiserver": "assets", "kube-controller-manager": "assets"},
        ),
        (
            ("kube-controller-manager",),
            ("etcd",),
            ("kube-apiserver", "etcd"),
            {"etcd": "assets", "kube-apiserver": "cache", "kube-controller-manager": "override"},
        ),
    ],
    ids=["all-overrides", "kubebuilder-assets", "cache", "override-wins", "mixed"],
)
def test_resolution_order(
    *,
    clean_env: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    overrides: tuple[str, ...],
    assets: tuple[str, ...],
    cache: tuple[str, ...],
    expected: dict[str, str],
) -> None:
    dirs = {"override": tmp_path / "override", "assets": tmp_path / "assets", "cache": clean_env}
    for name in overrides:
        monkeypatch.setenv(ENV_OVERRIDES[name], str(_fake(dirs["override"], name)))
    for name in assets:
        _fake(dirs["assets"], name)
    for name in cache:
        _fake(dirs["cache"], name)
    if assets:
        monkeypatch.setenv("KUBEBUILDER_ASSETS", str(dirs["assets"]))

    binaries = resolve_binaries(build=False)

    for name, source in expected.items():
        assert binaries.path(name) == dirs[source] / name, name


@pytest.mark.parametrize("present", [(), ("etcd",), ("etcd", "kube-apiserver")])
def test_missing_binaries_without_build_raise_naming_them(
    clean_env: Path, present: tuple[str, ...]
) -> None:
    for name in present:
        _fake(clean_env, name)
    missing = [n for n in NAMES if n not in present]
    assert find_binaries()[1] == missing
    with pytest.raises(BinariesNotFoundError) as info:
        resolve_binaries(build=False)
    message = str(info.value)
    for name in missing:
        assert name in message
    assert "make controlplane" in message


def test_override_naming_a_missing_file_is_an_error(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in NAMES:
        _fake(clean_env, name)
    monkeypatch.setenv("TEST_ASSET_KUBE_APISERVER", str(tmp_path / "nope"))
    with pytest.raises(BinariesNotFoundError, match="TEST_ASSET_KUBE_APISERVER"):
        resolve_binaries(build=False)


def test_missing_binaries_are_built_with_just_their_names(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake(clean_env, "etcd")
    calls: list[list[str]] = []

    def fake_build(names: list[str]) -> Path:
        calls.append(list(names))
        for name in names:
            _fake(clean_env, name)
        return clean_env

    monkeypatch.setattr("controlplane.binaries.run_build_script", fake_build)
    binaries = resolve_binaries(build=True)
    assert calls == [["kube-apiserver", "kube-controller-manager"]]
    assert binaries.kube_apiserver == clean_env / "kube-apiserver"


@pytest.mark.parametrize(
    ("env", "root"),
    [
        ({"NFS_PROVISIONER_CACHE": "/c", "XDG_CACHE_HOME": "/x", "HOME": "/h"}, "/c"),
        ({"XDG_CACHE_HOME": "/x", "HOME": "/h"}, "/x/nfs-provisioner"),
        (
            {"NFS_PROVISIONER_CACHE": "", "XDG_CACHE_HOME": "", "HOME": "/h"},
            "/h/.cache/nfs-provisioner",
        ),
    ],
)
def test_cache_dir_is_keyed_by_the_pinned_versions(env: dict[str, str], root: str) -> None:
    kube, etcd = pinned_versions()
    assert kube.startswith("v1.36.")
    assert etcd.startswith("v3.")
    assert cache_bin_dir(env) == Path(root) / f"controlplane-{kube}-etcd-{etcd}" / "bin"


def test_cache_dir_agrees_with_build_sh(tmp_path: Path) -> None:
    # An unknown target makes build.sh stop after creating its bin dir, before any `go build`.
    env = {**os.environ, "NFS_PROVISIONER_CACHE": str(tmp_path)}
    result = subprocess.run(
        ["bash", str(BUILD_SCRIPT), "no-such-binary"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    created = [p for p in tmp_path.rglob("bin") if p.is_dir()]
    assert created == [cache_bin_dir(env)]


# ---------------------------------------------------------------- logs


@pytest.mark.parametrize(
    ("content", "lines", "expected"),
    [
        ("", 5, []),
        ("a\nb\n", 5, ["a", "b"]),
        ("a\nb\nc\nd\n", 2, ["c", "d"]),
        ("a\nb\nc", 2, ["b", "c"]),
        ("a\nb\n", 0, []),
        (
            "".join(f"line {i}\n" for i in range(50_000)),
            3,
            ["line 49997", "line 49998", "line 49999"],
        ),
    ],
    ids=["empty", "short", "tail", "no-final-newline", "zero", "larger-than-a-block"],
)
def test_tail_lines(tmp_path: Path, content: str, lines: int, expected: list[str]) -> None:
    path = tmp_path / "x.log"
    path.write_text(content)
    assert tail_lines(path, lines) == expected


def test_tail_of_a_missing_file_is_empty(tmp_path: Path) -> None:
    assert tail_lines(tmp_path / "missing.log", 10) == []


def test_logs_tail_labels_each_component(tmp_path: Path) -> None:
    plane = runner.ControlPlane(tmp_path, Binaries(Path("e"), Path("a"), Path("c")))
    assert "no control-plane logs" in plane.logs_tail()
    plane.log_dir.mkdir()
    (plane.log_dir / "etcd.log").write_text("one\ntwo\n")
    (plane.log_dir / "kube-apiserver.log").write_text("")
    text = plane.logs_tail(1)
    assert "===== etcd: last 1 lines" in text
    assert "two" in text
    assert "one" not in text
    assert "===== kube-apiserver" in text
    assert "kube-controller-manager" not in text


# ---------------------------------------------------------------- certificates


def test_generated_pki(tmp_path: Path) -> None:
    pki = generate_pki(tmp_path / "pki")
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    serving = x509.load_pem_x509_certificate(pki.serving_cert.read_bytes())
    admin = x509.load_pem_x509_certificate(pki.admin_cert.read_bytes())
    for cert in (serving, admin):
        assert cert.issuer == ca.subject
        cert.verify_directly_issued_by(ca)
    sans = serving.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    # Loopback for the host's clients, the `kubernetes` Service for pods of the e2e node.
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == [
        "127.0.0.1",
        "10.0.0.1",
    ]
    assert sans.get_values_for_type(x509.DNSName) == ["localhost", "kubernetes.default.svc"]
    assert (
        ExtendedKeyUsageOID.SERVER_AUTH
        in serving.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    )
    orgs = admin.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    assert [o.value for o in orgs] == ["system:masters"]
    assert isinstance(admin.public_key(), ec.EllipticCurvePublicKey)
    for key in (pki.ca_key, pki.serving_key, pki.admin_key, pki.sa_key):
        assert key.stat().st_mode & 0o077 == 0, key


# ---------------------------------------------------------------- processes


def _sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def _ticks(pid: int) -> int:
    stat = processes._proc_stat(pid)
    assert stat is not None
    return stat[1]


def _wait(condition: Callable[[], bool], timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_stop_processes_terminates_what_it_recorded() -> None:
    proc = _sleeper()
    record = ProcessRecord("etcd", proc.pid, _ticks(proc.pid))
    stop_processes([record], {proc.pid: proc}, grace=5)
    assert proc.poll() is not None
    assert not processes._is_running(record)


def test_stop_processes_never_signals_a_reused_pid() -> None:
    proc = _sleeper()
    try:
        stale = ProcessRecord("etcd", proc.pid, _ticks(proc.pid) - 1)
        stop_processes([stale], grace=0.2)
        assert proc.poll() is None, "a process with another start time was signalled"
    finally:
        proc.kill()
        proc.wait()


SLEEP = [sys.executable, "-c", "import time; time.sleep(60)"]


@pytest.fixture
def sleeping_plane(tmp_path: Path) -> Iterator[runner.ControlPlane]:
    """A ControlPlane whose three "components" are sleeping Pythons, always healthy."""
    plane = runner.ControlPlane(
        tmp_path, Binaries(Path("e"), Path("a"), Path("c")), health_timeout=10
    )
    plane.log_dir.mkdir()
    try:
        for component in NAMES:
            plane._plans[component] = runner._Plan(SLEEP, lambda: True, {})
            plane._spawn(component, SLEEP, plane.log_dir / f"{component}.log")
        yield plane
    finally:
        plane.stop()


def test_restart_replaces_one_process_in_place_and_in_the_state_file(
    sleeping_plane: runner.ControlPlane,
) -> None:
    before = sleeping_plane.processes
    sleeping_plane.restart("kube-apiserver")
    after = sleeping_plane.processes
    assert [r.component for r in after] == list(NAMES)  # stop() keeps its order
    assert (after[0], after[2]) == (before[0], before[2])
    assert after[1].pid != before[1].pid
    assert not processes._is_running(before[1])
    assert sleeping_plane.is_running()
    state = json.loads(sleeping_plane.state_file.read_text())
    assert state["processes"] == [r.__dict__ for r in after]
    log = (sleeping_plane.log_dir / "kube-apiserver.log").read_text()
    assert log.count("controlplane.runner starts:") == 2


def test_restart_that_does_not_come_back_fails_and_leaves_it_stopped(
    sleeping_plane: runner.ControlPlane,
) -> None:
    sleeping_plane._plans["etcd"] = runner._Plan(
        [sys.executable, "-c", "raise SystemExit(3)"], lambda: False, {}
    )
    with pytest.raises(RuntimeError, match="restarted etcd exited with code 3"):
        sleeping_plane.restart("etcd")
    assert [r.component for r in sleeping_plane.processes] == list(NAMES)
    assert not processes._is_running(sleeping_plane.processes[0])
    assert not sleeping_plane.is_running()


def test_restart_needs_a_known_component_started_by_this_object(tmp_path: Path) -> None:
    plane = runner.ControlPlane(tmp_path, Binaries(Path("e"), Path("a"), Path("c")))
    with pytest.raises(ValueError, match="unknown component 'kubelet'"):
        plane.restart("kubelet")
    with pytest.raises(RuntimeError, match="kube-apiserver was not started by this object"):
        plane.restart("kube-apiserver")


def test_cli_down_is_idempotent(tmp_path: Path) -> None:
    state = tmp_path / "never-started"
    assert runner.main(["down", "--state", str(state)]) == 0
    assert runner.main(["down", "--state", str(state)]) == 0
    assert not state.exists()


def test_cli_down_stops_recorded_detached_processes_and_removes_state(tmp_path: Path) -> None:
    state = tmp_path / "dev"
    (state / "logs").mkdir(parents=True)
    (state / "kubeconfig").write_text("x")
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True
    )
    record = ProcessRecord("kube-apiserver", proc.pid, _ticks(proc.pid))
    (state / "state.json").write_text(
        json.dumps(
            {
                "binaries": {"etcd": "e", "kube_apiserver": "a", "kube_controller_manager": "c"},
                "processes": [record.__dict__],
                "etcd_data_dir": None,
            }
        )
    )
    assert runner.main(["down", "--state", str(state)]) == 0
    assert _wait(lambda: proc.poll() is not None)
    assert not state.exists()


def test_sweep_removes_only_etcd_dirs_of_dead_or_abandoned_control_planes(tmp_path: Path) -> None:
    def data_dir(name: str, owner: ProcessRecord | None, age: float = 0) -> Path:
        path = tmp_path / f"{runner.ETCD_DATA_PREFIX}{name}"
        (path / "data").mkdir(parents=True)
        if owner is not None:
            (path / runner.ETCD_OWNER_FILE).write_text(json.dumps(owner.__dict__))
        stamp = time.time() - age
        os.utime(path, (stamp, stamp))
        return path

    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished_record = ProcessRecord("etcd", finished.pid, _ticks(finished.pid))
    finished.wait()
    me = ProcessRecord("etcd", os.getpid(), _ticks(os.getpid()))

    dead = data_dir("dead", finished_record)
    alive = data_dir("alive", me)
    alive_but_old = data_dir("alive-old", me, age=3600)
    fresh_no_owner = data_dir("fresh", None)
    old_no_owner = data_dir("old", None, age=3600)
    unrelated = tmp_path / "something-else"
    unrelated.mkdir()
    os.utime(unrelated, (0, 0))

    removed = runner.sweep_stale_etcd_dirs(tmp_path, min_age=600)

    assert sorted(removed) == sorted([dead, old_no_owner])
    for kept in (alive, alive_but_old, fresh_no_owner, unrelated):
        assert kept.exists()
    assert not dead.exists()
    assert not old_no_owner.exists()
