"""Unit tests for provisioner.orphans: which leftover directories the leader's sweep may rmdir."""

from __future__ import annotations

from typing import Any

import pytest

from provisioner.core import ANN_DIRECTORY, ANN_EXPORT_PATH, Volume, volume_from
from provisioner.orphans import claim_uid_of, orphaned, used_top_dirs

UID = "0b6c1f7e-2d4a-4c8e-9f10-1234567890ab"
OTHER = "5e0f3a2b-7c6d-4e1f-8a9b-abcdef012345"
EXPORT = "/exports"


@pytest.mark.parametrize(
    ("name", "uid"),
    [
        pytest.param(f"ns-data-pvc-{UID}", UID, id="default-pattern"),
        pytest.param(f"a-b-c-pvc-{UID}", UID, id="dashes-in-names"),
        pytest.param(f"archived-ns-data-pvc-{UID}", None, id="archive-never"),
        pytest.param(f"archived-ns-data-pvc-{UID}-2", None, id="archive-suffix-never"),
        pytest.param(f"pvc-{UID}", None, id="no-namespace-part"),
        pytest.param(f"ns-data-pvc-{UID.upper()}", None, id="uppercase-is-not-a-uid"),
        pytest.param(f"ns-data-pvc-{UID}-x", None, id="suffix-after-uid"),
        pytest.param("ns-data", None, id="custom-pattern"),
        pytest.param("", None, id="empty"),
    ],
)
def test_claim_uid_of(name: str, uid: str | None) -> None:
    assert claim_uid_of(name) == uid


def volume(
    name: str, nfs_path: str | None = None, annotations: dict[str, str] | None = None
) -> Volume:
    """A PV as the sweep sees it: listed as JSON, narrowed by ``core.volume_from``."""
    body: dict[str, Any] = {"metadata": {"name": name, "annotations": annotations or {}}}
    if nfs_path is not None:
        body["spec"] = {"nfs": {"server": "nfs", "path": nfs_path}}
    return volume_from(body)


def test_used_top_dirs_reads_annotations_and_nfs_paths() -> None:
    volumes = [
        volume("ours", annotations={ANN_DIRECTORY: "ns-a", ANN_EXPORT_PATH: EXPORT}),
        volume("nested", annotations={ANN_DIRECTORY: "team/app", ANN_EXPORT_PATH: EXPORT}),
        volume("other-export", annotations={ANN_DIRECTORY: "x", ANN_EXPORT_PATH: "/elsewhere"}),
        volume("by-hand", nfs_path="/exports/static/deep"),
        volume("trailing-slash", nfs_path="/exports/slashed/"),
        volume("root-itself", nfs_path="/exports"),
        volume("sibling-export", nfs_path="/exports2/y"),
        volume("not-nfs"),
    ]
    assert used_top_dirs(volumes, EXPORT) == {"ns-a", "team", "static", "slashed"}
    # The recorded export path must match exactly, as release requires; nfs paths are compared
    # without the trailing slash.
    assert used_top_dirs(volumes, EXPORT + "/") == {"static", "slashed"}


def test_used_top_dirs_with_the_server_root_as_export() -> None:
    assert used_top_dirs([volume("v", nfs_path="/ns-a")], "/") == {"ns-a"}


def test_orphaned_keeps_anything_a_claim_or_volume_still_names() -> None:
    names = [
        f"ns-gone-pvc-{UID}",  # claim and PV gone: an orphan
        f"ns-live-pvc-{OTHER}",  # its claim exists
        f"ns-saved-pvc-{'1' * 8}-1111-1111-1111-{'1' * 12}",  # its PV exists
        f"ns-used-pvc-{'2' * 8}-2222-2222-2222-{'2' * 12}",  # another PV points at it
        f"archived-ns-old-pvc-{'3' * 8}-3333-3333-3333-{'3' * 12}",
        "team",
    ]
    assert orphaned(
        names,
        claim_uids={OTHER},
        volume_names={f"pvc-{'1' * 8}-1111-1111-1111-{'1' * 12}"},
        used_dirs={f"ns-used-pvc-{'2' * 8}-2222-2222-2222-{'2' * 12}", "team"},
    ) == [f"ns-gone-pvc-{UID}"]


def test_orphaned_is_sorted_and_empty_without_candidates() -> None:
    second = f"b-x-pvc-{OTHER}"
    first = f"a-x-pvc-{UID}"
    assert orphaned([second, first], set(), set(), set()) == [first, second]
    assert orphaned([], set(), set(), set()) == []
