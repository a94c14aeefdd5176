"""The one part of kopf's internals we rely on, in one place, checked.

kopf keeps a ``ResourceMemory`` per watched object (memo, error throttler, index and daemon
state) for every claim and PV of the cluster; ``@kopf.on.event`` handlers, the only kind we
register, read none of it. ``memories()`` gives ``kopf.operator(memories=...)`` a container that
keeps none (every recall is ephemeral, as kopf's admission webhooks use it). That needs kopf's
private ``kopf._core.reactor.inventory.ResourceMemories``: kopf's public API has no way to say
"no per-object memory" (measured: tests/bench/memory.py with ``make bench HOLD=...``).

A kopf upgrade within ``kopf>=1.45,<2`` may move or change it. ``problems()`` lists what is
missing; tests/unit/test_kopf_compat.py fails with that list, and at run time ``memories()``
falls back to kopf's own container with a warning: the provisioner still works, with more memory
per watched object. Everything else (handlers.py) uses kopf's public API only.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import logging
from typing import TYPE_CHECKING, Any

import kopf

if TYPE_CHECKING:
    from kopf._core.reactor.inventory import ResourceMemories, ResourceMemory

logger = logging.getLogger(__name__)

INVENTORY = "kopf._core.reactor.inventory"
RECALL_PARAMETERS = ("raw_body", "memobase", "noticed_by_listing", "ephemeral")


def problems() -> list[str]:
    """What the installed kopf lacks of what ``memories()`` relies on; empty when all is there."""
    try:
        inventory = importlib.import_module(INVENTORY)
    except ImportError as error:
        return [f"{INVENTORY} cannot be imported ({error})"]
    base = getattr(inventory, "ResourceMemories", None)
    if not isinstance(base, type):
        return [f"{INVENTORY}.ResourceMemories is gone"]
    found: list[str] = []
    recall = getattr(base, "recall", None)
    if recall is None or not inspect.iscoroutinefunction(recall):
        found.append(f"{INVENTORY}.ResourceMemories.recall is gone or no longer a coroutine")
    else:
        parameters = inspect.signature(recall).parameters
        missing = [name for name in RECALL_PARAMETERS if name not in parameters]
        if missing:
            found.append(
                f"{INVENTORY}.ResourceMemories.recall has no parameter {', '.join(missing)}"
            )
    if not hasattr(base, "iter_all_memories"):
        found.append(f"{INVENTORY}.ResourceMemories.iter_all_memories is gone")
    if "memories" not in inspect.signature(kopf.operator).parameters:
        found.append("kopf.operator() takes no memories= argument")
    return found


def memories() -> ResourceMemories | None:
    """A container that remembers nothing per object, or None (kopf's own) if kopf changed."""
    missing = problems()
    if missing:
        logger.warning(
            "kopf %s: %s; using kopf's own per-object memories (more memory per watched claim "
            "and PV). provisioner/kopfcompat.py needs updating for this kopf",
            importlib.metadata.version("kopf"),
            "; ".join(missing),
        )
        return None
    return _memoryless()


def _memoryless() -> ResourceMemories:
    from kopf._core.reactor import inventory

    class Memoryless(inventory.ResourceMemories):
        """Every recall is ephemeral: the memory is made for the event and not kept."""

        async def recall(
            self,
            raw_body: Any,
            *,
            memobase: Any = None,
            noticed_by_listing: bool = False,
            ephemeral: bool = False,
        ) -> ResourceMemory:
            return await super().recall(
                raw_body, memobase=memobase, noticed_by_listing=noticed_by_listing, ephemeral=True
            )

    return Memoryless()
