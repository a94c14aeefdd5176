"""In-memory view of the cluster: claims, volumes and StorageClasses.

Fed by the kopf event handlers and by the complete lists the reconciler takes before its first
reconcile and at every resync; read by the reconciler. Like client-go's informer caches, but only
the narrowed ``core`` values are kept (not whole objects; ``core`` says what is dropped), which
keeps memory small with every claim and PV of a large cluster. A list can be older than an event
already applied, and a watch gap loses DELETED events: ``plan_merge`` decides which version of
each object wins. A list is merged as it is read, one object at a time, so its narrowed objects
are never all alive at once. Plain data structures, no I/O.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TypeVar

from provisioner.core import Claim, Export, StorageClass, Volume, volume_directories

T = TypeVar("T")

MAX_TOMBSTONES = 10_000
"""Recent DELETED events remembered per kind. A tombstone is only needed until a list taken after
its deletion is merged (then it expires); the bound keeps a long standby from growing it."""


def _integer(version: str) -> int | None:
    try:
        return int(version)
    except ValueError:
        return None


def newer(candidate: str, current: str) -> bool:
    """Whether resourceVersion ``candidate`` is later than ``current``.

    The API calls them opaque, but they are etcd revisions, so they are compared as integers
    when both parse. When one does not, the answer is no: what the cache holds wins.
    """
    a, b = _integer(candidate), _integer(current)
    return a is not None and b is not None and a > b


def at_or_before(version: str, list_version: str) -> bool:
    """Whether an object at ``version`` is covered by a list taken at ``list_version``."""
    a, b = _integer(version), _integer(list_version)
    return a is not None and b is not None and a <= b


@dataclass(frozen=True)
class MergePlan:
    put: tuple[str, ...]
    """Listed keys to store: new to the cache, or newer than what it holds."""
    drop: tuple[str, ...]
    """Held keys the list proves gone."""


def _wanted(version: str, held: str | None, tombstone: str | None) -> bool:
    """Whether a listed object at ``version`` replaces what the cache holds (``held``, None when
    nothing), given the version of a DELETED event seen for its key (``tombstone``)."""
    return (held is None or newer(version, held)) and (
        tombstone is None or newer(version, tombstone)
    )


def plan_merge(
    held: Mapping[str, str],
    listed: Mapping[str, str],
    list_version: str,
    tombstones: Mapping[str, str],
) -> MergePlan:
    """Merge a complete list into the cache; every mapping is key -> resourceVersion.

    - A listed object is stored unless the cache holds the same or a newer version (a watch
      event applied after the list was taken), or a watch reported it DELETED at its listed
      version or later (a tombstone): an older list never overwrites a newer event, nor
      resurrects an object the watch saw deleted.
    - A held object absent from the list is dropped when its version is not after the list's:
      it was deleted while nothing watched (kopf re-lists after 410 Gone but reports no DELETED
      for what vanished). One held at a later version was created after the list was taken.

    ``Cache`` applies the same rules while it reads a list (``_merge``), one object at a time.
    """
    put = tuple(
        key
        for key, version in listed.items()
        if _wanted(version, held.get(key), tombstones.get(key))
    )
    drop = tuple(
        key
        for key, version in held.items()
        if key not in listed and at_or_before(version, list_version)
    )
    return MergePlan(put, drop)


class Tombstones:
    """The resourceVersions of recent DELETED watch events, by key, oldest first, bounded."""

    def __init__(self, limit: int = MAX_TOMBSTONES) -> None:
        self._versions: dict[str, str] = {}
        self._limit = limit

    def add(self, key: str, version: str) -> None:
        self._versions.pop(key, None)
        self._versions[key] = version
        while len(self._versions) > self._limit:
            del self._versions[next(iter(self._versions))]

    def expire(self, list_version: str) -> None:
        """Forget the deletions a merged list at ``list_version`` already reflects: every later
        list is taken later still, so it cannot show those objects either."""
        self._versions = {
            key: version
            for key, version in self._versions.items()
            if not at_or_before(version, list_version)
        }

    def view(self) -> Mapping[str, str]:
        return self._versions

    def __len__(self) -> int:
        return len(self._versions)


@dataclass(frozen=True)
class Merged:
    """What merging one list changed."""

    listed: int
    stored: int
    dropped: tuple[str, ...]


def _merge(
    held: Callable[[], Mapping[str, str]],
    listed: Iterable[tuple[str, str, T]],
    list_version: str,
    tombstones: Tombstones,
    put: Callable[[T], None],
    drop: Callable[[str], None],
) -> Merged:
    """``plan_merge``'s rules, applied while ``listed`` (key, resourceVersion, object) is read:
    each object is stored or discarded at once. ``held`` gives the cache's key -> version. A list
    holds a key once, so what one object stores cannot change the decision about another."""
    versions, deleted = held(), tombstones.view()
    seen: set[str] = set()
    stored = 0
    for key, version, item in listed:
        seen.add(key)
        if _wanted(version, versions.get(key), deleted.get(key)):
            put(item)
            stored += 1
    dropped = tuple(
        key
        for key, version in held().items()
        if key not in seen and at_or_before(version, list_version)
    )
    for key in dropped:
        drop(key)
    tombstones.expire(list_version)
    return Merged(listed=len(seen), stored=stored, dropped=dropped)


class _Versions(Mapping[str, str]):
    """The resourceVersion of each held object, read from the objects themselves (no copy)."""

    def __init__(self, objects: Mapping[str, Claim] | Mapping[str, Volume]) -> None:
        self._objects = objects

    def __getitem__(self, key: str) -> str:
        return self._objects[key].resource_version

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._objects))

    def __len__(self) -> int:
        return len(self._objects)


class Cache:
    def __init__(self, export: Export) -> None:
        self.export = export
        """Our NFS server and path: a PV owns a directory here by our annotations or spec.nfs."""
        self._claims: dict[str, Claim] = {}
        self._volumes: dict[str, Volume] = {}
        self._classes: dict[str, StorageClass] = {}
        self._class_versions: dict[str, str] = {}
        # Only claims that may still be provisioned (unbound, not deleting): those a new class
        # lets go ahead. A bound claim never waits for anything.
        self._claims_by_class: defaultdict[str, set[str]] = defaultdict(set)
        # Directory -> PV names and back, as tuples (one name, one directory: the usual case)
        # rather than sets, which cost 200 bytes each even when they hold one string.
        self._volumes_by_dir: dict[str, tuple[str, ...]] = {}
        self._dirs_of_volume: dict[str, tuple[str, ...]] = {}
        # Ancestor -> the recorded directories strictly inside it, so that the overlap check of
        # every provisioning is O(depth), not a scan of every PV. Empty with the default naming
        # (one component); a pathPattern's nesting adds an entry per intermediate directory.
        self._nested: dict[str, set[str]] = {}
        self._deleted_claims = Tombstones()
        self._deleted_volumes = Tombstones()
        self._deleted_classes = Tombstones()

    # --- claims, keyed by uid ------------------------------------------------------------------

    def put_claim(self, claim: Claim) -> None:
        claim = self._paired_claim(claim)
        self.drop_claim(claim.uid)
        self._claims[claim.uid] = claim
        if claim.class_name and not claim.volume_name and not claim.deleting:
            self._claims_by_class[claim.class_name].add(claim.uid)

    def drop_claim(self, uid: str) -> None:
        old = self._claims.pop(uid, None)
        if old is not None and old.class_name and old.class_name in self._claims_by_class:
            members = self._claims_by_class[old.class_name]
            members.discard(uid)
            if not members:
                del self._claims_by_class[old.class_name]

    def _paired_claim(self, claim: Claim) -> Claim:
        """``claim`` holding the very strings its bound PV holds (the PV's name, the uid and name
        in its claimRef), so that a bound pair stores each of them once."""
        volume = self._volumes.get(claim.volume_name) if claim.volume_name else None
        if volume is None or volume.claim_uid != claim.uid or volume.claim_name != claim.name:
            return claim
        return dataclasses.replace(
            claim, uid=volume.claim_uid, name=volume.claim_name, volume_name=volume.name
        )

    def claim_deleted(self, claim: Claim) -> None:
        """A watch DELETED event: drop the claim and remember the deletion (see plan_merge)."""
        self.drop_claim(claim.uid)
        self._deleted_claims.add(claim.uid, claim.resource_version)

    def merge_claims(self, claims: Iterable[Claim], list_version: str) -> Merged:
        """Merge a complete list of claims taken at ``list_version``; returns the dropped uids."""
        return _merge(
            lambda: _Versions(self._claims),
            ((claim.uid, claim.resource_version, claim) for claim in claims),
            list_version,
            self._deleted_claims,
            self.put_claim,
            self.drop_claim,
        )

    def claim(self, uid: str) -> Claim | None:
        return self._claims.get(uid)

    def claims(self) -> Iterator[Claim]:
        return iter(list(self._claims.values()))

    def claims_of_class(self, class_name: str) -> list[str]:
        """Uids of the claims of this class that may still be provisioned (unbound, not being
        deleted): the ones a newly seen class can let go ahead."""
        return sorted(self._claims_by_class.get(class_name, ()))

    # --- volumes, keyed by name ------------------------------------------------------------------

    def put_volume(self, volume: Volume) -> None:
        volume = self._paired_volume(volume)
        self.drop_volume(volume.name)
        self._volumes[volume.name] = volume
        directories = tuple(
            volume.directory if directory == volume.directory else directory
            for directory in sorted(volume_directories(volume, self.export))
        )
        if directories:
            self._dirs_of_volume[volume.name] = directories
        for directory in directories:
            holders = self._volumes_by_dir.get(directory, ())
            self._volumes_by_dir[directory] = (*holders, volume.name)
            if not holders:
                for ancestor in _ancestors(directory):
                    self._nested.setdefault(ancestor, set()).add(directory)

    def _paired_volume(self, volume: Volume) -> Volume:
        """``volume`` holding the very strings its bound claim holds (see ``_paired_claim``)."""
        claim = self._claims.get(volume.claim_uid) if volume.claim_uid else None
        if claim is None or claim.volume_name != volume.name or claim.name != volume.claim_name:
            return volume
        return dataclasses.replace(
            volume, name=claim.volume_name, claim_uid=claim.uid, claim_name=claim.name
        )

    def drop_volume(self, name: str) -> None:
        self._volumes.pop(name, None)
        for directory in self._dirs_of_volume.pop(name, ()):
            members = tuple(n for n in self._volumes_by_dir.get(directory, ()) if n != name)
            if members:
                self._volumes_by_dir[directory] = members
                continue
            self._volumes_by_dir.pop(directory, None)
            for ancestor in _ancestors(directory):
                inside = self._nested.get(ancestor)
                if inside is not None:
                    inside.discard(directory)
                    if not inside:
                        del self._nested[ancestor]

    def volume_deleted(self, volume: Volume) -> bool:
        """A watch DELETED event: drop the PV unless the cache holds a newer one of that name
        (re-created: events of two objects can arrive in either order); remember the deletion.
        Returns whether it was dropped."""
        self._deleted_volumes.add(volume.name, volume.resource_version)
        held = self._volumes.get(volume.name)
        if held is not None and newer(held.resource_version, volume.resource_version):
            return False
        self.drop_volume(volume.name)
        return True

    def merge_volumes(self, volumes: Iterable[Volume], list_version: str) -> Merged:
        """Merge a complete list of PVs taken at ``list_version``; returns the dropped names."""
        return _merge(
            lambda: _Versions(self._volumes),
            ((volume.name, volume.resource_version, volume) for volume in volumes),
            list_version,
            self._deleted_volumes,
            self.put_volume,
            self.drop_volume,
        )

    def volume(self, name: str) -> Volume | None:
        return self._volumes.get(name)

    def volumes(self) -> Iterator[Volume]:
        return iter(list(self._volumes.values()))

    def volumes_recording(self, directory: str) -> set[str]:
        """Names of the PVs that own this directory of our export (core.volume_directories)."""
        return set(self._volumes_by_dir.get(directory, ()))

    def volumes_overlapping(self, directory: str) -> set[str]:
        """PVs whose directory on our export is this one, inside it, or contains it.

        A claim must not get a directory inside another volume's (or around it): that would
        hand one tenant's data to another through a crafted pathPattern input.
        """
        found = self.volumes_recording(directory)
        for ancestor in _ancestors(directory):
            found.update(self._volumes_by_dir.get(ancestor, ()))
        for inside in self._nested.get(directory, ()):
            found.update(self._volumes_by_dir[inside])
        return found

    # --- StorageClasses, keyed by name (core.StorageClass has no version: it is kept here) -------

    def put_class(self, storage_class: StorageClass, resource_version: str = "") -> None:
        self._classes[storage_class.name] = storage_class
        self._class_versions[storage_class.name] = resource_version

    def drop_class(self, name: str) -> None:
        self._classes.pop(name, None)
        self._class_versions.pop(name, None)

    def class_deleted(self, name: str, resource_version: str) -> None:
        """A watch DELETED event: drop the class and remember the deletion (see plan_merge)."""
        self.drop_class(name)
        self._deleted_classes.add(name, resource_version)

    def merge_classes(
        self, classes: Iterable[tuple[StorageClass, str]], list_version: str
    ) -> Merged:
        """Merge a complete list of (StorageClass, resourceVersion) taken at ``list_version``."""
        return _merge(
            lambda: dict(self._class_versions),
            (
                (storage_class.name, version, (storage_class, version))
                for storage_class, version in classes
            ),
            list_version,
            self._deleted_classes,
            lambda item: self.put_class(*item),
            self.drop_class,
        )

    def storage_class(self, name: str | None) -> StorageClass | None:
        return self._classes.get(name) if name else None

    def counts(self) -> tuple[int, int]:
        return len(self._claims), len(self._volumes)


def _ancestors(directory: str) -> Iterator[str]:
    """The proper ancestors of a relative directory: ``a/b/c`` -> ``a``, ``a/b``."""
    end = directory.find("/")
    while end != -1:
        yield directory[:end]
        end = directory.find("/", end + 1)
