"""SPEC §4, one owner per directory: the pure rules behind it, as tables of named cases.

Which directories of our export a PV owns (by our annotations or by spec.nfs), when two
directories overlap (the reservation of concurrent claims), and when a cached claim turns out
to be gone at the last moment.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from provisioner import core

EXPORT = core.Export("NAS.example", "/exports")


def volume_body(
    annotations: dict[str, str] | None = None, nfs: dict[str, str] | None = None
) -> dict[str, Any]:
    spec: dict[str, Any] = {"persistentVolumeReclaimPolicy": "Retain"}
    if nfs is not None:
        spec["nfs"] = nfs
    return {"metadata": {"name": "pv", "annotations": annotations or {}}, "spec": spec}


OURS = {core.ANN_DIRECTORY: "ns/app", core.ANN_EXPORT_PATH: "/exports"}


@pytest.mark.parametrize(
    ("annotations", "nfs", "expected"),
    [
        pytest.param(
            OURS,
            {"server": "nas.example", "path": "/exports/ns/app"},
            {"ns/app"},
            id="ours",
        ),
        pytest.param(
            {**OURS, core.ANN_EXPORT_PATH: "/exports/"},
            None,
            {"ns/app"},
            id="ours-export-path-trailing-slash",
        ),
        pytest.param(
            {**OURS, core.ANN_DIRECTORY: "ns/edited"},
            {"server": "nas.example", "path": "/exports/ns/app"},
            {"ns/app", "ns/edited"},
            id="annotation-and-spec-disagree-both-owned",
        ),
        pytest.param(
            {**OURS, core.ANN_EXPORT_PATH: "/old"},
            {"server": "nas.example", "path": "/old/ns/app"},
            set(),
            id="ours-on-another-export-path",
        ),
        pytest.param(
            {core.ANN_DIRECTORY: "ns/app"},
            None,
            set(),
            id="directory-without-export-path",
        ),
        pytest.param(
            OURS,
            {"server": "other.example", "path": "/exports/ns/app"},
            set(),
            id="ours-on-another-server",
        ),
        pytest.param(
            None, {"server": "nas.example", "path": "/exports/hand"}, {"hand"}, id="by-hand"
        ),
        pytest.param(
            None, {"server": "NAS.EXAMPLE", "path": "/exports/hand"}, {"hand"}, id="server-case"
        ),
        pytest.param(
            None,
            {"server": "nas.example", "path": "/exports/a/b//"},
            {"a/b"},
            id="trailing-slashes",
        ),
        pytest.param(
            None,
            {"server": "other.example", "path": "/exports/hand"},
            set(),
            id="same-path-other-server",
        ),
        pytest.param(
            None, {"server": "nas.example", "path": "/exports"}, set(), id="export-root-itself"
        ),
        pytest.param(
            None, {"server": "nas.example", "path": "/exports/"}, set(), id="export-root-slash"
        ),
        pytest.param(
            None, {"server": "nas.example", "path": "/exports2/x"}, set(), id="sibling-export"
        ),
        pytest.param(
            None,
            {"server": "nas.example", "path": "/exports/ns/../ns/app"},
            set(),
            id="dotdot-owns-nothing",
        ),
        pytest.param(
            None,
            {"server": "nas.example", "path": "/exports//x"},
            set(),
            id="empty-component-owns-nothing",
        ),
        pytest.param(
            None, {"server": "nas.example", "path": "/exports/./x"}, set(), id="dot-owns-nothing"
        ),
        pytest.param(None, None, set(), id="not-nfs"),
    ],
)
def test_volume_directories(
    annotations: dict[str, str] | None, nfs: dict[str, str] | None, expected: set[str]
) -> None:
    volume = core.volume_from(volume_body(annotations, nfs))
    assert core.volume_directories(volume, EXPORT) == expected


def test_volume_directories_on_a_root_export() -> None:
    volume = core.volume_from(volume_body(nfs={"server": "nas.example", "path": "/ns/app"}))
    assert core.volume_directories(volume, core.Export("nas.example", "/")) == {"ns/app"}


def test_volume_from_reads_the_nfs_server() -> None:
    volume = core.volume_from(volume_body(nfs={"server": "nas.example", "path": "/exports/x"}))
    assert (volume.nfs_server, volume.nfs_path) == ("nas.example", "/exports/x")
    assert core.volume_from(volume_body()).nfs_server is None


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        pytest.param("x", "x", True, id="same"),
        pytest.param("x", "x/y", True, id="inside"),
        pytest.param("x/y", "x", True, id="around"),
        pytest.param("a/b/c", "a/b", True, id="deep"),
        pytest.param("x", "xy", False, id="common-prefix-not-a-component"),
        pytest.param("x/y", "x/z", False, id="siblings"),
        pytest.param("a/x", "b/x", False, id="same-leaf-other-parent"),
    ],
)
def test_dirs_overlap(first: str, second: str, expected: bool) -> None:
    assert core.dirs_overlap(first, second) is expected


CLAIM = core.Claim(uid="u1", namespace="ns", name="data", class_name="nfs")


@pytest.mark.parametrize(
    ("current", "expected"),
    [
        pytest.param(CLAIM, None, id="still-there"),
        pytest.param(None, "it no longer exists", id="gone"),
        pytest.param(
            dataclasses.replace(CLAIM, uid="u2"),
            "it no longer exists (the claim of that name now has uid u2)",
            id="re-created",
        ),
        pytest.param(
            dataclasses.replace(CLAIM, deleting=True), "it is being deleted", id="deleting"
        ),
    ],
)
def test_claim_gone(current: core.Claim | None, expected: str | None) -> None:
    assert core.claim_gone(CLAIM, current) == expected


def test_resource_version() -> None:
    assert core.resource_version({"metadata": {"resourceVersion": "42"}}) == "42"
    assert core.resource_version({}) == ""
