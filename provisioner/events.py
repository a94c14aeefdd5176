"""Event aggregation, correlation and spam limiting, as client-go's ``EventCorrelator``; pure.

``eventsink.EventRecorder`` asks ``Correlator.plan`` what to do with each Event (create it, patch
the earlier identical one, or drop it) and reports back what the API server answered. Similar
Events (same source, object, type and reason) with many different messages are combined into
one, as client-go's ``EventAggregator`` does, so a claim retried with a changing error message
does not leave a new Event per attempt. No I/O and no clock here: callers pass the monotonic
time, so tests decide what time it is.
"""

from __future__ import annotations

import enum
import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import TypeVar

CORRELATION_WINDOW = 600.0
"""Seconds: an identical Event seen again within this time patches the earlier one."""

SPAM_BURST = 25
"""Events one source may post about one object in a burst (client-go ``defaultSpamBurst``)."""

SPAM_REFILL = 300.0
"""Seconds per regained token after the burst (client-go ``defaultSpamQPS`` = 1/300)."""

CACHE_ENTRIES = 4096
"""Entries kept per cache, least recently used dropped first (client-go ``maxLruCacheEntries``)."""

AGGREGATE_AFTER = 10
"""Distinct messages of similar Events within the window before they are combined (client-go
``defaultAggregateMaxEvents``)."""

AGGREGATE_WINDOW = 600.0
"""Seconds without a similar Event after which the count of distinct messages starts again."""

COMBINED = "(combined from similar events): "
"""The message prefix of a combined Event, as client-go writes it."""

NAME_MAX = 253
"""An Event's name is a DNS subdomain: at most 253 characters."""

_DIGEST = 8

K = TypeVar("K")
V = TypeVar("V")


class Action(enum.Enum):
    CREATE = "create"
    PATCH = "patch"
    DROP = "drop"


@dataclass(frozen=True)
class EventKey:
    """What makes two Events the same one (client-go ``getEventKey``, without fieldPath and
    host, which we never set)."""

    component: str
    kind: str
    namespace: str
    name: str
    uid: str
    api_version: str
    event_type: str
    reason: str
    message: str

    @property
    def similar_key(self) -> tuple[str, ...]:
        """All but the message (client-go ``EventAggregatorByReasonFunc``)."""
        return (*self.spam_key, self.event_type, self.reason)

    @property
    def spam_key(self) -> tuple[str, ...]:
        """Source and object only (client-go ``getSpamKey``): every Event about the object
        shares one token bucket, whatever its type, reason or message."""
        return (self.component, self.kind, self.namespace, self.name, self.uid, self.api_version)


@dataclass(frozen=True)
class Plan:
    """``PATCH``: set ``count`` on the Event ``name``; ``CREATE``: a new Event with count 1 and
    ``message``. ``key`` is what the outcome is recorded under (``Correlator.recorded``): the
    Event's own key, or for a combined Event its key without the message."""

    action: Action
    name: str = ""
    count: int = 1
    key: EventKey | None = field(default=None, compare=False)
    message: str = field(default="", compare=False)


@dataclass(frozen=True)
class _Seen:
    name: str
    count: int
    last: float


@dataclass
class _Bucket:
    tokens: float
    stamp: float


@dataclass
class _Similar:
    messages: set[str]
    last: float


class Correlator:
    """Remembers the Events posted (by key) and a token bucket per source and object."""

    def __init__(
        self,
        window: float = CORRELATION_WINDOW,
        burst: int = SPAM_BURST,
        refill: float = SPAM_REFILL,
        entries: int = CACHE_ENTRIES,
    ) -> None:
        self._window = window
        self._burst = burst
        self._refill = refill
        self._entries = entries
        self._seen: OrderedDict[EventKey, _Seen] = OrderedDict()
        self._buckets: OrderedDict[tuple[str, ...], _Bucket] = OrderedDict()
        self._similar: OrderedDict[tuple[str, ...], _Similar] = OrderedDict()

    def plan(self, key: EventKey, now: float) -> Plan:
        """Spend a token of the object's bucket (none left: DROP); combine the Event with
        similar ones once ``AGGREGATE_AFTER`` distinct messages were seen; then PATCH the Event
        last posted under its key if that was within the window, else CREATE."""
        if not self._take_token(key.spam_key, now):
            return Plan(Action.DROP, key=key)
        key, message = self._aggregate(key, now)
        seen = self._seen.get(key)
        if seen is None or now - seen.last > self._window:
            return Plan(Action.CREATE, key=key, message=message)
        return Plan(Action.PATCH, seen.name, seen.count + 1, key=key, message=message)

    def _aggregate(self, key: EventKey, now: float) -> tuple[EventKey, str]:
        """The key to correlate under and the message to send (client-go ``EventAggregate``)."""
        similar = self._similar.get(key.similar_key)
        if similar is None or now - similar.last > AGGREGATE_WINDOW:
            similar = self._similar[key.similar_key] = _Similar(set(), now)
        similar.messages.add(key.message)
        similar.last = now
        _touch(self._similar, key.similar_key, self._entries)
        if len(similar.messages) < AGGREGATE_AFTER:
            return key, key.message
        similar.messages.discard(key.message)  # bounded: the set never outgrows the threshold
        return replace(key, message=""), f"{COMBINED}{key.message}"

    def recorded(self, key: EventKey, name: str, count: int, now: float) -> None:
        """The API server holds Event ``name`` with ``count`` for ``key`` (created or patched)."""
        self._seen[key] = _Seen(name, count, now)
        _touch(self._seen, key, self._entries)

    def expired(self, key: EventKey) -> None:
        """The Event of ``key`` is gone (its TTL passed): the next one is created anew."""
        self._seen.pop(key, None)

    def _take_token(self, spam_key: tuple[str, ...], now: float) -> bool:
        bucket = self._buckets.get(spam_key)
        if bucket is None:
            bucket = self._buckets[spam_key] = _Bucket(float(self._burst), now)
        elapsed = max(0.0, now - bucket.stamp)
        bucket.tokens = min(float(self._burst), bucket.tokens + elapsed / self._refill)
        bucket.stamp = now
        _touch(self._buckets, spam_key, self._entries)
        if bucket.tokens < 1:
            return False
        bucket.tokens -= 1
        return True


def _touch(cache: OrderedDict[K, V], key: K, entries: int) -> None:
    cache.move_to_end(key)
    while len(cache) > entries:
        cache.popitem(last=False)


def event_name(object_name: str, unique: str) -> str:
    """``<object name>.<unique>`` as client-go names Events, cut to a valid DNS subdomain.

    Object names may be 253 characters themselves: a name too long for the suffix keeps its
    start, loses trailing dots and dashes at the cut (``a.`` + ``.x`` would be an empty label),
    and gains a short digest of the whole name, so two long names differing only at the end
    still give different prefixes. ``unique`` is lower-case hex.
    """
    name = f"{object_name}.{unique}"
    if len(name) <= NAME_MAX:
        return name
    digest = hashlib.sha256(object_name.encode()).hexdigest()[:_DIGEST]
    room = NAME_MAX - len(unique) - len(digest) - 2
    prefix = object_name[: max(0, room)].rstrip(".-")
    return f"{prefix}-{digest}.{unique}" if prefix else f"{digest}.{unique}"
