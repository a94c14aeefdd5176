"""Unit tests for provisioner.orphans: what the leader's sweep does with each provisioning intent.

Tables of named cases over ``judge`` and ``used_dirs``; PVs are built the way the sweep sees
them (listed as JSON, narrowed by ``core.volume_from``). Pure: no filesystem, no API.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from provisioner.core import ANN_DIRECTORY, ANN_EXPORT_PATH, Export, Volume, volume_from
from provisioner.journal import Intent
from provisioner.orphans import Action, judge, used_dirs

CLUSTER = "cluster-uid-1"
PROVISIONER = "example.com/nfs"
UID = "0b6c1f7e-2d4a-4c8e-9f10-1234567890ab"
EXPORT_PATH = "/exports"
EXPORT = Export(server="nfs.example", path=EXPORT_PATH)
INTENT = Intent(
    volume=f"pvc-{UID}",
    namespace="team-a",
    claim="data",
    claim_uid=UID,
    directory=f"team-a-data-pvc-{UID}",
    cluster=CLUSTER,
    provisioner=PROVISIONER,
    since="2026-01-01T00:00:00Z",
)


@pytest.mark.parametrize(
    ("intent", "claim_uids", "volume_names", "used", "action"),
    [
        pytest.param(INTENT, set(), set(), set(), Action.REMOVE, id="claim-and-pv-gone"),
        pytest.param(INTENT, {UID}, set(), set(), Action.PENDING, id="claim-still-exists"),
        pytest.param(INTENT, set(), {f"pvc-{UID}"}, set(), Action.CLEAR, id="pv-was-saved"),
        pytest.param(INTENT, {UID}, {f"pvc-{UID}"}, set(), Action.CLEAR, id="pv-saved-claim-alive"),
        pytest.param(
            INTENT,
            set(),
            set(),
            {f"team-a-data-pvc-{UID}"},
            Action.CLEAR,
            id="another-pv-records-the-directory",
        ),
        pytest.param(
            replace(INTENT, directory="team-a/app"),
            set(),
            set(),
            {"team-a"},
            Action.REMOVE,
            id="a-pv-on-the-parent-is-not-this-directory",
        ),
        pytest.param(
            replace(INTENT, cluster="cluster-uid-2"),
            set(),
            set(),
            set(),
            Action.FOREIGN,
            id="another-cluster-sharing-the-export",
        ),
        pytest.param(
            replace(INTENT, provisioner="other.example.com/nfs"),
            set(),
            set(),
            set(),
            Action.FOREIGN,
            id="another-provisioner-on-this-cluster",
        ),
        pytest.param(
            replace(INTENT, cluster="cluster-uid-2"),
            {UID},
            {f"pvc-{UID}"},
            {INTENT.directory},
            Action.FOREIGN,
            id="foreign-wins-over-everything",
        ),
        pytest.param(
            replace(INTENT, cluster=""),
            set(),
            set(),
            set(),
            Action.FOREIGN,
            id="an-intent-without-cluster-is-not-ours",
        ),
    ],
)
def test_judge(
    intent: Intent, claim_uids: set[str], volume_names: set[str], used: set[str], action: Action
) -> None:
    assert judge(intent, CLUSTER, PROVISIONER, claim_uids, volume_names, used) is action


def volume(
    name: str,
    nfs_path: str | None = None,
    annotations: dict[str, str] | None = None,
    server: str = "nfs.example",
) -> Volume:
    """A PV as the sweep sees it: listed as JSON, narrowed by ``core.volume_from``."""
    body: dict[str, Any] = {"metadata": {"name": name, "annotations": annotations or {}}}
    if nfs_path is not None:
        body["spec"] = {"nfs": {"server": server, "path": nfs_path}}
    return volume_from(body)


def ours(directory: str, export_path: str = EXPORT_PATH) -> dict[str, str]:
    return {ANN_DIRECTORY: directory, ANN_EXPORT_PATH: export_path}


@pytest.mark.parametrize(
    ("pv", "export", "used"),
    [
        pytest.param(volume("ours", annotations=ours("ns-a")), EXPORT, {"ns-a"}, id="annotations"),
        pytest.param(
            volume("nested", annotations=ours("team/app")),
            EXPORT,
            {"team/app"},
            id="annotations-nested-is-the-whole-path",
        ),
        pytest.param(
            volume("no-export-path", annotations={ANN_DIRECTORY: "ns-b"}),
            EXPORT,
            set(),
            id="annotation-without-export-path",
        ),
        pytest.param(
            volume("elsewhere", annotations=ours("x", "/elsewhere")),
            EXPORT,
            set(),
            id="annotations-of-another-export-path",
        ),
        pytest.param(
            volume("slashed", annotations=ours("x", EXPORT_PATH + "/")),
            EXPORT,
            {"x"},
            id="recorded-export-path-with-trailing-slash",
        ),
        pytest.param(
            volume("unsafe", annotations=ours("a/../..")),
            EXPORT,
            set(),
            id="unsafe-recorded-directory",
        ),
        pytest.param(
            volume("by-hand", nfs_path="/exports/static/deep"),
            EXPORT,
            {"static/deep"},
            id="spec-nfs-of-any-pv",
        ),
        pytest.param(
            volume("by-hand", nfs_path="/exports/static/deep"),
            Export(server="nfs.example", path="/exports/"),
            {"static/deep"},
            id="spec-nfs-export-path-with-trailing-slash",
        ),
        pytest.param(
            volume("slashed", nfs_path="/exports/slashed/"),
            EXPORT,
            {"slashed"},
            id="spec-nfs-trailing-slash",
        ),
        pytest.param(
            volume("case", nfs_path="/exports/x", server="NFS.Example"),
            EXPORT,
            {"x"},
            id="server-names-are-case-insensitive",
        ),
        pytest.param(
            volume("other-server", nfs_path="/exports/x", server="other.example"),
            EXPORT,
            set(),
            id="another-server-owns-nothing-here",
        ),
        pytest.param(
            volume("other-server", nfs_path="/exports/x", annotations=ours("x"), server="other"),
            EXPORT,
            set(),
            id="another-server-even-with-our-annotations",
        ),
        pytest.param(volume("root", nfs_path="/exports"), EXPORT, set(), id="the-export-root"),
        pytest.param(volume("root", nfs_path="/exports/"), EXPORT, set(), id="the-root-slashed"),
        pytest.param(
            volume("sibling", nfs_path="/exports2/y"), EXPORT, set(), id="sibling-export-prefix"
        ),
        pytest.param(
            volume("server-root", nfs_path="/ns-a"),
            Export(server="nfs.example", path="/"),
            {"ns-a"},
            id="server-root-as-export",
        ),
        pytest.param(volume("not-nfs"), EXPORT, set(), id="not-an-nfs-volume"),
        pytest.param(
            volume("both", nfs_path="/exports/team/app", annotations=ours("team/app")),
            EXPORT,
            {"team/app"},
            id="annotations-and-spec-agree",
        ),
        pytest.param(
            volume("edited", nfs_path="/exports/team/b", annotations=ours("team/a")),
            EXPORT,
            {"team/a", "team/b"},
            id="annotations-and-spec-disagree-both-count",
        ),
    ],
)
def test_used_dirs(pv: Volume, export: Export, used: set[str]) -> None:
    assert used_dirs([pv], export) == used


def test_used_dirs_collects_every_volume() -> None:
    volumes = [
        volume("a", annotations=ours("ns-a")),
        volume("b", nfs_path="/exports/ns-b"),
        volume("c", nfs_path="/other/ns-c"),
    ]
    assert used_dirs(volumes, EXPORT) == {"ns-a", "ns-b"}
    assert used_dirs([], EXPORT) == set()


def test_a_directory_any_pv_records_is_never_removed() -> None:
    """judge and used_dirs together, as the sweep calls them: a PV written by hand protects the
    directory an intent of ours names, even though its claim and our PV are gone."""
    used = used_dirs([volume("by-hand", nfs_path=f"{EXPORT_PATH}/{INTENT.directory}")], EXPORT)
    assert judge(INTENT, CLUSTER, PROVISIONER, set(), set(), used) is Action.CLEAR
