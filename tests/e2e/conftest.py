"""Fixtures of the e2e scenarios: one cluster per session, the provisioner installed from
``manifests/`` through an overlay that changes only what every user edits.

The cluster (``tests/e2e/cluster.py``) is started the first time a scenario asks for it, after
the self-contained tests of its parts (test_image, test_nfs_standin, test_node: each starts and
stops its own), and stopped at the end of the session, where the host must be as it was.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from controlplane.nfs_server import Export
from tests.e2e.cluster import NFS_SERVER, REPO, E2ECluster, start_cluster

PROVISIONER_NAMESPACE = "nfs-provisioner"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The scenarios on the shared cluster run after the tests that start their own parts
    (test_image, test_nfs_standin, test_node): one node at a time fits on a host."""
    items.sort(key=lambda item: "shared_cluster" in getattr(item, "fixturenames", ()))


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail(
            "the e2e tests need root (containerd, kubelet, mounts, an NFS server); run "
            "`make e2e` as root",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def shared_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2ECluster]:
    require_root()
    started = start_cluster(tmp_path_factory.mktemp("e2e"))
    print(f"e2e cluster up: {started.timings}")
    try:
        yield started
    finally:
        left = started.stop()
        assert not left, "the host is not as it was:\n" + "\n".join(left)


def overlay(directory: Path, export: Export, image: str) -> Path:
    """A kustomization over ``manifests/`` that changes the image, the NFS server and the
    export path: what the README tells every user to change, and nothing else."""
    directory.mkdir(parents=True, exist_ok=True)
    name, _, tag = image.partition(":")
    base = os.path.relpath(REPO / "manifests", directory)
    (directory / "kustomization.yaml").write_text(
        f"""apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - {base}
images:
  - name: nfs-provisioner
    newName: {name}
    newTag: "{tag}"
patches:
  - patch: |-
      apiVersion: apps/v1
      kind: Deployment
      metadata:
        name: nfs-provisioner
        namespace: {PROVISIONER_NAMESPACE}
      spec:
        template:
          spec:
            containers:
              - name: nfs-provisioner
                env:
                  - name: NFS_SERVER
                    value: "{NFS_SERVER}"
                  - name: NFS_PATH
                    value: "{export.pseudo}"
            volumes:
              - name: nfs-client-root
                nfs:
                  server: "{NFS_SERVER}"
                  path: "{export.pseudo}"
""",
        encoding="utf-8",
    )
    return directory


def install(cluster: E2ECluster, export: Export) -> None:
    """``kubectl apply -k`` the overlay and wait until the provisioner runs on ``export``
    alone: rolled out, and no pod of an earlier template left (not even terminating)."""
    directory = overlay(
        cluster.state / f"overlay{export.pseudo.replace('/', '-')}", export, cluster.image
    )
    cluster.kubectl("apply", "-k", str(directory))
    cluster.kubectl(
        "rollout",
        "status",
        "deployment/nfs-provisioner",
        "-n",
        PROVISIONER_NAMESPACE,
        "--timeout=180s",
        timeout=200,
    )

    def only_pods_on_export() -> bool:
        pods = cluster.get("pods", "-n", PROVISIONER_NAMESPACE)
        assert pods is not None
        paths = [
            volume["nfs"]["path"]
            for pod in pods["items"]
            for volume in pod["spec"]["volumes"]
            if "nfs" in volume
        ]
        return bool(paths) and set(paths) == {export.pseudo}

    cluster.wait(f"only provisioner pods on {export.pseudo} to be left", only_pods_on_export)


@pytest.fixture(scope="session")
def seeds_provisioner(shared_cluster: E2ECluster) -> E2ECluster:
    """The provisioner as shipped, on the seeds' export (root-owned 0755, no_root_squash)."""
    install(shared_cluster, shared_cluster.nfs.seeds)
    return shared_cluster
