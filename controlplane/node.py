"""A real one-node Kubernetes node for ``make e2e``: containerd, a CNI bridge and a kubelet.

What: starts containerd (Debian's 1.6, configured from ``containerd config default`` with
everything it can move placed under a state directory), writes a CNI bridge config, imports two
images packed here from busybox-static (``local/pause:3.10``, the sandbox image, and
``local/busybox``) and starts the kubelet built by ``controlplane/build.sh kubelet``, registered
as node ``localhost`` against the control plane of ``controlplane.runner`` (its node profile).
Stopping drains the node, stops both and then undoes what they leave on the host.

Why it is code we own: there is no registry and no kind here; what a kubelet needs on this
machine (cgroup v1, no CAP_SYS_RESOURCE, loopback-only control plane) is recorded in
``reference/real-node.md``, and each setting in ``controlplane.nodeconfig`` answers one of its
findings.

Host-global effects: a kubelet and containerd cannot be fully confined to a directory.
``controlplane.hoststate`` records the host before the start, restores it after the stop and
says what still differs (:meth:`Node.host_differences`), so a test can assert nothing does.

Who calls it: ``tests/e2e/test_node.py`` (``make e2e``), and by hand ``python -m
controlplane.node up --state DIR --kubeconfig FILE`` / ``down --state DIR`` after ``python -m
controlplane.runner up --node``. The state file (``DIR/node.json``: pids, the host as found)
lets ``down`` clean up after a run that was killed, pods included.

Layout: this module holds the node's lifecycle (start, stop, re-attach) and its CLI; the paths
and configs are ``controlplane.nodeconfig``'s (pure), the images ``controlplane.ocipack``'s,
the host's state ``controlplane.hoststate``'s. Processes are stopped by recorded pid (see
``controlplane.processes.stop_processes``), never by name; the exceptions are tied to this
node: shims whose argv names its socket, and processes in ``kubepods`` cgroups that did not
exist before it started.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import yaml

from controlplane.binaries import KUBELET, kubectl_binary, resolve_paths
from controlplane.hoststate import (
    HostState,
    capture_host_state,
    diff_host_state,
    host_state_from_json,
    host_state_to_json,
    node_processes,
    node_scope,
    preflight_problems,
    restore_host,
    unmount_under,
)
from controlplane.network import KUBERNETES_SERVICE_IP, KUBERNETES_SERVICE_PORT, LOOPBACK
from controlplane.nodeconfig import (
    CNI_NETWORK,
    NODE_NAME,
    PAUSE_IMAGE,
    SERVICE_LINK,
    KubeletPorts,
    NodeLayout,
    cni_conflist,
    containerd_config,
    ctr_argv,
    kubelet_args,
    kubelet_config,
)
from controlplane.ocipack import busybox_layer, write_image_archive
from controlplane.processes import (
    ProcessRecord,
    _http_status,
    _is_running,
    _proc_stat,
    _run,
    free_ports,
    spawn_logged,
    stop_processes,
    tail_lines,
)

BUSYBOX_IMAGE = "docker.io/local/busybox:latest"
"""Pods refer to it as ``local/busybox:latest`` with ``imagePullPolicy: Never``."""
SEEDS_BUSYBOX_IMAGE = "docker.io/library/busybox:1.36"  # what the seeds' test-pod names
SERVICE_PROXY = "service-proxy"
PAUSE_COMMAND = ("sleep", "2147483647")
CONTAINERD = "containerd"
STATE_FILE = "node.json"  # pids, the host as found, the kubeconfig: what `down` needs
START_TIMEOUT = 60.0
DRAIN_TIMEOUT = 90.0


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
