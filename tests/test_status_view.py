"""The status view in Redis: the latest status wins whatever the order it is read in; Redis down holds it back."""
from __future__ import annotations

import json
from unittest.mock import create_autospec

import redis

from connectors.redis_store import RedisStore
from processors.status import request_status
from schemas.serde import AvroSerde
from streams.settings import Settings
from streams.status_view import StatusView, status_entry_key


class FakeRedis:
    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.down = False
        self.client = create_autospec(redis.Redis, instance=True)
        self.client.mget.side_effect = self._mget
        self.client.set.side_effect = self._set

    def _mget(self, keys):
        if self.down:
            raise redis.ConnectionError("refused")
        return [self.data.get(k) for k in keys]

    def _set(self, key, value, px=None):
        if self.down:
            raise redis.ConnectionError("refused")
        self.data[key] = value


def status(name: str, at: int) -> bytes:
    event = request_status(request={"tenant": "acme", "request_id": "r1"}, status=name, stage="gate", now_ms=at)
    return AvroSerde().encode("RequestStatus", event)


def make_view(fake: FakeRedis) -> StatusView:
    return StatusView(Settings(_env_file=None, topic_prefix="tv"), AvroSerde(),
                      RedisStore("redis://x", client=fake.client))


def test_the_latest_status_wins_whatever_the_order():
    fake = FakeRedis()
    view = make_view(fake)
    assert view._apply(status("admitted", 10)) and view._apply(status("published", 30))
    assert view._apply(status("admitted", 10))  # read again after a crash: changes nothing
    key = status_entry_key("tv", "acme", "r1")
    assert json.loads(fake.data[key])["status"] == "published"


def test_redis_down_means_the_status_is_read_again_later():
    fake = FakeRedis()
    view = make_view(fake)
    fake.down = True
    assert not view._apply(status("admitted", 10))  # the caller seeks back to it: nothing is skipped
