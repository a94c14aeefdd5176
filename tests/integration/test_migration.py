"""Swapping the image under a running nfs-subdir / nfs-client installation (SPEC §6, §11).

PersistentVolumes are written exactly as the old provisioners wrote them: nfs-subdir v4.0.2 and
HEAD (sig-storage-lib v6 adds claimRef, storageClassName and pv.kubernetes.io/provisioned-by to
the PV of provisioner.go: reclaim policy, access modes, mountOptions and capacity from the class
and claim, spec.nfs with NFS_SERVER and NFS_PATH joined to the directory) and the seeds'
nfs-client-provisioner (the same PV; default names only, claims naming their class by the beta
annotation). They are bound to their claims, their directories hold data on the temp export, and
our provisioner runs with the same PROVISIONER_NAME and classes: it adopts them and releases
them by the old rules, refuses what it cannot adopt safely, and the migration guide
(``docs/migration.md``: lock hand-over, ``check --migration``, rollback) is followed step by step.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from controlplane.binaries import kubectl_binary
from tests.integration.conftest import MakeNamespace, StartProvisioner, StorageClasses
from tests.integration.harness import (
    NFS_PATH,
    NFS_SERVER,
    REPO,
    Kube,
    Provisioned,
    ProvisionerProcess,
    claim,
    delete_claim,
    release,
    snapshot,
    unique,
    wait_for,
)
from tests.kubectl import kubectl

pytestmark = pytest.mark.integration

FINALIZER = "external-provisioner.volume.kubernetes.io/finalizer"
PROVISIONED_BY = "pv.kubernetes.io/provisioned-by"
PREFIX = "nfs.provisioner.dev/"
LEADER = "control-plane.alpha.kubernetes.io/leader"
BETA_CLASS = "volume.beta.kubernetes.io/storage-class"


# --- the old provisioners' objects ---------------------------------------------------------------


def old_volume(
    admin: Kube,
    export: Path,
    *,
    provisioner: str,
    namespace: str,
    name: str,
    class_name: str,
    directory: str | None = None,
    reclaim_policy: str = "Delete",
    mount_options: tuple[str, ...] = (),
    beta_class: bool = False,
    claim_annotations: dict[str, str] | None = None,
    nfs_path: str | None = None,
    nfs_server: str = NFS_SERVER,
    data: bool = True,
) -> Provisioned:
    """Create the claim, then the PV exactly as the old provisioner did, and wait for the PV
    controller to bind them. ``directory`` None is nfs-subdir's default name,
    ``<namespace>-<claim>-pvc-<uid>``; "" is the export root; ``nfs_path`` overrides the PV's
    spec.nfs.path. The result's ``recorded`` is ``directory``: what adoption should record."""
    annotations = dict(claim_annotations or {})
    if beta_class:  # the seeds' test-claim.yaml names its class this way
        annotations[BETA_CLASS] = class_name
    admin.apply(
        claim(name, namespace, None if beta_class else class_name, "2Gi", annotations=annotations)
    )
    pvc = admin.get("pvc", name, namespace)
    assert pvc is not None
    uid = pvc["metadata"]["uid"]
    pv_name = f"pvc-{uid}"
    if directory is None:
        directory = f"{namespace}-{name}-{pv_name}"
    spec: dict[str, Any] = {
        "persistentVolumeReclaimPolicy": reclaim_policy,
        "accessModes": pvc["spec"]["accessModes"],
        "capacity": {"storage": pvc["spec"]["resources"]["requests"]["storage"]},
        # filepath.Join(NFS_PATH, directory); readOnly false is omitted (omitempty)
        "nfs": {
            "server": nfs_server,
            "path": nfs_path or (f"{NFS_PATH}/{directory}" if directory else NFS_PATH),
        },
        "claimRef": {
            "kind": "PersistentVolumeClaim",
            "namespace": namespace,
            "name": name,
            "uid": uid,
            "apiVersion": "v1",
            "resourceVersion": pvc["metadata"]["resourceVersion"],
        },
        "storageClassName": class_name,
    }
    if mount_options:
        spec["mountOptions"] = list(mount_options)
    body = {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": pv_name, "annotations": {PROVISIONED_BY: provisioner}},
        "spec": spec,
    }
    admin.run("create", "-f", "-", input=json.dumps(body))
    bound = admin.wait_phase("pvc", name, "Bound", namespace)
    assert bound["spec"]["volumeName"] == pv_name
    if data and directory:
        fill(export / directory, f"{namespace}/{name}")
    return Provisioned(name, namespace, pv_name, directory, export / directory)


def fill(directory: Path, owner: str) -> None:
    """What a workload leaves in its volume: the seeds' SUCCESS file and nested data."""
    (directory / "data").mkdir(parents=True, exist_ok=True)
    (directory / "SUCCESS").write_text(owner)
    (directory / "data" / "db").write_text(f"rows of {owner}")


def pv_annotations(admin: Kube, pv: str) -> dict[str, str]:
    body = admin.get("pv", pv)
    assert body is not None, f"PV {pv} is gone"
    found: dict[str, str] = body["metadata"].get("annotations") or {}
    return found


def ours(admin: Kube, pv: str) -> dict[str, str]:
    return {k: v for k, v in pv_annotations(admin, pv).items() if k.startswith(PREFIX)}


def finalizers(admin: Kube, pv: str) -> list[str]:
    body = admin.get("pv", pv)
    assert body is not None
    return list(body["metadata"].get("finalizers") or [])


def events(admin: Kube, pv: str, reason: str) -> list[dict[str, Any]]:
    return [e for e in admin.events(None, pv) if e.get("reason") == reason]


def wait_adopted(admin: Kube, pv: str) -> dict[str, str]:
    def recorded() -> dict[str, str] | None:
        found = ours(admin, pv)
        return found if f"{PREFIX}directory" in found else None

    return wait_for(f"PV {pv} to be adopted", recorded)


def wait_refused(admin: Kube, pv: str) -> str:
    return wait_for(
        f"PV {pv} to be marked not adopted", lambda: ours(admin, pv).get(f"{PREFIX}not-adopted")
    )


def resyncs(process: ProvisionerProcess) -> int:
    return process.logs().count("resync: re-queueing")


def wait_resyncs(process: ProvisionerProcess, more: int) -> None:
    """Let the periodic resync re-reconcile everything ``more`` times (RESYNC_PERIOD is short)."""
    target = resyncs(process) + more
    wait_for(f"{more} more resyncs", lambda: resyncs(process) >= target, timeout=60)


def after(before: dict[str, str], removed: list[str], renamed: dict[str, str]) -> dict[str, str]:
    """``before`` with directories removed or renamed: the export nothing else may change in."""
    result: dict[str, str] = {}
    for path, kind in before.items():
        if any(path == d or path.startswith(f"{d}/") for d in removed):
            continue
        moved = path
        for old, new in renamed.items():
            if path == old or path.startswith(f"{old}/"):
                moved = new + path[len(old) :]
        result[moved] = kind
    return result


@pytest.fixture
def export(tmp_path: Path) -> Path:
    path = tmp_path / "export"
    path.mkdir()
    return path


# --- adoption and release by the old rules -------------------------------------------------------


def test_old_volumes_are_adopted_and_released_by_the_old_rules(
    admin: Kube,
    provisioner: StartProvisioner,
    namespace: str,
    export: Path,
    storage_classes: StorageClasses,
) -> None:
    # One installation of each kind shares the PROVISIONER_NAME: nfs-subdir's deploy/ default.
    name = f"k8s-sigs.io/{unique('nfs-subdir-external-provisioner')}"
    ns = namespace
    seeds_options = ("vers=4", "minorversion=0", "noresvport")  # the seeds' class

    def make(key: str, parameters: dict[str, str], **kw: Any) -> Provisioned:
        options = kw.pop("mount_options", ())
        reclaim = kw.pop("reclaim_policy", "Delete")
        class_name = storage_classes(
            name, parameters, prefix=key, reclaim_policy=reclaim, mount_options=options
        )
        return old_volume(
            admin,
            export,
            provisioner=name,
            namespace=ns,
            name=key,
            class_name=class_name,
            reclaim_policy=reclaim,
            mount_options=options,
            **kw,
        )

    nested = "${.PVC.namespace}/${.PVC.name}"
    v = {
        # nfs-subdir v4.0.2 through its Helm chart (archiveOnDelete "true"), nested pathPattern:
        # v4.0.2 looked for "<name>" at the export root and leaked; HEAD renames it to
        # "archived-<name>" at the root; we rename it beside itself.
        "v402-archive": make(
            "v402-archive",
            {"archiveOnDelete": "true", "pathPattern": nested},
            directory=f"{ns}/v402-archive",
        ),
        # nfs-subdir HEAD's README class: nested by an annotation, onDelete delete.
        "head-delete": make(
            "head-delete",
            {
                "pathPattern": "${.PVC.namespace}/${.PVC.annotations.nfs.io/storage-path}",
                "onDelete": "delete",
            },
            directory=f"{ns}/test-path",
            claim_annotations={"nfs.io/storage-path": "test-path"},
        ),
        "head-retain": make("head-retain", {"onDelete": "retain"}),
        # The seeds' nfs-client-provisioner: mountOptions, beta class annotation, default name.
        "seeds-false": make(
            "seeds-false",
            {"archiveOnDelete": "false"},
            mount_options=seeds_options,
            beta_class=True,
        ),
        "pv-first": make("pv-first", {"archiveOnDelete": "false"}),
        "reclaim-retain": make(
            "reclaim-retain", {"archiveOnDelete": "false"}, reclaim_policy="Retain"
        ),
        "class-gone": make("class-gone", {"archiveOnDelete": "false"}),
        "aod-yes": make("aod-yes", {"archiveOnDelete": "yes"}),
        "od-wrong-case": make("od-wrong-case", {"onDelete": "Delete"}),
        "od-retain-case": make(
            "od-retain-case", {"onDelete": "Retain", "archiveOnDelete": "false"}
        ),
    }
    # Deleted before the swap, while its volume is still bound: nfs-subdir's release of it
    # would fail forever ("storageclass not found").
    gone = admin.get("pv", v["class-gone"].volume)
    assert gone is not None
    admin.run("delete", "storageclass", gone["spec"]["storageClassName"])
    (export / "unrelated").mkdir()
    (export / "unrelated" / "keep").write_text("not a volume")

    process = provisioner(name=name, export=export, RESYNC_PERIOD="3")

    for key, old in v.items():
        recorded = wait_adopted(admin, old.volume)
        assert recorded[f"{PREFIX}directory"] == old.recorded, key
        assert recorded[f"{PREFIX}export-path"] == NFS_PATH, key
        assert recorded[f"{PREFIX}adopted"].endswith(
            f"; directory from spec.nfs.path {NFS_PATH}/{old.recorded}"
        ), key
        assert f"{PREFIX}on-delete" not in recorded, key  # the class decides at release
        has_finalizer = FINALIZER in finalizers(admin, old.volume)
        assert has_finalizer is (key != "reclaim-retain"), key
        message = admin.wait_event(None, old.volume, "VolumeAdopted")
        assert f'directory "{old.recorded}"' in message, key
        owner = json.loads(
            (
                export.joinpath(
                    ".nfs-provisioner", "owners", *(f"d{p}" for p in old.recorded.split("/"))
                )
                / "owner.json"
            ).read_text()
        )
        assert (owner["namespace"], owner["volume"]) == (ns, old.volume), key
    stable = {key: ours(admin, old.volume) for key, old in v.items()}

    # A PV deleted before its claim: our finalizer (added at adoption) keeps it until the claim
    # lets go, then the directory gets the class's policy. nfs-subdir leaked it.
    pv_first = v["pv-first"]
    admin.run("delete", "pv", pv_first.volume, "--wait=false")
    wait_for(
        "the PV to be Terminating",
        lambda: (
            (admin.get("pv", pv_first.volume) or {}).get("metadata", {}).get("deletionTimestamp")
        ),
    )
    wait_resyncs(process, 2)
    assert (pv_first.directory / "SUCCESS").exists()
    for key, old in v.items():
        assert ours(admin, old.volume) == stable[key], f"{key}: annotations rewritten"
        assert len(events(admin, old.volume, "VolumeAdopted")) == 1, key

    before = snapshot(export)
    for old in v.values():
        delete_claim(admin, old)
    for key, old in v.items():
        if key != "reclaim-retain":
            admin.wait_gone("pv", old.volume)
    retained = admin.wait_phase("pv", v["reclaim-retain"].volume, "Released")
    wait_resyncs(process, 2)

    d = {key: old.recorded for key, old in v.items()}
    assert snapshot(export) == after(
        before,
        removed=[d["head-delete"], d["seeds-false"], d["pv-first"]],
        renamed={
            d["v402-archive"]: f"{ns}/archived-v402-archive",
            d["aod-yes"]: f"archived-{d['aod-yes']}",
            d["od-wrong-case"]: f"archived-{d['od-wrong-case']}",
        },
    )
    assert (export / ns / "archived-v402-archive" / "SUCCESS").read_text() == f"{ns}/v402-archive"
    assert (export / "unrelated" / "keep").read_text() == "not a volume"

    def released(key: str, reason: str, event_type: str, *says: str) -> None:
        found = events(admin, v[key].volume, reason)
        assert len(found) == 1, (key, found)
        assert found[0]["type"] == event_type, (key, found[0])
        for text in says:
            assert text in found[0]["message"], (key, found[0]["message"])

    released("v402-archive", "VolumeArchived", "Normal", f'as "{ns}/archived-v402-archive"')
    released("head-delete", "VolumeDeleted", "Normal", 'onDelete "delete"')
    released("head-retain", "VolumeRetained", "Normal", 'onDelete "retain"')
    released("seeds-false", "VolumeDeleted", "Normal", 'archiveOnDelete "false"')
    released("pv-first", "VolumeDeleted", "Normal", "deleted")
    released("class-gone", "VolumeRetained", "Warning", "no longer exists", "by hand", "kept")
    released("aod-yes", "VolumeArchived", "Warning", '"yes" is not a boolean', "keeps the data")
    released("od-wrong-case", "VolumeArchived", "Warning", 'onDelete "Delete" ignored')
    released("od-retain-case", "VolumeRetained", "Warning", "asks to keep the data")
    # Retain: nothing touched, no finalizer of ours, no release Event, the record unchanged.
    assert FINALIZER not in (retained["metadata"].get("finalizers") or [])
    assert ours(admin, v["reclaim-retain"].volume) == stable["reclaim-retain"]
    for reason in ("VolumeDeleted", "VolumeArchived", "VolumeRetained", "VolumeFailedDelete"):
        assert not events(admin, v["reclaim-retain"].volume, reason)
    for key, old in v.items():
        assert not events(admin, old.volume, "VolumeFailedDelete"), key
    admin.run("delete", "pv", v["reclaim-retain"].volume, "--wait=false")


# --- what cannot be adopted safely ---------------------------------------------------------------


def test_unsafe_old_volumes_are_refused_once_and_nothing_is_touched(
    admin: Kube,
    provisioner: StartProvisioner,
    namespace: str,
    export: Path,
    tmp_path: Path,
    storage_classes: StorageClasses,
) -> None:
    name = f"fuseim.pri/{unique('ifs')}"  # the seeds' PROVISIONER_NAME
    ns = namespace
    # The most destructive class: every release would remove its directory.
    class_name = storage_classes(
        name,
        {"onDelete": "delete", "pathPattern": "${.PVC.annotations.nfs.io/storage-path}"},
        prefix="unsafe",
    )
    outside = tmp_path / "outside"
    (outside / "app").mkdir(parents=True)
    (outside / "app" / "SECRET").write_text("not the provisioner's")
    (export / "victim" / "app").mkdir(parents=True)
    (export / "victim" / "app" / "SECRET").write_text("another tenant's")
    # A workload replaced a parent of a volume with a link to another tenant's directory.
    (export / "linked").symlink_to(export / "victim")

    def make(key: str, **kw: Any) -> Provisioned:
        return old_volume(
            admin, export, provisioner=name, namespace=ns, name=key, class_name=class_name, **kw
        )

    refused = {
        "outside": (
            make("outside", directory="", nfs_path=f"{outside}/app"),
            f'spec.nfs.path "{outside}/app" is not under NFS_PATH "{NFS_PATH}"',
        ),
        "symlink": (
            make("symlink", directory="", nfs_path=f"{NFS_PATH}/linked/app"),
            '"linked" on its path is a symbolic link',
        ),
        # nfs-subdir v4.0.2 without the #83 guard: the pattern rendered "" (the claim lacks the
        # annotation), so the PV got the export root itself.
        "root": (make("root", directory=""), "is the export root NFS_PATH itself"),
        "other-server": (
            make(
                "other-server",
                directory="",
                nfs_path=f"{NFS_PATH}/victim/app",
                nfs_server="other-nfs.example.test",
            ),
            'spec.nfs.server "other-nfs.example.test" is not this provisioner\'s NFS_SERVER',
        ),
    }
    before = snapshot(export)
    outside_before = snapshot(outside)

    process = provisioner(name=name, export=export, RESYNC_PERIOD="2")
    for key, (old, why) in refused.items():
        marked = wait_refused(admin, old.volume)
        assert why in marked, (key, marked)
    wait_resyncs(process, 2)
    for old, _ in refused.values():
        delete_claim(admin, old)
    for old, _ in refused.values():
        admin.wait_phase("pv", old.volume, "Released")
    wait_resyncs(process, 2)

    for key, (old, why) in refused.items():
        found = events(admin, old.volume, "AdoptionRefused")
        assert len(found) == 1, (key, found)
        assert found[0]["type"] == "Warning"
        assert why in found[0]["message"], key
        assert "left alone" in found[0]["message"]
        assert list(ours(admin, old.volume)) == [f"{PREFIX}not-adopted"], key
        assert FINALIZER not in finalizers(admin, old.volume), key
        assert admin.phase("pv", old.volume) == "Released", key  # not deleted
        for reason in ("VolumeAdopted", "VolumeDeleted", "VolumeFailedDelete"):
            assert not events(admin, old.volume, reason), (key, reason)
    assert snapshot(export) == before
    assert snapshot(outside) == outside_before
    assert not (export / ".nfs-provisioner" / "owners").exists() or not any(
        (export / ".nfs-provisioner" / "owners").iterdir()
    )
    admin.run("delete", "pv", *(old.volume for old, _ in refused.values()), "--wait=false")


# --- the migration guide (docs/migration.md), followed --------------------------------------------


def guide_block(marker: str, **values: str) -> str:
    """The shell block after ``<!-- migration-guide: marker -->`` in docs/migration.md, with the
    variables an admin edits (``NAME=value`` lines) set to this test's values."""
    guide = (REPO / "docs" / "migration.md").read_text()
    match = re.search(
        rf"<!-- migration-guide: {re.escape(marker)} -->\s*```sh\n(.*?)```", guide, re.S
    )
    assert match is not None, f"docs/migration.md has no migration-guide block {marker}"
    script = match.group(1)
    for variable, value in values.items():
        script, count = re.subn(
            rf"^(\s*){variable}=\S+", rf"\g<1>{variable}='{value}'", script, flags=re.M
        )
        assert count == 1, f"block {marker} sets {variable} {count} times"
    return script


def run_guide(admin: Kube, script: str) -> str:
    """Run a block of the migration guide with bash, kubectl on PATH as the admin would."""
    env = {
        **os.environ,
        "KUBECONFIG": str(admin.kubeconfig),
        "PATH": f"{kubectl_binary().parent}{os.pathsep}{os.environ['PATH']}",
    }
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"{script}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    return result.stdout


class OldLeader:
    """The old provisioner's leader election (client-go, Endpoints lock), renewing every 2 s."""

    def __init__(self, admin: Kube, namespace: str, lock: str) -> None:
        self.admin, self.namespace, self.lock = admin, namespace, lock
        self.identity = f"nfs-client-provisioner-58487c669c-jjqpq_{unique('id')}"
        self.acquired = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.renewals = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_forever, daemon=True)

    def record(self) -> str:
        return json.dumps(
            {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": 15,
                "acquireTime": self.acquired,
                "renewTime": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "leaderTransitions": 0,
            }
        )

    def start(self) -> None:
        endpoints = {
            "apiVersion": "v1",
            "kind": "Endpoints",
            "metadata": {
                "name": self.lock,
                "namespace": self.namespace,
                "annotations": {LEADER: self.record()},
            },
        }
        self.admin.run("create", "-f", "-", input=json.dumps(endpoints))
        self._thread.start()

    def _renew_forever(self) -> None:
        while not self._stop.wait(2):
            renewed = kubectl(
                "annotate",
                "endpoints",
                self.lock,
                "-n",
                self.namespace,
                f"{LEADER}={self.record()}",
                "--overwrite",
                kubeconfig=self.admin.kubeconfig,
                check=False,  # a failed renewal is retried, as client-go does
            )
            self.renewals += renewed.returncode == 0

    def stop(self) -> None:
        """The old Deployment scaled to 0: lib v6 does not release the lock, it just stops."""
        self._stop.set()
        self._thread.join(timeout=30)


def holder(admin: Kube, namespace: str, lock: str) -> str:
    endpoints = admin.get("endpoints", lock, namespace)
    assert endpoints is not None
    return str(json.loads(endpoints["metadata"]["annotations"][LEADER])["holderIdentity"])


def check_migration(process: ProvisionerProcess) -> subprocess.CompletedProcess[str]:
    """``nfs-provisioner check --migration`` with the provisioner's own environment, as the
    guide runs it inside the standby pod (kubectl exec)."""
    return subprocess.run(
        [sys.executable, "-m", "provisioner", "check", "--migration"],
        cwd=REPO,
        env=process.env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def export_state(export: Path) -> dict[str, str]:
    """Everything on the export, the provisioner's records included."""
    return {
        str(p.relative_to(export)): (p.read_text() if p.is_file() else "dir")
        for p in sorted(export.rglob("*"))
    }


def test_the_migration_guide(
    admin: Kube,
    provisioner: StartProvisioner,
    namespace: str,
    new_namespace: MakeNamespace,
    export: Path,
    storage_classes: StorageClasses,
) -> None:
    # Where the old Deployment (and so its Endpoints lock) runs, e.g. default.
    old_namespace = new_namespace(unique("old"))
    name = f"cluster.local/{unique('nfs-subdir-external-provisioner')}"  # the Helm default
    lock = name.replace("/", "-")
    ns = namespace
    # The old installation: Helm's class (archiveOnDelete "true"), volumes, a running leader.
    class_name = storage_classes(
        name, {"archiveOnDelete": "true", "pathPattern": "${.PVC.namespace}/${.PVC.name}"}
    )
    common: dict[str, Any] = {"provisioner": name, "namespace": ns, "class_name": class_name}
    kept = old_volume(admin, export, name="web", directory=f"{ns}/web", **common)
    released = old_volume(admin, export, name="db", directory=f"{ns}/db", **common)
    (export / "elsewhere").mkdir()
    (export / ns / "cache").symlink_to(export / "elsewhere")
    linked = old_volume(
        admin, export, name="cache", directory="", nfs_path=f"{NFS_PATH}/{ns}/cache", **common
    )
    old_leader = OldLeader(admin, old_namespace, lock)
    old_leader.start()
    try:
        # Steps 1-3: rbac/ is applied (the session fixture); the lock Role in the old namespace.
        run_guide(admin, guide_block("lock-role", OLD_NAMESPACE=old_namespace))
        # Step 4: ours, same PROVISIONER_NAME and lock kind, POD_NAMESPACE = the old namespace.
        ours_process = provisioner(
            name=name,
            export=export,
            ENABLE_LEADER_ELECTION="true",
            LEADER_ELECTION_LOCK="endpoints",
            POD_NAMESPACE=old_namespace,
        )
        wait_for(
            "ours to stand by on the old lock",
            lambda: f"waiting for lock {old_namespace}/{lock}" in ours_process.logs(),
        )
        # Step 5: the listing, in the standby; it changes nothing.
        volumes_before = {v.volume: admin.get("pv", v.volume) for v in (kept, released, linked)}
        state_before = export_state(export)
        listing = check_migration(ours_process)
        assert listing.returncode == 0, listing.stderr
        out = listing.stdout
        assert "2 PersistentVolume(s) of the previous provisioner will be adopted" in out
        assert f'  {kept.volume}: directory "{ns}/web", claim {ns}/web, Bound' in out
        assert f'renamed to "{ns}/archived-web"' in out
        assert 'nfs-subdir renamed it to "archived-web" at the export root' in out
        assert "1 cannot be adopted" in out
        assert f'  {linked.volume}: "{ns}/cache" on its path is a symbolic link' in out
        assert "nothing was changed" in out
        assert {v: admin.get("pv", v) for v in volumes_before} == volumes_before
        assert export_state(export) == state_before

        # While the old one renews, ours provisions and adopts nothing.
        admin.apply(claim("new", ns, class_name))
        renewed = old_leader.renewals
        wait_for("the old leader to renew 4 more times", lambda: old_leader.renewals >= renewed + 4)
        assert holder(admin, old_namespace, lock) == old_leader.identity
        assert admin.phase("pvc", "new", ns) == "Pending"
        assert ours(admin, kept.volume) == {}
        assert export_state(export) == state_before

        # Step 6: the old Deployment scaled to 0; ours takes the lock once the lease expires.
        old_leader.stop()
        wait_for(
            "ours to take the old lock",
            lambda: holder(admin, old_namespace, lock) not in ("", old_leader.identity),
            timeout=60,
        )
        assert f"{holder(admin, old_namespace, lock)} became leader" in ours_process.logs()
        new_pv = admin.wait_phase("pvc", "new", "Bound", ns)["spec"]["volumeName"]
        assert wait_adopted(admin, kept.volume)[f"{PREFIX}directory"] == f"{ns}/web"
        wait_adopted(admin, released.volume)
        assert "symbolic link" in wait_refused(admin, linked.volume)
        # Released by the old rules (archiveOnDelete "true"), beside itself.
        release(admin, released)
        assert (export / ns / "archived-db" / "SUCCESS").read_text() == f"{ns}/db"
        assert not (export / ns / "db").exists()

        # Rollback: ours scaled to 0 releases the lock at once; our finalizer is removed.
        assert ours_process.stop() == 0
        assert holder(admin, old_namespace, lock) == ""
        assert FINALIZER in finalizers(admin, kept.volume)
        assert FINALIZER in finalizers(admin, new_pv)
        run_guide(admin, guide_block("rollback", PROVISIONER=name))
        for pv in (kept.volume, new_pv, linked.volume):
            assert FINALIZER not in finalizers(admin, pv), pv
        assert "kubernetes.io/pv-protection" in finalizers(admin, kept.volume)
        assert ours(admin, kept.volume)[f"{PREFIX}directory"] == f"{ns}/web"  # harmless, kept
    finally:
        old_leader.stop()
        admin.run("delete", "pvc", "--all", "-n", ns, "--wait=false", check=False)
        names = [
            pv["metadata"]["name"]
            for pv in admin.items("pv")
            if (pv["metadata"].get("annotations") or {}).get(PROVISIONED_BY) == name
        ]
        if names:
            admin.run("delete", "pv", *names, "--wait=false", check=False)


def test_check_migration_fails_when_it_cannot_list(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:9"}}],
                "users": [{"name": "u", "user": {"token": "x"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    process = ProvisionerProcess(kubeconfig, "fuseim.pri/ifs", tmp_path / "export", tmp_path / "l")
    result = check_migration(process)
    assert result.returncode == 1
    assert "migration: cannot list PersistentVolumes and StorageClasses" in result.stderr
