"""Adoption of the previous provisioner's PVs (SPEC §6, §11): tables of named cases.

Which PVs are adopted, where their directory is, and what the old provisioner's rules (nfs-subdir
HEAD and v4.0.2, nfs-client) say at release, including every quirk we follow or refuse.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from provisioner import adoption, config, core
from provisioner.config import OnDelete
from provisioner.paths import RelativeDir

NAME = "fuseim.pri/ifs"
EXPORT = core.Export("nfs.example.test", "/exports")

# A PV exactly as nfs-subdir v4.0.2 (lib v6) writes it, read back through core.volume_from.
OLD_BODY: dict[str, Any] = {
    "metadata": {
        "name": "pvc-0a1b",
        "resourceVersion": "41",
        "uid": "pv-uid",
        "annotations": {core.ANN_PROVISIONED_BY: NAME},
        "finalizers": ["kubernetes.io/pv-protection"],
    },
    "spec": {
        "persistentVolumeReclaimPolicy": "Delete",
        "accessModes": ["ReadWriteMany"],
        "mountOptions": ["vers=4", "minorversion=0", "noresvport"],
        "capacity": {"storage": "2Gi"},
        "nfs": {"server": "nfs.example.test", "path": "/exports/default-test-claim-pvc-0a1b"},
        "claimRef": {
            "kind": "PersistentVolumeClaim",
            "apiVersion": "v1",
            "namespace": "default",
            "name": "test-claim",
            "uid": "0a1b",
            "resourceVersion": "40",
        },
        "storageClassName": "nfs-client",
        "volumeMode": "Filesystem",
    },
    "status": {"phase": "Bound"},
}
OLD = core.volume_from(OLD_BODY)


def old(**changes: Any) -> core.Volume:
    return dataclasses.replace(OLD, **changes)


def sc(parameters: dict[str, str], name: str = "nfs-client") -> core.StorageClass:
    return core.StorageClass(name=name, provisioner=NAME, parameters=parameters)


# --- which PVs are adopted -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        pytest.param({}, adoption.Standing.ADOPT, id="old-provisioner"),
        pytest.param(
            {"provisioned_by": "example.com/other"}, adoption.Standing.NOT_OURS, id="other-name"
        ),
        pytest.param({"provisioned_by": None}, adoption.Standing.NOT_OURS, id="made-by-hand"),
        pytest.param(
            {"directory": "d", "export_path": "/exports", "on_delete": "archive"},
            adoption.Standing.OURS,
            id="ours",
        ),
        pytest.param({"directory": "d"}, adoption.Standing.OURS, id="partial-record-is-ours"),
        pytest.param({"on_delete": "delete"}, adoption.Standing.OURS, id="only-on-delete"),
        pytest.param(
            {"not_adopted": "why"}, adoption.Standing.NOT_ADOPTED, id="refused-once-stays-refused"
        ),
        pytest.param(
            {"not_adopted": "why", "directory": "d", "export_path": "/exports"},
            adoption.Standing.OURS,
            id="admin-recorded-it-by-hand",
        ),
        pytest.param(
            {"adopted": "2026-01-01T00:00:00Z; x"},
            adoption.Standing.ADOPT,
            id="adopted-marker-without-directory-is-adopted-again",
        ),
    ],
)
def test_standing(changes: dict[str, Any], expected: adoption.Standing) -> None:
    assert adoption.standing(old(**changes), NAME) is expected


def test_volume_from_reads_the_adoption_annotations() -> None:
    body = {
        **OLD_BODY,
        "metadata": {
            **OLD_BODY["metadata"],
            "annotations": {
                core.ANN_PROVISIONED_BY: NAME,
                core.ANN_ADOPTED: "t; from",
                core.ANN_ON_DELETE_BASIS: "basis",
                core.ANN_NOT_ADOPTED: "why",
            },
        },
    }
    volume = core.volume_from(body)
    assert (volume.adopted, volume.on_delete_basis, volume.not_adopted) == (
        "t; from",
        "basis",
        "why",
    )


# --- where its directory is ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("nfs", "directory"),
    [
        pytest.param(
            ("nfs.example.test", "/exports/default-test-claim-pvc-0a1b"),
            "default-test-claim-pvc-0a1b",
            id="default-name",
        ),
        pytest.param(("nfs.example.test", "/exports/ns/app"), "ns/app", id="nested-pathPattern"),
        pytest.param(("NFS.Example.TEST", "/exports/a"), "a", id="server-case-insensitive"),
        pytest.param(("nfs.example.test", "/exports/a/"), "a", id="trailing-slash"),
        pytest.param(
            ("nfs.example.test", "/exports/archived-a"), "archived-a", id="an-archive-name"
        ),
    ],
)
def test_locate(nfs: tuple[str, str], directory: str) -> None:
    volume = old(nfs_server=nfs[0], nfs_path=nfs[1])
    located = adoption.locate(volume, EXPORT)
    assert located == adoption.Located(RelativeDir(tuple(directory.split("/"))), nfs[1])
    assert core.volume_directories(volume, EXPORT) == {directory}


@pytest.mark.parametrize(
    ("nfs", "reason"),
    [
        pytest.param((None, None), "not an NFS volume", id="no-spec-nfs"),
        pytest.param(
            ("other.example", "/exports/a"),
            'spec.nfs.server "other.example" is not this provisioner\'s NFS_SERVER',
            id="other-server",
        ),
        pytest.param(
            ("nfs.example.test", "/elsewhere/a"),
            'spec.nfs.path "/elsewhere/a" is not under NFS_PATH "/exports"',
            id="outside-the-export",
        ),
        pytest.param(
            ("nfs.example.test", "/exportsx/a"), "is not under NFS_PATH", id="prefix-is-not-parent"
        ),
        pytest.param(
            ("nfs.example.test", "/exports"), "is the export root NFS_PATH itself", id="root"
        ),
        pytest.param(
            ("nfs.example.test", "/exports/"), "is the export root NFS_PATH itself", id="root-slash"
        ),
        pytest.param(
            ("nfs.example.test", "/exports/../etc"), 'a path component is ".."', id="dot-dot"
        ),
        pytest.param(
            ("nfs.example.test", "/exports/a//b"), "empty path component", id="double-slash"
        ),
        pytest.param(
            ("nfs.example.test", "/exports/.nfs-provisioner/owners"),
            "the provisioner's own records",
            id="journal",
        ),
    ],
)
def test_locate_refuses(nfs: tuple[str | None, str | None], reason: str) -> None:
    located = adoption.locate(old(nfs_server=nfs[0], nfs_path=nfs[1]), EXPORT)
    assert isinstance(located, adoption.Refusal)
    assert reason in located.reason


def test_redirected_reason_names_the_component() -> None:
    reason = adoption.redirected_reason("ns/app", "a symbolic link")
    assert reason.startswith('"ns/app" on its path is a symbolic link')


# --- what adoption writes ----------------------------------------------------------------------

LOCATED = adoption.Located(RelativeDir(("ns", "app")), "/exports/ns/app")


@pytest.mark.parametrize(
    ("changes", "finalizers"),
    [
        pytest.param({}, ["kubernetes.io/pv-protection", core.FINALIZER], id="delete-adds-ours"),
        pytest.param({"reclaim_policy": "Retain"}, None, id="retain-none"),
        pytest.param({"deleting": True}, None, id="being-deleted-none"),
        pytest.param({"finalizers": (core.FINALIZER,)}, None, id="already-there"),
    ],
)
def test_adoption_patch(changes: dict[str, Any], finalizers: list[str] | None) -> None:
    patch = adoption.adoption_patch(old(**changes), LOCATED, EXPORT, "2026-05-01T10:00:00Z")
    metadata = patch["metadata"]
    assert metadata["resourceVersion"] == "41"
    assert metadata["annotations"] == {
        core.ANN_DIRECTORY: "ns/app",
        core.ANN_EXPORT_PATH: "/exports",
        core.ANN_ADOPTED: "2026-05-01T10:00:00Z; directory from spec.nfs.path /exports/ns/app",
    }
    assert metadata.get("finalizers") == finalizers
    assert core.ANN_ON_DELETE not in metadata["annotations"]  # decided at release


def test_adopted_volume_reads_back_as_ours_and_release_finds_the_directory() -> None:
    patch = adoption.adoption_patch(OLD, LOCATED, EXPORT, "t")
    body = {
        **OLD_BODY,
        "metadata": {
            **OLD_BODY["metadata"],
            "annotations": {
                **OLD_BODY["metadata"]["annotations"],
                **patch["metadata"]["annotations"],
            },
        },
    }
    volume = core.volume_from(body)
    assert adoption.standing(volume, NAME) is adoption.Standing.OURS
    assert core.recorded_directory(volume, "/exports") == RelativeDir(("ns", "app"))


def test_refusal_patch_and_message() -> None:
    refusal = adoption.Refusal("it is odd")
    assert adoption.refusal_patch(OLD, refusal) == {
        "metadata": {"resourceVersion": "41", "annotations": {core.ANN_NOT_ADOPTED: "it is odd"}}
    }
    message = adoption.refusal_message(OLD, refusal)
    assert "pvc-0a1b" in message
    assert '"/exports/default-test-claim-pvc-0a1b"' in message
    assert "cannot be adopted: it is odd" in message
    assert core.ANN_NOT_ADOPTED in message


def test_adopted_message() -> None:
    message = adoption.adopted_message(OLD, LOCATED, exists=False)
    assert '"ns/app"' in message
    assert "does not exist" in message
    assert core.FINALIZER in message
    assert 'the StorageClass "nfs-client" decides' in message


def test_adopted_message_under_retain() -> None:
    message = adoption.adopted_message(old(reclaim_policy="Retain"), LOCATED, exists=True)
    assert "it exists" in message
    assert core.FINALIZER not in message
    assert "Reclaim policy Retain: its release touches nothing" in message


# --- the policy at release -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw", ["1", "t", "T", "TRUE", "true", "True", "0", "f", "F", "FALSE", "false", "False"]
)
def test_go_parse_bool_accepts_go_spellings(raw: str) -> None:
    assert adoption.go_parse_bool(raw) is (raw in {"1", "t", "T", "TRUE", "true", "True"})


@pytest.mark.parametrize("raw", ["yes", "no", "tRUE", " true", "false ", "", "2", "on"])
def test_go_parse_bool_refuses_the_rest(raw: str) -> None:
    with pytest.raises(ValueError) as raised:
        adoption.go_parse_bool(raw)
    assert raised.value.args == (raw,)


DELETE, RETAIN, ARCHIVE = OnDelete.DELETE, OnDelete.RETAIN, OnDelete.ARCHIVE


@pytest.mark.parametrize(
    ("parameters", "policy", "caution", "says"),
    [
        # nfs-subdir HEAD / v4.0.2 and nfs-client, plainly
        pytest.param({}, ARCHIVE, False, "archiveOnDelete not set", id="nothing-archives"),
        pytest.param({"archiveOnDelete": "true"}, ARCHIVE, False, '"true"', id="aod-true"),
        pytest.param({"archiveOnDelete": "false"}, DELETE, False, '"false"', id="aod-false"),
        pytest.param({"archiveOnDelete": "F"}, DELETE, False, '"F"', id="aod-go-F"),
        pytest.param({"archiveOnDelete": "0"}, DELETE, False, '"0"', id="aod-go-0"),
        pytest.param({"onDelete": "delete"}, DELETE, False, 'onDelete "delete"', id="od-delete"),
        pytest.param({"onDelete": "retain"}, RETAIN, False, 'onDelete "retain"', id="od-retain"),
        pytest.param(
            {"onDelete": "retain", "archiveOnDelete": "false"}, RETAIN, False, "", id="od-wins"
        ),
        pytest.param(
            {"onDelete": "delete", "archiveOnDelete": "true"}, DELETE, False, "", id="od-wins-2"
        ),
        pytest.param(
            {"onDelete": "", "archiveOnDelete": "false"}, DELETE, False, "", id="od-empty-is-absent"
        ),
        pytest.param({"pathPattern": "${.PVC.namespace}"}, ARCHIVE, False, "", id="pattern-only"),
        # (b) unparsable archiveOnDelete: nfs-subdir failed forever; we archive
        pytest.param(
            {"archiveOnDelete": "yes"}, ARCHIVE, True, "not a boolean", id="aod-unparsable"
        ),
        pytest.param({"archiveOnDelete": "False "}, ARCHIVE, True, "not a boolean", id="aod-space"),
        # (c) onDelete spelled otherwise: ignored as nfs-subdir did ...
        pytest.param({"onDelete": "Delete"}, ARCHIVE, True, "ignored", id="od-Delete-archives"),
        pytest.param(
            {"onDelete": "Delete", "archiveOnDelete": "false"},
            DELETE,
            False,
            "ignored",
            id="od-Delete-aod-false-deletes",
        ),
        pytest.param({"onDelete": "archive"}, ARCHIVE, False, "ignored", id="od-archive"),
        pytest.param({"ondelete": "delete"}, ARCHIVE, True, "ignored", id="key-case"),
        pytest.param(
            {"archiveondelete": "false"}, ARCHIVE, False, "keys are case-sensitive", id="aod-key"
        ),
        # ... except that an onDelete asking to keep the data is never deleted
        pytest.param(
            {"onDelete": "Retain", "archiveOnDelete": "false"},
            RETAIN,
            True,
            "asks to keep the data",
            id="od-Retain-aod-false-kept",
        ),
        pytest.param(
            {"onDelete": "archive", "archiveOnDelete": "false"},
            ARCHIVE,
            True,
            "asks to keep the data",
            id="od-archive-aod-false-archived",
        ),
        pytest.param(
            {"onDelete": "keep", "archiveOnDelete": "false"},
            ARCHIVE,
            True,
            "would have deleted",
            id="od-unknown-aod-false-archived",
        ),
        pytest.param(
            {"OnDelete": "retain", "archiveOnDelete": "0"},
            RETAIN,
            True,
            "asks to keep",
            id="od-key-case-aod-false-kept",
        ),
    ],
)
def test_legacy_policy(
    parameters: dict[str, str], policy: OnDelete, caution: bool, says: str
) -> None:
    found = adoption.legacy_policy("nfs-client", sc(parameters))
    assert (found.on_delete, found.caution) == (policy, caution)
    assert says in found.basis
    assert found.basis.startswith('StorageClass "nfs-client"') or found.basis.startswith(
        'Warning: StorageClass "nfs-client"'
    )
    assert adoption.is_caution(found.basis) is caution


@pytest.mark.parametrize(
    ("class_name", "says"),
    [
        pytest.param("gone", 'StorageClass "gone" no longer exists', id="class-deleted"),
        pytest.param("", "names no StorageClass", id="no-class"),
    ],
)
def test_missing_class_keeps_the_directory(class_name: str, says: str) -> None:
    found = adoption.legacy_policy(class_name, None)
    assert found.on_delete is RETAIN
    assert found.caution
    assert says in found.basis
    assert "by hand" in found.basis


def test_policy_patch_records_policy_and_basis() -> None:
    policy = adoption.legacy_policy("nfs-client", sc({"archiveOnDelete": "false"}))
    assert adoption.policy_patch(OLD, policy) == {
        "metadata": {
            "resourceVersion": "41",
            "annotations": {
                core.ANN_ON_DELETE: "delete",
                core.ANN_ON_DELETE_BASIS: 'StorageClass "nfs-client": archiveOnDelete "false"',
            },
        }
    }


@pytest.mark.parametrize(
    ("basis", "note", "event_type"),
    [
        pytest.param("plain", ". Adopted volume: plain", "Normal", id="plain"),
        pytest.param("Warning: odd", ". Adopted volume: odd", "Warning", id="caution"),
        pytest.param(None, ". Adopted volume: the on-delete policy recorded", "Normal", id="none"),
    ],
)
def test_release_note(basis: str | None, note: str, event_type: str) -> None:
    text, kind = adoption.release_note(basis)
    assert text.startswith(note)
    assert kind == event_type


def test_overlap_refusal_waits_for_nested_volumes() -> None:
    directory = RelativeDir(("ns",))
    assert adoption.overlap_refusal(OLD, directory, {OLD.name}) is None
    message = adoption.overlap_refusal(OLD, directory, {OLD.name, "pvc-inner"})
    assert message is not None
    assert "pvc-inner" in message
    assert "Retain" in message


# --- check --migration -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "parameters", "says"),
    [
        pytest.param({}, {"archiveOnDelete": "false"}, "directory removed", id="delete"),
        pytest.param({}, {"onDelete": "retain"}, "directory kept, PV deleted", id="retain"),
        pytest.param(
            {},
            {},
            'renamed to "ns/archived-app" (or -2, -3, ... if taken); nfs-subdir renamed it to '
            '"archived-app" at the export root',
            id="nested-archive-stays-beside",
        ),
        pytest.param(
            {"reclaim_policy": "Retain"}, {}, "reclaim policy Retain: nothing is touched", id="rt"
        ),
    ],
)
def test_release_preview(changes: dict[str, Any], parameters: dict[str, str], says: str) -> None:
    policy = adoption.legacy_policy("nfs-client", sc(parameters))
    preview = adoption.release_preview(old(**changes), RelativeDir(("ns", "app")), policy)
    assert says in preview


def test_release_preview_of_a_top_level_archive_matches_nfs_subdir() -> None:
    policy = adoption.legacy_policy("nfs-client", sc({}))
    preview = adoption.release_preview(OLD, RelativeDir(("a",)), policy)
    assert 'renamed to "archived-a"' in preview
    assert "export root" not in preview


def test_render_report() -> None:
    row = adoption.Row("pvc-1", "ns/app", "ns/app-claim", "Bound", "directory removed (x)")
    text = adoption.render_report(NAME, EXPORT, [row], [("pvc-2", "why")], ours=3, adopted=1)
    assert text.splitlines() == [
        'migration: PROVISIONER_NAME "fuseim.pri/ifs", export nfs.example.test:/exports',
        "migration: 1 PersistentVolume(s) of the previous provisioner will be adopted:",
        '  pvc-1: directory "ns/app", claim ns/app-claim, Bound',
        "    on release: directory removed (x)",
        "migration: 1 cannot be adopted (each gets one AdoptionRefused Warning Event and the "
        "annotation nfs.provisioner.dev/not-adopted, and is left alone):",
        "  pvc-2: why",
        "migration: 3 PersistentVolume(s) already carry our records (1 of them adopted earlier); "
        "PersistentVolumes of other provisioners are not listed",
        "migration: nothing was changed",
    ]


@pytest.mark.parametrize(
    ("argv", "wanted"),
    [
        pytest.param(["check", "--migration"], True, id="check-migration"),
        pytest.param(["check"], False, id="plain-check"),
        pytest.param(["run"], False, id="run"),
    ],
)
def test_the_migration_flag_belongs_to_check(argv: list[str], wanted: bool) -> None:
    assert config.wants_migration(argv) is wanted


@pytest.mark.parametrize("argv", [["--migration"], ["run", "--migration"]])
def test_the_migration_flag_elsewhere_is_a_config_error(argv: list[str]) -> None:
    with pytest.raises(config.ConfigError, match="check --migration"):
        config.wants_migration(argv)
