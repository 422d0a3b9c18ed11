"""A cancel and the start of a render race on one Redis key: exactly one of them wins (real Redis)."""
from __future__ import annotations

import os
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from connectors.redis_store import RedisStore
from streams.cancellation import Cancellations

pytestmark = pytest.mark.stack


@pytest.fixture
def cancellations() -> Cancellations:
    return Cancellations(RedisStore(os.environ.get("ZIMAGE_REDIS_URL", "redis://127.0.0.1:6379/0")),
                         f"cancel-test-{uuid.uuid4().hex[:8]}", ttl_s=60)


def request() -> dict:
    return {"tenant": "acme", "request_id": uuid.uuid4().hex}


def test_a_cancel_before_the_render_wins_and_the_gate_and_worker_see_it(cancellations):
    cancelled, other = request(), request()
    assert cancellations.cancel("acme", cancelled["request_id"]) == "cancelled"
    assert cancellations.cancel("acme", cancelled["request_id"]) == "cancelled"  # asking twice is the same answer
    assert cancellations.cancelled([other, cancelled]) == {1}
    assert cancellations.start_rendering([other, cancelled]) == {1}
    assert cancellations.cancel("acme", other["request_id"]) == "too_late"  # its render started


def test_a_cancel_of_another_tenants_request_id_touches_nothing(cancellations):
    mine = request()
    assert cancellations.cancel("globex", mine["request_id"]) == "cancelled"
    assert cancellations.start_rendering([mine]) == set()


def test_racing_cancels_and_renders_agree_on_one_winner_per_request(cancellations):
    requests = [request() for _ in range(200)]
    with ThreadPoolExecutor(8) as pool:
        renders = pool.submit(lambda: [cancellations.start_rendering([r]) for r in requests])
        cancels = list(pool.map(lambda r: cancellations.cancel("acme", r["request_id"]), requests))
        rendered_first = [not hit for hit in renders.result()]
    for cancel, started in zip(cancels, rendered_first, strict=True):
        assert (cancel == "cancelled") != started


def test_redis_down_cancels_nothing_and_blocks_nothing():
    down = Cancellations(RedisStore("redis://127.0.0.1:1/0", timeout_s=0.05), "down")
    assert down.cancel("acme", "r1") == "unavailable"
    assert down.start_rendering([request()]) == set() and down.cancelled([request()]) == set()
