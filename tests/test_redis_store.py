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


def test_no_two_tenants_meet_on_one_redis_key_whatever_their_names_and_ids():
    from connectors.redis_store import cancel_entry_key
    from streams.api_service import idempotency_key, index_key, result_key
    from streams.status_view import status_entry_key

    pairs = [("acme", "eu:r1"), ("acme:eu", "r1"), ("acme", "eu/r1"), ("acme/eu", "r1"), ("acme%3Aeu", "r1")]
    for key_of in (cancel_entry_key, idempotency_key, result_key, status_entry_key):
        keys = {key_of("p", tenant, request_id) for tenant, request_id in pairs}
        assert len(keys) == len(pairs), key_of.__name__
    assert len({index_key("p", tenant) for tenant, _ in pairs}) == 4  # four distinct tenants among the pairs
    assert status_entry_key("p", "acme", "r-1") == "zimage:p:status:acme/r-1"  # plain names read as before
