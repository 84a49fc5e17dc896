"""TurnBatcher (group commit per reactor turn) and Redis Cluster slots: pure unit tests."""

from __future__ import annotations

import pytest

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from improto_server.production.redis_slots import crc16, key_slot, slot_chunks, slot_groups
from improto_server.turn_batcher import TurnBatcher


class Runs:
    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.pending: list[Deferred[list[int]]] = []

    def double(self, items: list[int]) -> Deferred[list[int]]:
        self.batches.append(items)
        return succeed([2 * i for i in items])

    def held(self, items: list[int]) -> Deferred[list[int]]:
        self.batches.append(items)
        d: Deferred[list[int]] = Deferred()
        self.pending.append(d)
        return d


def results(ds: list[Deferred[int]]) -> list[object]:
    out: list[object] = []
    for d in ds:
        d.addBoth(out.append)
    return out


def test_items_of_one_turn_run_as_one_batch_in_order():
    clock, runs = Clock(), Runs()
    b = TurnBatcher(clock, runs.double, max_size=100)
    got = results([b.submit(i) for i in (5, 1, 3)])
    assert runs.batches == [] and got == []  # nothing runs before the turn ends
    clock.advance(0)
    assert runs.batches == [[5, 1, 3]] and got == [10, 2, 6]
    later = results([b.submit(7)])
    clock.advance(0)
    assert runs.batches[-1] == [7] and later == [14] and b.batches == 2


def test_adaptive_an_idle_batcher_runs_at_the_end_of_the_turn_without_a_timer():
    clock, runs = Clock(), Runs()
    b = TurnBatcher(clock, runs.held, max_size=100, adaptive=True)
    first = results([b.submit(1), b.submit(2)])
    assert runs.batches == []
    clock.advance(0)  # no window: the turn's items go at once
    assert runs.batches == [[1, 2]]
    # While that batch runs, items gather, whatever time passes: no timer runs them.
    second = results([b.submit(3)])
    clock.advance(0)
    third = results([b.submit(4), b.submit(5)])
    clock.advance(1.0)
    assert runs.batches == [[1, 2]] and first == [] and second == third == []
    runs.pending[0].callback([10, 20])  # done: what gathered goes together, at once
    assert first == [10, 20] and runs.batches == [[1, 2], [3, 4, 5]]
    runs.pending[1].callback([30, 40, 50])
    assert second + third == [30, 40, 50] and b.batches == 2
    # Idle again: the next item is on its own at the end of its turn.
    fourth = results([b.submit(6)])
    clock.advance(0)
    runs.pending[2].callback([60])
    assert runs.batches[-1] == [6] and fourth == [60]


def test_adaptive_max_size_still_splits_and_a_failure_reaches_its_batch_only():
    clock, runs = Clock(), Runs()
    b = TurnBatcher(clock, runs.held, max_size=2, adaptive=True)
    first = results([b.submit(1), b.submit(2)])  # full: runs at once
    assert runs.batches == [[1, 2]]
    rest = results([b.submit(3)])
    clock.advance(0)
    assert runs.batches == [[1, 2]]  # gathers behind the running batch
    runs.pending[0].errback(RuntimeError("down"))
    assert [type(x).__name__ for x in first] == ["Failure", "Failure"]
    assert runs.batches == [[1, 2], [3]] and rest == []
    runs.pending[1].callback([6])
    assert rest == [6]


def test_a_window_gathers_the_items_of_later_turns_too():
    clock, runs = Clock(), Runs()
    b = TurnBatcher(clock, runs.double, max_size=100, window=0.001)
    first = results([b.submit(1)])
    clock.advance(0.0005)  # later turns, still inside the window of the first item
    second = results([b.submit(2)])
    assert runs.batches == []
    clock.advance(0.0005)
    assert runs.batches == [[1, 2]] and first + second == [2, 4]
    third = results([b.submit(3)])  # the next item opens a new window
    clock.advance(0.0009)
    assert runs.batches == [[1, 2]] and third == []
    clock.advance(0.0001)
    assert runs.batches[-1] == [3] and third == [6]


def test_a_full_batch_runs_at_once_and_the_rest_waits_for_the_turn():
    clock, runs = Clock(), Runs()
    b = TurnBatcher(clock, runs.double, max_size=2)
    got = results([b.submit(i) for i in range(5)])
    assert runs.batches == [[0, 1], [2, 3]] and got == [0, 2, 4, 6]
    clock.advance(0)
    assert runs.batches[-1] == [4] and got[-1] == 8


def test_a_failed_batch_fails_each_item_and_the_next_batch_is_independent():
    clock, runs = Clock(), Runs()
    b = TurnBatcher(clock, runs.held, max_size=10)
    first = results([b.submit(1), b.submit(2)])
    clock.advance(0)
    second = results([b.submit(3)])
    clock.advance(0)
    assert runs.batches == [[1, 2], [3]]  # the second did not wait for the first
    runs.pending[0].errback(RuntimeError("boom"))
    runs.pending[1].callback([30])
    assert [f.value.args for f in first] == [("boom",), ("boom",)]  # type: ignore[union-attr]
    assert second == [30]


def test_a_wrong_number_of_results_fails_the_batch():
    clock = Clock()
    b: TurnBatcher[int, int] = TurnBatcher(clock, lambda items: [1], max_size=10)
    got = results([b.submit(1), b.submit(2)])
    clock.advance(0)
    assert all(isinstance(g.value, RuntimeError) for g in got)  # type: ignore[union-attr]


def test_a_run_that_raises_fails_every_item():
    clock = Clock()
    b: TurnBatcher[int, int] = TurnBatcher(clock, lambda items: fail(KeyError("k")), 10)
    got = results([b.submit(1)])
    clock.advance(0)
    assert isinstance(got[0].value, KeyError)  # type: ignore[attr-defined]
    with pytest.raises(ValueError):
        TurnBatcher(clock, lambda items: items, 0)


def test_crc16_and_slots_match_redis_cluster():
    assert crc16(b"123456789") == 0x31C3  # the check value in the Redis Cluster spec
    assert key_slot("foo") == 12182 and key_slot("bar") == 5061
    assert key_slot("{user1000}.following") == key_slot("{user1000}.followers")
    assert key_slot("foo{}{bar}") == key_slot(b"foo{}{bar}")  # empty tag: the whole key
    assert key_slot("foo{{bar}}zap") == key_slot("{bar")  # the tag is "{bar"
    assert key_slot("foo{bar}{zap}") == key_slot("bar")  # the first tag counts


def test_slot_groups_keep_order_and_split_only_in_cluster_mode():
    keys = [f"p:inbox:{{u{i % 3}}}:meta" for i in range(7)]
    assert slot_groups(keys, str, cluster=False) == [keys]
    groups = slot_groups(keys, str, cluster=True)
    assert sorted(len(g) for g in groups) == [2, 2, 3]
    for g in groups:
        assert len({key_slot(k) for k in g}) == 1
        assert g == [k for k in keys if key_slot(k) == key_slot(g[0])]  # order kept
    assert slot_groups([], str, cluster=True) == [] == slot_groups([], str, cluster=False)


def test_slot_chunks_cut_each_slot_group_in_order():
    keys = [f"p:inbox:{{u{i % 2}}}:meta" for i in range(7)]
    assert slot_chunks(keys, str, cluster=False, size=3) == [keys[0:3], keys[3:6], keys[6:]]
    chunks = slot_chunks(keys, str, cluster=True, size=3)
    assert sorted(len(c) for c in chunks) == [1, 3, 3]
    assert [k for c in chunks for k in c] == [k for g in slot_groups(keys, str, True) for k in g]
    assert slot_chunks([], str, cluster=True, size=3) == []


def test_results_are_handed_out_in_submission_order_across_batches():
    clock, runs = Clock(), Runs()
    b = TurnBatcher(clock, runs.held, max_size=10)
    first = results([b.submit(1)])
    clock.advance(0)
    second = results([b.submit(2)])
    clock.advance(0)
    runs.pending[1].callback([20])  # the second batch's connection answers first
    assert second == [] and first == []  # held back until the first is handed out
    runs.pending[0].callback([10])
    assert first == [10] and second == [20]
    third = results([b.submit(3)])
    clock.advance(0)
    runs.pending[2].errback(RuntimeError("late"))
    assert isinstance(third[0].value, RuntimeError)  # type: ignore[attr-defined]
