"""The swap, for real (issue 33): nfs-subdir's own ``deploy/`` manifests with only our image.

An admin who runs nfs-subdir-external-provisioner swaps the image and changes nothing else:
the same ServiceAccount, ClusterRole, Role and bindings (``deploy/rbac.yaml``, which grant no
``patch`` on PersistentVolumes and nothing on namespaces), the same Deployment
(``deploy/deployment.yaml``: no securityContext, no probes, no resources) and the same class
(``deploy/class.yaml``: ``archiveOnDelete: "false"``). Below they are written out as upstream
ships them; what differs is commented: the image, and the NFS server and path, which every
upstream user edits too.

On the one-node cluster, with our shipped installation removed first (and put back at the
end, as the session had it), this proves:

- ``nfs-provisioner check`` in that pod passes, and reports both missing wanted permissions as
  ``degraded`` with the rule that turns each on; the leader logs the same as warnings;
- the seeds' flow works: ``test-claim`` is Bound to a PV with no finalizer of ours,
  ``test-pod`` writes ``SUCCESS`` that reaches the export's disk, and the claim's deletion
  removes the directory (``archiveOnDelete: "false"``) and the PV;
- a volume the old provisioner made before the swap is adopted in memory only (the PV is never
  patched) and, when its claim goes, released by the old rules: its directory deleted, no
  ``archived-`` copy, a ``VolumeDeleted`` Event on the PV;
- the records on the export name the cluster by its CA certificate's fingerprint, since
  kube-system's uid cannot be read.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from provisioner.identity import ca_fingerprints
from tests.e2e.cluster import NFS_SERVER, REPO, E2ECluster, E2EError
from tests.e2e.conftest import PROVISIONER_NAMESPACE, install
from tests.kubectl import kubectl
from tests.upstream import (
    NAMESPACE_RULE,
    PATCH_RULE,
    UPSTREAM_CLASS,
    UPSTREAM_RBAC,
    upstream_deployment,
)

pytestmark = pytest.mark.e2e

MANIFESTS = REPO / "manifests"
NAMESPACE = "default"  # where nfs-subdir's deploy/ puts everything namespaced
UPSTREAM_PROVISIONER = "k8s-sigs.io/nfs-subdir-external-provisioner"
DEPLOYMENT = "nfs-client-provisioner"
CLASS = "nfs-client"
OLD_CLAIM = "old-claim"
OUR_FINALIZER = "external-provisioner.volume.kubernetes.io/finalizer"
OUR_ANNOTATIONS = "nfs.provisioner.dev/"
LOCK = UPSTREAM_PROVISIONER.replace("/", "-")  # the leader lock (Endpoints) in "default"

DEGRADED_FINALIZER = "without the PersistentVolume finalizer"
DEGRADED_IDENTITY = "without the cluster's identity from kube-system's uid"


@dataclass
class Swap:
    cluster: E2ECluster
    old_volume: str  # the PV nfs-subdir wrote before the swap
    old_directory: Path  # its directory on the export's disk
    made: list[Path] = field(default_factory=list)


def apply_yaml(cluster: E2ECluster, text: str) -> None:
    cluster.kubectl("apply", "-f", "-", input=text)


def items(cluster: E2ECluster, *args: str) -> list[dict[str, Any]]:
    found = cluster.get(*args)
    return [] if found is None else list(found.get("items", []))


def no_pods(cluster: E2ECluster, namespace: str, selector: str) -> bool:
    return not items(cluster, "pods", "-n", namespace, "-l", selector)


def bound_claim(cluster: E2ECluster, name: str) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        found = cluster.get("pvc", name, "-n", NAMESPACE)
        if found is not None and found.get("status", {}).get("phase") == "Bound":
            return found
        return None

    return cluster.wait(f"claim {NAMESPACE}/{name} to be Bound", probe)


def volume_events(cluster: E2ECluster, volume: str) -> list[dict[str, Any]]:
    """The Events about the PV (cluster-scoped: they land in "default"), from any source."""
    return items(cluster, "events", "-A", "--field-selector", f"involvedObject.name={volume}")


def wait_event(cluster: E2ECluster, volume: str, reason: str) -> str:
    def probe() -> str | None:
        for event in volume_events(cluster, volume):
            if event.get("reason") == reason:
                return str(event.get("message", ""))
        return None

    return cluster.wait(f"Event {reason} on PV {volume}", probe, timeout=60)


def upstream_volumes(cluster: E2ECluster) -> list[dict[str, Any]]:
    return [
        pv
        for pv in items(cluster, "pv")
        if pv["metadata"].get("annotations", {}).get("pv.kubernetes.io/provisioned-by")
        == UPSTREAM_PROVISIONER
    ]


def owner_record(cluster: E2ECluster, directory: str) -> dict[str, Any] | None:
    """The export's owner record of a top-level directory (journal.py's mirror tree)."""
    record = cluster.nfs.seeds.host_dir / ".nfs-provisioner" / "owners" / f"d{directory}"
    path = record / "owner.json"
    if not path.is_file():
        return None
    loaded: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return loaded


def cluster_ca_fingerprint(cluster: E2ECluster) -> str:
    """``ca:<hex>`` of the CA bundle every pod has mounted (kube-root-ca.crt)."""
    config = cluster.get("configmap", "kube-root-ca.crt", "-n", NAMESPACE)
    assert config is not None
    return ca_fingerprints(config["data"]["ca.crt"].encode())[0]


def remove_ours(cluster: E2ECluster) -> None:
    """Our shipped Deployment and class out of the way: the same class name is upstream's."""
    cluster.kubectl(
        "delete",
        "-n",
        PROVISIONER_NAMESPACE,
        "deployment/nfs-provisioner",
        "--ignore-not-found",
        "--wait=true",
        timeout=200,
    )
    cluster.kubectl("delete", "storageclass", CLASS, "--ignore-not-found", "--wait=true")
    cluster.wait(
        "our provisioner's pods to be gone",
        lambda: no_pods(cluster, PROVISIONER_NAMESPACE, "app.kubernetes.io/name=nfs-provisioner"),
    )


def make_old_volume(cluster: E2ECluster, made: list[Path]) -> tuple[str, Path]:
    """A claim and the PV nfs-subdir v4.0.2 wrote for it, with its directory on the export.

    This stands in for running the old image first: it cannot be pulled here (no registry), so
    the PV and the directory are written as that image would have written them."""
    export = cluster.nfs.seeds
    claim = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": OLD_CLAIM, "namespace": NAMESPACE},
        "spec": {
            "storageClassName": CLASS,
            "accessModes": ["ReadWriteMany"],
            "resources": {"requests": {"storage": "1Mi"}},
        },
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(claim))
    created = cluster.get("pvc", OLD_CLAIM, "-n", NAMESPACE)
    assert created is not None
    uid = created["metadata"]["uid"]
    volume = f"pvc-{uid}"
    name = f"{NAMESPACE}-{OLD_CLAIM}-{volume}"  # nfs-subdir's <namespace>-<claim>-<pv>
    directory = export.host_dir / name
    made.append(directory)
    directory.mkdir()
    directory.chmod(0o777)  # nfs-subdir: MkdirAll(path, 0777) then Chmod(path, 0777)
    (directory / "data").write_text("written before the swap\n", encoding="utf-8")
    pv = {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {
            "name": volume,
            "annotations": {"pv.kubernetes.io/provisioned-by": UPSTREAM_PROVISIONER},
        },
        "spec": {
            "persistentVolumeReclaimPolicy": "Delete",
            "storageClassName": CLASS,
            "accessModes": ["ReadWriteMany"],
            "capacity": {"storage": "1Mi"},
            "nfs": {"server": NFS_SERVER, "path": f"{export.pseudo}/{name}"},
            "claimRef": {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "namespace": NAMESPACE,
                "name": OLD_CLAIM,
                "uid": uid,
            },
        },
    }
    cluster.kubectl("create", "-f", "-", input=json.dumps(pv))
    bound = bound_claim(cluster, OLD_CLAIM)  # kube-controller-manager's binder
    assert bound["spec"]["volumeName"] == volume
    return volume, directory


def remove_swap(cluster: E2ECluster, made: list[Path]) -> list[str]:
    """Everything the swap made, best effort; what could not be removed."""
    problems: list[str] = []

    def attempt(what: str, *args: str, timeout: float = 120) -> None:
        result = kubectl(*args, kubeconfig=cluster.kubeconfig, check=False, timeout=timeout)
        if result.returncode != 0:
            problems.append(f"{what}: {result.stderr.strip()}")

    attempt("delete test-pod", "delete", "-n", NAMESPACE, "pod", "test-pod", "--ignore-not-found")
    for claim in ("test-claim", OLD_CLAIM):
        attempt(f"delete {claim}", "delete", "-n", NAMESPACE, "pvc", claim, "--ignore-not-found")
    # While it still runs, the provisioner releases what is left.
    with contextlib.suppress(E2EError):
        cluster.wait(
            "the swap's PVs to be released", lambda: not upstream_volumes(cluster), timeout=60
        )
    attempt(
        "delete the upstream Deployment",
        "delete",
        "-n",
        NAMESPACE,
        f"deployment/{DEPLOYMENT}",
        "--ignore-not-found",
        "--wait=true",
        timeout=200,
    )
    try:
        cluster.wait(
            "the upstream Deployment's pods to be gone",
            lambda: no_pods(cluster, NAMESPACE, f"app={DEPLOYMENT}"),
        )
    except E2EError as error:
        problems.append(str(error).splitlines()[0])
    export = cluster.nfs.seeds
    for pv in upstream_volumes(cluster):
        name = pv["metadata"]["name"]
        problems.append(f"PV {name} was left; deleted by hand")
        attempt(
            f"unfinalize PV {name}",
            "patch",
            "pv",
            name,
            "--type=merge",
            "-p",
            '{"metadata":{"finalizers":null}}',
        )
        attempt(f"delete PV {name}", "delete", "pv", name, "--ignore-not-found")
        path = pv["spec"].get("nfs", {}).get("path", "")
        if path.startswith(f"{export.pseudo}/"):
            made.append(export.host_dir / path.removeprefix(f"{export.pseudo}/"))
    for directory in made:
        for leftover in (
            directory,
            directory.parent / f"archived-{directory.name}",
            export.host_dir / ".nfs-provisioner" / "owners" / f"d{directory.name}",
            export.host_dir / ".nfs-provisioner" / "owners" / f"darchived-{directory.name}",
        ):
            if leftover.exists():
                shutil.rmtree(leftover)
    for kind, name, namespaced in (
        ("storageclass", CLASS, False),
        ("clusterrolebinding", "run-nfs-client-provisioner", False),
        ("clusterrole", "nfs-client-provisioner-runner", False),
        ("rolebinding", "leader-locking-nfs-client-provisioner", True),
        ("role", "leader-locking-nfs-client-provisioner", True),
        ("serviceaccount", "nfs-client-provisioner", True),
        ("endpoints", LOCK, True),
    ):
        where = ("-n", NAMESPACE) if namespaced else ()
        attempt(f"delete {kind} {name}", "delete", *where, kind, name, "--ignore-not-found")
    return problems


@pytest.fixture(scope="module")
def swap(seeds_provisioner: E2ECluster) -> Iterator[Swap]:
    """nfs-subdir's deploy/ with our image, an old volume of nfs-subdir's made before it;
    afterwards everything removed and our shipped installation back as the session had it."""
    cluster = seeds_provisioner
    made: list[Path] = []
    try:
        remove_ours(cluster)
        apply_yaml(cluster, UPSTREAM_RBAC)
        apply_yaml(cluster, UPSTREAM_CLASS)
        old_volume, old_directory = make_old_volume(cluster, made)
        export = cluster.nfs.seeds
        apply_yaml(cluster, upstream_deployment(cluster.image, NFS_SERVER, export.pseudo))
        cluster.kubectl(
            "rollout",
            "status",
            "-n",
            NAMESPACE,
            f"deployment/{DEPLOYMENT}",
            "--timeout=180s",
            timeout=200,
        )
        yield Swap(cluster, old_volume, old_directory, made)
    finally:
        problems: list[str] = []
        try:
            problems = remove_swap(cluster, made)
        finally:
            install(cluster, cluster.nfs.seeds)
            ours = cluster.get("storageclass", CLASS)
            assert ours is not None, "our nfs-client StorageClass was not re-created"
            assert ours["provisioner"] == "example.com/nfs", ours
        assert not problems, "the swap's clean-up:\n" + "\n".join(problems)


def test_check_reports_the_two_degraded_features(swap: Swap) -> None:
    result = kubectl(
        "exec",
        "-n",
        NAMESPACE,
        f"deploy/{DEPLOYMENT}",
        "--",
        "nfs-provisioner",
        "check",
        kubeconfig=swap.cluster.kubeconfig,
        check=False,
        timeout=120,
    )
    out = result.stdout
    assert result.returncode == 0, f"check exited {result.returncode}:\n{out}{result.stderr}"
    assert "FAILED" not in out, out
    assert "preflight: ok: export mount /persistentvolumes is a writable directory" in out, out
    assert "preflight: ok: every RBAC permission the provisioner needs is granted" in out, out
    assert f"preflight: degraded: {DEGRADED_FINALIZER} and the adoption records: " in out, out
    assert f"preflight: degraded: {DEGRADED_IDENTITY}: " in out, out
    assert PATCH_RULE in out, out
    assert NAMESPACE_RULE in out, out


def test_the_leader_logs_both_as_warnings(swap: Swap) -> None:
    def warned() -> str | None:
        log = swap.cluster.kubectl("logs", "-n", NAMESPACE, f"deploy/{DEPLOYMENT}", check=False)
        lines = [line for line in log.splitlines() if "WARNING" in line]
        found = all(
            any(text in line for line in lines) for text in (DEGRADED_FINALIZER, DEGRADED_IDENTITY)
        )
        return log if found else None

    swap.cluster.wait("both degraded warnings in the provisioner's log", warned, timeout=60)


def test_old_volume_is_adopted_in_memory_only(swap: Swap) -> None:
    cluster = swap.cluster
    message = wait_event(cluster, swap.old_volume, "VolumeAdopted")
    assert swap.old_directory.name in message, message
    pv = cluster.get("pv", swap.old_volume)
    assert pv is not None
    annotations = pv["metadata"].get("annotations", {})
    assert not [key for key in annotations if key.startswith(OUR_ANNOTATIONS)], annotations
    assert OUR_FINALIZER not in pv["metadata"].get("finalizers", []), pv["metadata"]
    # The adoption recorded the directory's owner on the export, by the CA's fingerprint.
    record = owner_record(cluster, swap.old_directory.name)
    assert record is not None, "no owner record for the adopted directory"
    assert record["cluster"] == cluster_ca_fingerprint(cluster), record
    assert record["namespace"] == NAMESPACE, record


def test_seeds_flow_without_a_finalizer(swap: Swap) -> None:
    cluster = swap.cluster
    assert "storageClassName: nfs-client" in (MANIFESTS / "test-claim.yaml").read_text()
    cluster.kubectl("apply", "-n", NAMESPACE, "-f", str(MANIFESTS / "test-claim.yaml"))
    claim = bound_claim(cluster, "test-claim")
    volume = claim["spec"]["volumeName"]
    directory = cluster.nfs.seeds.host_dir / f"{NAMESPACE}-test-claim-{volume}"
    swap.made.append(directory)
    assert directory.is_dir(), f"{directory} was not made on the export"
    pv = cluster.get("pv", volume)
    assert pv is not None
    assert OUR_FINALIZER not in pv["metadata"].get("finalizers", []), pv["metadata"]
    assert pv["spec"]["nfs"] == {
        "server": NFS_SERVER,
        "path": f"{cluster.nfs.seeds.pseudo}/{directory.name}",
    }
    record = owner_record(cluster, directory.name)
    assert record is not None, "no owner record for the new directory"
    assert record["cluster"].startswith("ca:"), record
    assert record["cluster"] == cluster_ca_fingerprint(cluster), record
    assert record["volume"] == volume, record

    cluster.kubectl("apply", "-n", NAMESPACE, "-f", str(MANIFESTS / "test-pod.yaml"))

    def finished() -> str | None:
        found = cluster.get("pod", "test-pod", "-n", NAMESPACE)
        phase = None if found is None else found.get("status", {}).get("phase")
        return phase if phase in ("Succeeded", "Failed") else None

    assert cluster.wait("test-pod to finish", finished) == "Succeeded"
    assert (directory / "SUCCESS").is_file(), "the pod's write did not reach the export"

    cluster.kubectl("delete", "-n", NAMESPACE, "pod", "test-pod", "--wait=true")
    cluster.kubectl("delete", "-n", NAMESPACE, "pvc", "test-claim", "--wait=true")
    cluster.wait("test-claim's PV to be deleted", lambda: cluster.get("pv", volume) is None)
    assert not directory.exists(), "archiveOnDelete false: the directory should be deleted"
    assert not (directory.parent / f"archived-{directory.name}").exists()
    assert owner_record(cluster, directory.name) is None


def test_old_volume_is_released_by_the_old_rules(swap: Swap) -> None:
    cluster = swap.cluster
    directory = swap.old_directory
    assert (directory / "data").is_file()
    cluster.kubectl("delete", "-n", NAMESPACE, "pvc", OLD_CLAIM, "--wait=true")
    cluster.wait(
        f"the old PV {swap.old_volume} to be deleted",
        lambda: cluster.get("pv", swap.old_volume) is None,
    )
    assert not directory.exists(), "archiveOnDelete false: the old directory should be deleted"
    assert not (directory.parent / f"archived-{directory.name}").exists()
    message = wait_event(cluster, swap.old_volume, "VolumeDeleted")
    assert directory.name in message, message
    assert owner_record(cluster, directory.name) is None
