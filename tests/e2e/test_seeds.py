"""The seeds' flow, for real: the shipped manifests on a kubelet node, volumes mounted over NFS.

The provisioner runs as a Pod of ``manifests/deployment.yaml`` from our image, installed with
``kubectl apply -k`` of an overlay that changes only the image, the NFS server and the path;
it mounts the seeds' export (root-owned 0755, no_root_squash) through the kubelet. Then, as a
user following the seeds would: ``test-claim`` and ``test-pod`` (the pod writes ``SUCCESS``
through NFS; we read it on the server's disk), the claim's deletion (archived, as the shipped
class says), and the seeds' StatefulSet scaled to 3, to 0 and back, each replica finding its
own data again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.e2e.cluster import REPO, E2ECluster

pytestmark = pytest.mark.e2e

MANIFESTS = REPO / "manifests"


def phase(cluster: E2ECluster, kind: str, name: str, namespace: str) -> str | None:
    found = cluster.get(kind, name, "-n", namespace)
    return None if found is None else found.get("status", {}).get("phase")


def bound_claim(cluster: E2ECluster, name: str, namespace: str) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        found = cluster.get("pvc", name, "-n", namespace)
        if found is not None and found.get("status", {}).get("phase") == "Bound":
            return found
        return None

    return cluster.wait(f"claim {namespace}/{name} to be Bound", probe)


def directory_of(cluster: E2ECluster, claim: dict[str, Any]) -> Path:
    """The claim's directory on the seeds export, as the server's disk has it."""
    meta = claim["metadata"]
    name = f"{meta['namespace']}-{meta['name']}-{claim['spec']['volumeName']}"
    return cluster.nfs.seeds.host_dir / name


def test_seeds_test_claim_and_test_pod(seeds_provisioner: E2ECluster) -> None:
    cluster = seeds_provisioner
    namespace = "default"  # where the seeds apply them
    cluster.kubectl("apply", "-n", namespace, "-f", str(MANIFESTS / "test-claim.yaml"))
    claim = bound_claim(cluster, "test-claim", namespace)
    directory = directory_of(cluster, claim)
    assert directory.is_dir(), f"{directory} was not made on the export"
    volume = claim["spec"]["volumeName"]
    pv = cluster.get("pv", volume)
    assert pv is not None
    assert pv["spec"]["nfs"] == {"server": "127.0.0.1", "path": f"/k8s/{directory.name}"}

    cluster.kubectl("apply", "-n", namespace, "-f", str(MANIFESTS / "test-pod.yaml"))
    cluster.wait(
        "test-pod to succeed",
        lambda: phase(cluster, "pod", "test-pod", namespace) == "Succeeded",
    )
    assert (directory / "SUCCESS").is_file(), "the pod's write did not reach the export"

    cluster.kubectl("delete", "-n", namespace, "pod", "test-pod", "--wait=true")
    cluster.kubectl("delete", "-n", namespace, "pvc", "test-claim", "--wait=true")
    cluster.wait("the PV to be released and deleted", lambda: cluster.get("pv", volume) is None)
    archived = directory.parent / f"archived-{directory.name}"
    assert not directory.exists()
    assert (archived / "SUCCESS").is_file(), "the directory was not archived with its data"


def test_seeds_statefulset_replicas_keep_their_own_data(seeds_provisioner: E2ECluster) -> None:
    cluster = seeds_provisioner
    namespace = "web"
    replicas = 3
    cluster.kubectl("create", "namespace", namespace)
    cluster.kubectl("apply", "-n", namespace, "-f", str(MANIFESTS / "statefulset.yaml"))
    cluster.kubectl("scale", "-n", namespace, "statefulset/web", f"--replicas={replicas}")
    rollout = ("rollout", "status", "-n", namespace, "statefulset/web", "--timeout=240s")
    cluster.kubectl(*rollout, timeout=260)

    volumes = {}
    for index in range(replicas):
        claim = bound_claim(cluster, f"data-web-{index}", namespace)
        volumes[index] = claim["spec"]["volumeName"]
        directory = directory_of(cluster, claim)
        page = directory / "index.html"
        cluster.wait(f"web-{index} to write {page}", page.is_file)
        assert page.read_text() == f"web-{index}\n"
        # Written on the server: only the same directory, mounted again, can show it.
        (directory / "marker").write_text(f"data of web-{index}\n")

    cluster.kubectl("scale", "-n", namespace, "statefulset/web", "--replicas=0")
    cluster.wait(
        "every web pod to be gone",
        lambda: (
            not cluster.kubectl(
                "get", "pods", "-n", namespace, "-o", "name", "--ignore-not-found"
            ).strip()
        ),
    )
    cluster.kubectl("scale", "-n", namespace, "statefulset/web", f"--replicas={replicas}")
    cluster.kubectl(*rollout, timeout=260)
    for index in range(replicas):
        claim = bound_claim(cluster, f"data-web-{index}", namespace)
        assert claim["spec"]["volumeName"] == volumes[index]
        seen = cluster.kubectl("exec", "-n", namespace, f"web-{index}", "--", "cat", "/data/marker")
        assert seen == f"data of web-{index}\n"
    cluster.kubectl("delete", "namespace", namespace, "--wait=true", timeout=240)
