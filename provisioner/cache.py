"""In-memory view of the cluster built from watch events: claims, volumes and StorageClasses.

Fed by the kopf event handlers, read by the reconciler; like client-go's informer caches, but only
the narrowed ``core`` values are kept (not whole objects), which keeps memory small with thousands
of claims. Plain data structures, no I/O.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

from provisioner.core import Claim, StorageClass, Volume


class Cache:
    def __init__(self) -> None:
        self._claims: dict[str, Claim] = {}
        self._volumes: dict[str, Volume] = {}
        self._classes: dict[str, StorageClass] = {}
        self._claims_by_class: defaultdict[str, set[str]] = defaultdict(set)
        self._volumes_by_dir: defaultdict[tuple[str, str], set[str]] = defaultdict(set)

    # --- claims, keyed by uid ------------------------------------------------------------------

    def put_claim(self, claim: Claim) -> None:
        self.drop_claim(claim.uid)
        self._claims[claim.uid] = claim
        if claim.class_name:
            self._claims_by_class[claim.class_name].add(claim.uid)

    def drop_claim(self, uid: str) -> None:
        old = self._claims.pop(uid, None)
        if old is not None and old.class_name:
            members = self._claims_by_class[old.class_name]
            members.discard(uid)
            if not members:
                del self._claims_by_class[old.class_name]

    def claim(self, uid: str) -> Claim | None:
        return self._claims.get(uid)

    def claims(self) -> Iterator[Claim]:
        return iter(list(self._claims.values()))

    def claims_of_class(self, class_name: str) -> list[str]:
        return sorted(self._claims_by_class.get(class_name, ()))

    # --- volumes, keyed by name ------------------------------------------------------------------

    def put_volume(self, volume: Volume) -> None:
        self.drop_volume(volume.name)
        self._volumes[volume.name] = volume
        if volume.directory is not None:
            self._volumes_by_dir[(volume.export_path or "", volume.directory)].add(volume.name)

    def drop_volume(self, name: str) -> None:
        old = self._volumes.pop(name, None)
        if old is not None and old.directory is not None:
            key = (old.export_path or "", old.directory)
            members = self._volumes_by_dir[key]
            members.discard(name)
            if not members:
                del self._volumes_by_dir[key]

    def volume(self, name: str) -> Volume | None:
        return self._volumes.get(name)

    def volumes(self) -> Iterator[Volume]:
        return iter(list(self._volumes.values()))

    def volumes_recording(self, export_path: str, directory: str) -> set[str]:
        """Names of the PVs that record this directory of this export."""
        return set(self._volumes_by_dir.get((export_path, directory), ()))

    def volumes_overlapping(self, export_path: str, directory: str) -> set[str]:
        """PVs whose directory is this one, inside it, or contains it.

        A claim must not get a directory inside another volume's (or around it): that would
        hand one tenant's data to another through a crafted pathPattern input.
        """
        parts = directory.split("/")
        found: set[str] = set()
        for depth in range(1, len(parts) + 1):
            found |= self.volumes_recording(export_path, "/".join(parts[:depth]))
        prefix = f"{directory}/"
        for (export, recorded), names in self._volumes_by_dir.items():
            if export == export_path and recorded.startswith(prefix):
                found |= names
        return found

    # --- StorageClasses ----------------------------------------------------------------------

    def put_class(self, storage_class: StorageClass) -> None:
        self._classes[storage_class.name] = storage_class

    def drop_class(self, name: str) -> None:
        self._classes.pop(name, None)

    def storage_class(self, name: str | None) -> StorageClass | None:
        return self._classes.get(name) if name else None

    def counts(self) -> tuple[int, int]:
        return len(self._claims), len(self._volumes)
