"""What the provisioner asks of the API server, as RBAC rules: needed, and merely wanted.

The contract with ``rbac/``: one line per kind of API call the provisioner makes. Most are
*needed* (without them it cannot provision or release, and the start-up check stops it). Two
are *wanted*: nfs-subdir's own RBAC does not grant them, and an admin who only swaps the image
must still get a working provisioner, so each has a way of working without, which ``Grant``
describes, and ``nfs-provisioner check`` reports as degraded with the rule that turns it on:

- ``patch`` on PersistentVolumes: our finalizer, and the annotations that record an adopted
  volume of the old provisioner;
- ``get`` on the namespace ``kube-system``: its uid names the cluster in the export's records
  (identity.py says what is used instead).

Pure: preflight.py asks the API server (SelfSubjectAccessReview) and app.py acts on the answer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from provisioner.config import LockKind, Settings


@dataclass(frozen=True)
class Permission:
    group: str
    resource: str
    verb: str
    namespaced: bool = False  # True: only in the provisioner's own namespace (a Role)
    name: str | None = None  # only this object (resourceNames)


@dataclass(frozen=True)
class Grant:
    """A permission the provisioner can do without, and what it does instead."""

    permission: Permission
    feature: str  # what it turns on
    without: str  # what changes when it is missing


PATCH_VOLUMES = Grant(
    Permission("", "persistentvolumes", "patch"),
    "the PersistentVolume finalizer and the adoption records",
    "new volumes get no finalizer external-provisioner.volume.kubernetes.io/finalizer, so the "
    "directory of a PersistentVolume deleted before its claim is left as it is (data kept, space "
    "not freed, as with nfs-subdir); the old provisioner's volumes are adopted in memory only "
    "(again at every start), each release reading its class as the old provisioner did",
)
READ_CLUSTER_UID = Grant(
    Permission("", "namespaces", "get", name="kube-system"),
    "the cluster's identity from kube-system's uid",
    "the records on the export name this cluster by its CA certificate's fingerprint, so two "
    "clusters built from one CA and sharing this export would not be told apart",
)
WANTED = (PATCH_VOLUMES, READ_CLUSTER_UID)


def needed_permissions(settings: Settings) -> list[Permission]:
    """The calls the provisioner cannot work without (watches included)."""
    needed = [
        *(Permission("", "persistentvolumeclaims", v) for v in ("get", "list", "watch")),
        *(
            Permission("", "persistentvolumes", v)
            for v in ("get", "list", "watch", "create", "delete")
        ),
        *(Permission("storage.k8s.io", "storageclasses", v) for v in ("list", "watch")),
        # Events are created, and repeats patched (count, lastTimestamp) as client-go does.
        *(Permission("", "events", v) for v in ("create", "patch")),
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


def all_permissions(settings: Settings) -> list[Permission]:
    """Everything ``rbac/`` grants: the needed calls and the wanted ones."""
    return [*needed_permissions(settings), *(grant.permission for grant in WANTED)]


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


def degraded_line(grant: Grant) -> str:
    """How ``check`` and the start-up log name a missing wanted permission."""
    return (
        f"without {grant.feature}: {grant.without}. To turn it on, add to the provisioner's "
        "role:\n" + render_rules([grant.permission])
    )
