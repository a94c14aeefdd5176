"""Claim selection, PV shape and release decisions (SPEC §3, §5, §6) as tables of named cases."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from provisioner import core
from provisioner.config import OnDelete
from provisioner.paths import RelativeDir

NAME = "fuseim.pri/ifs"
CLASS = core.StorageClass(
    name="nfs", provisioner=NAME, parameters={}, mount_options=("vers=4", "noresvport")
)


def claim_body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "metadata": {
            "uid": "u1",
            "namespace": "default",
            "name": "test-claim",
            "annotations": {core.ANN_STORAGE_CLASS_BETA: "nfs"},
            "labels": {"app": "web"},
            "resourceVersion": "7",
        },
        "spec": {
            "storageClassName": "other",
            "accessModes": ["ReadWriteMany"],
            "resources": {"requests": {"storage": "2Gi"}},
        },
    }
    for path, value in changes.items():
        section, _, key = path.partition("__")
        body[section][key] = value
    return body


def test_claim_from_reads_the_beta_class_annotation_first() -> None:
    claim = core.claim_from(claim_body())
    assert claim.class_name == "nfs"
    assert claim.storage_request == "2Gi"
    assert claim.access_modes == ("ReadWriteMany",)
    assert claim.volume_name_for == "pvc-u1"


def test_claim_from_falls_back_to_spec_class() -> None:
    assert core.claim_from(claim_body(metadata__annotations={})).class_name == "other"


def _claim(**changes: Any) -> core.Claim:
    return dataclasses.replace(core.claim_from(claim_body()), **changes)


WFFC = dataclasses.replace(CLASS, binding_mode="WaitForFirstConsumer")
OTHER = dataclasses.replace(CLASS, provisioner="example.com/other")


@pytest.mark.parametrize(
    ("claim", "storage_class", "exists", "verdict", "reason"),
    [
        pytest.param(_claim(), CLASS, False, core.Verdict.PROVISION, "ours", id="provision"),
        pytest.param(
            _claim(volume_name="pv1"), CLASS, False, core.Verdict.IGNORE, "bound", id="bound"
        ),
        pytest.param(
            _claim(deleting=True), CLASS, False, core.Verdict.IGNORE, "deleted", id="deleting"
        ),
        pytest.param(
            _claim(class_name=None),
            CLASS,
            False,
            core.Verdict.IGNORE,
            "no StorageClass",
            id="no-class-name",
        ),
        pytest.param(
            _claim(), None, False, core.Verdict.WAIT, "does not exist", id="missing-class"
        ),
        pytest.param(
            _claim(), OTHER, False, core.Verdict.IGNORE, "example.com/other", id="other-provisioner"
        ),
        pytest.param(
            _claim(annotations={core.ANN_STORAGE_PROVISIONER: "x.io/y"}),
            CLASS,
            False,
            core.Verdict.IGNORE,
            "x.io/y",
            id="annotation-names-other",
        ),
        pytest.param(
            _claim(annotations={core.ANN_STORAGE_PROVISIONER_BETA: NAME}),
            CLASS,
            False,
            core.Verdict.PROVISION,
            "ours",
            id="beta-annotation-ours",
        ),
        pytest.param(_claim(), CLASS, True, core.Verdict.IGNORE, "already exists", id="pv-exists"),
        pytest.param(_claim(), WFFC, False, core.Verdict.WAIT, "no node selected", id="wffc-waits"),
        pytest.param(
            _claim(annotations={core.ANN_SELECTED_NODE: "n1"}),
            WFFC,
            False,
            core.Verdict.PROVISION,
            "ours",
            id="wffc-selected",
        ),
        pytest.param(
            _claim(has_selector=True),
            CLASS,
            False,
            core.Verdict.REFUSE,
            "spec.selector",
            id="selector",
        ),
        pytest.param(
            _claim(volume_mode="Block"),
            CLASS,
            False,
            core.Verdict.REFUSE,
            'volumeMode "Block"',
            id="block",
        ),
        pytest.param(
            _claim(data_source="VolumeSnapshot/s1"),
            CLASS,
            False,
            core.Verdict.REFUSE,
            "VolumeSnapshot/s1",
            id="data-source",
        ),
    ],
)
def test_decide_claim(
    claim: core.Claim,
    storage_class: core.StorageClass | None,
    exists: bool,
    verdict: core.Verdict,
    reason: str,
) -> None:
    decision = core.decide_claim(claim, storage_class, NAME, exists)
    assert decision.verdict is verdict
    assert reason in decision.reason


def test_build_volume_records_what_delete_needs() -> None:
    claim = core.claim_from(claim_body())
    directory = RelativeDir(("default-test-claim-pvc-u1",))
    body = core.build_volume(
        claim, CLASS, directory, OnDelete.DELETE, core.Export("nas", "/exports/"), NAME
    )
    assert body["metadata"]["name"] == "pvc-u1"
    assert body["metadata"]["finalizers"] == [core.FINALIZER]
    assert body["metadata"]["annotations"] == {
        core.ANN_PROVISIONED_BY: NAME,
        core.ANN_DIRECTORY: "default-test-claim-pvc-u1",
        core.ANN_EXPORT_PATH: "/exports/",
        core.ANN_ON_DELETE: "delete",
    }
    spec = body["spec"]
    assert spec["nfs"] == {"server": "nas", "path": "/exports/default-test-claim-pvc-u1"}
    assert spec["capacity"] == {"storage": "2Gi"}
    assert spec["accessModes"] == ["ReadWriteMany"]
    assert spec["mountOptions"] == ["vers=4", "noresvport"]
    assert spec["persistentVolumeReclaimPolicy"] == "Delete"
    assert spec["volumeMode"] == "Filesystem"
    assert spec["storageClassName"] == "nfs"
    assert spec["claimRef"]["uid"] == "u1"
    volume = core.volume_from(body)
    assert volume.nfs_path == "/exports/default-test-claim-pvc-u1"
    assert core.volume_is_for_claim(volume, claim, NAME)
    assert not core.volume_is_for_claim(volume, dataclasses.replace(claim, uid="u2"), NAME)


def test_retain_class_gets_no_finalizer() -> None:
    body = core.build_volume(
        core.claim_from(claim_body()),
        dataclasses.replace(CLASS, reclaim_policy="Retain"),
        RelativeDir(("d",)),
        OnDelete.ARCHIVE,
        core.Export("nas", "/exports"),
        NAME,
    )
    assert body["metadata"]["finalizers"] == []
    assert body["spec"]["persistentVolumeReclaimPolicy"] == "Retain"


VOLUME = core.Volume(
    name="pvc-u1",
    provisioned_by=NAME,
    phase="Released",
    reclaim_policy="Delete",
    deleting=False,
    finalizers=(core.FINALIZER,),
    claim_uid="u1",
    claim_namespace="default",
    claim_name="test-claim",
    storage_class="nfs",
    directory="default-test-claim-pvc-u1",
    export_path="/exports",
    on_delete="archive",
)


@pytest.mark.parametrize(
    ("volume", "action"),
    [
        pytest.param(VOLUME, core.VolumeAction.CLEAN, id="released-delete"),
        pytest.param(
            dataclasses.replace(VOLUME, phase="Bound"), core.VolumeAction.IGNORE, id="bound"
        ),
        pytest.param(
            dataclasses.replace(VOLUME, phase="Bound", deleting=True),
            core.VolumeAction.IGNORE,
            id="pv-deleted-while-bound-waits",
        ),
        pytest.param(
            dataclasses.replace(VOLUME, deleting=True),
            core.VolumeAction.CLEAN,
            id="pv-deleted-first-then-released",
        ),
        pytest.param(
            dataclasses.replace(VOLUME, deleting=True, finalizers=()),
            core.VolumeAction.IGNORE,
            id="already-cleaned",
        ),
        pytest.param(
            dataclasses.replace(VOLUME, provisioned_by="x.io/y"),
            core.VolumeAction.IGNORE,
            id="not-ours",
        ),
        pytest.param(
            dataclasses.replace(VOLUME, reclaim_policy="Retain"),
            core.VolumeAction.RELEASE_FINALIZER,
            id="retain-wins",
        ),
        pytest.param(
            dataclasses.replace(VOLUME, reclaim_policy="Retain", finalizers=()),
            core.VolumeAction.IGNORE,
            id="retain-no-finalizer",
        ),
        pytest.param(
            dataclasses.replace(VOLUME, reclaim_policy="Retain", phase="Bound"),
            core.VolumeAction.IGNORE,
            id="retain-bound",
        ),
    ],
)
def test_decide_volume(volume: core.Volume, action: core.VolumeAction) -> None:
    assert core.decide_volume(volume, NAME).action is action


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        pytest.param({"directory": None}, "does not record its directory", id="no-record"),
        pytest.param({"directory": "../.."}, "is unsafe", id="traversal"),
        pytest.param({"directory": "/"}, "is unsafe", id="absolute"),
        pytest.param({"directory": "."}, "is unsafe", id="root"),
        pytest.param({"export_path": "/other"}, 'export path "/other"', id="other-export"),
    ],
)
def test_recorded_directory_refuses_unsafe_records(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(core.ReleaseRefused) as caught:
        core.recorded_directory(dataclasses.replace(VOLUME, **changes), "/exports")
    assert message in str(caught.value)
    assert "pvc-u1" in str(caught.value)


def test_recorded_on_delete() -> None:
    assert core.recorded_on_delete(VOLUME) is OnDelete.ARCHIVE
    with pytest.raises(core.ReleaseRefused, match='"shred"'):
        core.recorded_on_delete(dataclasses.replace(VOLUME, on_delete="shred"))
