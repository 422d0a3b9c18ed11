"""The best-effort Redis store's batch calls, on a real Redis: one script call per batch."""
from __future__ import annotations

import os
import uuid

import pytest

from connectors.redis_store import RedisStore

pytestmark = pytest.mark.stack


@pytest.fixture
def store() -> RedisStore:
    return RedisStore(os.environ.get("ZIMAGE_REDIS_URL", "redis://127.0.0.1:6379/0"))


def keys(n: int) -> list[str]:
    tag = uuid.uuid4().hex[:8]
    return [f"zimage-test:{tag}:{i}" for i in range(n)]


def test_set_many_sets_each_value_with_the_ttl(store: RedisStore) -> None:
    a, b, absent = keys(3)
    assert store.set_many([(a, b"one"), (b, b"")], ttl_s=30)
    assert store.get_many([a, b, absent]) == [b"one", b"", None]
    assert 25_000 < store._client.pttl(a) <= 30_000


def test_claim_many_takes_only_absent_keys_and_answers_what_each_holds(store: RedisStore) -> None:
    held, free = keys(2)
    store.set_many([(held, b"theirs")], ttl_s=30)
    assert store.claim_many([held, free], b"mine", ttl_s=30) == [b"theirs", b"mine"]
    assert store.claim_many([free], b"again", ttl_s=30) == [b"mine"]


def test_redis_down_answers_false_and_none_and_is_left_alone() -> None:
    down = RedisStore("redis://127.0.0.1:1/0", timeout_s=0.05)
    assert down.set_many([("k", b"v")], ttl_s=1) is False
    assert down.failures == 1 and down.claim_many(["k"], b"v", ttl_s=1) is None  # not asked again for a while
    assert down.failures == 1
