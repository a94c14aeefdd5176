"""Pure decisions: which claims to provision, what PersistentVolume to write, what to do on release.

The reconciler calls these with plain values read from watch events; nothing here performs I/O,
so every rule of SPEC §3, §5 and §6 is a table-driven unit test. Kubernetes objects enter as
JSON dicts and are narrowed at once into the frozen ``Claim``, ``Volume`` and ``StorageClass``.

The cache holds one ``Claim`` and one ``Volume`` per claim and PV of the whole cluster, so the
narrowing keeps only what a decision reads (slotted dataclasses, no ``__dict__``):

- A claim with ``spec.volumeName`` set, or being deleted, can never be provisioned again (both
  are one-way): ``decide_claim`` ignores it before reading anything else, so only its identity
  (uid, namespace, name, class, volume name, deleting, resourceVersion) is kept; its labels,
  annotations, selector, volumeMode, dataSource, access modes and request are not.
- Any other claim keeps all its labels and annotations (a class's ``pathPattern`` may read any
  ``${.PVC.labels.X}`` / ``${.PVC.annotations.X}``) except those under ``kubectl.kubernetes.io/``
  (``DROPPED_ANNOTATION_PREFIXES``): kubectl's bookkeeping, above all
  ``last-applied-configuration``, a copy of the whole manifest and often most of the object's
  size. A pattern naming one of them renders it as missing (empty), like an absent annotation.
- A PV keeps the fields release, adoption and the collision index read; no other annotation,
  label, spec field (CSI attributes, node affinity, capacity) or status field but the phase.
- Repeated strings (namespaces, classes, provisioner names, phases, policies, servers, export
  paths, label and annotation keys and values) and tuples (finalizers, access modes) are shared:
  one copy each, from a bounded table (``_shared``), not ``sys.intern``, whose strings Python 3.12
  never frees. The names a bound claim and its PV both hold are shared by the cache.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from provisioner.config import ANNOTATION_PREFIX, OnDelete
from provisioner.paths import RelativeDir, UnsafePathError, parse_relative, parts_overlap

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

DROPPED_ANNOTATION_PREFIXES = ("kubectl.kubernetes.io/",)
"""Claim annotations never kept: kubectl's bookkeeping (``last-applied-configuration`` copies
the whole manifest). No decision reads them, and a pathPattern naming one renders it empty."""

Body = Mapping[str, Any]

EMPTY: Mapping[str, str] = MappingProxyType({})
"""The labels and annotations of every claim that keeps none: one shared, read-only mapping."""

MAX_SHARED = 16_384
"""Distinct strings (and as many tuples) ``_shared`` keeps one copy of; later ones are not shared.
The bound keeps names that come and go (namespaces, label values) from growing the table."""
_shared_strings: dict[str, str] = {}
_shared_tuples: dict[tuple[str, ...], tuple[str, ...]] = {}


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _strings(value: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in _mapping(value).items()}


def _shared(value: Any) -> str:
    """``str(value)``, as the one copy every object holding an equal string shares (for strings
    many objects repeat; the table is bounded by ``MAX_SHARED``)."""
    text = str(value)
    found = _shared_strings.get(text)
    if found is not None:
        return found
    if len(_shared_strings) < MAX_SHARED:
        _shared_strings[text] = text
    return text


def _shared_or_none(value: Any) -> str | None:
    return None if value is None else _shared(value)


def _shared_strings_of(value: Any, dropped: tuple[str, ...] = ()) -> Mapping[str, str]:
    """A str -> str mapping of shared keys and values, without the keys under ``dropped``."""
    found = {
        _shared(k): _shared(v) for k, v in _mapping(value).items() if not str(k).startswith(dropped)
    }
    return found or EMPTY


def _shared_tuple(values: Iterable[Any] | None) -> tuple[str, ...]:
    """A tuple of shared strings, itself shared: the few distinct finalizer lists and access
    modes of a cluster are each stored once."""
    key = tuple(_shared(v) for v in values or ())
    if not key:
        return ()
    found = _shared_tuples.get(key)
    if found is not None:
        return found
    if len(_shared_tuples) < MAX_SHARED:
        _shared_tuples[key] = key
    return key


@dataclass(frozen=True, slots=True)
class StorageClass:
    name: str
    provisioner: str
    parameters: Mapping[str, str]
    reclaim_policy: str = "Delete"
    mount_options: tuple[str, ...] = ()
    binding_mode: str = "Immediate"


@dataclass(frozen=True, slots=True)
class Claim:
    """The fields of a PersistentVolumeClaim that provisioning reads; nothing else is kept (of a
    bound or deleting claim, only its identity: see the module docstring)."""

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
    labels: Mapping[str, str] = field(default_factory=lambda: EMPTY)
    annotations: Mapping[str, str] = field(default_factory=lambda: EMPTY)
    resource_version: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def volume_name_for(self) -> str:
        """The PV name is fixed by the claim, so repeating work is harmless."""
        return f"pvc-{self.uid}"


@dataclass(frozen=True, slots=True)
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
        name=_shared(meta.get("name", "")),
        provisioner=_shared(body.get("provisioner", "")),
        parameters=_strings(body.get("parameters")),
        reclaim_policy=_shared(body.get("reclaimPolicy") or "Delete"),
        mount_options=tuple(str(o) for o in body.get("mountOptions") or ()),
        binding_mode=_shared(body.get("volumeBindingMode") or "Immediate"),
    )


def claim_from(body: Body) -> Claim:
    meta = _mapping(body.get("metadata"))
    spec = _mapping(body.get("spec"))
    raw_annotations = _mapping(meta.get("annotations"))
    # The beta annotation wins over spec.storageClassName (util.GetPersistentVolumeClaimClass).
    class_name = _shared_or_none(raw_annotations.get(ANN_STORAGE_CLASS_BETA))
    if class_name is None and spec.get("storageClassName") is not None:
        class_name = _shared(spec["storageClassName"])
    volume_name = str(spec.get("volumeName") or "")
    deleting = meta.get("deletionTimestamp") is not None
    uid = str(meta.get("uid", ""))
    namespace = _shared(meta.get("namespace", ""))
    name = str(meta.get("name", ""))
    resource_version = str(meta.get("resourceVersion", ""))
    if volume_name or deleting:
        # Settled for good: decide_claim ignores it before reading any other field.
        return Claim(
            uid=uid,
            namespace=namespace,
            name=name,
            class_name=class_name,
            volume_name=volume_name,
            deleting=deleting,
            resource_version=resource_version,
        )
    source = _mapping(spec.get("dataSourceRef")) or _mapping(spec.get("dataSource"))
    requests = _mapping(_mapping(spec.get("resources")).get("requests"))
    return Claim(
        uid=uid,
        namespace=namespace,
        name=name,
        class_name=class_name,
        volume_name=volume_name,
        deleting=deleting,
        has_selector=bool(spec.get("selector")),
        volume_mode=_shared(spec.get("volumeMode") or "Filesystem"),
        data_source=(f"{source.get('kind', '?')}/{source.get('name', '?')}" if source else None),
        access_modes=_shared_tuple(spec.get("accessModes")),
        storage_request=_shared(requests["storage"]) if "storage" in requests else None,
        labels=_shared_strings_of(meta.get("labels")),
        annotations=_shared_strings_of(raw_annotations, DROPPED_ANNOTATION_PREFIXES),
        resource_version=resource_version,
    )


def _annotation(annotations: Mapping[str, Any], key: str) -> str | None:
    value = annotations.get(key)
    return None if value is None else str(value)


_RECORDED_FIELDS = {
    ANN_DIRECTORY: "directory",
    ANN_EXPORT_PATH: "export_path",
    ANN_ON_DELETE: "on_delete",
    ANN_ADOPTED: "adopted",
    ANN_ON_DELETE_BASIS: "on_delete_basis",
    ANN_NOT_ADOPTED: "not_adopted",
}
"""Our annotations on a PV, and the ``Volume`` field each one is read into."""


def with_annotations(volume: Volume, annotations: Mapping[str, str]) -> Volume:
    """``volume`` as ``volume_from`` would read it with these annotations of ours added: what
    a patch would have recorded, kept in memory when PVs may not be patched."""
    return replace(
        volume,
        **{_RECORDED_FIELDS[key]: value for key, value in annotations.items()},  # type: ignore[arg-type]
    )


def volume_from(body: Body) -> Volume:
    meta = _mapping(body.get("metadata"))
    spec = _mapping(body.get("spec"))
    annotations = _mapping(meta.get("annotations"))
    claim_ref = _mapping(spec.get("claimRef"))
    nfs = _mapping(spec.get("nfs"))
    return Volume(
        name=str(meta.get("name", "")),
        provisioned_by=_shared_or_none(annotations.get(ANN_PROVISIONED_BY)),
        phase=_shared(_mapping(body.get("status")).get("phase") or ""),
        reclaim_policy=_shared(spec.get("persistentVolumeReclaimPolicy") or "Retain"),
        deleting=meta.get("deletionTimestamp") is not None,
        finalizers=_shared_tuple(meta.get("finalizers")),
        claim_uid=str(claim_ref["uid"]) if claim_ref.get("uid") else None,
        claim_namespace=_shared(claim_ref["namespace"]) if claim_ref.get("namespace") else None,
        claim_name=str(claim_ref["name"]) if claim_ref.get("name") else None,
        storage_class=_shared(spec.get("storageClassName") or ""),
        directory=_annotation(annotations, ANN_DIRECTORY),
        export_path=_shared_or_none(annotations.get(ANN_EXPORT_PATH)),
        on_delete=_shared_or_none(annotations.get(ANN_ON_DELETE)),
        resource_version=str(meta.get("resourceVersion", "")),
        uid=str(meta.get("uid", "")),
        nfs_path=str(nfs["path"]) if nfs.get("path") else None,
        nfs_server=_shared(nfs["server"]) if nfs.get("server") else None,
        adopted=_annotation(annotations, ANN_ADOPTED),
        on_delete_basis=_annotation(annotations, ANN_ON_DELETE_BASIS),
        not_adopted=_annotation(annotations, ANN_NOT_ADOPTED),
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
    finalizer: bool = True,
) -> dict[str, Any]:
    """SPEC §5: the PV body, including what delete will need, recorded on the PV itself.
    ``finalizer`` False: none, since it could never be removed (no ``patch`` granted)."""
    finalizers = [FINALIZER] if finalizer and storage_class.reclaim_policy == "Delete" else []
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


def nothing_overlaps(_directory: str) -> frozenset[str]:
    """The overlap query of a world without PVs (the cache's ``volumes_overlapping`` otherwise)."""
    return frozenset()


def dirs_overlap(first: str, second: str) -> bool:
    """``paths.parts_overlap`` for directories written as ``a/b``."""
    return parts_overlap(first.split("/"), second.split("/"))


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
