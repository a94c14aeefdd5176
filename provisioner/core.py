"""Pure decisions: which claims to provision, what PersistentVolume to write, what to do on release.

The reconciler calls these with plain values read from watch events; nothing here performs I/O,
so every rule of SPEC §3, §5 and §6 is a table-driven unit test. Kubernetes objects enter as
JSON dicts and are narrowed at once into the frozen ``Claim``, ``Volume`` and ``StorageClass``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from provisioner.config import ANNOTATION_PREFIX, OnDelete
from provisioner.paths import RelativeDir, UnsafePathError, parse_relative

ANN_STORAGE_CLASS_BETA = "volume.beta.kubernetes.io/storage-class"
ANN_STORAGE_PROVISIONER = "volume.kubernetes.io/storage-provisioner"
ANN_STORAGE_PROVISIONER_BETA = "volume.beta.kubernetes.io/storage-provisioner"
ANN_SELECTED_NODE = "volume.kubernetes.io/selected-node"
ANN_PROVISIONED_BY = "pv.kubernetes.io/provisioned-by"
FINALIZER = "external-provisioner.volume.kubernetes.io/finalizer"
ANN_DIRECTORY = f"{ANNOTATION_PREFIX}/directory"
ANN_EXPORT_PATH = f"{ANNOTATION_PREFIX}/export-path"
ANN_ON_DELETE = f"{ANNOTATION_PREFIX}/on-delete"
# Adoption of the previous provisioner's PVs (adoption.py): when and from what it was adopted,
# why the on-delete policy was chosen at release, or why it could not be adopted.
ANN_ADOPTED = f"{ANNOTATION_PREFIX}/adopted"
ANN_ON_DELETE_BASIS = f"{ANNOTATION_PREFIX}/on-delete-basis"
ANN_NOT_ADOPTED = f"{ANNOTATION_PREFIX}/not-adopted"

Body = Mapping[str, Any]


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _strings(value: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in _mapping(value).items()}


@dataclass(frozen=True)
class StorageClass:
    name: str
    provisioner: str
    parameters: Mapping[str, str]
    reclaim_policy: str = "Delete"
    mount_options: tuple[str, ...] = ()
    binding_mode: str = "Immediate"


@dataclass(frozen=True)
class Claim:
    """The fields of a PersistentVolumeClaim that provisioning reads; nothing else is kept."""

    uid: str
    namespace: str
    name: str
    class_name: str | None
    volume_name: str = ""
    deleting: bool = False
    has_selector: bool = False
    volume_mode: str = "Filesystem"
    data_source: str | None = None
    access_modes: tuple[str, ...] = ()
    storage_request: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    resource_version: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def volume_name_for(self) -> str:
        """The PV name is fixed by the claim, so repeating work is harmless."""
        return f"pvc-{self.uid}"


@dataclass(frozen=True)
class Volume:
    """The fields of a PersistentVolume that release and collision checks read."""

    name: str
    provisioned_by: str | None
    phase: str
    reclaim_policy: str
    deleting: bool
    finalizers: tuple[str, ...]
    claim_uid: str | None
    claim_namespace: str | None
    claim_name: str | None
    storage_class: str
    directory: str | None
    export_path: str | None
    on_delete: str | None
    resource_version: str = ""
    uid: str = ""
    nfs_path: str | None = None  # spec.nfs.path: set on any NFS PV, ours or not
    nfs_server: str | None = None  # spec.nfs.server: likewise
    adopted: str | None = None  # ANN_ADOPTED: made by the previous provisioner, adopted by us
    on_delete_basis: str | None = None  # ANN_ON_DELETE_BASIS: why an adopted PV got its policy
    not_adopted: str | None = None  # ANN_NOT_ADOPTED: why it could not be adopted


def storage_class_from(body: Body) -> StorageClass:
    meta = _mapping(body.get("metadata"))
    return StorageClass(
        name=str(meta.get("name", "")),
        provisioner=str(body.get("provisioner", "")),
        parameters=_strings(body.get("parameters")),
        reclaim_policy=str(body.get("reclaimPolicy") or "Delete"),
        mount_options=tuple(str(o) for o in body.get("mountOptions") or ()),
        binding_mode=str(body.get("volumeBindingMode") or "Immediate"),
    )


def claim_from(body: Body) -> Claim:
    meta = _mapping(body.get("metadata"))
    spec = _mapping(body.get("spec"))
    annotations = _strings(meta.get("annotations"))
    # The beta annotation wins over spec.storageClassName (util.GetPersistentVolumeClaimClass).
    class_name = annotations.get(ANN_STORAGE_CLASS_BETA)
    if class_name is None and spec.get("storageClassName") is not None:
        class_name = str(spec["storageClassName"])
    source = _mapping(spec.get("dataSourceRef")) or _mapping(spec.get("dataSource"))
    requests = _mapping(_mapping(spec.get("resources")).get("requests"))
    return Claim(
        uid=str(meta.get("uid", "")),
        namespace=str(meta.get("namespace", "")),
        name=str(meta.get("name", "")),
        class_name=class_name,
        volume_name=str(spec.get("volumeName") or ""),
        deleting=meta.get("deletionTimestamp") is not None,
        has_selector=bool(spec.get("selector")),
        volume_mode=str(spec.get("volumeMode") or "Filesystem"),
        data_source=(f"{source.get('kind', '?')}/{source.get('name', '?')}" if source else None),
        access_modes=tuple(str(m) for m in spec.get("accessModes") or ()),
        storage_request=str(requests["storage"]) if "storage" in requests else None,
        labels=_strings(meta.get("labels")),
        annotations=annotations,
        resource_version=str(meta.get("resourceVersion", "")),
    )


def volume_from(body: Body) -> Volume:
    meta = _mapping(body.get("metadata"))
    spec = _mapping(body.get("spec"))
    annotations = _strings(meta.get("annotations"))
    claim_ref = _mapping(spec.get("claimRef"))
    return Volume(
        name=str(meta.get("name", "")),
        provisioned_by=annotations.get(ANN_PROVISIONED_BY),
        phase=str(_mapping(body.get("status")).get("phase") or ""),
        reclaim_policy=str(spec.get("persistentVolumeReclaimPolicy") or "Retain"),
        deleting=meta.get("deletionTimestamp") is not None,
        finalizers=tuple(str(f) for f in meta.get("finalizers") or ()),
        claim_uid=str(claim_ref["uid"]) if claim_ref.get("uid") else None,
        claim_namespace=str(claim_ref["namespace"]) if claim_ref.get("namespace") else None,
        claim_name=str(claim_ref["name"]) if claim_ref.get("name") else None,
        storage_class=str(spec.get("storageClassName") or ""),
        directory=annotations.get(ANN_DIRECTORY),
        export_path=annotations.get(ANN_EXPORT_PATH),
        on_delete=annotations.get(ANN_ON_DELETE),
        resource_version=str(meta.get("resourceVersion", "")),
        uid=str(meta.get("uid", "")),
        nfs_path=str(nfs["path"]) if (nfs := _mapping(spec.get("nfs"))).get("path") else None,
        nfs_server=str(nfs["server"]) if nfs.get("server") else None,
        adopted=annotations.get(ANN_ADOPTED),
        on_delete_basis=annotations.get(ANN_ON_DELETE_BASIS),
        not_adopted=annotations.get(ANN_NOT_ADOPTED),
    )


# --- should this claim be provisioned? ---------------------------------------------------------


class Verdict(enum.Enum):
    PROVISION = "provision"
    IGNORE = "ignore"  # not ours, or nothing to do
    WAIT = "wait"  # ours, but not yet (missing class, no selected node)
    REFUSE = "refuse"  # ours, and it can never be provisioned as it is: one Event, no retry


@dataclass(frozen=True)
class ClaimDecision:
    verdict: Verdict
    reason: str


def decide_claim(
    claim: Claim,
    storage_class: StorageClass | None,
    provisioner_name: str,
    volume_exists: bool,
) -> ClaimDecision:
    """SPEC §3: is this claim ours, and can it be provisioned now?"""
    if claim.volume_name:
        return ClaimDecision(Verdict.IGNORE, f"already bound to volume {claim.volume_name}")
    if claim.deleting:
        return ClaimDecision(Verdict.IGNORE, "the claim is being deleted")
    if not claim.class_name:
        return ClaimDecision(Verdict.IGNORE, "the claim names no StorageClass")
    for annotation in (ANN_STORAGE_PROVISIONER, ANN_STORAGE_PROVISIONER_BETA):
        named = claim.annotations.get(annotation)
        if named is not None and named != provisioner_name:
            return ClaimDecision(Verdict.IGNORE, f'{annotation} names "{named}"')
    if storage_class is None:
        return ClaimDecision(
            Verdict.WAIT, f'StorageClass "{claim.class_name}" does not exist (yet); waiting for it'
        )
    if storage_class.provisioner != provisioner_name:
        return ClaimDecision(
            Verdict.IGNORE, f'StorageClass "{storage_class.name}" is {storage_class.provisioner}\'s'
        )
    if volume_exists:
        return ClaimDecision(Verdict.IGNORE, f"volume {claim.volume_name_for} already exists")
    if storage_class.binding_mode == "WaitForFirstConsumer" and not claim.annotations.get(
        ANN_SELECTED_NODE
    ):
        return ClaimDecision(Verdict.WAIT, "WaitForFirstConsumer: no node selected yet")
    refusal = _refusal(claim)
    if refusal is not None:
        return ClaimDecision(Verdict.REFUSE, refusal)
    return ClaimDecision(Verdict.PROVISION, "ours and unbound")


def _refusal(claim: Claim) -> str | None:
    if claim.has_selector:
        return (
            f'claim "{claim.key}" sets spec.selector, which dynamic provisioning does not support; '
            "remove the selector or bind the claim to an existing volume"
        )
    if claim.volume_mode != "Filesystem":
        return (
            f'claim "{claim.key}" asks for volumeMode "{claim.volume_mode}"; NFS volumes are '
            "Filesystem only: remove volumeMode or set it to Filesystem"
        )
    if claim.data_source is not None:
        return (
            f'claim "{claim.key}" sets a data source ({claim.data_source}); cloning and restoring '
            "are not supported yet: remove dataSource/dataSourceRef"
        )
    return None


# --- the PersistentVolume to write -------------------------------------------------------------


@dataclass(frozen=True)
class Export:
    server: str
    path: str

    def path_of(self, directory: RelativeDir) -> str:
        return f"{self.path.rstrip('/')}/{directory}"


def build_volume(
    claim: Claim,
    storage_class: StorageClass,
    directory: RelativeDir,
    on_delete: OnDelete,
    export: Export,
    provisioner_name: str,
) -> dict[str, Any]:
    """SPEC §5: the PV body, including what delete will need, recorded on the PV itself."""
    finalizers = [FINALIZER] if storage_class.reclaim_policy == "Delete" else []
    spec: dict[str, Any] = {
        "capacity": {"storage": claim.storage_request or "0"},
        "accessModes": list(claim.access_modes) or ["ReadWriteOnce"],
        "persistentVolumeReclaimPolicy": storage_class.reclaim_policy,
        "storageClassName": storage_class.name,
        "volumeMode": "Filesystem",
        "nfs": {"server": export.server, "path": export.path_of(directory)},
        "claimRef": {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "namespace": claim.namespace,
            "name": claim.name,
            "uid": claim.uid,
        },
    }
    if storage_class.mount_options:
        spec["mountOptions"] = list(storage_class.mount_options)
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {
            "name": claim.volume_name_for,
            "annotations": {
                ANN_PROVISIONED_BY: provisioner_name,
                ANN_DIRECTORY: str(directory),
                ANN_EXPORT_PATH: export.path,
                ANN_ON_DELETE: on_delete.value,
            },
            "finalizers": finalizers,
        },
        "spec": spec,
    }


def volume_is_for_claim(volume: Volume, claim: Claim, provisioner_name: str) -> bool:
    """An AlreadyExists on create is success only when the existing PV is ours for this claim."""
    return volume.provisioned_by == provisioner_name and volume.claim_uid == claim.uid


# --- release ---------------------------------------------------------------------------------


class VolumeAction(enum.Enum):
    IGNORE = "ignore"
    CLEAN = "clean"  # apply the recorded on-delete policy, delete the PV, drop our finalizer
    RELEASE_FINALIZER = "release-finalizer"  # Retain: touch nothing, let an admin delete the PV


@dataclass(frozen=True)
class VolumeDecision:
    action: VolumeAction
    reason: str


class ReleaseRefused(Exception):
    """What the PV recorded cannot be acted on safely; retried, reported as VolumeFailedDelete."""


@dataclass(frozen=True)
class ReleaseOutcome:
    reason: str  # the Event reason: VolumeDeleted, VolumeArchived or VolumeRetained
    message: str
    event_type: str = "Normal"  # Warning when an admin should look (adoption.LegacyPolicy)


def decide_volume(volume: Volume, provisioner_name: str) -> VolumeDecision:
    """SPEC §6: clean a PV of ours when Released under Delete, or deleted with our finalizer on.

    The reclaim policy is read from the PV as it is now: an admin who switched it to Retain wins
    over the on-delete policy recorded at provision time.
    """
    if volume.provisioned_by != provisioner_name:
        return VolumeDecision(VolumeAction.IGNORE, "not provisioned by us")
    has_finalizer = FINALIZER in volume.finalizers
    if volume.reclaim_policy != "Delete":
        if has_finalizer and (volume.deleting or volume.phase == "Released"):
            return VolumeDecision(
                VolumeAction.RELEASE_FINALIZER,
                f'Reclaim policy is {volume.reclaim_policy}: directory "{volume.directory}" '
                "left untouched; delete the PersistentVolume by hand when done",
            )
        return VolumeDecision(VolumeAction.IGNORE, f"reclaim policy {volume.reclaim_policy}")
    if volume.deleting and not has_finalizer:
        return VolumeDecision(VolumeAction.IGNORE, "being deleted and already cleaned")
    # Only a Released volume is cleaned, also when the PV object was deleted first: while its
    # claim is still bound a pod may be writing to the directory. Our finalizer keeps the PV
    # until the claim lets go, then the directory gets the recorded policy (KEP-2644).
    if volume.phase == "Released":
        return VolumeDecision(VolumeAction.CLEAN, "released under reclaim policy Delete")
    return VolumeDecision(VolumeAction.IGNORE, f"phase {volume.phase or 'unknown'}")


def recorded_directory(volume: Volume, export_path: str) -> RelativeDir:
    """The directory the PV recorded at provision time, re-validated; never re-derived."""
    if volume.directory is None or volume.export_path is None:
        raise ReleaseRefused(
            f"PersistentVolume {volume.name} does not record its directory (annotations "
            f"{ANN_DIRECTORY} and {ANN_EXPORT_PATH}); refusing to guess. Handle the directory by "
            f"hand and remove the finalizer {FINALIZER}"
        )
    if volume.export_path.rstrip("/") != export_path.rstrip("/"):
        raise ReleaseRefused(
            f'PersistentVolume {volume.name} lives on export path "{volume.export_path}" but this '
            f'provisioner mounts NFS_PATH "{export_path}"; run a provisioner for that export'
        )
    try:
        return parse_relative(volume.directory)
    except UnsafePathError as error:
        raise ReleaseRefused(
            f"PersistentVolume {volume.name}: {error}; nothing was removed or renamed"
        ) from None


def recorded_on_delete(volume: Volume) -> OnDelete:
    try:
        return OnDelete((volume.on_delete or "").lower())
    except ValueError:
        raise ReleaseRefused(
            f'PersistentVolume {volume.name} records on-delete policy "{volume.on_delete}" in '
            f"{ANN_ON_DELETE}; expected delete, retain or archive"
        ) from None


# --- one owner per directory (SPEC §4) ---------------------------------------------------------


def resource_version(body: Body) -> str:
    """``metadata.resourceVersion`` of an object or of a list; "" when absent."""
    return str(_mapping(body.get("metadata")).get("resourceVersion") or "")


def _relative_on(path: str, export_path: str) -> str | None:
    """``path`` relative to ``export_path`` if it lies strictly under it, else None.

    Only trailing "/" are stripped; nothing else is normalised, so a path whose relative part is
    not a safe, normalised directory (``..``, ``.``, empty components) gives None as well.
    """
    root = export_path.rstrip("/") + "/"
    path = path.rstrip("/")
    if not path.startswith(root):
        return None
    try:
        return str(parse_relative(path[len(root) :]))
    except UnsafePathError:
        return None


def volume_directories(volume: Volume, export: Export) -> frozenset[str]:
    """The directories of our export that this PV owns, relative to the export.

    The one our annotations record and the one its ``spec.nfs`` points at: the same for the PVs
    we write, while a PV made by hand or by nfs-subdir has only ``spec.nfs``. A PV on another
    server owns nothing here (server names compared case-insensitively): two NFS servers may
    well export the same path with the same pattern.
    """
    if volume.nfs_server is not None and volume.nfs_server.lower() != export.server.lower():
        return frozenset()
    found: set[str | None] = set()
    root = export.path.rstrip("/")
    recorded = volume.export_path
    if volume.directory is not None and recorded is not None and recorded.rstrip("/") == root:
        found.add(_relative_on(f"{root}/{volume.directory}", export.path))
    if volume.nfs_path is not None and volume.nfs_server is not None:
        found.add(_relative_on(volume.nfs_path, export.path))
    return frozenset(directory for directory in found if directory is not None)


def dirs_overlap(first: str, second: str) -> bool:
    """Whether one directory is the other or lies inside it, component by component:
    ``ns/app`` overlaps ``ns/app/data`` and ``ns``, not ``ns/application``."""
    a, b = first.split("/"), second.split("/")
    depth = min(len(a), len(b))
    return a[:depth] == b[:depth]


def claim_gone(cached: Claim, current: Claim | None) -> str | None:
    """Why a claim taken from the cache must not be provisioned after all, judged by a fresh read
    (``current``, None when the API says it does not exist); None when it may."""
    if current is None:
        return "it no longer exists"
    if current.uid != cached.uid:
        return f"it no longer exists (the claim of that name now has uid {current.uid})"
    if current.deleting:
        return "it is being deleted"
    return None
