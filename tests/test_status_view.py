"""The status view in Redis: the latest status wins whatever the order it is read in; Redis down holds it back."""
from __future__ import annotations

import json
from unittest.mock import MagicMock, create_autospec, patch

import redis
from confluent_kafka import Consumer, Message, TopicPartition

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
        self.client.register_script.side_effect = self._script
        self.script_calls = 0

    def _script(self, source):
        def run(keys, args):
            if self.down:
                raise redis.ConnectionError("refused")
            self.script_calls += 1
            assert "SET" in source and "NX" not in source  # the view only sets many
            for i, key in enumerate(keys):
                self.data[key] = args[i + 1]
            return len(keys)
        return run

    def _mget(self, keys):
        if self.down:
            raise redis.ConnectionError("refused")
        return [self.data.get(k) for k in keys]

    def _set(self, key, value, px=None):
        if self.down:
            raise redis.ConnectionError("refused")
        self.data[key] = value


def status(name: str, at: int, request_id: str = "r1") -> bytes:
    event = request_status(request={"tenant": "acme", "request_id": request_id}, status=name, stage="gate",
                           now_ms=at)
    return AvroSerde().encode("RequestStatus", event)


def make_view(fake: FakeRedis) -> StatusView:
    return StatusView(Settings(_env_file=None, topic_prefix="tv"), AvroSerde(),
                      RedisStore("redis://x", client=fake.client))


def test_the_latest_status_wins_whatever_the_order():
    fake = FakeRedis()
    view = make_view(fake)
    assert view._apply_many([status("admitted", 10)]) and view._apply_many([status("published", 30)])
    assert view._apply_many([status("admitted", 10)])  # read again after a crash: changes nothing
    key = status_entry_key("tv", "acme", "r1")
    assert json.loads(fake.data[key])["status"] == "published"


def test_a_batch_keeps_the_latest_of_each_request_in_two_round_trips():
    fake = FakeRedis()
    view = make_view(fake)
    batch = [status("published", 30, "r1"), status("admitted", 10, "r1"), status("admitted", 5, "r2"),
             b"\x00garbage", None, status("rendered", 20, "r2")]
    assert view._apply_many(batch)
    assert json.loads(fake.data[status_entry_key("tv", "acme", "r1")])["status"] == "published"
    assert json.loads(fake.data[status_entry_key("tv", "acme", "r2")])["status"] == "rendered"
    assert fake.client.mget.call_count == 1 and fake.script_calls == 1


def test_an_unreadable_value_in_redis_is_replaced_not_fatal():
    fake = FakeRedis()
    view = make_view(fake)
    held = [b"not json", b"[1, 2]", b'{"at": "late"}', b'{"status": "x"}', b"[" * 100_000, b'{"at": true}']
    for i, value in enumerate(held):
        fake.data[status_entry_key("tv", "acme", f"r{i}")] = value
    assert view._apply_many([status("admitted", 10, f"r{i}") for i in range(len(held))])
    for i in range(len(held)):
        assert json.loads(fake.data[status_entry_key("tv", "acme", f"r{i}")])["status"] == "admitted"


def test_a_schema_registry_outage_reads_the_batch_again_later():
    from schemas.serde import RegistryUnavailable

    class RegistryDown(AvroSerde):
        def decode(self, *_args, **_kwargs):
            raise RegistryUnavailable("the registry does not answer")

    fake = FakeRedis()
    view = StatusView(Settings(_env_file=None, topic_prefix="tv"), RegistryDown(),
                      RedisStore("redis://x", client=fake.client))
    assert view._apply_many([status("admitted", 10)]) is False and not fake.data  # not skipped: held


def test_redis_down_means_the_status_is_read_again_later():
    fake = FakeRedis()
    view = make_view(fake)
    fake.down = True
    assert not view._apply_many([status("admitted", 10)])  # the caller seeks back to it: nothing is skipped


def message(topic: str, partition: int, offset: int, value: bytes) -> Message:
    msg = create_autospec(Message, instance=True)
    msg.topic.return_value, msg.partition.return_value, msg.offset.return_value = topic, partition, offset
    msg.value.return_value, msg.error.return_value = value, None
    return msg


def run_once(fake: FakeRedis, msgs: list[Message]) -> MagicMock:
    """One round of the view's loop over `msgs`, with an autospecced consumer."""
    consumer: MagicMock = create_autospec(Consumer, instance=True)
    settings = Settings(_env_file=None, topic_prefix="tv")
    view = StatusView(settings, AvroSerde(), RedisStore("redis://x", client=fake.client),
                      consumer_factory=lambda *a, **k: consumer)
    rounds = iter([msgs])

    def consume(*_args, **_kwargs):
        batch = next(rounds, None)
        if batch is None:
            view.stop()
            return []
        return batch
    consumer.consume.side_effect = consume
    consumer.poll.return_value = None
    with patch("streams.status_view.time.sleep"):
        view.run()
    return consumer


def test_the_loop_stores_the_offsets_after_the_statuses_reached_redis():
    fake = FakeRedis()
    msgs = [message("tv.status", 0, 7, status("admitted", 10)), message("tv.status", 0, 8, status("published", 30))]
    consumer = run_once(fake, msgs)
    consumer.store_offsets.assert_called_once_with(offsets=[TopicPartition("tv.status", 0, 9)])
    consumer.seek.assert_not_called()


def test_the_loop_reads_a_batch_again_when_redis_is_down():
    fake = FakeRedis()
    fake.down = True
    msgs = [message("tv.status", 0, 7, status("admitted", 10)), message("tv.status", 0, 8, status("published", 30))]
    consumer = run_once(fake, msgs)
    consumer.store_offsets.assert_not_called()
    consumer.seek.assert_called_once_with(TopicPartition("tv.status", 0, 7))
