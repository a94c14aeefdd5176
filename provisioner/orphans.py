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

from provisioner.core import Export, Volume, volume_directories
from provisioner.journal import Intent


class Action(enum.Enum):
    FOREIGN = "foreign"  # another provisioner's or cluster's: not ours to judge
    PENDING = "pending"  # the claim still exists: its reconcile finishes the work
    CLEAR = "clear"  # a PV was saved (or records the directory): only the intent goes
    REMOVE = "remove"  # the claim is gone and nothing records the directory: rmdir it


def used_dirs(volumes: Iterable[Volume], export: Export) -> set[str]:
    """Every directory of this export any PV points at, by our annotations or by spec.nfs, so a
    PV written by another provisioner or by hand protects its directory too."""
    used: set[str] = set()
    for volume in volumes:
        used |= volume_directories(volume, export)
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
