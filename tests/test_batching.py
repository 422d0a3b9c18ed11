import random
from typing import Any

import pytest

from processors.batching import PRIORITIES, Batch, BatchBuffer, CompatKey, Pending

KEY_A = CompatKey("z-image-turbo", "v1", 1024, 1024, 8, 0.0)
KEY_B = CompatKey("z-image-turbo", "v1", 768, 1344, 8, 0.0)


def pending(rid: str, priority: str = "normal", key: CompatKey = KEY_A, cost: int = 1, at: float = 0.0,
            partition: int = 0, offset: int = 0) -> Pending:
    return Pending(request_id=rid, priority=priority, key=key, source=(f"req.{priority}", partition, offset),
                   enqueued_at=at, deadline=None, payload={"id": rid}, cost=cost)


def ids(items) -> list[str]:
    return [item.request_id for item in items]


def test_compat_key_is_a_value():
    same = CompatKey("z-image-turbo", "v1", 1024, 1024, 8, 0.0)
    assert same == KEY_A and hash(same) == hash(KEY_A)
    assert KEY_A != KEY_B
    assert (CompatKey("m", "v1", 1, 1, 1, 0.0, extra=("len<=77",))
            != CompatKey("m", "v1", 1, 1, 1, 0.0, extra=("len<=256",)))


@pytest.mark.parametrize("field, value", [("priority", "urgent"), ("cost", 0), ("cost", -2), ("cost", True)])
def test_pending_rejects_invalid_fields(field, value):
    kwargs: dict[str, Any] = dict(request_id="r", priority="low", key=KEY_A, source=("t", 0, 0), enqueued_at=0.0,
                                  deadline=None, payload=None)
    kwargs[field] = value
    with pytest.raises(ValueError):
        Pending(**kwargs)


def test_batch_cost_is_the_sum_of_item_costs():
    batch = Batch("b1", KEY_A, (pending("a", cost=2), pending("b", cost=3)), formed_at=1.0, reason="full")
    assert batch.cost == 5


def test_plan_takes_the_head_key_in_arrival_order_and_take_removes_only_the_plan():
    buf = BatchBuffer()
    for rid, key in [("a1", KEY_A), ("b1", KEY_B), ("a2", KEY_A), ("a3", KEY_A), ("b2", KEY_B)]:
        buf.add(pending(rid, key=key))
    plan = buf.plan("normal", max_batch_size=2)
    assert plan is not None
    assert plan.key == KEY_A and ids(plan.items) == ["a1", "a2"] and plan.full
    assert len(buf) == 5  # planning changes nothing
    assert ids(buf.take(plan)) == ["a1", "a2"]
    assert ids(buf) == ["b1", "a3", "b2"]
    plan = buf.plan("normal", max_batch_size=4)
    assert plan.key == KEY_B and ids(plan.items) == ["b1", "b2"] and not plan.full


def test_plan_fills_from_the_chosen_class_then_the_others_in_priority_order():
    buf = BatchBuffer()
    buf.add(pending("n1", "normal"))
    buf.add(pending("l1", "low"))
    buf.add(pending("h1", "high"))
    buf.add(pending("l2", "low"))
    buf.add(pending("h-other", "high", key=KEY_B))
    plan = buf.plan("low", max_batch_size=10)
    assert ids(plan.items) == ["l1", "l2", "h1", "n1"]
    assert plan.key == KEY_A


def test_plan_respects_cost_and_never_lets_a_later_item_overtake_in_its_queue():
    buf = BatchBuffer()
    for rid, cost in [("c3", 3), ("c2", 2), ("c1", 1)]:
        buf.add(pending(rid, cost=cost))
    plan = buf.plan("normal", max_batch_size=4)
    assert plan is not None
    # c2 does not fit after c3; c1 would, but it must not overtake c2.
    assert ids(plan.items) == ["c3"]
    assert plan.full, "a same-key request left over means waiting cannot grow the batch"
    buf.take(plan)
    plan = buf.plan("normal", max_batch_size=4)
    assert ids(plan.items) == ["c2", "c1"] and not plan.full


def test_plan_fills_exactly_to_the_size_and_an_oversized_head_goes_alone():
    buf = BatchBuffer()
    buf.add(pending("big", cost=9))
    buf.add(pending("s1", cost=1))
    plan = buf.plan("normal", max_batch_size=4)
    assert plan is not None
    assert ids(plan.items) == ["big"] and plan.full
    buf.take(plan)
    for i in range(2, 6):
        buf.add(pending(f"s{i}", cost=1))
    plan = buf.plan("normal", max_batch_size=4)
    assert ids(plan.items) == ["s1", "s2", "s3", "s4"] and plan.full


def test_plan_of_an_empty_class_is_none():
    buf = BatchBuffer()
    buf.add(pending("n1", "normal"))
    assert buf.plan("high", 4) is None


def test_remove_where_keeps_the_indexes_consistent():
    buf = BatchBuffer()
    for i in range(6):
        buf.add(pending(f"r{i}", PRIORITIES[i % 3], key=KEY_A if i % 2 else KEY_B, partition=i % 2))
    removed = buf.remove_where(lambda item: item.partition == ("req.high", 0) or item.source[1] == 1)
    assert ids(removed) == ["r0", "r1", "r3", "r5"]
    assert ids(buf) == ["r2", "r4"]
    assert buf.count("high") == 0 and buf.count("normal") == 1 and buf.count("low") == 1
    assert buf.head("high") is None
    assert ids(buf.plan("low", 4).items) == ["r2", "r4"]


def test_random_plans_never_mix_keys_and_take_every_item_once():
    rng = random.Random(7)
    keys = [KEY_A, KEY_B, CompatKey("z-image", "v2", 1024, 1024, 30, 4.0)]
    buf = BatchBuffer()
    offered = []
    for i in range(500):
        item = pending(f"r{i}", rng.choice(PRIORITIES), rng.choice(keys), cost=rng.randint(1, 5))
        buf.add(item)
        offered.append(item.request_id)
    taken = []
    while len(buf):
        priority = rng.choice([p for p in PRIORITIES if buf.count(p)])
        plan = buf.plan(priority, max_batch_size=6)
        assert plan is not None
        assert plan.head.priority == priority
        assert all(item.key == plan.key for item in plan.items)
        assert sum(i.cost for i in plan.items) <= 6 or len(plan.items) == 1
        taken.extend(ids(buf.take(plan)))
    assert sorted(taken) == sorted(offered)
