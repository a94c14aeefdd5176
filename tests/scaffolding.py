"""The provisioner's own directories that a test of "nothing changed" leaves out.

Taking and releasing an export lock (exportlocks.py), or writing and clearing a release's
operation record (journal.Operation), leaves the directories that held them behind, empty.
They are made once per export and change no tenant's data; a file left in them is still seen.
"""

from __future__ import annotations

from provisioner.paths import JOURNAL_DIR

SCAFFOLDING = frozenset(
    {JOURNAL_DIR, f"{JOURNAL_DIR}/locks", f"{JOURNAL_DIR}/operations", f"{JOURNAL_DIR}/tmp"}
)


def is_scaffolding(key: str) -> bool:
    """``key``, relative to the export or to the directory holding it, is one of them."""
    parts = key.split("/")
    return any("/".join(parts[index:]) in SCAFFOLDING for index in range(min(len(parts), 2)))
