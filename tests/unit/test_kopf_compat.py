"""The kopf internals provisioner/kopfcompat.py relies on are still there, and still save memory.

A kopf upgrade that moves ``kopf._core.reactor.inventory.ResourceMemories`` or changes its
``recall`` fails here with the list of what changed, before a release ships without the saving.
"""

from __future__ import annotations

import asyncio
import importlib
from typing import Any

import pytest

from provisioner import kopfcompat

BODY = {"apiVersion": "v1", "kind": "PersistentVolumeClaim"}


def _body(uid: str) -> Any:  # a kopf RawBody
    return {**BODY, "metadata": {"uid": uid, "name": uid, "namespace": "default"}}


def test_the_installed_kopf_has_what_kopfcompat_relies_on() -> None:
    missing = kopfcompat.problems()
    assert not missing, (
        "the installed kopf no longer has what provisioner/kopfcompat.py relies on: "
        + "; ".join(missing)
        + ". Update kopfcompat (or pin kopf below this version in setup.cfg)."
    )


def test_the_container_keeps_no_memory_per_object_where_kopfs_keeps_one() -> None:
    inventory = importlib.import_module(kopfcompat.INVENTORY)
    ours = kopfcompat.memories()
    assert ours is not None
    theirs = inventory.ResourceMemories()

    async def recall_all() -> None:
        for uid in ("u1", "u2", "u1"):
            await ours.recall(_body(uid))
            await theirs.recall(_body(uid))

    asyncio.run(recall_all())
    assert list(ours.iter_all_memories()) == []
    assert len(list(theirs.iter_all_memories())) == 2


def test_a_kopf_without_the_internals_falls_back_to_its_own_memories(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(kopfcompat, "INVENTORY", "kopf._core.reactor.no_such_module")
    assert kopfcompat.problems() == [
        "kopf._core.reactor.no_such_module cannot be imported "
        "(No module named 'kopf._core.reactor.no_such_module')"
    ]
    assert kopfcompat.memories() is None
