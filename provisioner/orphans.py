"""What the leader's sweep does with each provisioning intent it finds: a pure decision.

A provisioner writes an intent (journal.py) before it creates a claim's directory and clears it
once the claim's PV is saved. An intent still on the export at the next leadership means a
crash (or an error) came in between. ``sweep.py`` lists the intents first and every claim and PV
second, then asks ``judge`` about each; the directory is removed with a plain rmdir, so one that
holds anything is kept whatever this module concluded.

Only intents of this provisioner in this cluster are acted on: another cluster sharing the
export cannot be asked whether its claims still exist.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

from provisioner.core import Volume
from provisioner.journal import Intent


class Action(enum.Enum):
    FOREIGN = "foreign"  # another provisioner's or cluster's: not ours to judge
    PENDING = "pending"  # the claim still exists: its reconcile finishes the work
    CLEAR = "clear"  # a PV was saved (or records the directory): only the intent goes
    REMOVE = "remove"  # the claim is gone and nothing records the directory: rmdir it


def _inside(path: str, export_path: str) -> str | None:
    """``path`` relative to ``export_path`` if it lies strictly inside it, else None."""
    root = export_path.rstrip("/") + "/"
    return path[len(root) :].strip("/") or None if path.startswith(root) else None


def used_dirs(volumes: Iterable[Volume], export_path: str) -> set[str]:
    """Every directory any PV points at on this export, by our annotation or spec.nfs.path,
    so a PV written by another provisioner or by hand protects its directory too."""
    used: set[str] = set()
    for volume in volumes:
        if volume.directory and volume.export_path in (None, export_path):
            used.add(volume.directory.strip("/"))
        relative = _inside(volume.nfs_path, export_path) if volume.nfs_path else None
        if relative:
            used.add(relative)
    return used


def judge(
    intent: Intent,
    cluster: str,
    provisioner: str,
    claim_uids: set[str],
    volume_names: set[str],
    used: set[str],
) -> Action:
    if intent.cluster != cluster or intent.provisioner != provisioner:
        return Action.FOREIGN
    if intent.volume in volume_names or intent.directory in used:
        return Action.CLEAR
    if intent.claim_uid in claim_uids:
        return Action.PENDING
    return Action.REMOVE
