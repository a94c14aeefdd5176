"""Start-up preflight, also the ``nfs-provisioner check`` command: mount, API, permissions.

Runs before the operator starts (a failure stops the process with the reason) and alone as
``check`` (exit 0/1). Missing permissions are printed as rules ready to paste into a ClusterRole
or Role. The list of permissions here is the contract with ``rbac/``: one line per API call kind.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from provisioner.config import LockKind, Settings
from provisioner.kube import ApiError, KubeApi, load_api_client
from provisioner.safefs import LocalSyscalls, Syscalls
from provisioner.storage import Storage, StorageError


@dataclass(frozen=True)
class Permission:
    group: str
    resource: str
    verb: str
    namespaced: bool = False  # True: only in the provisioner's own namespace (a Role)
    name: str | None = None  # only this object (resourceNames)


def required_permissions(settings: Settings) -> list[Permission]:
    """Exactly the calls the provisioner makes (watches included)."""
    needed = [
        *(Permission("", "persistentvolumeclaims", v) for v in ("get", "list", "watch")),
        *(
            Permission("", "persistentvolumes", v)
            for v in ("get", "list", "watch", "create", "delete", "patch")
        ),
        *(Permission("storage.k8s.io", "storageclasses", v) for v in ("list", "watch")),
        # Events are created, and repeats patched (count, lastTimestamp) as client-go does.
        *(Permission("", "events", v) for v in ("create", "patch")),
        # The cluster's identity in the export's records (journal.py): kube-system's uid.
        Permission("", "namespaces", "get", name="kube-system"),
    ]
    if settings.leader_election:
        resources: list[tuple[str, str]] = []
        if settings.lock_kind in (LockKind.ENDPOINTS, LockKind.ENDPOINTS_LEASES):
            resources.append(("", "endpoints"))
        if settings.lock_kind in (LockKind.LEASES, LockKind.ENDPOINTS_LEASES):
            resources.append(("coordination.k8s.io", "leases"))
        for group, resource in resources:
            needed += [
                Permission(group, resource, v, namespaced=True) for v in ("get", "create", "update")
            ]
    return needed


def render_rules(missing: Iterable[Permission]) -> str:
    """Missing permissions as RBAC rules, grouped by API group and resource."""
    grouped: dict[tuple[str, str, bool, str | None], list[str]] = {}
    for permission in missing:
        key = (permission.group, permission.resource, permission.namespaced, permission.name)
        grouped.setdefault(key, []).append(permission.verb)
    lines: list[str] = []
    for (group, resource, namespaced, name), verbs in grouped.items():
        where = "Role in the provisioner's namespace" if namespaced else "ClusterRole"
        lines += [
            f"  # {where}",
            f'  - apiGroups: ["{group}"]',
            f'    resources: ["{resource}"]',
            *([f'    resourceNames: ["{name}"]'] if name else []),
            "    verbs: [" + ", ".join(f'"{v}"' for v in verbs) + "]",
        ]
    return "\n".join(lines)


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    passed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def render(self) -> str:
        lines = [f"preflight: ok: {item}" for item in self.passed]
        lines += [f"preflight: FAILED: {item}" for item in self.problems]
        return "\n".join(lines)


async def check_mount(settings: Settings, storage: Storage, report: Report) -> None:
    try:
        await storage.check_writable()
    except StorageError as error:
        report.problems.append(f"export mount {settings.mount_path}: {error}")
    else:
        report.passed.append(f"export mount {settings.mount_path} is a writable directory")


async def check_api(settings: Settings, kube: KubeApi, report: Report) -> None:
    try:
        version = await kube.server_version()
    except ApiError as error:
        report.problems.append(f"Kubernetes API unreachable: {error}")
        return
    report.passed.append(f"Kubernetes API reachable (server {version})")
    missing: list[Permission] = []
    for permission in required_permissions(settings):
        namespace = settings.namespace if permission.namespaced else None
        try:
            allowed = await kube.can_i(
                permission.verb, permission.resource, permission.group, namespace, permission.name
            )
        except ApiError as error:
            report.problems.append(f"SelfSubjectAccessReview failed: {error}")
            return
        if not allowed:
            missing.append(permission)
    if missing:
        report.problems.append(
            "missing RBAC permissions; add these rules to the provisioner's role:\n"
            + render_rules(missing)
        )
    else:
        report.passed.append("every RBAC permission the provisioner needs is granted")


async def run(settings: Settings, calls: Syscalls | None = None) -> Report:
    report = Report()
    storage = Storage(
        Path(settings.mount_path), calls or LocalSyscalls(), timeout=settings.fs_timeout
    )
    try:
        await check_mount(settings, storage, report)
    finally:
        storage.close()
    try:
        kube = KubeApi(load_api_client(pool_size=2), qps=50, burst=50, threads=2)
    except Exception as error:  # noqa: BLE001 - any config failure is reported, not raised
        report.problems.append(f"no Kubernetes configuration: {error}")
        return report
    try:
        await asyncio.wait_for(check_api(settings, kube, report), timeout=60)
    except TimeoutError:
        report.problems.append("Kubernetes API did not answer within 60 s")
    finally:
        kube.close()
    return report
