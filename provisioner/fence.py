"""The fence: may this replica make a side effect now, by its own monotonic clock?

leader.py owns it and moves it forward after every successful renewal; storage.py checks it
before every mutating filesystem call and kube.py before every PersistentVolume write. Without
leader election the fence is always valid. No I/O here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable


class Fenced(Exception):
    """A side effect was refused because the leader lease is not known to be ours."""


class Fence:
    """Valid while ``clock() < valid_until``; ``valid_until`` only ever moves when the elector
    says so. Reads and writes of one float are atomic, so worker threads may check it."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, valid: bool = False) -> None:
        self._clock = clock
        self._valid_until = math.inf if valid else -math.inf

    @classmethod
    def always(cls) -> Fence:
        """The fence of a process that runs without leader election."""
        return cls(valid=True)

    def extend(self, valid_until: float) -> None:
        self._valid_until = valid_until

    def revoke(self) -> None:
        self._valid_until = -math.inf

    def valid(self) -> bool:
        return self._clock() < self._valid_until

    def check(self, action: str) -> None:
        """Raise ``Fenced`` naming ``action`` unless the fence is valid."""
        if not self.valid():
            raise Fenced(
                f"refused to {action}: this replica's leader lease is not known to be valid "
                "(not renewed recently enough); the work is retried by whichever replica leads"
            )
