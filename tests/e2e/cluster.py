"""The one-node cluster the e2e scenarios run on, put together from controlplane's parts.

What, in start order (``real-node.md``'s): our image built from the repository's Dockerfile
(``controlplane.images``, before the node: its dockerd must be gone when containerd starts),
the control plane in its node profile (``controlplane.runner``), nfs-ganesha with the seeds'
no_root_squash export and a root_squash one (``controlplane.nfs_server``), the ``mount``
wrapper that hands the kubelet's ``nfs`` mounts to the user-space client
(``controlplane.mount_nfs``), and the kubelet node (``controlplane.node``) whose pods reach the
apiserver as the ``kubernetes`` Service; then the image is imported into the node's containerd.
:meth:`E2ECluster.stop` takes it all down in reverse and reports what the host kept.

Why here and not in ``controlplane``: it is the e2e tests' fixture, with their timeouts and
failure reports; the parts stay reusable on their own (``make dev-cluster``, the CLIs).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from controlplane import images, mount_nfs, nfs_server
from controlplane.binaries import resolve_binaries
from controlplane.hoststate import unmount_under
from controlplane.node import Node, kubelet_binary
from controlplane.runner import ControlPlane
from tests.kubectl import kubectl

REPO = Path(__file__).resolve().parents[2]
NFS_SERVER = "127.0.0.1"
"""What the PVs and the Deployment name as the NFS server: the kubelet's mounts join the
server's network namespace (controlplane.mount_nfs), where it listens on loopback."""
WAIT = 180.0

_T = TypeVar("_T")


class E2EError(AssertionError):
    """A wait that ran out, with what the cluster said about it."""


@dataclass
class E2ECluster:
    """A running one-node cluster; ``kubeconfig`` is the admin's."""

    state: Path
    plane: ControlPlane
    nfs: nfs_server.NfsServer
    node: Node
    image: str
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def kubeconfig(self) -> Path:
        return self.plane.admin_kubeconfig

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120
    ) -> str:
        return kubectl(
            *args, kubeconfig=self.kubeconfig, input=input, check=check, timeout=timeout
        ).stdout

    def get(self, *args: str) -> dict[str, Any] | None:
        """``kubectl get ... -o json``; None when it is not found."""
        result = kubectl(
            "get", *args, "-o", "json", kubeconfig=self.kubeconfig, check=False, timeout=60
        )
        if result.returncode != 0:
            if "NotFound" in result.stderr or "not found" in result.stderr:
                return None
            raise E2EError(f"kubectl get {' '.join(args)} failed: {result.stderr}")
        loaded: dict[str, Any] = json.loads(result.stdout)
        return loaded

    def wait(self, what: str, probe: Callable[[], _T | None], timeout: float = WAIT) -> _T:
        """Poll ``probe`` until it returns something truthy; fail with the cluster's story."""
        deadline = time.monotonic() + timeout
        while True:
            value = probe()
            if value:
                return value
            if time.monotonic() >= deadline:
                raise E2EError(f"{what}: not within {timeout:.0f} s\n{self.diagnose()}")
            time.sleep(0.5)

    def diagnose(self) -> str:
        """What an admin would look at first: objects, events, provisioner logs, node logs."""
        parts = []
        for args in (
            ("get", "nodes,pods,pvc,pv", "-A", "-o", "wide"),
            ("get", "events", "-A", "--sort-by=.lastTimestamp"),
            (
                "logs",
                "-n",
                "nfs-provisioner",
                "-l",
                "app.kubernetes.io/name=nfs-provisioner",
                "--tail=60",
                "--prefix",
            ),
        ):
            result = kubectl(*args, kubeconfig=self.kubeconfig, check=False, timeout=30)
            parts.append(f"$ kubectl {' '.join(args)}\n{result.stdout}{result.stderr}")
        parts.append(self.node.logs_tail(30))
        return "\n".join(parts)

    def stop(self) -> list[str]:
        """Everything down, in reverse; returns what differs on the host from before."""
        problems: list[str] = []
        with contextlib.suppress(Exception):
            self.kubectl("delete", "namespace", "nfs-provisioner", "--wait=false", check=False)
        for name, action in (
            ("node", self.node.stop),
            ("nfs client mounts", lambda: unmount_under([self.state])),
            ("nfs server", self.nfs.stop),
            ("control plane", self.plane.stop),
        ):
            try:
                action()
            except Exception as error:  # noqa: BLE001 - each part that failed to stop is reported
                problems.append(f"stopping the {name} failed: {error}")
        return problems + self.node.host_differences()


def _timed(timings: dict[str, float], name: str, action: Callable[[], _T]) -> _T:
    began = time.monotonic()
    result = action()
    timings[name] = round(time.monotonic() - began, 1)
    return result


def start_cluster(state: Path) -> E2ECluster:
    """Build and start everything under ``state``; on failure what started is stopped."""
    state = state.resolve()
    timings: dict[str, float] = {}
    built = _timed(timings, "image", lambda: images.build_project_image(state / "image"))
    stack = contextlib.ExitStack()
    with stack:
        binaries = resolve_binaries(build=False, node=True)
        plane = ControlPlane(state / "controlplane", binaries, node=True)
        _timed(timings, "control plane", plane.start)
        stack.callback(plane.stop)
        nfs = _timed(timings, "nfs server", lambda: nfs_server.start(state / "nfs"))
        stack.callback(nfs.stop)
        stack.callback(unmount_under, [state])
        stand_in = mount_nfs.write_wrapper(state / "nfs")
        wrapper = mount_nfs.write_mount_wrapper(state / "nfs", stand_in)
        node = Node(
            state / "node",
            plane.admin_kubeconfig,
            kubelet=kubelet_binary(build=False),
            apiserver_port=plane.ports["apiserver"],
            path_prefix=wrapper.parent,
        )
        _timed(timings, "node", node.start)
        stack.callback(node.stop)
        imported = _timed(
            timings, "image import", lambda: node.ctr("images", "import", str(built.tarball))
        )
        if imported.returncode != 0:
            raise E2EError(f"ctr images import failed: {imported.stderr}")
        cluster = E2ECluster(state, plane, nfs, node, built.tag, timings)
        stack.pop_all()
    return cluster
