"""`zimage processors --only status`: the materialized view of `zimage.status` in Redis, for `zimage status`.

The compacted status topic is the truth; Redis holds a copy of the latest status of each request. The view is
rebuilt from the topic's beginning whenever Redis has lost it (a restart without persistence, a flush): a
marker key says the view is there. Writes are idempotent (the latest status by its time), so reading a record
twice after a crash changes nothing; Redis down means the view lags, never a lost status.
"""
from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable

from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, TopicPartition

from connectors import kafka
from connectors.redis_store import RedisStore, key_part
from schemas.serde import AvroSerde, RegistryUnavailable, SerdeError
from streams.heap import freeze_start_up_heap
from streams.settings import Settings

log = logging.getLogger(__name__)


def status_entry_key(topic_prefix: str, tenant: str, request_id: str) -> str:
    return f"zimage:{topic_prefix}:status:{key_part(tenant)}/{key_part(request_id)}"


class StatusView:
    def __init__(self, settings: Settings, serde: AvroSerde, redis: RedisStore,
                 consumer_factory: Callable[..., Consumer] = kafka.consumer):
        self.s = settings
        self._serde = serde
        self._redis = redis
        self._consumer_factory = consumer_factory
        self._marker = f"zimage:{settings.topic_prefix}:status-view"
        self._stop = threading.Event()
        self.group_id = f"{settings.topic_prefix}-status-view"

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        # offsets committed in the background, but only those of statuses that reached Redis (stored by hand)
        consumer = self._consumer_factory(self.s.kafka_config(), self.group_id, **{"enable.auto.commit": True})
        topic = self.s.topology.status
        consumer.subscribe([topic], on_assign=self._on_assign)
        log.info("keeping the status view of %s in Redis", topic)
        freeze_start_up_heap()
        try:
            while not self._stop.is_set():
                msgs = [m for m in kafka.consume_ready(consumer, 500, 0.2) if m.error() is None]
                if not msgs:
                    continue
                if not self._apply_many([m.value() for m in msgs]):
                    # Redis is down: read these statuses again later; the topic keeps every status meanwhile
                    for tp in _first_of_each_partition(msgs):
                        consumer.seek(tp)
                    time.sleep(1.0)
                    continue
                consumer.store_offsets(offsets=_next_of_each_partition(msgs))
        finally:
            consumer.close()

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        found = self._redis.get_many([self._marker])
        if found is not None and not found[0]:  # Redis answers, and the view is not there: read everything again
            log.info("the status view is empty: rebuilding it from the beginning of the topic")
            for tp in partitions:
                tp.offset = OFFSET_BEGINNING
            self._redis.set(self._marker, b"1", ttl_s=10 * 365 * 24 * 3600.0)

    def _apply_many(self, values: list[bytes | None]) -> bool:
        """Keeps the latest of `values` (by status time) in Redis, in two round trips whatever their number: one
        status a round trip capped the view at a few thousand statuses a second, under the three that each
        request makes. False when Redis could not take them."""
        latest: dict[str, dict] = {}
        for value in values:
            if value is None:
                continue
            try:
                status = self._serde.decode("RequestStatus", value)
            except SerdeError as exc:
                log.warning("ignoring an unreadable status: %s", exc)
                continue
            except RegistryUnavailable as exc:  # an outage, like Redis down: the batch is read again later
                log.warning("the Schema Registry does not answer: %s", exc)
                return False
            key = status_entry_key(self.s.topic_prefix, status["tenant"], status["request_id"])
            if key not in latest or status["at"] >= latest[key]["at"]:
                latest[key] = status
        if not latest:
            return True
        keys = list(latest)
        current = self._redis.get_many(keys)
        if current is None:
            return False
        newer = [(key, json.dumps(latest[key]).encode()) for key, held in zip(keys, current, strict=True)
                 if _time_of(held) <= latest[key]["at"]]  # an older one read again: kept
        return self._redis.set_many(newer, ttl_s=self.s.publication_window_days * 24 * 3600)


def _time_of(held: bytes | None) -> float:
    """The time of the status Redis holds under a key. A value the view cannot read (written by hand, cut short,
    from another program) counts as older than any status: the topic is the truth, so the view overwrites it
    rather than stop on it."""
    if not held:
        return -math.inf
    try:
        at = json.loads(held)["at"]
    except (ValueError, TypeError, KeyError, IndexError, RecursionError):
        at = None
    if isinstance(at, bool) or not isinstance(at, (int, float)):
        log.warning("a status in Redis is unreadable; the topic's replaces it")
        return -math.inf
    return float(at)


def _first_of_each_partition(msgs: list[Message]) -> list[TopicPartition]:
    first: dict[tuple[str, int], int] = {}
    for topic, partition, offset in map(_coordinates, msgs):
        first.setdefault((topic, partition), offset)
    return [TopicPartition(t, p, o) for (t, p), o in first.items()]


def _next_of_each_partition(msgs: list[Message]) -> list[TopicPartition]:
    last: dict[tuple[str, int], int] = {}
    for topic, partition, offset in map(_coordinates, msgs):
        last[(topic, partition)] = offset
    return [TopicPartition(t, p, o + 1) for (t, p), o in last.items()]


def _coordinates(msg: Message) -> tuple[str, int, int]:
    return msg.topic(), msg.partition(), msg.offset()  # type: ignore[return-value]  # a consumed record has all
