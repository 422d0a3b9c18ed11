import itertools
import random
from typing import Any

import pytest

from processors.batching import PRIORITIES, CompatKey, Pending
from processors.scheduler import Scheduler, SchedulerConfig

KEY = CompatKey("z-image-turbo", "v1", 1024, 1024, 8, 0.0)
OTHER_KEY = CompatKey("z-image-turbo", "v1", 768, 1344, 8, 0.0)
_offsets = itertools.count()


def req(rid: str, priority: str = "normal", at: float = 0.0, key: CompatKey = KEY, cost: int = 1,
        deadline: float | None = None, partition: int = 0) -> Pending:
    return Pending(request_id=rid, priority=priority, key=key, source=(f"req.{priority}", partition, next(_offsets)),
                   enqueued_at=at, deadline=deadline, payload=None, cost=cost)


def make(**overrides) -> Scheduler:
    settings: dict[str, Any] = dict(max_batch_size=4, max_wait_s=0.1, capacity_per_priority=100_000, min_share={},
                                    aging_s=None)
    settings.update(overrides)
    counter = itertools.count()
    return Scheduler(SchedulerConfig(**settings), new_batch_id=lambda: f"w1-{next(counter)}")


def ids(batch) -> list[str]:
    return [item.request_id for item in batch.items]


# ---- configuration ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [
    dict(max_batch_size=0), dict(max_batch_size=2.5), dict(max_wait_s=-1), dict(max_wait_s=float("nan")),
    dict(capacity_per_priority=0), dict(capacity_per_priority={"high": 10, "normal": 10}),
    dict(min_share={"high": 0.1}), dict(min_share={"low": 1.0}), dict(min_share={"normal": 0.6, "low": 0.5}),
    dict(aging_s=0), dict(share_patience_s=-1), dict(share_patience_s=float("inf")), dict(share_patience_s=True),
    dict(fetch_wait_s=-0.5), dict(fetch_wait_s=float("nan")), dict(fetch_wait_s="0.5"),
    dict(arrival_window_s=0), dict(arrival_window_s=float("inf")),
])
def test_config_rejects_invalid_values(overrides):
    with pytest.raises(ValueError):
        SchedulerConfig(**overrides)


def test_config_capacity_per_class():
    config = SchedulerConfig(capacity_per_priority={"high": 5, "normal": 3, "low": 1})
    assert [config.capacity(p) for p in PRIORITIES] == [5, 3, 1]
    assert SchedulerConfig(capacity_per_priority=7).capacity("low") == 7


# ---- choosing the class ---------------------------------------------------------------------------------------

def test_strict_priority_without_share_or_aging():
    s = make(max_batch_size=1, max_wait_s=0)
    for rid, priority in [("l1", "low"), ("n1", "normal"), ("h1", "high"), ("n2", "normal"), ("h2", "high")]:
        s.offer(req(rid, priority, key=KEY if rid != "h2" else OTHER_KEY))
    served = [ids(s.next_batch(1.0))[0] for _ in range(5)]
    assert served == ["h1", "h2", "n1", "n2", "l1"]
    assert s.next_batch(1.0) is None


def test_aging_lifts_low_past_normal_but_never_past_high():
    s = make(max_batch_size=1, max_wait_s=0, aging_s=10.0)
    s.offer(req("l-old", "low", at=0.0))
    for i in range(5):
        s.offer(req(f"n{i}", "normal", at=14.0 + i))
    assert s.choose_class(now=15.0) == "normal"  # low aged one level: ties with normal, normal wins
    assert ids(s.next_batch(15.0)) == ["n0"]
    s.offer(req("h1", "high", at=20.0))
    assert ids(s.next_batch(20.0)) == ["h1"]  # low aged to the top level still yields to high
    assert ids(s.next_batch(20.0)) == ["l-old"]  # two levels up: ahead of the fresh normal requests
    assert ids(s.next_batch(20.0)) == ["n1"]


def test_without_aging_a_waiting_low_request_stays_behind_normal():
    s = make(max_batch_size=1, max_wait_s=0, aging_s=None)
    s.offer(req("l-old", "low", at=0.0))
    s.offer(req("n1", "normal", at=500.0))
    assert ids(s.next_batch(1000.0)) == ["n1"]


def simulate_saturating_high(s: Scheduler, batches: int, lower: tuple[str, ...]) -> dict[str, int]:
    """High alone saturates the renderer; each lower class keeps a steady backlog. Returns images served."""
    rng = random.Random(3)
    served = {p: 0 for p in PRIORITIES}
    now = 0.0
    counter = itertools.count()
    for _ in range(batches):
        for priority in ("high", *lower):
            while s.queue_lengths()[priority] < 12:
                s.offer(req(f"{priority}-{next(counter)}", priority, at=now, cost=rng.randint(1, 2)))
        batch = s.next_batch(now, flush=True)
        for item in batch.items:
            served[item.priority] += item.cost
        now += 1.0
    return served


def test_min_share_gives_low_its_share_under_a_saturating_high_load():
    s = make(max_batch_size=4, min_share={"low": 0.1}, share_patience_s=2.0)
    served = simulate_saturating_high(s, batches=3000, lower=("low",))
    total = sum(served.values())
    assert served["low"] / total >= 0.1 - 0.01
    assert served["high"] / total >= 0.8


def test_min_share_for_normal_and_low_together():
    s = make(max_batch_size=4, min_share={"normal": 0.2, "low": 0.1}, share_patience_s=2.0)
    served = simulate_saturating_high(s, batches=3000, lower=("normal", "low"))
    total = sum(served.values())
    assert abs(served["normal"] / total - 0.2) < 0.01
    assert abs(served["low"] / total - 0.1) < 0.01
    # the counters stay bounded: neither class is carried far above or below its share
    assert all(-4 <= deficit <= 4 for deficit in s.share_deficits().values())


def test_patience_delays_the_share_but_does_not_reduce_it():
    impatient = simulate_saturating_high(make(min_share={"low": 0.1}, share_patience_s=0), 1000, ("low",))
    patient = simulate_saturating_high(make(min_share={"low": 0.1}, share_patience_s=30.0), 1000, ("low",))
    assert abs(impatient["low"] - patient["low"]) <= 8  # 30 batches of patience are paid back in full


def test_without_min_share_low_starves_under_a_saturating_high_load():
    served = simulate_saturating_high(make(max_batch_size=4, min_share={}), batches=500, lower=("low",))
    assert served["low"] == 0


def test_with_no_lower_load_high_gets_everything():
    s = make(max_batch_size=4, min_share={"normal": 0.2, "low": 0.1})
    served = simulate_saturating_high(s, batches=300, lower=())
    assert served["normal"] == served["low"] == 0 and served["high"] > 0


def test_high_behind_a_backlog_of_ten_thousand_low_is_served_next():
    s = make(max_batch_size=4, max_wait_s=0.1, min_share={"low": 0.1}, aging_s=1.0)
    for i in range(10_000):
        s.offer(req(f"l{i}", "low", at=0.0, key=KEY if i % 3 else OTHER_KEY))
    for _ in range(5):
        assert s.next_batch(50.0).items[0].priority == "low"
    s.offer(req("h1", "high", at=50.0))
    batch = s.next_batch(50.0)  # headed by h1, filled up with low requests of its key
    assert ids(batch)[0] == "h1" and batch.reason == "full"
    assert {item.key for item in batch.items} == {KEY}
    s.offer(req("h2", "high", at=60.0, key=CompatKey("z-image", "v2", 512, 512, 30, 4.0)))
    assert s.next_batch(60.0) is None  # h2's batch may still fill; low does not jump in meanwhile
    batch = s.next_batch(60.1)
    assert ids(batch) == ["h2"] and batch.reason == "timeout"


def test_low_arriving_after_a_window_of_highs_waits_out_its_patience():
    s = make(max_batch_size=2, max_wait_s=0, min_share={"low": 0.1}, share_patience_s=2.0)
    for i in range(40):
        s.offer(req(f"h{i}", "high"))
    for _ in range(10):
        s.next_batch(0.0)  # 20 high images and no low: nothing is owed for them
    for i in range(100):
        s.offer(req(f"l{i}", "low", key=OTHER_KEY, at=1.0))
    for now in (1.0, 1.4, 1.8, 2.2, 2.6):  # contention began at 1.0: low is below its share, not yet owed
        assert s.next_batch(now).items[0].priority == "high"
    assert s.share_deficits()["low"] == pytest.approx(1.0)
    assert s.next_batch(3.0).items[0].priority == "low"  # below its share for 2 s of contention
    assert s.next_batch(3.0).items[0].priority == "high"  # paid back with a surplus of 0.8 images


def test_a_class_served_alone_ends_its_contention_and_owes_nothing_later():
    s = make(max_batch_size=2, max_wait_s=0, min_share={"low": 0.1}, share_patience_s=1.0)
    for i in range(30):
        s.offer(req(f"l{i}", "low", key=OTHER_KEY))
    s.offer(req("h0", "high"))
    assert ids(s.next_batch(0.0)) == ["h0"]  # contention: low falls below its share
    assert s.share_deficits()["low"] > 0
    for t in range(1, 6):
        assert s.next_batch(float(t)).items[0].priority == "low"  # alone, it gets everything
    assert s.share_deficits()["low"] == 0
    for i in range(6):
        s.offer(req(f"h{i + 1}", "high", at=10.0))
    served = [s.next_batch(10.0 + 0.1 * step).items[0].priority for step in range(4)]
    assert served == ["high", "high", "high", "low"]


def test_an_owed_class_waits_for_a_filling_batch_only_until_its_patience_ends():
    s = make(max_batch_size=2, max_wait_s=5.0, min_share={"low": 0.1}, share_patience_s=1.0)
    for rid in ("h1", "h2"):
        s.offer(req(rid, "high"))
    for rid in ("l1", "l2"):
        s.offer(req(rid, "low", key=OTHER_KEY))
    assert ids(s.next_batch(0.0)) == ["h1", "h2"]
    s.offer(req("h3", "high"))  # its batch would wait until 5.0 to fill...
    assert s.next_batch(0.5) is None
    assert s.time_until_ready(0.5) == pytest.approx(0.5)  # ...but low is owed at 1.0
    assert ids(s.next_batch(1.0)) == ["l1", "l2"]


# ---- forming and timing batches -------------------------------------------------------------------------------

def test_batch_waits_for_max_wait_unless_full_or_flushed():
    s = make(max_batch_size=3, max_wait_s=0.5)
    s.offer(req("a", at=10.0))
    s.offer(req("b", at=10.2))
    assert s.next_batch(10.3) is None
    assert s.time_until_ready(10.3) == pytest.approx(0.2)
    batch = s.next_batch(10.5)
    assert ids(batch) == ["a", "b"] and batch.reason == "timeout" and batch.formed_at == 10.5
    s.offer(req("c", at=11.0))
    assert ids(s.next_batch(11.0, flush=True)) == ["c"]
    for rid in "def":
        s.offer(req(rid, at=12.0))
    assert s.time_until_ready(12.0) == 0.0
    batch = s.next_batch(12.0)
    assert ids(batch) == ["d", "e", "f"] and batch.reason == "full"
    assert s.time_until_ready(12.0) is None and s.next_batch(12.0) is None


def test_a_head_that_nothing_is_likely_to_join_goes_at_once():
    s = make(max_batch_size=4, max_wait_s=0.05, arrival_window_s=1.0)
    s.offer(req("alone", at=100.0))  # the first request after a quiet spell
    assert s.time_until_ready(100.0) == 0.0
    batch = s.next_batch(100.0)
    assert ids(batch) == ["alone"] and batch.reason == "sparse"
    # a steady 20 requests/s: one more is expected every 50 ms, so a 50 ms wait is mostly in vain
    for i in range(40):
        s.offer(req(f"slow{i}", at=101.0 + i * 0.05))
        assert ids(s.next_batch(101.0 + i * 0.05)) == [f"slow{i}"]


def test_a_head_waits_when_arrivals_are_frequent_or_records_are_still_in_kafka():
    s = make(max_batch_size=64, max_wait_s=0.05, arrival_window_s=1.0)
    for i in range(500):  # 1,000 requests/s for half a second: about 20 more expected within 50 ms
        s.offer(req(f"r{i}", at=i * 0.001))
    assert s.next_batch(0.499).reason == "full"
    while s.next_batch(0.499, flush=True) is not None:
        pass
    s.offer(req("fresh", at=0.5))
    assert s.next_batch(0.5) is None  # it waits to fill
    wake = s.time_until_ready(0.5)
    assert wake is not None and 0.04 < wake < 0.05
    quiet = make(max_batch_size=4, max_wait_s=0.05, arrival_window_s=1.0)
    quiet.set_unfetched("normal", True, 10.0)  # more of it is on its way from Kafka
    quiet.offer(req("first", at=10.0))
    assert quiet.next_batch(10.0) is None and quiet.time_until_ready(10.0) == pytest.approx(0.05)
    quiet.set_unfetched("normal", False, 10.01)
    assert quiet.next_batch(10.01).reason == "sparse"


def test_the_expected_arrivals_decay_until_the_head_goes_before_max_wait():
    s = make(max_batch_size=8, max_wait_s=0.1, arrival_window_s=1.0)
    for i in range(30):  # 30 requests/s for a second: 3 expected in a 100 ms wait
        s.offer(req(f"r{i}", at=i / 30))
        s.next_batch(i / 30, flush=True)
    s.offer(req("head", at=1.0))  # about 20 requests/s over the last second: 2 expected in 100 ms
    assert s.next_batch(1.0) is None
    wake = s.time_until_ready(1.0)
    assert wake is not None and 0.02 < wake < 0.1  # sooner than max_wait: the wait left falls under one expected gap
    assert s.next_batch(1.0 + wake + 1e-6).reason == "sparse"


def test_a_flushed_batch_says_so_and_ids_come_from_the_factory():
    s = make(max_batch_size=3, max_wait_s=5.0)
    s.offer(req("a", at=0.0))
    batch = s.next_batch(1.0, flush=True)
    assert batch.reason == "flush" and batch.id == "w1-0"


def test_cost_accounting_and_oversized_requests():
    s = make(max_batch_size=4, max_wait_s=10.0)
    s.offer(req("big", cost=6))
    s.offer(req("c3", cost=3))
    s.offer(req("c2", cost=2))
    s.offer(req("c1", cost=1))
    first = s.next_batch(0.0)
    assert ids(first) == ["big"] and first.reason == "full"
    second = s.next_batch(0.0)
    assert ids(second) == ["c3"] and second.reason == "full"  # c2 left over: waiting cannot help
    assert s.next_batch(0.0) is None  # c2 + c1 = 3 < 4: waits for more
    assert ids(s.next_batch(10.0)) == ["c2", "c1"]


def test_a_batch_never_mixes_compat_keys():
    rng = random.Random(11)
    keys = [KEY, OTHER_KEY, CompatKey("z-image-turbo", "v1", 1024, 1024, 8, 0.0, extra=("long-prompt",))]
    s = make(max_batch_size=5, max_wait_s=0.2, min_share={"normal": 0.2, "low": 0.1}, aging_s=3.0)
    offered: set[str] = set()
    served, now = [], 0.0
    for step in range(400):
        now += 0.05
        for _ in range(rng.randint(0, 3)):
            item = req(f"r{step}-{len(offered)}", rng.choice(PRIORITIES), at=now, key=rng.choice(keys),
                       cost=rng.randint(1, 3))
            assert s.offer(item)
            offered.add(item.request_id)
        batch = s.next_batch(now)
        if batch is not None:
            assert {item.key for item in batch.items} == {batch.key}
            assert batch.cost <= 5 or len(batch.items) == 1
            served.extend(ids(batch))
    while (batch := s.next_batch(now, flush=True)) is not None:
        served.extend(ids(batch))
    assert sorted(served) == sorted(offered)
    assert sum(s.served_counts().values()) == len(offered)


def test_time_until_ready_wakes_for_an_aging_step_that_changes_the_choice():
    s = make(max_batch_size=2, max_wait_s=5.0, aging_s=2.0)
    s.offer(req("l1", "low", at=0.0))
    s.offer(req("l2", "low", at=0.0))
    s.offer(req("n1", "normal", at=3.5, key=OTHER_KEY))
    # low has aged one level and ties with normal, which stays ahead and would wait until 8.5 to fill...
    assert s.next_batch(3.5) is None
    # ...but at 4.0 low steps up again, ahead of normal, and its batch is full
    assert s.time_until_ready(3.5) == pytest.approx(0.5)
    assert ids(s.next_batch(4.0)) == ["l1", "l2"]
    assert s.time_until_ready(4.0) == pytest.approx(4.5)


# ---- buffer management ----------------------------------------------------------------------------------------

def test_offer_returns_false_when_a_class_is_full_and_nothing_is_dropped():
    s = make(capacity_per_priority={"high": 5, "normal": 5, "low": 2}, max_wait_s=0)
    assert s.offer(req("l1", "low")) and s.offer(req("l2", "low"))
    assert not s.has_room("low") and s.has_room("high")
    assert not s.offer(req("l3", "low"))
    assert s.queue_lengths() == {"high": 0, "normal": 0, "low": 2} and len(s) == 2
    s.next_batch(1.0)
    assert s.has_room("low") and s.offer(req("l3", "low"))
    with pytest.raises(ValueError):
        s.has_room("urgent")


def test_expire_removes_only_requests_past_their_deadline():
    s = make(max_batch_size=10, max_wait_s=0)
    s.offer(req("late", deadline=5.0))
    s.offer(req("later", deadline=9.0))
    s.offer(req("none"))
    s.offer(req("exact", deadline=7.0))
    assert s.expire(4.0) == []
    assert [p.request_id for p in s.expire(7.0)] == ["late"]  # 7.0 is not past a deadline of 7.0
    assert [p.request_id for p in s.expire(100.0)] == ["exact", "later"]
    assert ids(s.next_batch(100.0)) == ["none"]


def test_expire_ignores_requests_already_batched():
    s = make(max_batch_size=10, max_wait_s=0)
    s.offer(req("a", deadline=5.0))
    assert ids(s.next_batch(1.0)) == ["a"]
    assert s.expire(6.0) == []


def test_drop_partitions_removes_revoked_requests_only():
    s = make(max_batch_size=10, max_wait_s=0)
    s.offer(req("h-p0", "high", partition=0))
    s.offer(req("h-p1", "high", partition=1, deadline=3.0))
    s.offer(req("l-p1", "low", partition=1))
    dropped = s.drop_partitions([("req.high", 1), ("req.low", 1), ("req.normal", 7)])
    assert [p.request_id for p in dropped] == ["h-p1", "l-p1"]
    assert s.expire(10.0) == []
    assert ids(s.next_batch(0.0)) == ["h-p0"] and len(s) == 0


def test_clear_empties_every_class():
    s = make()
    for priority in PRIORITIES:
        s.offer(req(priority, priority, deadline=1.0))
    assert len(s.clear()) == 3 and len(s) == 0
    assert s.expire(5.0) == [] and s.time_until_ready(0.0) is None
