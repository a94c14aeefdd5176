"""Integration fixtures: RBAC from rbac/ applied once, the provisioner's ServiceAccount
kubeconfig, fresh namespaces per test, provisioner subprocesses stopped after each test and
StorageClasses deleted after each test; ``install`` starts a provisioner with a StorageClass of
it, the first step of most provisioning cases."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from controlplane.runner import ControlPlane
from tests.faults import FaultRule, write_fault_rules
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


MakeNamespace = Callable[..., str]


@pytest.fixture
def new_namespace(admin: Kube) -> Iterator[MakeNamespace]:
    """Create namespaces, by name or unique (``t-…``); all are deleted after the test."""
    made: list[str] = []

    def make(name: str | None = None) -> str:
        name = name or unique("t")
        admin.run("create", "namespace", name)
        made.append(name)
        return name

    yield make
    for name in made:
        admin.run("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def namespace(new_namespace: MakeNamespace) -> str:
    """The test's own namespace, deleted after the test."""
    return new_namespace()


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


@dataclass
class Install:
    """What the ``install`` fixture hands a test: call it to start a provisioner (its own name,
    the export ``export``) and create a StorageClass of it.

    ``install(parameters, prefix=..., default=..., faults=[...], **env)`` returns the process and
    the class's name. With ``faults`` the provisioner is the fault-injecting one, reading its
    rules from ``faults_file``, which the test may rewrite (``write_fault_rules``) to lift them.
    """

    start: StartProvisioner
    storage_classes: StorageClasses
    export: Path
    faults_file: Path

    def __call__(
        self,
        parameters: dict[str, str] | None = None,
        *,
        prefix: str,
        default: bool = False,
        faults: list[FaultRule] | None = None,
        **env: str,
    ) -> tuple[ProvisionerProcess, str]:
        if faults is not None:
            write_fault_rules(self.faults_file, faults)
            env["NFS_PROVISIONER_UNSAFE_FAULTS_FILE"] = str(self.faults_file)
        process = self.start(**env)
        class_name = self.storage_classes(process.name, parameters, prefix=prefix, default=default)
        return process, class_name


@pytest.fixture
def install(
    provisioner: StartProvisioner,
    namespace: str,
    storage_classes: StorageClasses,
    tmp_path: Path,
) -> Install:
    """Start a provisioner and a StorageClass of it (see ``Install``).

    List it before ``namespace``: the teardown then deletes the classes, then the namespace,
    then stops the provisioners, as it does for ``provisioner, namespace, storage_classes``.
    """
    return Install(provisioner, storage_classes, tmp_path / "export", tmp_path / "faults.json")
