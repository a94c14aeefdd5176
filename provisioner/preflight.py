"""Start-up preflight, also the ``nfs-provisioner check`` command: mount, API, permissions.

Runs before the operator starts (a failure stops the process with the reason) and alone as
``check`` (exit 0/1). Missing permissions are printed as rules ready to paste into a ClusterRole
or Role; a missing *wanted* permission (permissions.py) is no failure: it is reported as
``degraded``, with what changes and the rule that turns the feature on.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

from provisioner.api import ApiError
from provisioner.config import Settings
from provisioner.kube import KubeClient, load_api_client
from provisioner.permissions import (
    WANTED,
    Permission,
    degraded_line,
    needed_permissions,
    render_rules,
)
from provisioner.safefs import LocalSyscalls, Syscalls
from provisioner.storage import Storage, StorageError


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    passed: list[str] = field(default_factory=list)
    degraded: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def render(self) -> str:
        lines = [f"preflight: ok: {item}" for item in self.passed]
        lines += [f"preflight: degraded: {item}" for item in self.degraded]
        lines += [f"preflight: FAILED: {item}" for item in self.problems]
        return "\n".join(lines)


async def check_mount(settings: Settings, storage: Storage, report: Report) -> None:
    try:
        await storage.check_writable()
    except StorageError as error:
        report.problems.append(f"export mount {settings.mount_path}: {error}")
    else:
        report.passed.append(f"export mount {settings.mount_path} is a writable directory")


async def check_api(settings: Settings, kube: KubeClient, report: Report) -> None:
    try:
        version = await kube.server_version()
    except ApiError as error:
        report.problems.append(f"Kubernetes API unreachable: {error}")
        return
    report.passed.append(f"Kubernetes API reachable (server {version})")
    try:
        missing = await _missing(settings, kube, needed_permissions(settings))
        missing_wanted = await _missing(settings, kube, [grant.permission for grant in WANTED])
    except ApiError as error:
        report.problems.append(f"SelfSubjectAccessReview failed: {error}")
        return
    if missing:
        report.problems.append(
            "missing RBAC permissions; add these rules to the provisioner's role:\n"
            + render_rules(missing)
        )
    else:
        report.passed.append("every RBAC permission the provisioner needs is granted")
    report.degraded += [
        degraded_line(grant) for grant in WANTED if grant.permission in missing_wanted
    ]


async def _missing(
    settings: Settings, kube: KubeClient, permissions: list[Permission]
) -> list[Permission]:
    missing: list[Permission] = []
    for permission in permissions:
        namespace = settings.namespace if permission.namespaced else None
        allowed = await kube.can_i(
            permission.verb, permission.resource, permission.group, namespace, permission.name
        )
        if not allowed:
            missing.append(permission)
    return missing


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
        kube = KubeClient(load_api_client(pool_size=2), qps=50, burst=50, threads=2)
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
