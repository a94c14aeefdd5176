"""Integration fixtures: RBAC from rbac/ applied once, the provisioner's ServiceAccount
kubeconfig, a fresh namespace per test, provisioner subprocesses stopped after each test and
StorageClasses deleted after each test."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest

from controlplane.runner import ControlPlane
from tests.integration.harness import REPO, Kube, ProvisionerProcess, storage_class, unique

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


def provisioners(
    kubeconfig: Path, tmp_path: Path, log_prefix: str = "provisioner", name_prefix: str = "p"
) -> Iterator[StartProvisioner]:
    """The body of a fixture that starts provisioner subprocesses under ``kubeconfig``; each
    test gets its own provisioner name and export. All are stopped at teardown."""
    started: list[ProvisionerProcess] = []

    def start(
        name: str | None = None, export: Path | None = None, **env: str
    ) -> ProvisionerProcess:
        process = ProvisionerProcess(
            kubeconfig=kubeconfig,
            name=name or f"test.nfs.io/{unique(name_prefix)}",
            export=export or tmp_path / "export",
            log_path=tmp_path / f"{log_prefix}-{len(started)}.log",
            extra_env=env,
        )
        started.append(process)
        return process.start()

    yield start
    for process in started:
        process.stop()
        # Shown by pytest only when the test fails.
        print(f"--- provisioner log {process.log_path} ---\n{process.logs()[-20000:]}")


@pytest.fixture
def provisioner(sa_kubeconfig: Path, tmp_path: Path) -> Iterator[StartProvisioner]:
    """Start provisioner subprocesses (see ``provisioners``)."""
    yield from provisioners(sa_kubeconfig, tmp_path)


class StorageClasses:
    """What the ``storage_classes`` fixture hands a test: call it to create a StorageClass.

    ``storage_classes(provisioner_name, parameters, prefix=...)`` applies
    ``harness.storage_class`` under the name ``unique(prefix)`` and returns that name. Every
    class made is deleted after the test. A test may delete one itself: the teardown ignores
    classes that are already gone and never fails, so it cannot hide the test's own failure.
    """

    def __init__(self, admin: Kube) -> None:
        self._admin = admin
        self._names: list[str] = []

    def __call__(
        self,
        provisioner_name: str,
        parameters: dict[str, str] | None = None,
        *,
        prefix: str = "sc",
        reclaim_policy: str = "Delete",
        default: bool = False,
        mount_options: Iterable[str] = (),
    ) -> str:
        name = unique(prefix)
        self._names.append(name)  # before applying: a half-done apply is cleaned up too
        self._admin.apply(
            storage_class(
                name,
                provisioner_name,
                parameters,
                reclaim_policy=reclaim_policy,
                default=default,
                mount_options=mount_options,
            )
        )
        return name

    def delete_all(self) -> None:
        if self._names:
            self._admin.run(
                "delete", "storageclass", *self._names, "--ignore-not-found", check=False
            )


@pytest.fixture
def storage_classes(admin: Kube) -> Iterator[StorageClasses]:
    """StorageClasses with unique names, all deleted after the test (see ``StorageClasses``).

    List it after ``provisioner`` and ``namespace``: its teardown then runs first, where the
    test's own ``finally`` would have deleted the classes.
    """
    classes = StorageClasses(admin)
    yield classes
    classes.delete_all()
