"""Integration fixtures: RBAC from rbac/ applied once, the provisioner's ServiceAccount
kubeconfig, a fresh namespace per test, and provisioner subprocesses stopped after each test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from controlplane.runner import ControlPlane
from tests.integration.harness import REPO, Kube, ProvisionerProcess, unique

SA_NAMESPACE = "nfs-provisioner"
SA_NAME = "nfs-provisioner"


@pytest.fixture(scope="session")
def admin(control_plane: ControlPlane) -> Kube:
    return Kube(control_plane.admin_kubeconfig)


@pytest.fixture(scope="session")
def sa_kubeconfig(
    control_plane: ControlPlane, admin: Kube, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The shipped rbac/ applied with kubectl, and a token of its ServiceAccount."""
    admin.run("apply", "-k", str(REPO / "rbac"))
    path = tmp_path_factory.mktemp("sa") / "kubeconfig"
    return control_plane.service_account_kubeconfig(SA_NAMESPACE, SA_NAME, path)


@pytest.fixture
def namespace(admin: Kube) -> Iterator[str]:
    name = unique("t")
    admin.run("create", "namespace", name)
    yield name
    admin.run("delete", "namespace", name, "--wait=false", check=False)


StartProvisioner = Callable[..., ProvisionerProcess]


@pytest.fixture
def provisioner(
    sa_kubeconfig: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[StartProvisioner]:
    """Start provisioner subprocesses; each test gets its own provisioner name and export."""
    started: list[ProvisionerProcess] = []

    def start(
        name: str | None = None, export: Path | None = None, **env: str
    ) -> ProvisionerProcess:
        process = ProvisionerProcess(
            kubeconfig=sa_kubeconfig,
            name=name or f"test.nfs.io/{unique('p')}",
            export=export or tmp_path / "export",
            log_path=tmp_path / f"provisioner-{len(started)}.log",
            extra_env=env,
        )
        started.append(process)
        return process.start()

    yield start
    for process in started:
        process.stop()
        # Shown by pytest only when the test fails.
        print(f"--- provisioner log {process.log_path} ---\n{process.logs()[-20000:]}")
