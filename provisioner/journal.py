"""The provisioner's own records on the export: provisioning intents and directory owners.

Both live in ``.nfs-provisioner/`` at the export root, outside every volume (paths.py refuses
that name as a claim's directory, so no tenant can reach it):

- ``intents/<pv name>.json``: written and synced before a claim's directory is created, removed
  once its PersistentVolume is saved. After a crash, ``sweep.py`` reads the intents of this
  provisioner and cluster only, and removes the (empty) directory of a claim that is gone.
- ``owners/<d+component>/.../owner.json``: which cluster and namespace a directory was created
  for, in a tree that mirrors the export's (so the records inside or above a directory are one
  walk away). Written before the directory is made, moved just before it when it is archived,
  removed with it. ``ownership.py`` decides reuse from these records.
- ``operations/<pv name>.json``: a release under way (archive or delete), written before its
  first change and removed after its last, so that a retry finishes it and nobody else takes
  its paths meanwhile (``Operation``).
- ``locks/``: the export locks that keep writers apart (exportlocks.py).
- ``tmp/tmp-<writer>-<random>``: each record is written here first and renamed into place. A
  process killed in between leaves its file behind; ``remove_temporaries`` (run by the sweep)
  removes those of one writer, a cluster's provisioner, and never another writer's in flight.

Storage calls these functions inside its timed jobs, on a ``safefs.Tree``. No kopf, kubernetes
or prometheus here.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from provisioner.paths import JOURNAL_DIR
from provisioner.safefs import Tree

INTENTS = (JOURNAL_DIR, "intents")
OWNERS = (JOURNAL_DIR, "owners")
SCRATCH = (JOURNAL_DIR, "tmp")
RECORD = "owner.json"
_MAX_MIRROR_NAME = 255
_VERSION = 1


def timestamp() -> str:
    """Now, as records and PV annotations write it (RFC 3339, UTC, seconds)."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Owner:
    """Who a directory on the export belongs to: a namespace of one cluster."""

    cluster: str
    namespace: str
    provisioner: str = ""
    volume: str = ""
    """The PersistentVolume it was created for; empty when an admin handed it over."""
    since: str = ""

    def same_tenant(self, other: Owner) -> bool:
        return (self.cluster, self.namespace) == (other.cluster, other.namespace)

    def describe(self) -> str:
        return f'namespace "{self.namespace}" (cluster {self.cluster or "unknown"})'


UNREADABLE = Owner(cluster="", namespace="<unreadable owner record>")
"""Stands for a record that exists but cannot be parsed: it matches no tenant."""


@dataclass(frozen=True)
class Intent:
    """A directory about to be created for a claim whose PersistentVolume is not saved yet."""

    volume: str
    namespace: str
    claim: str
    claim_uid: str
    directory: str
    cluster: str
    provisioner: str
    since: str = ""


def mirror_name(component: str) -> str:
    """The mirror tree's name for one path component: ``d<component>``, or ``h<sha256>`` when
    that would be too long. Neither can be ``owner.json`` or a temporary file's name."""
    name = f"d{component}"
    if len(name.encode("utf-8", "surrogatepass")) <= _MAX_MIRROR_NAME:
        return name
    return "h" + hashlib.sha256(component.encode("utf-8", "surrogatepass")).hexdigest()


def component_of(mirror: str) -> str | None:
    """The path component a mirror name stands for; None for a hashed one."""
    return mirror[1:] if mirror.startswith("d") else None


def mirror_of(parts: Sequence[str]) -> tuple[str, ...]:
    return (*OWNERS, *(mirror_name(part) for part in parts))


def writer_prefix(cluster: str, provisioner: str) -> str:
    """The prefix of the temporary files one writer (a cluster's provisioner) creates."""
    digest = hashlib.sha256(f"{cluster}\0{provisioner}".encode()).hexdigest()[:16]
    return f"tmp-{digest}-"


def _write_record(
    tree: Tree,
    parts: Sequence[str],
    name: str,
    record: Owner | Intent | Operation,
    replace: bool = True,
) -> None:
    write_as(tree, parts, name, _encode(record), record.cluster, record.provisioner, replace)


def write_as(
    tree: Tree,
    parts: Sequence[str],
    name: str,
    data: bytes,
    cluster: str,
    provisioner: str,
    replace: bool = True,
) -> None:
    """Write the file ``name`` in ``parts`` atomically, through this writer's temporary file in
    the scratch directory (so that ``remove_temporaries`` finds it if the writer is killed)."""
    os.close(tree.make_dirs(SCRATCH)[0])
    tree.write_file(
        parts,
        name,
        data,
        replace=replace,
        scratch=SCRATCH,
        prefix=writer_prefix(cluster, provisioner),
    )


def remove_temporaries(tree: Tree, cluster: str, provisioner: str) -> list[str]:
    """Remove the temporary files this writer left when it was killed mid-write; their names.

    Call it only when no write of this writer can be in flight (the sweep runs before the
    leader's work queue starts)."""
    prefix = writer_prefix(cluster, provisioner)
    removed = []
    for name in tree.list_files(SCRATCH):
        if name.startswith(prefix) and tree.remove_file(SCRATCH, name):
            removed.append(name)
    return removed


def _encode(value: object) -> bytes:
    return (json.dumps({"version": _VERSION, **asdict(value)}, sort_keys=True) + "\n").encode()  # type: ignore[call-overload]


def _decode_owner(raw: bytes) -> Owner:
    try:
        data = json.loads(raw)
        return Owner(
            cluster=str(data["cluster"]),
            namespace=str(data["namespace"]),
            provisioner=str(data.get("provisioner", "")),
            volume=str(data.get("volume", "")),
            since=str(data.get("since", "")),
        )
    except (ValueError, KeyError, TypeError):
        return UNREADABLE


# --- owners --------------------------------------------------------------------------------------


def read_owner(tree: Tree, parts: Sequence[str]) -> Owner | None:
    raw = tree.read_file(mirror_of(parts), RECORD)
    return None if raw is None else _decode_owner(raw)


def write_owner(tree: Tree, parts: Sequence[str], owner: Owner) -> None:
    os.close(tree.make_dirs(mirror_of(parts))[0])
    _write_record(tree, mirror_of(parts), RECORD, owner)


def create_owner(tree: Tree, parts: Sequence[str], owner: Owner) -> bool:
    """Write the record only where there is none; False (nothing changed) if one exists."""
    os.close(tree.make_dirs(mirror_of(parts))[0])
    try:
        _write_record(tree, mirror_of(parts), RECORD, owner, replace=False)
    except FileExistsError:
        return False
    return True


def remove_owner(tree: Tree, parts: Sequence[str]) -> bool:
    """Remove the record of ``parts`` itself (not those below it)."""
    return tree.remove_file(mirror_of(parts), RECORD)


def remove_owners(tree: Tree, parts: Sequence[str]) -> None:
    """Forget the records of ``parts`` and of everything below it (the directory is gone)."""
    with contextlib.suppress(FileNotFoundError):
        tree.remove_tree(mirror_of(parts))


def move_owners(tree: Tree, parts: Sequence[str], target: Sequence[str]) -> bool:
    """Move the records of ``parts`` (and below) to ``target``, a sibling, after the directory
    itself was renamed there; False if ``parts`` had none. Records found at ``target`` are
    replaced: the caller holds the reservation covering both and has judged them stale (an
    ``Operation`` says which records belong where, so no one else ever does)."""
    parent = mirror_of(parts[:-1])
    try:
        return tree.rename_dir(parent, mirror_name(parts[-1]), mirror_name(target[-1]))
    except FileExistsError:
        tree.remove_tree(mirror_of(target))
        return tree.rename_dir(parent, mirror_name(parts[-1]), mirror_name(target[-1]))
    except FileNotFoundError:
        return False  # no record, not even for the parent


def has_records(tree: Tree, parts: Sequence[str]) -> bool:
    """Whether anything is recorded at or below ``parts`` (a mirror directory exists)."""
    try:
        return tree.entry(mirror_of(parts)) is not None
    except FileNotFoundError:
        return False


def owners_above(tree: Tree, parts: Sequence[str]) -> list[tuple[str, Owner]]:
    """Records of the directories strictly above ``parts``, outermost first."""
    found = []
    for depth in range(1, len(parts)):
        owner = read_owner(tree, parts[:depth])
        if owner is not None:
            found.append(("/".join(parts[:depth]), owner))
    return found


SCAN_LIMIT = 10000
"""Directories of the owner tree one scan below a path visits at most (see ``scan_below``)."""


def owners_below(
    tree: Tree, parts: Sequence[str], limit: int = SCAN_LIMIT
) -> list[tuple[str, Owner]]:
    """Records of the directories strictly inside ``parts`` (at most ``limit`` visited)."""
    return scan_below(tree, parts, limit)[0]


def scan_below(
    tree: Tree, parts: Sequence[str], limit: int = SCAN_LIMIT
) -> tuple[list[tuple[str, Owner]], bool]:
    """Records strictly inside ``parts``, and whether the scan saw all of them: it stops after
    visiting ``limit`` directories of the owner tree, and a decision that relies on it must
    then fail closed (SPEC §4)."""
    found: list[tuple[str, Owner]] = []
    pending: list[tuple[tuple[str, ...], str]] = [(mirror_of(parts), "/".join(parts))]
    visited = 0
    while pending:
        mirror, shown = pending.pop()
        try:
            children = tree.list_dirs(mirror)
        except FileNotFoundError:
            continue
        for child in children:
            if visited >= limit:
                return found, False
            visited += 1
            component = component_of(child)
            child_shown = f"{shown}/{component if component is not None else '<long name>'}"
            raw = tree.read_file((*mirror, child), RECORD)
            if raw is not None:
                found.append((child_shown, _decode_owner(raw)))
            pending.append(((*mirror, child), child_shown))
    return found, True


# --- operations under way ------------------------------------------------------------------------


@dataclass(frozen=True)
class Operation:
    """A release under way on the export: ``archive`` renames ``source`` to ``target``,
    ``delete`` removes ``source``; written before the first change, removed after the last.

    It says which records belong where while directory and records disagree (an archive whose
    rename failed or was interrupted, a delete half done): the retry for ``volume`` finishes
    it, and every other operation treats both paths as taken until then.
    """

    volume: str
    kind: str
    source: str
    target: str = ""
    cluster: str = ""
    provisioner: str = ""
    since: str = ""

    def paths(self) -> tuple[str, ...]:
        return (self.source, self.target) if self.target else (self.source,)

    def describe(self) -> str:
        if self.kind == "archive":
            return (
                f'the archive of "{self.source}" as "{self.target}" for PersistentVolume '
                f"{self.volume}"
            )
        return f'the delete of "{self.source}" for PersistentVolume {self.volume}'


OPERATIONS = (JOURNAL_DIR, "operations")


def write_operation(tree: Tree, operation: Operation) -> None:
    os.close(tree.make_dirs(OPERATIONS)[0])
    _write_record(tree, OPERATIONS, f"{operation.volume}.json", operation)


def clear_operation(tree: Tree, volume: str) -> bool:
    return tree.remove_file(OPERATIONS, f"{volume}.json")


def _decode_operation(raw: bytes) -> Operation | None:
    try:
        data = json.loads(raw)
        return Operation(
            **{key: str(data[key]) for key in Operation.__dataclass_fields__ if key in data}
        )
    except (ValueError, TypeError):
        return None


def read_operation(tree: Tree, volume: str) -> Operation | None:
    raw = tree.read_file(OPERATIONS, f"{volume}.json")
    return None if raw is None else _decode_operation(raw)


def read_operations(tree: Tree) -> list[Operation]:
    """Every operation under way on the export; an unreadable record blocks nothing here (the
    sweep logs it), as its paths are unknown."""
    found = []
    for name in tree.list_files(OPERATIONS):
        if name.endswith(".json"):
            raw = tree.read_file(OPERATIONS, name)
            operation = None if raw is None else _decode_operation(raw)
            if operation is not None:
                found.append(operation)
    return found


# --- intents -------------------------------------------------------------------------------------


def write_intent(tree: Tree, intent: Intent) -> None:
    os.close(tree.make_dirs(INTENTS)[0])
    _write_record(tree, INTENTS, f"{intent.volume}.json", intent)


def clear_intent(tree: Tree, volume: str) -> bool:
    return tree.remove_file(INTENTS, f"{volume}.json")


def read_intents(tree: Tree) -> tuple[list[Intent], list[str]]:
    """Every intent on the export, and the names of the files that could not be parsed."""
    intents: list[Intent] = []
    unreadable: list[str] = []
    for name in tree.list_files(INTENTS):
        if not name.endswith(".json"):
            continue
        raw = tree.read_file(INTENTS, name)
        if raw is None:
            continue
        try:
            data = json.loads(raw)
            intents.append(
                Intent(
                    **{key: str(data[key]) for key in Intent.__dataclass_fields__ if key in data}
                )
            )
        except (ValueError, TypeError):
            unreadable.append(name)
    return intents, unreadable
