"""Unit tests for provisioner.reservations: which directories this process is working on.

SPEC §4: a reservation of ``a/b`` conflicts with ``a``, ``a/b`` and ``a/b/c`` held by another
holder, never with a sibling, and never with the same holder's own reservations. A conflict
fails at once (``Busy``) and takes nothing. No I/O: every test works on a fresh table.
"""

from __future__ import annotations

import threading

import pytest

from provisioner.paths import parts_overlap as overlaps
from provisioner.reservations import Busy, Held, Reservations


def path(value: str) -> tuple[str, ...]:
    return tuple(value.split("/"))


@pytest.fixture
def table() -> Reservations:
    return Reservations()


@pytest.mark.parametrize(
    ("first", "second", "other"),
    [
        pytest.param("ns/app", "ns/app", "ns/app", id="equal"),
        pytest.param("ns", "ns/app", "ns", id="held-is-an-ancestor"),
        pytest.param("ns/app/data", "ns/app", "ns/app/data", id="held-is-a-descendant"),
        pytest.param("ns/app/a/b/c", "ns", "ns/app/a/b/c", id="held-is-a-deep-descendant"),
        pytest.param("ns", "ns/app/a/b/c", "ns", id="held-is-a-far-ancestor"),
    ],
)
def test_an_overlapping_path_of_another_holder_is_busy(
    table: Reservations, first: str, second: str, other: str
) -> None:
    table.take("archive", [path(first)])
    with pytest.raises(Busy) as caught:
        table.take("claim", [path(second)])
    busy = caught.value
    assert (busy.path, busy.other, busy.holder) == (second, other, "archive")
    assert table.held() == [(first, "archive")]
    assert not table.is_free(path(second))
    assert not table.is_free(path(second), holder="claim")


@pytest.mark.parametrize(
    ("first", "second"),
    [
        pytest.param("ns/a", "ns/b", id="siblings"),
        pytest.param("ns/app", "ns/application", id="name-prefix-is-not-a-parent"),
        pytest.param("ns/application", "ns/app", id="name-prefix-the-other-way"),
        pytest.param("ns", "nsx", id="top-level-name-prefix"),
        pytest.param("a/b/c", "a/b/d/e", id="cousins"),
        pytest.param("x/ns/app", "ns/app", id="same-tail-other-root"),
    ],
)
def test_paths_that_do_not_nest_are_held_at_once(
    table: Reservations, first: str, second: str
) -> None:
    table.take("one", [path(first)])
    table.take("two", [path(second)])
    assert table.held() == sorted([(first, "one"), (second, "two")])
    assert table.is_free(path(second), holder="two")
    assert not overlaps(path(first), path(second))


def test_overlaps_is_component_wise_and_symmetric() -> None:
    assert overlaps(path("a/b"), path("a/b/c"))
    assert overlaps(path("a/b/c"), path("a/b"))
    assert overlaps(path("a"), path("a"))
    assert not overlaps(path("a/b"), path("a/bc"))
    assert not overlaps(path("a/bc"), path("a/b"))


def test_the_same_holder_may_reserve_overlapping_paths_again(table: Reservations) -> None:
    source = table.take("release", [path("ns/app")])
    inner = table.take("release", [path("ns/app/data")])
    again = table.take("release", [path("ns/app")])
    outer = table.take("release", [path("ns")])
    assert table.held() == [("ns", "release"), ("ns/app", "release"), ("ns/app/data", "release")]
    for held in (outer, inner, again):
        table.give_back(held)
    # ``ns/app`` was taken twice and given back once: it is still held.
    assert table.held() == [("ns/app", "release")]
    assert not table.is_free(path("ns/app/data"), holder="claim")
    with pytest.raises(Busy):
        table.take("claim", [path("ns")])
    table.give_back(source)
    assert table.held() == []
    assert table.is_free(path("ns/app"))
    table.take("claim", [path("ns")])


def test_a_take_is_all_or_nothing(table: Reservations) -> None:
    table.take("archive", [path("ns/app/data")])
    with pytest.raises(Busy) as caught:
        table.take("claim", [path("free/one"), path("ns/app"), path("free/two")])
    assert caught.value.path == "ns/app"
    assert caught.value.other == "ns/app/data"
    assert table.held() == [("ns/app/data", "archive")]
    assert table.is_free(path("free/one"))
    assert table.is_free(path("free"))
    # Nothing of the refused take lingers, not even in the prefix count behind descendants.
    table.take("third", [path("free")])


def test_a_duplicated_path_in_one_take_is_given_back_in_full(table: Reservations) -> None:
    held = table.take("claim", [path("ns/app"), path("ns/app")])
    assert held == Held("claim", (path("ns/app"),))
    table.give_back(held)
    assert table.held() == []
    assert table.is_free(path("ns"))
    table.take("other", [path("ns")])


def test_is_free_without_a_holder_counts_every_holder(table: Reservations) -> None:
    table.take("claim", [path("ns/app")])
    assert not table.is_free(path("ns/app"))
    assert not table.is_free(path("ns"))
    assert not table.is_free(path("ns/app/x"))
    assert table.is_free(path("ns/other"))
    # With a holder, that holder's own reservations do not count against it.
    assert table.is_free(path("ns"), holder="claim")
    assert table.is_free(path("ns/app/x"), holder="claim")
    assert not table.is_free(path("ns"), holder="someone else")


def test_is_free_finds_another_holder_beside_the_one_asking(table: Reservations) -> None:
    table.take("one", [path("ns/app")])
    table.take("one", [path("ns/app/a")])
    table.take("two", [path("ns/other/deep")])
    assert not table.is_free(path("ns"), holder="one")
    assert not table.is_free(path("ns"), holder="two")
    assert table.is_free(path("ns/app"), holder="one")


def test_busy_names_both_paths_and_the_holder(table: Reservations) -> None:
    table.take("the release of PersistentVolume pvc-1", [path("ns/app/data")])
    with pytest.raises(Busy) as caught:
        table.take("a claim", [path("ns/app")])
    message = str(caught.value)
    assert '"ns/app"' in message
    assert '"ns/app/data"' in message
    assert "the release of PersistentVolume pvc-1" in message


def test_busy_on_the_very_same_path_says_so() -> None:
    error = Busy("ns/app", "ns/app", "a hand-over")
    assert str(error).startswith(
        'directory "ns/app" overlaps the same directory, which a hand-over is working on'
    )


def test_giving_back_frees_the_path_for_other_holders(table: Reservations) -> None:
    held = table.take("one", [path("ns/app"), path("other")])
    table.give_back(held)
    assert table.held() == []
    for value in ("ns", "ns/app", "ns/app/x", "other", "other/y"):
        assert table.is_free(path(value)), value
    table.take("two", [path("ns"), path("other/y")])


def test_two_threads_never_both_take_overlapping_paths(table: Reservations) -> None:
    """``is_free`` runs on storage's threads, ``take`` on the loop: the table is locked."""
    rounds = 300
    wins: list[tuple[int, str]] = []
    barrier = threading.Barrier(2)

    def contend(holder: str, value: str) -> None:
        for number in range(rounds):
            barrier.wait()
            try:
                table.take(holder, [path(f"r{number}/{value}")])  # never given back
            except Busy:
                continue
            wins.append((number, holder))

    one = threading.Thread(target=contend, args=("one", "a"))
    two = threading.Thread(target=contend, args=("two", "a/b"))
    one.start()
    two.start()
    one.join()
    two.join()
    per_round = [sum(1 for number, _ in wins if number == r) for r in range(rounds)]
    assert per_round == [1] * rounds
