"""Priority order under bursts and while requests of a more urgent class are still in Kafka."""
import random

import pytest

from processors.batching import PRIORITIES, CompatKey
from processors.scheduler import Scheduler
from tests.test_scheduler import KEY, OTHER_KEY, ids, make, req

# ---- a burst arriving together --------------------------------------------------------------------------------

BURST_KEYS = {
    "all equal": lambda priority, i: KEY,
    "one per class": lambda priority, i: CompatKey("z-image-turbo", "v1", 1024, 1024, 8, 0.0, extra=(priority,)),
    "one per request": lambda priority, i: CompatKey("z-image-turbo", "v1", 1024, 1024, 8, 0.0,
                                                     extra=(priority, i)),
}


def serve_burst(seed: int, keys, high_before: bool) -> list[str]:
    """Offers 4 high, 4 normal, 4 low in a shuffled order at one instant; returns the priorities served."""
    s = make(max_batch_size=4, max_wait_s=0.1, min_share={"normal": 0.2, "low": 0.1}, aging_s=60.0)
    now = 0.0
    if high_before:  # one high request alone, being rendered when the burst arrives
        s.offer(req("h-alone", "high", at=now))
        assert ids(s.next_batch(now + 0.1)) == ["h-alone"]
        now += 0.2
    burst = [req(f"{p}{i}", p, at=now, key=keys(p, i)) for p in PRIORITIES for i in range(4)]
    random.Random(seed).shuffle(burst)
    for item in burst:
        assert s.offer(item)
    served: list[str] = []
    while len(s):
        batch = s.next_batch(now)
        if batch is None:
            now += 0.05
            continue
        served.extend(item.priority for item in batch.items)
        if batch.items[0].priority != "high":
            assert served.count("high") == 4, "a lower class headed a batch while a high request waited"
    return served


@pytest.mark.parametrize("high_before", [False, True], ids=["fresh", "one-high-served-before"])
@pytest.mark.parametrize("keys", BURST_KEYS.values(), ids=BURST_KEYS.keys())
def test_a_burst_serves_every_high_request_first(keys, high_before):
    for seed in range(20):
        served = serve_burst(seed, keys, high_before)
        assert served[:4] == ["high"] * 4, f"seed {seed}: {served}"
        assert sorted(served) == sorted(p for p in PRIORITIES for _ in range(4))


# ---- requests still in Kafka ----------------------------------------------------------------------------------

def buffered_normal_and_low(**overrides) -> Scheduler:
    s = make(max_batch_size=4, max_wait_s=0.1, min_share={"normal": 0.2, "low": 0.1}, fetch_wait_s=0.5,
             **overrides)
    for i in range(4):
        s.offer(req(f"n{i}", "normal", key=OTHER_KEY))
        s.offer(req(f"l{i}", "low", key=KEY))
    return s


def test_unfetched_high_holds_lower_classes_until_the_highs_arrive():
    s = buffered_normal_and_low()
    s.set_unfetched("high", True, now=0.0)
    assert s.next_batch(0.0) is None and s.next_batch(0.3, flush=True) is None
    assert s.time_until_ready(0.3) == pytest.approx(0.2)
    for i in range(4):
        s.offer(req(f"h{i}", "high", at=0.35, key=OTHER_KEY))
    s.set_unfetched("high", False, now=0.35)
    assert ids(s.next_batch(0.35)) == ["h0", "h1", "h2", "h3"]
    assert ids(s.next_batch(0.35)) == ["n0", "n1", "n2", "n3"]
    assert ids(s.next_batch(0.35)) == ["l0", "l1", "l2", "l3"]


def test_unfetched_high_holds_lower_classes_for_fetch_wait_at_most():
    s = buffered_normal_and_low()
    s.set_unfetched("high", True, now=0.0)
    s.set_unfetched("high", True, now=0.4)  # still waiting: the hold counts from the first report
    assert s.next_batch(0.49) is None
    assert ids(s.next_batch(0.5)) == ["n0", "n1", "n2", "n3"]
    s.set_unfetched("high", False, now=0.6)
    s.set_unfetched("high", True, now=0.7)  # new lag: a new bounded hold
    assert s.next_batch(0.7) is None
    assert s.time_until_ready(0.7) == pytest.approx(0.5)
    assert ids(s.next_batch(1.2)) == ["l0", "l1", "l2", "l3"]


def test_unfetched_normal_holds_low_but_not_a_high_batch_and_its_same_key_riders():
    s = make(max_batch_size=4, max_wait_s=0.1, min_share={}, fetch_wait_s=0.5)
    s.offer(req("h0", "high"))
    s.offer(req("h1", "high"))
    for i in range(4):
        s.offer(req(f"l{i}", "low"))
    s.set_unfetched("normal", True, now=0.0)
    assert ids(s.next_batch(0.0)) == ["h0", "h1", "l0", "l1"]
    assert s.next_batch(0.1) is None
    assert ids(s.next_batch(0.5)) == ["l2", "l3"]


def test_a_low_request_aged_past_normal_is_not_held_for_normal_but_is_for_high():
    s = make(max_batch_size=1, max_wait_s=0, min_share={}, aging_s=1.0, fetch_wait_s=0.5)
    s.offer(req("l-old", "low", at=0.0))
    s.offer(req("l-new", "low", at=2.0))
    s.set_unfetched("normal", True, now=2.0)
    assert ids(s.next_batch(2.0)) == ["l-old"]  # two levels up: ahead of any fresh normal request
    assert s.next_batch(2.0) is None  # l-new is not: held for normal until 2.5
    s.set_unfetched("high", True, now=2.2)
    assert s.next_batch(2.6) is None  # held for high until 2.7
    assert s.time_until_ready(2.6) == pytest.approx(0.1)
    assert ids(s.next_batch(2.7)) == ["l-new"]


def test_a_class_owed_its_share_is_not_held_for_unfetched_requests():
    s = make(max_batch_size=2, max_wait_s=0, min_share={"low": 0.1}, share_patience_s=0, fetch_wait_s=0.5)
    s.offer(req("h0", "high"))
    s.offer(req("h1", "high"))
    for i in range(4):
        s.offer(req(f"l{i}", "low", key=OTHER_KEY))
    assert ids(s.next_batch(0.0)) == ["h0", "h1"]  # contention: low is owed 0.2 images
    s.set_unfetched("high", True, now=0.0)
    assert ids(s.next_batch(0.0)) == ["l0", "l1"]  # owed: not held
    assert s.next_batch(0.1) is None  # low was alone at that cut: no longer owed, so held again
    assert ids(s.next_batch(0.5)) == ["l2", "l3"]


def test_unfetched_reports_check_the_class():
    with pytest.raises(ValueError):
        make().set_unfetched("urgent", True, now=0.0)


def test_a_class_with_more_in_kafka_fills_its_batch_with_its_own_requests_only():
    s = make(max_batch_size=4, max_wait_s=0.1, min_share={}, fetch_wait_s=0.5)
    for i in range(2):
        s.offer(req(f"h{i}", "high", at=0.0, key=KEY))
    for i in range(4):
        s.offer(req(f"n{i}", "normal", at=0.0, key=KEY))
    s.set_unfetched("high", True, now=0.0)
    assert s.next_batch(0.01) is None  # not full without riders: waits for the highs still in Kafka
    s.offer(req("h2", "high", at=0.02, key=KEY))
    s.offer(req("h3", "high", at=0.02, key=KEY))
    assert ids(s.next_batch(0.03)) == ["h0", "h1", "h2", "h3"]

    s.offer(req("h4", "high", at=0.04, key=KEY))
    assert ids(s.next_batch(0.2)) == ["h4"]  # at max_wait it goes as it is, still without riders
    s.offer(req("h5", "high", at=0.3, key=KEY))
    s.set_unfetched("high", False, now=0.3)
    assert ids(s.next_batch(0.3)) == ["h5", "n0", "n1", "n2"]  # nothing more on its way: riders fill it
