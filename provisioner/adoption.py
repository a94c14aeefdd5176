"""Adopting the previous provisioner's PersistentVolumes: pure decisions, no I/O.

nfs-subdir-external-provisioner and nfs-client-provisioner wrote PVs that name our
PROVISIONER_NAME in ``pv.kubernetes.io/provisioned-by`` but carry none of our
``nfs.provisioner.dev/`` records. The reconciler asks ``standing`` whether a PV is one, ``locate``
where its directory is (from ``spec.nfs``, by the rules of every other path), and at release
``legacy_policy`` what the old provisioner would have done with it given the StorageClass as it
is then. ``migration.py`` (``check --migration``) asks the same questions and changes nothing.
No kopf, kubernetes or prometheus here.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from provisioner.config import OnDelete
from provisioner.core import (
    ANN_ADOPTED,
    ANN_DIRECTORY,
    ANN_EXPORT_PATH,
    ANN_NOT_ADOPTED,
    ANN_ON_DELETE,
    ANN_ON_DELETE_BASIS,
    FINALIZER,
    Export,
    StorageClass,
    Volume,
    volume_directories,
)
from provisioner.paths import RelativeDir, UnsafePathError, archive_name, parse_relative


def _quote(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)


class Standing(enum.Enum):
    NOT_OURS = "not-ours"  # another provisioner's PV, or none's
    OURS = "ours"  # carries our records: provisioned (or adopted) by us
    ADOPT = "adopt"  # the previous provisioner's: adopt it now
    NOT_ADOPTED = "not-adopted"  # the previous provisioner's, refused once: left alone


def standing(volume: Volume, provisioner_name: str) -> Standing:
    """Which kind of PV this is for the reconciler. Any record of ours (directory, export path
    or on-delete policy) makes it ours: a partial record is an edited PV, refused at release, not
    re-adopted. ``not-adopted`` holds until an admin removes it (or records the PV by hand)."""
    if volume.provisioned_by != provisioner_name:
        return Standing.NOT_OURS
    if volume.directory is not None or volume.export_path is not None:
        return Standing.OURS
    if volume.on_delete is not None:
        return Standing.OURS
    if volume.not_adopted is not None:
        return Standing.NOT_ADOPTED
    return Standing.ADOPT


# --- where is its directory? -------------------------------------------------------------------


@dataclass(frozen=True)
class Located:
    directory: RelativeDir
    nfs_path: str  # spec.nfs.path it came from


@dataclass(frozen=True)
class Refusal:
    reason: str  # short: the value of nfs.provisioner.dev/not-adopted


def locate(volume: Volume, export: Export) -> Located | Refusal:
    """The PV's directory on our export from ``spec.nfs`` (``core.volume_directories``), or why
    it cannot be adopted. Whether its path holds a symlink is for storage to find out."""
    if volume.nfs_path is None or volume.nfs_server is None:
        return Refusal("it is not an NFS volume (no spec.nfs.server and spec.nfs.path)")
    if volume.nfs_server.lower() != export.server.lower():
        return Refusal(
            f"spec.nfs.server {_quote(volume.nfs_server)} is not this provisioner's "
            f"NFS_SERVER {_quote(export.server)}"
        )
    found = sorted(volume_directories(volume, export))
    if len(found) == 1:
        return Located(parse_relative(found[0]), volume.nfs_path)
    if found:  # unreachable for a PV without records; refuse rather than pick one
        return Refusal(f"it points at {len(found)} directories: {', '.join(found)}")
    return Refusal(_outside_reason(volume.nfs_path, export.path))


def _outside_reason(nfs_path: str, export_path: str) -> str:
    root = export_path.rstrip("/")
    path = nfs_path.rstrip("/")
    shown = f"spec.nfs.path {_quote(nfs_path)}"
    if path == root:
        return (
            f"{shown} is the export root NFS_PATH itself (nfs-subdir v4.0.2 wrote this when a "
            "pathPattern rendered empty); releasing it would remove or rename the whole share"
        )
    if not path.startswith(f"{root}/"):
        return f"{shown} is not under NFS_PATH {_quote(export_path)}"
    try:
        parse_relative(path[len(root) + 1 :])
    except UnsafePathError as error:
        return f"{shown} is unsafe: {error.rule}"
    return f"{shown} is not a plain directory under NFS_PATH {_quote(export_path)}"


def redirected_reason(where: str, what: str) -> str:
    """The refusal when storage found a symlink (or a non-directory, or a mount) on the path."""
    return (
        f"{_quote(where)} on its path is {what}; the provisioner never follows one, so the "
        "directory it names may not be the volume's"
    )


# --- what adoption writes on the PV ------------------------------------------------------------


def adds_finalizer(volume: Volume) -> bool:
    """Our finalizer on an adopted PV with reclaim policy Delete, as on the PVs we write: a PV
    deleted before its claim then still gets its directory handled. Not on a PV being deleted:
    the API refuses new finalizers there."""
    return (
        volume.reclaim_policy == "Delete"
        and not volume.deleting
        and FINALIZER not in volume.finalizers
    )


def adoption_patch(volume: Volume, located: Located, export: Export, now: str) -> dict[str, Any]:
    """JSON merge patch recording the adoption; resourceVersion makes it apply to what was read."""
    metadata: dict[str, Any] = {
        "resourceVersion": volume.resource_version,
        "annotations": {
            ANN_DIRECTORY: str(located.directory),
            ANN_EXPORT_PATH: export.path,
            ANN_ADOPTED: f"{now}; directory from spec.nfs.path {located.nfs_path}",
        },
    }
    if adds_finalizer(volume):
        metadata["finalizers"] = [*volume.finalizers, FINALIZER]
    return {"metadata": metadata}


def refusal_patch(volume: Volume, refusal: Refusal) -> dict[str, Any]:
    return {
        "metadata": {
            "resourceVersion": volume.resource_version,
            "annotations": {ANN_NOT_ADOPTED: refusal.reason},
        }
    }


def adopted_message(volume: Volume, located: Located, exists: bool) -> str:
    state = (
        "it exists"
        if exists
        else "it does not exist on the export now (release will only delete the PV)"
    )
    finalizer = f"; finalizer {FINALIZER} added" if adds_finalizer(volume) else ""
    if volume.reclaim_policy == "Delete":
        release = (
            f"On release the StorageClass {_quote(volume.storage_class)} decides, as nfs-subdir "
            "read it then"
        )
    else:
        release = f"Reclaim policy {volume.reclaim_policy}: its release touches nothing"
    return (
        f"Adopted from the previous provisioner: directory {_quote(str(located.directory))} "
        f"(from spec.nfs.path {_quote(located.nfs_path)}), {state}{finalizer}. {release}"
    )


def refusal_message(volume: Volume, refusal: Refusal) -> str:
    return (
        f"PersistentVolume {volume.name} (spec.nfs.path {_quote(volume.nfs_path or '')}) was "
        f"made by the previous provisioner and cannot be adopted: {refusal.reason}. It is left "
        "alone: nothing was changed, and its directory will not be deleted or archived on "
        "release. Handle the directory by hand and delete the PersistentVolume, or fix the cause "
        f"and remove the annotation {ANN_NOT_ADOPTED} to try again"
    )


# --- the on-delete policy at release, as nfs-subdir read it -----------------------------------

_GO_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_GO_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})


def go_parse_bool(raw: str) -> bool:
    """Go's strconv.ParseBool exactly (nfs-subdir and nfs-client read archiveOnDelete with it)."""
    if raw in _GO_TRUE:
        return True
    if raw in _GO_FALSE:
        return False
    raise ValueError(raw)


@dataclass(frozen=True)
class LegacyPolicy:
    on_delete: OnDelete
    basis: str
    """Why, for the PV annotation and the release Event."""
    caution: bool = False
    """The outcome differs from a plain reading of the class, or needs the admin: Warning."""


_CAUTION = "Warning: "


def legacy_policy(class_name: str, storage_class: StorageClass | None) -> LegacyPolicy:
    """What nfs-subdir (HEAD and v4.0.2) or nfs-client would do on release with this class, with
    our decisions where that would lose data or fail forever (README "Migrating from ...").

    nfs-subdir: ``onDelete`` exactly "delete" or "retain" wins (case-sensitive key and value);
    otherwise ``archiveOnDelete`` parsed by strconv.ParseBool, false deletes; absent or true
    archives. nfs-client reads only ``archiveOnDelete``, the same way.
    """
    if storage_class is None:
        named = (
            f"StorageClass {_quote(class_name)} no longer exists"
            if class_name
            else "the PersistentVolume names no StorageClass"
        )
        return LegacyPolicy(
            OnDelete.RETAIN,
            f"{_CAUTION}{named}, so its onDelete/archiveOnDelete could not be read (nfs-subdir "
            "failed such a release forever). The directory is kept and the PersistentVolume "
            "deleted: remove or archive the directory on the export by hand",
            caution=True,
        )
    parameters = storage_class.parameters
    where = f"StorageClass {_quote(storage_class.name)}"
    on_delete = parameters.get("onDelete", "")
    if on_delete == "delete":
        return LegacyPolicy(OnDelete.DELETE, f'{where}: onDelete "delete"')
    if on_delete == "retain":
        return LegacyPolicy(OnDelete.RETAIN, f'{where}: onDelete "retain"')
    fallback, basis, unparsable = _archive_on_delete(parameters)
    wishes = _on_delete_wishes(parameters)
    keep = _keep_wish(wishes)
    if fallback is OnDelete.DELETE and keep is not None:
        key, value = next((k, v) for k, v in wishes if _wish(v) is not OnDelete.DELETE)
        return LegacyPolicy(
            keep,
            f"{_CAUTION}{where}: {basis}, but {key} {_quote(value)} asks to keep the data. "
            'nfs-subdir ignored that value (it accepts exactly "delete" or "retain") and '
            f"would have deleted the directory; it is {_past(keep)} instead",
            caution=True,
        )
    if wishes:
        ignored = ", ".join(f"{key} {_quote(value)}" for key, value in wishes)
        # A Warning when the class asked for something else than what happens.
        caution = unparsable or {_wish(value) for _, value in wishes} != {fallback}
        return LegacyPolicy(
            fallback,
            f"{_CAUTION if caution else ''}{where}: {basis}; {ignored} ignored, as nfs-subdir "
            'did (it accepts only the key onDelete with exactly "delete" or "retain")',
            caution=caution,
        )
    return LegacyPolicy(fallback, f"{_CAUTION if unparsable else ''}{where}: {basis}", unparsable)


def _archive_on_delete(parameters: Mapping[str, str]) -> tuple[OnDelete, str, bool]:
    """(policy, basis, unparsable) from archiveOnDelete alone; the key is case-sensitive."""
    if "archiveOnDelete" not in parameters:
        others = [key for key in parameters if key.lower() == "archiveondelete"]
        ignored = f" ({', '.join(others)} ignored: keys are case-sensitive)" if others else ""
        return OnDelete.ARCHIVE, f"archiveOnDelete not set, so archive{ignored}", False
    raw = parameters["archiveOnDelete"]
    try:
        archive = go_parse_bool(raw)
    except ValueError:
        return (
            OnDelete.ARCHIVE,
            f"archiveOnDelete {_quote(raw)} is not a boolean nfs-subdir could parse (it failed "
            "such a release forever); archived instead, which keeps the data",
            True,
        )
    return (
        (OnDelete.ARCHIVE if archive else OnDelete.DELETE),
        f"archiveOnDelete {_quote(raw)}",
        False,
    )


def _on_delete_wishes(parameters: Mapping[str, str]) -> list[tuple[str, str]]:
    """onDelete values nfs-subdir ignored: any spelling of the key, any value but the two exact
    ones (which return before this is asked), empty values aside (Go reads absent as "")."""
    return sorted(
        (key, value)
        for key, value in parameters.items()
        if key.lower() == "ondelete" and value != ""
    )


def _wish(value: str) -> OnDelete | None:
    try:
        return OnDelete(value.strip().lower())
    except ValueError:
        return None


def _keep_wish(wishes: Iterable[tuple[str, str]]) -> OnDelete | None:
    """What an ignored onDelete asks to keep: retain wins over archive; any value that is not a
    spelling of delete counts as archive (it did not ask for deletion)."""
    kept = {_wish(value) or OnDelete.ARCHIVE for _, value in wishes} - {OnDelete.DELETE}
    if OnDelete.RETAIN in kept:
        return OnDelete.RETAIN
    return OnDelete.ARCHIVE if kept else None


def _past(policy: OnDelete) -> str:
    return {OnDelete.RETAIN: "kept", OnDelete.ARCHIVE: "archived", OnDelete.DELETE: "deleted"}[
        policy
    ]


def is_caution(basis: str) -> bool:
    """Whether a recorded basis (ANN_ON_DELETE_BASIS) called for a Warning Event."""
    return basis.startswith(_CAUTION)


def release_note(basis: str | None) -> tuple[str, str]:
    """The release Event's tail for an adopted PV, and the Event's type."""
    recorded = basis or "the on-delete policy recorded on the PersistentVolume"
    text = recorded.removeprefix(_CAUTION)
    return f". Adopted volume: {text}", "Warning" if is_caution(recorded) else "Normal"


def policy_patch(volume: Volume, policy: LegacyPolicy) -> dict[str, Any]:
    """Record the policy resolved at the first release attempt, so retries apply the same one."""
    return {
        "metadata": {
            "resourceVersion": volume.resource_version,
            "annotations": {
                ANN_ON_DELETE: policy.on_delete.value,
                ANN_ON_DELETE_BASIS: policy.basis,
            },
        }
    }


def overlap_refusal(volume: Volume, directory: RelativeDir, others: Iterable[str]) -> str | None:
    """nfs-subdir let two PVs nest (``ns`` and ``ns/app``); deleting or archiving the outer
    directory would take the other volume's data with it. Wait until the others are released."""
    names = sorted(set(others) - {volume.name})
    if not names:
        return None
    return (
        f"PersistentVolume {volume.name} (adopted) has directory {_quote(str(directory))}, which "
        f"contains or lies inside the directory of PersistentVolume {', '.join(names)}; deleting "
        "or archiving it now would take that volume's data too (nfs-subdir would have). Retried "
        "until the other volume is released; or set this PV's reclaim policy to Retain and "
        "handle the directory by hand"
    )


# --- check --migration ---------------------------------------------------------------------------


def release_preview(volume: Volume, directory: RelativeDir, policy: LegacyPolicy | None) -> str:
    """What releasing the PV would do now; ``policy`` None when the reclaim policy is not Delete."""
    if policy is None or volume.reclaim_policy != "Delete":
        return f"reclaim policy {volume.reclaim_policy}: nothing is touched"
    if policy.on_delete is OnDelete.DELETE:
        action = "directory removed"
    elif policy.on_delete is OnDelete.RETAIN:
        action = "directory kept, PV deleted"
    else:
        target = archive_name(directory, lambda _candidate: False)
        old = f"archived-{directory.leaf}"
        flat = (
            f"; nfs-subdir renamed it to {_quote(old)} at the export root"
            if len(directory.parts) > 1
            else ""
        )
        action = f"renamed to {_quote(str(target))} (or -2, -3, ... if taken){flat}"
    return f"{action} ({policy.basis})"


@dataclass(frozen=True)
class Row:
    volume: str
    directory: str
    claim: str
    phase: str
    release: str


def render_report(
    provisioner_name: str,
    export: Export,
    adoptable: Iterable[Row],
    refused: Iterable[tuple[str, str]],
    ours: int,
    adopted: int,
) -> str:
    """The ``check --migration`` listing; ``refused`` pairs a PV name with why."""
    will, cannot = list(adoptable), list(refused)
    lines = [
        f"migration: PROVISIONER_NAME {_quote(provisioner_name)}, export "
        f"{export.server}:{export.path}",
        f"migration: {len(will)} PersistentVolume(s) of the previous provisioner will be adopted:",
    ]
    for row in will:
        lines += [
            f"  {row.volume}: directory {_quote(row.directory)}, claim {row.claim}, {row.phase}",
            f"    on release: {row.release}",
        ]
    lines.append(
        f"migration: {len(cannot)} cannot be adopted (each gets one AdoptionRefused Warning "
        f"Event and the annotation {ANN_NOT_ADOPTED}, and is left alone):"
    )
    lines += [f"  {name}: {why}" for name, why in cannot]
    lines += [
        f"migration: {ours} PersistentVolume(s) already carry our records ({adopted} of them "
        "adopted earlier); PersistentVolumes of other provisioners are not listed",
        "migration: nothing was changed",
    ]
    return "\n".join(lines)
