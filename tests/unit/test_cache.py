"""The cache's collision index: a directory is never shared, nested in, or wrapped around."""

from __future__ import annotations

import pytest

from provisioner.cache import Cache
from provisioner.core import Volume


def volume(name: str, directory: str, export: str = "/exports") -> Volume:
    return Volume(
        name=name,
        provisioned_by="a.io/b",
        phase="Bound",
        reclaim_policy="Delete",
        deleting=False,
        finalizers=(),
        claim_uid=None,
        claim_namespace=None,
        claim_name=None,
        storage_class="nfs",
        directory=directory,
        export_path=export,
        on_delete="delete",
    )


@pytest.fixture
def cache() -> Cache:
    c = Cache()
    c.put_volume(volume("pv-a", "ns/app"))
    c.put_volume(volume("pv-b", "other", export="/elsewhere"))
    return c


@pytest.mark.parametrize(
    ("directory", "expected"),
    [
        pytest.param("ns/app", {"pv-a"}, id="same"),
        pytest.param("ns/app/sub", {"pv-a"}, id="inside"),
        pytest.param("ns", {"pv-a"}, id="around"),
        pytest.param("ns/application", set(), id="sibling-with-common-prefix"),
        pytest.param("ns/db", set(), id="sibling"),
        pytest.param("other", set(), id="other-export"),
    ],
)
def test_volumes_overlapping(cache: Cache, directory: str, expected: set[str]) -> None:
    assert cache.volumes_overlapping("/exports", directory) == expected


def test_dropped_volume_frees_its_directory(cache: Cache) -> None:
    cache.drop_volume("pv-a")
    assert cache.volumes_overlapping("/exports", "ns/app") == set()
