import random

import pytest

from processors.offsets import OffsetTracker

TP = ("req.high", 0)


def tracked(*offsets: int, tp: tuple[str, int] = TP) -> OffsetTracker:
    tracker = OffsetTracker()
    for offset in offsets:
        tracker.track(*tp, offset)
    return tracker


def test_out_of_order_completion_releases_only_the_finished_prefix():
    t = tracked(0, 1, 2, 3, 4)
    assert t.complete(*TP, 2, "r2") and t.complete(*TP, 1, "r1")
    assert t.release() == ([], {})  # offset 0 is unfinished: nothing may be published or committed
    assert t.held_count() == 2 and t.pending_count() == 3
    t.complete(*TP, 0, "r0")
    t.complete(*TP, 4, "r4")
    assert t.release() == (["r0", "r1", "r2"], {TP: 3})
    assert t.release() == ([], {})
    t.complete(*TP, 3, "r3")
    assert t.release() == (["r3", "r4"], {TP: 5})
    assert t.pending_count() == t.held_count() == 0 and t.lag_by_partition() == {}


def test_gaps_between_tracked_offsets_are_not_missing_records():
    t = tracked(10, 12, 15)
    t.complete(*TP, 12, "r12")
    t.complete(*TP, 10, "r10")
    assert t.release() == (["r10", "r12"], {TP: 13})
    assert t.lag_by_partition() == {TP: 1}
    t.complete(*TP, 15, "r15")
    assert t.release() == (["r15"], {TP: 16})


def test_partitions_advance_independently():
    other = ("req.low", 3)
    t = tracked(0, 1)
    t.track(*other, 7)
    t.track(*other, 8)
    t.complete(*other, 7, "o7")
    t.complete(*TP, 1, "r1")
    assert t.release() == (["o7"], {other: 8})
    assert t.lag_by_partition() == {TP: 2, other: 1}
    assert t.partitions() == [TP, other]


def test_complete_of_unknown_or_repeated_offsets_is_refused():
    t = tracked(0, 1)
    assert not t.complete(*TP, 5, "x")  # never tracked
    assert not t.complete("req.normal", 0, 0, "x")  # unknown partition
    assert t.complete(*TP, 0, "first")
    assert not t.complete(*TP, 0, "second")
    assert t.release() == (["first"], {TP: 1})
    assert not t.complete(*TP, 0, "again")  # already released


def test_a_result_of_none_is_still_a_result():
    t = tracked(0)
    assert t.complete(*TP, 0, None)
    assert t.release() == ([None], {TP: 1})


def test_offsets_must_increase_per_partition():
    t = tracked(5)
    with pytest.raises(ValueError):
        t.track(*TP, 5)
    with pytest.raises(ValueError):
        t.track(*TP, 3)
    t.complete(*TP, 5, "r5")
    t.release()
    with pytest.raises(ValueError):
        t.track(*TP, 4)  # still behind what was consumed, even once released


def test_revoke_forgets_the_partition_and_its_held_results():
    other = ("req.low", 1)
    t = tracked(0, 1, 2)
    t.track(*other, 0)
    t.complete(*TP, 1, "r1")
    t.complete(*TP, 2, "r2")
    t.complete(*other, 0, "o0")
    assert t.revoke([TP, ("req.normal", 9)]) == 3
    assert not t.complete(*TP, 0, "r0")  # late completion from a batch that was in flight
    assert t.release() == (["o0"], {other: 1})
    t.track(*TP, 0)  # reassigned: consumed again from the committed offset
    t.complete(*TP, 0, "r0-again")
    assert t.release() == (["r0-again"], {TP: 1})


def test_clear_forgets_everything():
    t = tracked(0, 1)
    t.complete(*TP, 0, "r0")
    t.clear()
    assert t.release() == ([], {})
    assert t.pending_count() == t.held_count() == 0
    t.track(*TP, 0)  # rewound to the committed offset
    assert t.pending_count() == 1


@pytest.mark.parametrize("seed", range(5))
def test_random_completion_orders_release_each_result_once_in_offset_order(seed):
    rng = random.Random(seed)
    partitions = [("req.high", 0), ("req.high", 1), ("req.low", 0)]
    next_offset = {tp: rng.randint(0, 50) for tp in partitions}
    t = OffsetTracker()
    unfinished: list[tuple[tuple[str, int], int]] = []
    all_tracked: dict[tuple[str, int], list[int]] = {tp: [] for tp in partitions}
    released: dict[tuple[str, int], list[int]] = {tp: [] for tp in partitions}
    committed: dict[tuple[str, int], int] = {}

    def release() -> None:
        results, commits = t.release()
        for tp, offset in results:
            released[tp].append(offset)
        for tp, offset in commits.items():
            assert offset > committed.get(tp, -1), "a committed offset moved backwards"
            assert offset == released[tp][-1] + 1
            committed[tp] = offset
        # whatever is released is exactly a finished prefix of what was tracked
        for tp in partitions:
            assert released[tp] == all_tracked[tp][:len(released[tp])]

    for _ in range(2000):
        action = rng.random()
        if action < 0.45:
            tp = rng.choice(partitions)
            offset = next_offset[tp]
            next_offset[tp] += rng.choice([1, 1, 1, 2, 5])  # gaps: control records, compaction
            t.track(*tp, offset)
            all_tracked[tp].append(offset)
            unfinished.append((tp, offset))
        elif action < 0.9 and unfinished:
            tp, offset = unfinished.pop(rng.randrange(len(unfinished)))
            assert t.complete(*tp, offset, (tp, offset))
        else:
            release()
    for tp, offset in unfinished:
        t.complete(*tp, offset, (tp, offset))
    release()
    assert released == all_tracked
    assert t.pending_count() == t.held_count() == 0
    assert all(committed[tp] == all_tracked[tp][-1] + 1 for tp in partitions if all_tracked[tp])
