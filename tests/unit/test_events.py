"""Event correlation, aggregation, the per-object spam limit and Event names (events.py), as
tables; eventsink.EventRecorder against an in-memory Events endpoint (create, patch, 404, drop); and
eventsink.EventSink: queued, paced by its own budget, never waited for, drops counted."""

from __future__ import annotations

import asyncio
import dataclasses
import re
from typing import Any

import pytest

from provisioner import events
from provisioner.api import NotFound, ObjectRef
from provisioner.events import Action, Correlator, EventKey, Plan
from provisioner.eventsink import EventRecorder, EventSink, PendingEvent

KEY = EventKey(
    component="example.com/nfs_host_1",
    kind="PersistentVolumeClaim",
    namespace="ns",
    name="claim",
    uid="u1",
    api_version="v1",
    event_type="Warning",
    reason="ProvisioningFailed",
    message="mkdir timed out",
)

# DNS-1123 subdomain, as the API server validates Event names.
SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def other(**changes: str) -> EventKey:
    return dataclasses.replace(KEY, **changes)


Step = tuple[float, EventKey]


def replay(steps: list[Step], correlator: Correlator | None = None) -> list[Plan]:
    """Plan each Event at its time and record it as the server would (names e0, e1, ...)."""
    correlator = correlator or Correlator()
    plans = []
    for index, (now, key) in enumerate(steps):
        plan = correlator.plan(key, now)
        plans.append(plan)
        recorded = plan.key or key  # a combined Event is recorded without its message
        if plan.action is Action.CREATE:
            correlator.recorded(recorded, f"e{index}", 1, now)
        elif plan.action is Action.PATCH:
            correlator.recorded(recorded, plan.name, plan.count, now)
    return plans


CORRELATION = [
    pytest.param([(0, KEY)], [Plan(Action.CREATE)], id="first-is-created"),
    pytest.param(
        [(0, KEY), (1, KEY), (2, KEY)],
        [Plan(Action.CREATE), Plan(Action.PATCH, "e0", 2), Plan(Action.PATCH, "e0", 3)],
        id="repeats-patch-count",
    ),
    pytest.param(
        [(0, KEY), (599, KEY), (1198, KEY)],
        [Plan(Action.CREATE), Plan(Action.PATCH, "e0", 2), Plan(Action.PATCH, "e0", 3)],
        id="window-counts-from-the-last-occurrence",
    ),
    pytest.param(
        [(0, KEY), (601, KEY)],
        [Plan(Action.CREATE), Plan(Action.CREATE)],
        id="after-ten-minutes-a-new-event",
    ),
    *(
        pytest.param(
            [(0, KEY), (1, other(**{field: "x"}))],
            [Plan(Action.CREATE), Plan(Action.CREATE)],
            id=f"different-{field}",
        )
        for field in (
            "component",
            "kind",
            "namespace",
            "name",
            "uid",
            "api_version",
            "event_type",
            "reason",
            "message",
        )
    ),
    pytest.param(
        [(0, KEY), (1, other(message="m2")), (2, KEY), (3, other(message="m2"))],
        [
            Plan(Action.CREATE),
            Plan(Action.CREATE),
            Plan(Action.PATCH, "e0", 2),
            Plan(Action.PATCH, "e1", 2),
        ],
        id="interleaved-messages-each-patch-their-own",
    ),
]


@pytest.mark.parametrize(("steps", "expected"), CORRELATION)
def test_correlation(steps: list[Step], expected: list[Plan]) -> None:
    assert replay(steps) == expected


def test_expired_event_is_created_again() -> None:
    correlator = Correlator()
    replay([(0, KEY), (1, KEY)], correlator)
    correlator.expired(KEY)
    assert correlator.plan(KEY, 2) == Plan(Action.CREATE)


def test_server_count_is_followed() -> None:
    correlator = Correlator()
    correlator.recorded(KEY, "e0", 7, 0)
    assert correlator.plan(KEY, 1) == Plan(Action.PATCH, "e0", 8)


SPAM = [
    pytest.param([0.0] * 25, 25, id="burst-of-25-passes"),
    pytest.param([0.0] * 26, 25, id="26th-at-once-is-dropped"),
    pytest.param([0.0] * 30 + [299.0], 25, id="no-token-before-5-minutes"),
    pytest.param([0.0] * 30 + [300.0], 26, id="one-token-per-5-minutes"),
    pytest.param([0.0] * 30 + [300.0, 300.0], 26, id="refill-is-one-not-a-burst"),
    pytest.param([0.0] * 25 + [25 * 300.0] * 30, 50, id="refills-up-to-the-burst"),
    pytest.param([0.0] * 25 + [10**6] * 30, 50, id="never-beyond-the-burst"),
]


@pytest.mark.parametrize(("times", "passed"), SPAM)
def test_spam_limit_per_object(times: list[float], passed: int) -> None:
    plans = replay([(now, KEY) for now in times])
    assert sum(plan.action is not Action.DROP for plan in plans) == passed


def test_spam_limit_counts_patches_and_all_reasons_of_one_object() -> None:
    """client-go's spam key is source + object: type, reason and message share a bucket."""
    keys = [KEY, other(reason="Provisioning", event_type="Normal", message="m")]
    plans = replay([(0, keys[i % 2]) for i in range(26)])
    assert [p.action for p in plans].count(Action.DROP) == 1
    assert plans[-1].action is Action.DROP


def test_spam_limit_is_per_object_and_per_source() -> None:
    correlator = Correlator()
    replay([(0, KEY)] * 25, correlator)
    assert correlator.plan(KEY, 0).action is Action.DROP
    assert correlator.plan(other(uid="u2", name="c2"), 0).action is Action.CREATE
    assert correlator.plan(other(component="another"), 0).action is Action.CREATE


def test_caches_are_bounded() -> None:
    correlator = Correlator(entries=2)
    replay([(0, other(uid=str(i))) for i in range(3)], correlator)
    # The oldest object's Event and bucket were evicted: created again, with a full bucket.
    assert correlator.plan(other(uid="0"), 1) == Plan(Action.CREATE)
    assert correlator.plan(other(uid="2"), 1) == Plan(Action.PATCH, "e2", 2)


LONG = "a" * 253
DOTTED = ("a" * 60 + ".") * 3 + "b" * 70  # 253, with a dot where the cut falls

NAMES = [
    pytest.param("claim", "claim.0123456789abcdef", id="short-as-client-go"),
    pytest.param("a" * 236, "a" * 236 + ".0123456789abcdef", id="exactly-253"),
    pytest.param(LONG, None, id="253-characters"),
    pytest.param(DOTTED, None, id="253-with-dot-at-the-cut"),
    pytest.param("a" * 227 + "-" * 9 + "b" * 17, None, id="dashes-at-the-cut"),
]


@pytest.mark.parametrize(("object_name", "expected"), NAMES)
def test_event_name_is_a_valid_subdomain(object_name: str, expected: str | None) -> None:
    name = events.event_name(object_name, "0123456789abcdef")
    if expected is not None:
        assert name == expected
    assert len(name) <= events.NAME_MAX
    assert SUBDOMAIN.fullmatch(name), name
    assert name.endswith(".0123456789abcdef")
    assert name.startswith(object_name[:100])


def test_long_names_differing_at_the_end_keep_different_prefixes() -> None:
    first = events.event_name("a" * 252 + "x", "00")
    second = events.event_name("a" * 252 + "y", "00")
    assert first != second


class FakeServer:
    """The Events endpoint of an API server, in memory: POST stores, PATCH merges or 404s."""

    def __init__(self) -> None:
        self.events: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, str, str]] = []

    async def request(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json"
    ) -> dict[str, Any]:
        self.calls.append((method, path, content_type))
        if method == "POST":
            self.events[body["metadata"]["name"]] = dict(body)
            return dict(body)
        name = path.rpartition("/")[2]
        if name not in self.events:
            raise NotFound(404, "NotFound", f'events "{name}" not found')
        self.events[name].update(body)
        return dict(self.events[name])


REF = ObjectRef(kind="PersistentVolumeClaim", name="claim", uid="u1", namespace="ns")


def post(recorder: EventRecorder, message: str = "mkdir timed out") -> Action:
    return asyncio.run(
        recorder.record(REF, "Warning", "ProvisioningFailed", message, "example.com/nfs_1")
    )


def test_recorder_patches_repeats_and_recreates_an_expired_event() -> None:
    server = FakeServer()
    recorder = EventRecorder(server.request, clock=lambda: 0.0)
    assert [post(recorder) for _ in range(3)] == [Action.CREATE, Action.PATCH, Action.PATCH]
    (name,) = server.events
    assert server.events[name]["count"] == 3
    assert [c[0] for c in server.calls] == ["POST", "PATCH", "PATCH"]
    assert server.calls[1][2] == "application/strategic-merge-patch+json"
    server.events.clear()  # the Event's TTL passed
    assert post(recorder) == Action.CREATE  # the PATCH found it gone: created anew
    assert [c[0] for c in server.calls[3:]] == ["PATCH", "POST"]
    (fresh,) = server.events
    assert server.events[fresh]["count"] == 1
    assert post(recorder) == Action.PATCH
    assert server.events[fresh]["count"] == 2


def test_recorder_drops_over_the_spam_limit_without_calling_the_api() -> None:
    server = FakeServer()
    recorder = EventRecorder(server.request, clock=lambda: 0.0)
    outcomes = [post(recorder, message=f"m{i % 3}") for i in range(30)]
    assert outcomes.count(Action.DROP) == 5
    assert len(server.calls) == 25
    assert sum(e["count"] for e in server.events.values()) == 25


def test_recorder_names_events_of_long_objects_validly() -> None:
    server = FakeServer()
    recorder = EventRecorder(server.request, clock=lambda: 0.0)
    long_ref = dataclasses.replace(REF, name=DOTTED)
    asyncio.run(recorder.record(long_ref, "Warning", "ProvisioningFailed", "x", "c"))
    (name,) = server.events
    assert len(name) <= 253
    assert SUBDOMAIN.fullmatch(name)


def test_similar_events_are_combined_after_ten_distinct_messages() -> None:
    """client-go's EventAggregator: the 10th distinct message of one source, object, type and
    reason within ten minutes starts a combined Event; later ones patch its count."""
    correlator = Correlator()
    plans = replay([(i, other(message=f"attempt {i}")) for i in range(12)], correlator)
    assert [p.action for p in plans] == [Action.CREATE] * 10 + [Action.PATCH] * 2
    assert all(p.message == f"attempt {i}" for i, p in enumerate(plans[:9]))
    assert plans[9].message == f"{events.COMBINED}attempt 9"
    assert plans[10].name == plans[11].name == "e9"
    assert plans[11].count == 3
    assert correlator.plan(other(reason="Other", message="attempt 1"), 12).action is Action.CREATE


def test_the_distinct_messages_are_counted_again_after_ten_quiet_minutes() -> None:
    correlator = Correlator()
    replay([(i, other(message=f"attempt {i}")) for i in range(9)], correlator)
    plan = correlator.plan(other(message="late"), 8 + events.AGGREGATE_WINDOW + 1)
    assert (plan.action, plan.message) == (Action.CREATE, "late")


class Gate:
    """An Event endpoint that answers only when released, and remembers what it got."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.posted: list[str] = []

    async def post(self, ref: ObjectRef, kind: str, reason: str, message: str, c: str) -> Action:
        await self.open.wait()
        self.posted.append(reason)
        return Action.DROP if reason == "Spam" else Action.CREATE


def pending(reason: str) -> PendingEvent:
    return PendingEvent(REF, "Normal", reason, "m", "c")


def test_the_sink_never_makes_the_caller_wait_and_counts_what_it_drops() -> None:
    async def scenario() -> tuple[list[str], list[tuple[str, str]], int]:
        gate, dropped = Gate(), []
        sink = EventSink(
            gate.post, qps=1000, burst=1000, capacity=3, on_dropped=lambda *d: dropped.append(d)
        )
        sink.emit(pending("First"))
        await asyncio.sleep(0.01)  # "First" is being posted: the endpoint does not answer
        for reason in ("Second", "Spam", "Third", "Fourth"):
            sink.emit(pending(reason))  # returns at once; "Fourth" finds the queue full
        waiting = sink.waiting
        gate.open.set()
        await sink.flush(5)
        sink.close()
        return gate.posted, dropped, waiting

    posted, dropped, waiting = asyncio.run(scenario())
    assert waiting == 3
    assert posted == ["First", "Second", "Spam", "Third"]
    assert dropped == [("Fourth", "queue-full"), ("Spam", "spam")]


def test_the_sink_paces_events_with_its_own_budget() -> None:
    async def scenario() -> list[float]:
        gate = Gate()
        gate.open.set()
        stamps: list[float] = []

        async def post(*event: str | ObjectRef) -> Action:
            stamps.append(asyncio.get_running_loop().time())
            return Action.CREATE

        sink = EventSink(post, qps=20, burst=2)
        for index in range(4):
            sink.emit(pending(f"E{index}"))
        await sink.flush(5)
        sink.close()
        return stamps

    stamps = asyncio.run(scenario())
    assert len(stamps) == 4
    assert stamps[3] - stamps[0] >= 2 / 20 * 0.9  # two beyond the burst, at 20 per second
