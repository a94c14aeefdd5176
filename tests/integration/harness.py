"""Helpers for integration tests: the provisioner as a subprocess, kubectl as JSON, waiting.

The provisioner runs as ``python -m provisioner`` under the ServiceAccount token from ``rbac/``
(never as admin) with a temporary directory as the mounted export, so crash tests can SIGKILL
it. Waiting is always polling with a deadline; nothing here asserts on speed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from provisioner.paths import JOURNAL_DIR
from tests.faults import FAULTS_ENV
from tests.kubectl import kubectl

REPO = Path(__file__).resolve().parents[2]
NFS_SERVER = "nfs.example.test"
NFS_PATH = "/exports"

T = TypeVar("T")


def wait_for(
    what: str, probe: Callable[[], T | None], timeout: float = 90, interval: float = 0.2
) -> T:
    """Poll ``probe`` until it returns something truthy; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what} (last: {last!r})")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


@dataclass
class Kube:
    """kubectl bound to one kubeconfig, returning parsed JSON."""

    kubeconfig: Path

    def run(self, *args: str, input: str | None = None, check: bool = True) -> str:
        return kubectl(*args, kubeconfig=self.kubeconfig, input=input, check=check).stdout

    def apply(self, manifest: str) -> None:
        self.run("apply", "-f", "-", input=manifest)

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        args = ["get", kind, name, "-o", "json", "--ignore-not-found"]
        if namespace:
            args += ["-n", namespace]
        out = self.run(*args)
        return json.loads(out) if out.strip() else None

    def items(self, kind: str, namespace: str | None = None) -> list[dict[str, Any]]:
        args = ["get", kind, "-o", "json"]
        args += ["-n", namespace] if namespace else ["-A"]
        items: list[dict[str, Any]] = json.loads(self.run(*args))["items"]
        return items

    def events(self, namespace: str | None, name: str) -> list[dict[str, Any]]:
        """Events about the object ``name``; namespace None searches every namespace, as
        cluster-scoped objects (PVs) have their Events in "default".

        kube-controller-manager's binder (source ``persistentvolume-controller``) is left out:
        when its informer has not seen a just-created StorageClass yet it posts a
        ``ProvisioningFailed … not found`` of its own, which is not the provisioner's answer."""
        return [
            e
            for e in self.items("events", namespace)
            if e.get("involvedObject", {}).get("name") == name
            and e.get("source", {}).get("component") != "persistentvolume-controller"
        ]

    def wait_event(self, namespace: str | None, name: str, reason: str, timeout: float = 60) -> str:
        """The message of the first Event with ``reason`` on the object."""

        def probe() -> str | None:
            for event in self.events(namespace, name):
                if event.get("reason") == reason:
                    return str(event.get("message", ""))
            return None

        return wait_for(f"event {reason} on {namespace or ''}/{name}", probe, timeout)

    def phase(self, kind: str, name: str, namespace: str | None = None) -> str | None:
        obj = self.get(kind, name, namespace)
        return None if obj is None else obj.get("status", {}).get("phase")

    def wait_phase(
        self, kind: str, name: str, phase: str, namespace: str | None = None, timeout: float = 90
    ) -> dict[str, Any]:
        def probe() -> dict[str, Any] | None:
            obj = self.get(kind, name, namespace)
            return obj if obj and obj.get("status", {}).get("phase") == phase else None

        return wait_for(f"{kind} {namespace or ''}/{name} to be {phase}", probe, timeout)

    def wait_gone(
        self, kind: str, name: str, namespace: str | None = None, timeout: float = 90
    ) -> None:
        wait_for(
            f"{kind} {name} to be gone", lambda: self.get(kind, name, namespace) is None, timeout
        )


def storage_class(
    name: str,
    provisioner: str,
    parameters: dict[str, str] | None = None,
    reclaim_policy: str = "Delete",
    default: bool = False,
    mount_options: Iterable[str] = (),
) -> str:
    doc: dict[str, Any] = {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {"name": name},
        "provisioner": provisioner,
        "reclaimPolicy": reclaim_policy,
        "parameters": parameters or {},
    }
    if default:
        doc["metadata"]["annotations"] = {"storageclass.kubernetes.io/is-default-class": "true"}
    if mount_options:
        doc["mountOptions"] = list(mount_options)
    return json.dumps(doc)


def claim(
    name: str,
    namespace: str,
    class_name: str | None,
    size: str = "1Mi",
    access_modes: Iterable[str] = ("ReadWriteMany",),
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    extra_spec: dict[str, Any] | None = None,
) -> str:
    spec: dict[str, Any] = {
        "accessModes": list(access_modes),
        "resources": {"requests": {"storage": size}},
        **(extra_spec or {}),
    }
    if class_name is not None:
        spec["storageClassName"] = class_name
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": labels or {},
                "annotations": annotations or {},
            },
            "spec": spec,
        }
    )


ANN_DIRECTORY = "nfs.provisioner.dev/directory"


@dataclass(frozen=True)
class Provisioned:
    """A Bound claim, its PV, and where the PV says the data is."""

    name: str
    namespace: str
    volume: str
    recorded: str
    """The directory relative to the export: our PV's ``nfs.provisioner.dev/directory``
    annotation; for an old provisioner's PV, the one its spec.nfs.path names ("" for the export
    root), which adoption records."""
    directory: Path
    """``recorded`` under the test's export."""


def bound(admin: Kube, namespace: str, name: str, export: Path) -> Provisioned:
    """Wait until the claim ``name`` is Bound and read the directory its PV records."""
    pvc = admin.wait_phase("pvc", name, "Bound", namespace)
    volume = pvc["spec"]["volumeName"]
    pv = admin.get("pv", volume)
    assert pv is not None
    recorded = pv["metadata"]["annotations"][ANN_DIRECTORY]
    return Provisioned(name, namespace, volume, recorded, export / recorded)


def provision(
    admin: Kube, namespace: str, class_name: str, export: Path, name: str = "data", **kw: Any
) -> Provisioned:
    """Apply the claim ``name`` (``claim``'s keywords), wait until it is Bound and read the
    directory its PV records."""
    admin.apply(claim(name, namespace, class_name, **kw))
    return bound(admin, namespace, name, export)


def delete_claim(admin: Kube, p: Provisioned) -> None:
    """Delete the claim without waiting: the release is the provisioner's to do."""
    admin.run("delete", "pvc", p.name, "-n", p.namespace, "--wait=false")


def release(admin: Kube, p: Provisioned) -> None:
    """Delete the claim and wait until its PV is gone."""
    delete_claim(admin, p)
    admin.wait_gone("pv", p.volume)


def claims_resource_version(admin: Kube) -> str:
    """The resourceVersion of a claim list now (the raw list: kubectl's own ``get -o json``
    List carries none)."""
    listed = json.loads(admin.run("get", "--raw", "/api/v1/persistentvolumeclaims"))
    version: str = listed["metadata"]["resourceVersion"]
    assert version
    return version


def watch_answer(admin: Kube, resource_version: str) -> dict[str, Any] | None:
    """The first event of a claim watch resumed at ``resource_version`` (None: not served yet)."""
    out = admin.run(
        "get",
        "--raw",
        f"/api/v1/persistentvolumeclaims?watch=1&resourceVersion={resource_version}"
        "&timeoutSeconds=1",
        check=False,
    )
    first = next((line for line in out.splitlines() if line.strip()), None)
    if first is None:
        return None
    event: dict[str, Any] = json.loads(first)
    return event


def wait_for_410_after_restart(admin: Kube, old_version: str, timeout: float) -> None:
    """After a kube-apiserver restart: wait until kubectl is answered again, then check that a
    watch resumed at ``old_version`` (read before the restart) gets 410 Gone, so that kopf has
    to re-list rather than resume."""
    wait_for(
        "kubectl to answer again",
        lambda: admin.run("get", "--raw", "/readyz", check=False).strip() == "ok",
        timeout=timeout,
    )
    answer = wait_for(
        "a watch resumed from before the restart to be answered",
        lambda: watch_answer(admin, old_version),
        timeout=timeout,
    )
    assert answer["type"] == "ERROR", answer
    assert answer["object"]["code"] == 410, answer


def entries(export: Path) -> list[Path]:
    """What is in the export's top level, except the provisioner's own records directory."""
    return sorted(p for p in export.iterdir() if p.name != JOURNAL_DIR)


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` with its kind and content, to prove what did (not) change.

    The provisioner's records (``.nfs-provisioner/``) are left out: they are its bookkeeping,
    not anybody's data; tests that care read them directly.
    """
    result: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if rel == JOURNAL_DIR or rel.startswith(f"{JOURNAL_DIR}/"):
            continue
        if path.is_symlink():
            result[rel] = f"link:{os.readlink(path)}"
        elif path.is_dir():
            result[rel] = f"dir:{oct(path.stat().st_mode & 0o7777)}"
        else:
            result[rel] = f"file:{path.read_bytes()[:64]!r}"
    return result


def snapshot_for(root: Path, namespace: str) -> dict[str, str]:
    """``snapshot`` of a shared export as one test sees it: the directories of other tests'
    namespaces (``t-…`` and their ``archived-t-…``), which their releases may change at any
    time, are left out; everything else, including the export's root, is in."""

    def foreign(rel: str) -> bool:
        top = rel.split("/", 1)[0].removeprefix("archived-")
        return top.startswith("t-") and not top.startswith(namespace)

    return {rel: kind for rel, kind in snapshot(root).items() if not foreign(rel)}


def entry_module(env: dict[str, str]) -> str:
    """The real entry point, or its fault-injecting twin when the test set a rules file."""
    return "tests.faulty_provisioner" if FAULTS_ENV in env else "provisioner"


@dataclass
class ProvisionerProcess:
    """``python -m provisioner`` with a ServiceAccount kubeconfig and a temp export."""

    kubeconfig: Path
    name: str
    export: Path
    log_path: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("KUBERNETES_", "NFS_", "PROVISIONER_"))
        }
        env.update(
            {
                "KUBECONFIG": str(self.kubeconfig),
                "PROVISIONER_NAME": self.name,
                "NFS_SERVER": NFS_SERVER,
                "NFS_PATH": NFS_PATH,
                "NFS_MOUNT_PATH": str(self.export),
                "ENABLE_LEADER_ELECTION": "false",
                "POD_NAMESPACE": "nfs-provisioner",
                "HTTP_ADDRESS": "127.0.0.1:0",
                "RESYNC_PERIOD": "30",
                "FS_TIMEOUT": "5",
                "RETRY_BACKOFF_BASE": "0.5",
                "RETRY_BACKOFF_MAX": "5",
                "LOG_LEVEL": "INFO",
                "PYTHONUNBUFFERED": "1",
                **self.extra_env,
            }
        )
        return env

    def start(self) -> ProvisionerProcess:
        self.export.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", entry_module(self.extra_env)],
            cwd=REPO,
            env=self.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        wait_for(
            f"provisioner {self.name} to be ready",
            lambda: self.ready() or self._died(),
            timeout=60,
        )
        return self

    @property
    def url(self) -> str | None:
        """The HTTP endpoint (metrics, probes), read from the log since the port is random."""
        match = re.search(r"on (http://[0-9.]+:[0-9]+)", self.logs())
        return match.group(1) if match else None

    def get(self, path: str) -> tuple[int, str]:
        assert self.url is not None, "the provisioner has not logged its HTTP address yet"
        try:
            with urllib.request.urlopen(f"{self.url}{path}", timeout=10) as response:  # noqa: S310
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def ready(self) -> bool:
        return self.url is not None and self.get("/readyz")[0] == 200

    def _died(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(
                f"provisioner exited with {self.process.returncode}:\n{self.logs()[-3000:]}"
            )
        return False

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL: the crash tests' way of stopping mid-work."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        return self.process.returncode


def check_env(kubeconfig: Path, mount: Path, **extra: str) -> dict[str, str]:
    """The environment of `nfs-provisioner check` for a ServiceAccount and a mount path."""
    return {
        "KUBECONFIG": str(kubeconfig),
        "PROVISIONER_NAME": "a.io/b",
        "NFS_SERVER": "nas",
        "NFS_PATH": "/exports",
        "NFS_MOUNT_PATH": str(mount),
        "POD_NAMESPACE": "nfs-provisioner",
        **extra,
    }


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("NFS_", "PROVISIONER_"))}
    return subprocess.run(
        [sys.executable, "-m", entry_module(env), *args],
        cwd=REPO,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
