"""What the cache keeps of each claim and PV (core.claim_from / volume_from, cache.Cache): only
what decisions read, repeated strings once, lists merged as they are read. Decisions on the
narrowed objects are compared with those on a complete narrowing of the same bodies."""

from __future__ import annotations

import dataclasses
import gc
import json
import tracemalloc
from collections.abc import Iterator
from typing import Any

import pytest

from provisioner import adoption, core
from provisioner.cache import Cache

NAME = "example.com/nfs"
EXPORT = core.Export("nas.example", "/exports")
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
CLASSES = [
    None,
    core.StorageClass(name="nfs", provisioner=NAME, parameters={}),
    core.StorageClass(name="nfs", provisioner="other.io/csi", parameters={}),
    core.StorageClass(
        name="nfs", provisioner=NAME, parameters={}, binding_mode="WaitForFirstConsumer"
    ),
]


def claim_body(
    uid: str = "u1",
    *,
    volume: str | None = None,
    deleting: bool = False,
    annotations: dict[str, str] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    """A claim as the API returns one applied with kubectl: last-applied and managedFields."""
    applied = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "spec": {"x": "y" * 500}}
    meta: dict[str, Any] = {
        "uid": uid,
        "namespace": "team-a",
        "name": f"data-{uid}",
        "resourceVersion": "17",
        "labels": {"app": "web", "tier": "db"},
        "annotations": {
            LAST_APPLIED: json.dumps(applied),
            "kubectl.kubernetes.io/restartedAt": "2025-01-01T00:00:00Z",
            "example.com/dir": "shared",
            core.ANN_SELECTED_NODE: "node-1",
            **(annotations or {}),
        },
        "managedFields": [{"manager": "kubectl", "fieldsV1": {"f:spec": {}}}],
    }
    if deleting:
        meta["deletionTimestamp"] = "2025-01-01T00:00:00Z"
    body_spec: dict[str, Any] = {
        "storageClassName": "nfs",
        "accessModes": ["ReadWriteMany"],
        "resources": {"requests": {"storage": "1Gi"}},
        **spec,
    }
    if volume is not None:
        body_spec["volumeName"] = volume
    return {"metadata": meta, "spec": body_spec, "status": {"phase": "Pending"}}


def volume_body(
    name: str = "pv1",
    *,
    provisioner: str = NAME,
    nfs: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    phase: str = "Bound",
    claim_uid: str = "u1",
) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "uid": f"uid-{name}",
            "resourceVersion": "23",
            "annotations": {core.ANN_PROVISIONED_BY: provisioner, **(annotations or {})},
            "finalizers": [core.FINALIZER, "kubernetes.io/pv-protection"],
        },
        "spec": {
            "claimRef": {"namespace": "team-a", "name": f"data-{claim_uid}", "uid": claim_uid},
            "persistentVolumeReclaimPolicy": "Delete",
            "storageClassName": "nfs",
            "capacity": {"storage": "1Gi"},
            **({"nfs": nfs} if nfs else {"csi": {"driver": "x", "volumeHandle": "vol-1"}}),
        },
        "status": {"phase": phase},
    }


def complete_claim(body: dict[str, Any]) -> core.Claim:
    """Every field read from the body, nothing dropped: what claim_from kept before."""
    meta, spec = body["metadata"], body["spec"]
    annotations = {str(k): str(v) for k, v in meta.get("annotations", {}).items()}
    class_name = annotations.get(core.ANN_STORAGE_CLASS_BETA, spec.get("storageClassName"))
    source = spec.get("dataSourceRef") or spec.get("dataSource")
    return core.Claim(
        uid=meta["uid"],
        namespace=meta["namespace"],
        name=meta["name"],
        class_name=class_name,
        volume_name=spec.get("volumeName") or "",
        deleting="deletionTimestamp" in meta,
        has_selector=bool(spec.get("selector")),
        volume_mode=spec.get("volumeMode") or "Filesystem",
        data_source=f"{source['kind']}/{source['name']}" if source else None,
        access_modes=tuple(spec.get("accessModes") or ()),
        storage_request=spec.get("resources", {}).get("requests", {}).get("storage"),
        labels=dict(meta.get("labels", {})),
        annotations=annotations,
        resource_version=meta["resourceVersion"],
    )


def decoded(body: dict[str, Any]) -> dict[str, Any]:
    """A fresh decode, as each watch event is: no string shared with another body."""
    result: dict[str, Any] = json.loads(json.dumps(body))
    return result


# --- claims ------------------------------------------------------------------------------------


def test_an_unbound_claim_keeps_labels_and_annotations_but_not_kubectls() -> None:
    claim = core.claim_from(claim_body())
    assert claim.labels == {"app": "web", "tier": "db"}
    assert claim.annotations == {"example.com/dir": "shared", core.ANN_SELECTED_NODE: "node-1"}
    assert LAST_APPLIED not in claim.annotations
    assert claim.access_modes == ("ReadWriteMany",)
    assert claim.storage_request == "1Gi"


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(claim_body(volume="pv-9"), id="bound"),
        pytest.param(claim_body(deleting=True), id="deleting"),
        pytest.param(claim_body(volume="pv-9", deleting=True), id="bound-and-deleting"),
    ],
)
def test_a_settled_claim_keeps_only_its_identity(body: dict[str, Any]) -> None:
    claim = core.claim_from(body)
    assert (claim.uid, claim.namespace, claim.name, claim.class_name) == (
        "u1",
        "team-a",
        "data-u1",
        "nfs",
    )
    assert claim.resource_version == "17"
    assert claim.labels is core.EMPTY
    assert claim.annotations is core.EMPTY
    assert (claim.access_modes, claim.storage_request) == ((), None)


BODIES = [
    pytest.param(claim_body(), id="unbound"),
    pytest.param(claim_body(volume="pv-9"), id="bound"),
    pytest.param(claim_body(deleting=True), id="deleting"),
    pytest.param(claim_body(volume="pv-9", selector={"a": "b"}), id="bound-with-selector"),
    pytest.param(claim_body(selector={"matchLabels": {"a": "b"}}), id="selector"),
    pytest.param(claim_body(volumeMode="Block"), id="block"),
    pytest.param(claim_body(dataSource={"kind": "PVC", "name": "x"}), id="clone"),
    pytest.param(claim_body(deleting=True, volumeMode="Block"), id="deleting-block"),
    pytest.param(
        claim_body(annotations={core.ANN_STORAGE_PROVISIONER: "other.io/csi"}),
        id="another-provisioner",
    ),
    pytest.param(
        claim_body(volume="pv-9", annotations={core.ANN_STORAGE_PROVISIONER: NAME}),
        id="bound-ours",
    ),
    pytest.param(claim_body(storageClassName=None), id="no-class"),
]


@pytest.mark.parametrize("body", BODIES)
@pytest.mark.parametrize("storage_class", CLASSES, ids=["none", "ours", "other", "wffc"])
@pytest.mark.parametrize("exists", [False, True], ids=["new", "pv-exists"])
def test_decide_claim_is_unchanged_by_what_is_dropped(
    body: dict[str, Any], storage_class: core.StorageClass | None, exists: bool
) -> None:
    narrowed = core.decide_claim(core.claim_from(body), storage_class, NAME, exists)
    complete = core.decide_claim(complete_claim(body), storage_class, NAME, exists)
    assert narrowed == complete


def test_claim_gone_reads_only_what_a_settled_claim_keeps() -> None:
    cached = core.claim_from(claim_body())
    deleted = core.claim_from(claim_body(deleting=True))
    assert core.claim_gone(cached, deleted) == core.claim_gone(
        cached, complete_claim(claim_body(deleting=True))
    )
    assert core.claim_gone(cached, core.claim_from(claim_body("u2", volume="pv"))) is not None


# --- volumes -------------------------------------------------------------------------------------

VOLUMES = [
    pytest.param(volume_body(provisioner="other.io/csi"), id="csi-of-another"),
    pytest.param(volume_body(), id="not-nfs-named-ours"),
    pytest.param(
        volume_body(
            nfs={"server": "nas.example", "path": "/exports/team-a/x"},
            annotations={
                core.ANN_DIRECTORY: "team-a/x",
                core.ANN_EXPORT_PATH: "/exports",
                core.ANN_ON_DELETE: "archive",
            },
            phase="Released",
        ),
        id="ours-released",
    ),
    pytest.param(
        volume_body(nfs={"server": "NAS.example", "path": "/exports/old"}, phase="Released"),
        id="to-adopt",
    ),
    pytest.param(
        volume_body(
            provisioner="cluster.local/nfs-subdir",
            nfs={"server": "other.example", "path": "/srv/x"},
        ),
        id="nfs-of-another",
    ),
]


def complete_volume(body: dict[str, Any]) -> core.Volume:
    """Every field volume_from reads, read the plain way (no interning, no shared tuples)."""
    meta, spec = body["metadata"], body["spec"]
    annotations = {str(k): str(v) for k, v in meta.get("annotations", {}).items()}
    claim_ref, nfs = spec.get("claimRef") or {}, spec.get("nfs") or {}
    return core.Volume(
        name=meta["name"],
        provisioned_by=annotations.get(core.ANN_PROVISIONED_BY),
        phase=body.get("status", {}).get("phase") or "",
        reclaim_policy=spec.get("persistentVolumeReclaimPolicy") or "Retain",
        deleting="deletionTimestamp" in meta,
        finalizers=tuple(meta.get("finalizers") or ()),
        claim_uid=claim_ref.get("uid"),
        claim_namespace=claim_ref.get("namespace"),
        claim_name=claim_ref.get("name"),
        storage_class=spec.get("storageClassName") or "",
        directory=annotations.get(core.ANN_DIRECTORY),
        export_path=annotations.get(core.ANN_EXPORT_PATH),
        on_delete=annotations.get(core.ANN_ON_DELETE),
        resource_version=meta.get("resourceVersion", ""),
        uid=meta.get("uid", ""),
        nfs_path=nfs.get("path"),
        nfs_server=nfs.get("server"),
        adopted=annotations.get(core.ANN_ADOPTED),
        on_delete_basis=annotations.get(core.ANN_ON_DELETE_BASIS),
        not_adopted=annotations.get(core.ANN_NOT_ADOPTED),
    )


@pytest.mark.parametrize("body", VOLUMES)
def test_a_volume_keeps_every_field_decisions_read(body: dict[str, Any]) -> None:
    volume = core.volume_from(decoded(body))
    assert volume == complete_volume(body)
    for name in (NAME, "other.io/csi"):
        assert adoption.standing(volume, name) is adoption.standing(complete_volume(body), name)
        assert core.decide_volume(volume, name) == core.decide_volume(complete_volume(body), name)


def test_an_unbound_claim_differs_from_a_complete_one_only_by_kubectls_annotations() -> None:
    body = claim_body(selector={"a": "b"}, dataSourceRef={"kind": "PVC", "name": "x"})
    complete = complete_claim(body)
    kept = {k: v for k, v in complete.annotations.items() if not k.startswith("kubectl.")}
    assert core.claim_from(decoded(body)) == dataclasses.replace(complete, annotations=kept)


def test_no_instance_dict() -> None:
    for value in (
        core.claim_from(claim_body()),
        core.volume_from(volume_body()),
        core.storage_class_from({"metadata": {"name": "nfs"}, "provisioner": NAME}),
    ):
        assert not hasattr(value, "__dict__")


# --- interning ---------------------------------------------------------------------------------


def test_repeated_strings_are_stored_once() -> None:
    first = core.claim_from(decoded(claim_body("u1")))
    second = core.claim_from(decoded(claim_body("u2")))
    assert first.namespace is second.namespace
    assert first.class_name is second.class_name
    assert first.access_modes is second.access_modes
    assert first.storage_request is second.storage_request
    for key in first.labels:
        other_key = next(k for k in second.labels if k == key)
        assert key is other_key
        assert first.labels[key] is second.labels[key]
    one = core.volume_from(decoded(volume_body("pv1")))
    two = core.volume_from(decoded(volume_body("pv2")))
    assert one.finalizers is two.finalizers
    assert one.provisioned_by is two.provisioned_by
    assert one.phase is two.phase and one.reclaim_policy is two.reclaim_policy
    assert one.storage_class is two.storage_class and one.claim_namespace is two.claim_namespace


@pytest.mark.parametrize("claim_first", [True, False], ids=["claim-first", "volume-first"])
def test_a_bound_pair_stores_its_names_once(claim_first: bool) -> None:
    cache = Cache(EXPORT)
    claim = core.claim_from(decoded(claim_body("u7", volume="pv-7")))
    volume = core.volume_from(decoded(volume_body("pv-7", claim_uid="u7")))
    if claim_first:
        cache.put_claim(claim)
        cache.put_volume(volume)
    else:
        cache.put_volume(volume)
        cache.put_claim(claim)
    # A later event of either brings fresh strings: they are paired again.
    cache.put_claim(core.claim_from(decoded(claim_body("u7", volume="pv-7"))))
    cache.put_volume(core.volume_from(decoded(volume_body("pv-7", claim_uid="u7"))))
    held_claim, held_volume = cache.claim("u7"), cache.volume("pv-7")
    assert held_claim is not None and held_volume is not None
    assert held_claim == claim and held_volume == volume
    assert held_claim.uid is held_volume.claim_uid
    assert held_claim.name is held_volume.claim_name
    assert held_claim.volume_name is held_volume.name


def test_a_volume_bound_to_another_claim_shares_nothing_with_this_one() -> None:
    cache = Cache(EXPORT)
    cache.put_claim(core.claim_from(decoded(claim_body("u7", volume="pv-7"))))
    cache.put_volume(core.volume_from(decoded(volume_body("pv-7", claim_uid="u8"))))
    held_claim, held_volume = cache.claim("u7"), cache.volume("pv-7")
    assert held_claim is not None and held_volume is not None
    assert (held_volume.claim_uid, held_volume.claim_name) == ("u8", "data-u8")
    assert held_claim.volume_name is not held_volume.name


def test_the_shared_table_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(core, "_shared_strings", {})
    monkeypatch.setattr(core, "_shared_tuples", {})
    monkeypatch.setattr(core, "MAX_SHARED", 8)
    for i in range(20):
        body = volume_body()
        body["metadata"]["finalizers"] = [f"example.com/f-{i}"]
        body["spec"]["storageClassName"] = f"class-{i}"
        volume = core.volume_from(body)
        assert volume.finalizers == (f"example.com/f-{i}",)
        assert volume.storage_class == f"class-{i}"
    assert len(core._shared_strings) == 8
    assert len(core._shared_tuples) <= 8


# --- the cache -----------------------------------------------------------------------------------


def test_only_claims_that_may_be_provisioned_wait_for_their_class() -> None:
    cache = Cache(EXPORT)
    cache.put_claim(core.claim_from(claim_body("pending")))
    cache.put_claim(core.claim_from(claim_body("bound", volume="pv-1")))
    cache.put_claim(core.claim_from(claim_body("going", deleting=True)))
    assert cache.claims_of_class("nfs") == ["pending"]
    cache.put_claim(core.claim_from(claim_body("pending", volume="pv-2")))  # now bound
    assert cache.claims_of_class("nfs") == []
    assert {c.uid for c in cache.claims()} == {"pending", "bound", "going"}


def test_a_list_is_merged_as_it_is_read() -> None:
    cache = Cache(EXPORT)
    cache.put_claim(core.claim_from(claim_body("gone")))
    cache.put_claim(dataclasses.replace(core.claim_from(claim_body("held")), resource_version="30"))

    def listed() -> Iterator[core.Claim]:
        previous: str | None = None
        for uid in ("a", "held", "b"):
            if previous is not None and previous != "held":
                assert cache.claim(previous) is not None  # stored before the next is read
            previous = uid
            yield core.claim_from(claim_body(uid))

    merged = cache.merge_claims(listed(), "20")
    assert (merged.listed, merged.stored, merged.dropped) == (3, 2, ("gone",))
    held = cache.claim("held")
    assert held is not None and held.resource_version == "30"  # a newer event wins


def test_directories_shared_by_two_volumes_stay_indexed_until_both_go() -> None:
    cache = Cache(EXPORT)
    nfs = {"server": "nas.example", "path": "/exports/team-a/x"}
    cache.put_volume(core.volume_from(volume_body("pv-a", nfs=nfs)))
    cache.put_volume(core.volume_from(volume_body("pv-b", nfs=nfs)))
    assert cache.volumes_recording("team-a/x") == {"pv-a", "pv-b"}
    assert cache.volumes_overlapping("team-a") == {"pv-a", "pv-b"}
    cache.drop_volume("pv-a")
    assert cache.volumes_recording("team-a/x") == {"pv-b"}
    cache.put_volume(core.volume_from(volume_body("pv-b", nfs=nfs)))  # the same PV again
    assert cache.volumes_recording("team-a/x") == {"pv-b"}
    cache.drop_volume("pv-b")
    assert cache.volumes_overlapping("team-a") == set()


def test_memory_per_cached_pair_stays_small() -> None:
    """A coarse guard: a bound claim with kubectl's last-applied and its CSI PV cost about
    4 KiB in the cache before the narrowing, well under 1.5 KiB after."""
    pairs = 2000
    bodies = [
        (
            json.dumps(claim_body(f"uid-{i:05d}", volume=f"pvc-{i:05d}")),
            json.dumps(
                volume_body(f"pvc-{i:05d}", provisioner="other.io/csi", claim_uid=f"uid-{i:05d}")
            ),
        )
        for i in range(pairs)
    ]
    gc.collect()
    tracemalloc.start()
    try:
        cache = Cache(EXPORT)
        for claim, volume in bodies:
            cache.put_claim(core.claim_from(json.loads(claim)))
            cache.put_volume(core.volume_from(json.loads(volume)))
        gc.collect()
        used, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert cache.counts() == (pairs, pairs)
    assert used / pairs < 1536
