"""`zimage processors --only status`: the materialized view of `zimage.status` in Redis, for `zimage status`.

The compacted status topic is the truth; Redis holds a copy of the latest status of each request. The view is
rebuilt from the topic's beginning whenever Redis has lost it (a restart without persistence, a flush): a
marker key says the view is there. Writes are idempotent (the latest status by its time), so reading a record
twice after a crash changes nothing; Redis down means the view lags, never a lost status.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from connectors import kafka
from connectors.redis_store import RedisStore
from schemas.serde import AvroSerde, SerdeError
from streams.failures import Origin
from streams.heap import freeze_start_up_heap
from streams.settings import Settings

log = logging.getLogger(__name__)


def status_entry_key(topic_prefix: str, tenant: str, request_id: str) -> str:
    return f"zimage:{topic_prefix}:status:{tenant}/{request_id}"


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
                for msg in kafka.consume_ready(consumer, 500, 0.2):
                    value = msg.value()
                    if msg.error() is not None:
                        continue
                    if value is not None and not self._apply(value):
                        # Redis is down: read this status again later; the topic keeps every status meanwhile
                        origin = Origin.of(msg)
                        consumer.seek(TopicPartition(origin.topic, origin.partition, origin.offset))
                        time.sleep(1.0)
                        break
                    consumer.store_offsets(message=msg)
        finally:
            consumer.close()

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        found = self._redis.get_many([self._marker])
        if found is not None and not found[0]:  # Redis answers, and the view is not there: read everything again
            log.info("the status view is empty: rebuilding it from the beginning of the topic")
            for tp in partitions:
                tp.offset = OFFSET_BEGINNING
            self._redis.set(self._marker, b"1", ttl_s=10 * 365 * 24 * 3600.0)

    def _apply(self, value: bytes) -> bool:
        """False when Redis could not take it."""
        try:
            status = self._serde.decode("RequestStatus", value)
        except SerdeError as exc:
            log.warning("ignoring an unreadable status: %s", exc)
            return True
        key = status_entry_key(self.s.topic_prefix, status["tenant"], status["request_id"])
        current = self._redis.get_many([key])
        if current is None:
            return False
        if current[0] and json.loads(current[0])["at"] > status["at"]:
            return True  # an older status read again: the view keeps the latest
        return self._redis.set(key, json.dumps(status).encode(), ttl_s=self.s.publication_window_days * 24 * 3600)
