"""Run a real local Kubernetes control plane: etcd, kube-apiserver, kube-controller-manager.

What: starts the three binaries (resolved by ``controlplane.binaries``: ``TEST_ASSET_*``
overrides, ``$KUBEBUILDER_ASSETS``, or the version-keyed cache that ``controlplane/build.sh``
fills, building what is missing) on 127.0.0.1 with random free ports, their own CA and
certificates (``controlplane.pki``), RBAC authorization and the persistent-volume controllers
(their flags in ``controlplane.flags``), waits for each to be healthy, restarts one on request
(tests of clients that must reconnect) and stops them again (``controlplane.processes``). The
*node profile* (``node=True``, ``up --node``) is for ``make e2e``, where a real kubelet
(``controlplane/node.py``) runs pods: it also turns on the ServiceAccount admission plugin and
the token controllers (pods get in-cluster credentials), the workload controllers
(Deployments, StatefulSets) and node-lifecycle (which lifts the not-ready taint), and starts
kube-scheduler. Without it the control plane is exactly what the integration tests have always
used.

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
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType

from controlplane.binaries import (
    COMPONENTS,
    ETCD,
    KUBE_APISERVER,
    KUBE_CONTROLLER_MANAGER,
    KUBE_SCHEDULER,
    NODE_COMPONENTS,
    Binaries,
    BinariesNotFoundError,
    kubectl_binary,
    resolve_binaries,
)
from controlplane.flags import (
    apiserver_args,
    apiserver_ready,
    controller_manager_args,
    controller_manager_healthy,
    etcd_args,
    etcd_healthy,
    scheduler_args,
)
from controlplane.network import LOOPBACK
from controlplane.pki import Pki, _write_private, generate_pki, kubeconfig_dict, render_kubeconfig
from controlplane.processes import (
    ProcessRecord,
    _is_running,
    free_port,
    free_ports,
    spawn_logged,
    stop_processes,
    tail_lines,
)

HEALTH_TIMEOUT = 60.0  # seconds, per component
PORT_ATTEMPTS = 3  # a free port can be taken between choosing it and the process binding it
STATE_FILE = "state.json"
ETCD_DATA_PREFIX = "nfs-provisioner-etcd-"
ETCD_OWNER_FILE = "owner.json"  # the etcd process using the directory, for sweeping leftovers
SHM = Path("/dev/shm")  # noqa: S108 - etcd's data on tmpfs; the directory is private (mkdtemp)


# --------------------------------------------------------------------------- etcd's data


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


# --------------------------------------------------------------------------- control plane


@dataclass(frozen=True)
class _Plan:
    argv: list[str]
    probe: Callable[[], bool]
    ports: dict[str, int]


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
