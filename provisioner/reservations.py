"""Which directories of the export this process is working on right now, nesting-aware.

SPEC §4: every operation that touches a directory (provisioning, reuse, archive source and
target, delete, adoption, hand-over, the sweep) holds a reservation from its first inspection
until its records and its directory agree. A reservation of ``a/b`` conflicts with one of
``a``, ``a/b`` and ``a/b/c`` held by another holder, not with ``a/c``: a claim can never be
created inside a directory being archived, nor an archive renamed onto a path being claimed.

Conflicts fail at once (``Busy``) instead of waiting: the caller's attempt is retried with
backoff by the work queue, so two holders can never wait on each other. The same holder may
take overlapping reservations (an archive holds its source, then also its target). This table
protects one process; ``exportlocks.py`` extends it to other writers of the export. It is read
from storage's worker threads (``is_free``) as well as the event loop, hence the lock. No I/O.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass


class Busy(Exception):
    """Another operation holds a path that overlaps the one asked for; try again later."""

    def __init__(self, path: str, other: str, holder: str) -> None:
        self.path = path
        self.other = other
        self.holder = holder
        where = "the same directory" if other == path else f'"{other}"'
        super().__init__(
            f'directory "{path}" overlaps {where}, which {holder} is working on right now; '
            "retried when that finishes"
        )


@dataclass(frozen=True)
class Held:
    """What one ``take`` reserved; give it back to ``give_back``."""

    holder: str
    paths: tuple[tuple[str, ...], ...]


class Reservations:
    """Paths held per holder, with a count so that a holder may reserve a path twice."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[tuple[str, ...], Counter[str]] = {}
        # Every prefix of every held path, so a conflict check costs O(depth), not O(held).
        self._prefixes: Counter[tuple[str, ...]] = Counter()

    def take(self, holder: str, paths: Iterable[tuple[str, ...]]) -> Held:
        """Reserve all ``paths`` for ``holder``, or none of them (``Busy``)."""
        wanted = tuple(dict.fromkeys(paths))
        with self._lock:
            for path in wanted:
                conflict = self._conflict(holder, path)
                if conflict is not None:
                    other, who = conflict
                    raise Busy("/".join(path), "/".join(other), who)
            for path in wanted:
                self._held.setdefault(path, Counter())[holder] += 1
                for depth in range(1, len(path) + 1):
                    self._prefixes[path[:depth]] += 1
        return Held(holder, wanted)

    def give_back(self, held: Held) -> None:
        with self._lock:
            for path in held.paths:
                holders = self._held[path]
                holders[held.holder] -= 1
                if holders[held.holder] <= 0:
                    del holders[held.holder]
                if not holders:
                    del self._held[path]
                for depth in range(1, len(path) + 1):
                    self._prefixes[path[:depth]] -= 1
                    if self._prefixes[path[:depth]] <= 0:
                        del self._prefixes[path[:depth]]

    def is_free(self, path: tuple[str, ...], holder: str = "") -> bool:
        """Nothing overlapping ``path`` is held by anyone but ``holder``."""
        with self._lock:
            return self._conflict(holder, path) is None

    def held(self) -> list[tuple[str, str]]:
        """(path, holder) pairs, for tests and diagnostics."""
        with self._lock:
            items = list(self._held.items())
        return sorted(("/".join(path), who) for path, holders in items for who in holders)

    def _conflict(self, holder: str, path: tuple[str, ...]) -> tuple[tuple[str, ...], str] | None:
        # Ancestors and the path itself: direct lookups.
        for depth in range(1, len(path) + 1):
            found = self._other(self._held.get(path[:depth]), holder)
            if found is not None:
                return path[:depth], found
        if self._prefixes[path] == 0:
            return None
        # Something is held strictly inside ``path``: find it (rare, so a scan is fine).
        for other, holders in self._held.items():
            if len(other) > len(path) and other[: len(path)] == path:
                found = self._other(holders, holder)
                if found is not None:
                    return other, found
        return None

    @staticmethod
    def _other(holders: Counter[str] | None, holder: str) -> str | None:
        if not holders:
            return None
        for name in sorted(holders):
            if name != holder:
                return name
        return None
