"""Which directories on the export a crash left behind: a pure decision, no I/O.

A provisioner that dies after creating a claim's directory but before saving its PV leaves that
directory empty; if the claim is deleted before any provisioner runs again, no PV will ever point
at it. ``sweep.py`` lists the export's top level first and every claim and PV second (so a
directory it saw belongs to a claim that the later list still shows, unless the claim is really
gone) and asks ``orphaned`` which names qualify. The caller removes them with a plain rmdir, so a
directory that holds anything is kept whatever this module concluded.

Only names the default pattern produces (``<namespace>-<pvc>-pvc-<claim uid>``) at the top level
qualify; ``archived-*`` directories and anything a custom ``pathPattern`` made are never touched.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from provisioner.core import Volume

_UID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
_DEFAULT_NAME = re.compile(rf"(?!archived-).+-pvc-(?P<uid>{_UID})")


def claim_uid_of(name: str) -> str | None:
    """The claim uid a default-pattern directory name ends with; None for any other name."""
    match = _DEFAULT_NAME.fullmatch(name)
    return match.group("uid") if match else None


def _inside(path: str, export_path: str) -> str | None:
    """``path`` relative to ``export_path`` if it lies strictly inside it, else None."""
    root = export_path.rstrip("/") + "/"
    return path[len(root) :].strip("/") or None if path.startswith(root) else None


def used_top_dirs(volumes: Iterable[Volume], export_path: str) -> set[str]:
    """The first component of every directory any PV points at on this export.

    Both our recorded directory annotation and ``spec.nfs.path`` count, so a PV written by
    another provisioner or by hand protects its directory too.
    """
    used: set[str] = set()
    for volume in volumes:
        if volume.directory and volume.export_path in (None, export_path):
            used.add(volume.directory.strip("/").split("/")[0])
        relative = _inside(volume.nfs_path, export_path) if volume.nfs_path else None
        if relative:
            used.add(relative.split("/")[0])
    return used


def orphaned(
    dir_names: Iterable[str],
    claim_uids: set[str],
    volume_names: set[str],
    used_dirs: set[str],
) -> list[str]:
    """Top-level directories to try removing: named for a claim that no longer exists, whose
    PV ``pvc-<uid>`` does not exist, and that no PV points at. Sorted, for stable logs."""
    found = []
    for name in dir_names:
        uid = claim_uid_of(name)
        if uid is None or uid in claim_uids or f"pvc-{uid}" in volume_names:
            continue
        if name not in used_dirs:
            found.append(name)
    return sorted(found)
