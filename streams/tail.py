"""Following ImageReady (and RequestFailed) events: `zimage tail` and the demo's progress."""
from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from connectors.retry import until_done
from schemas.serde import AvroSerde, SerdeError


class EventFollower:
    """Reads committed records of some topics without a consumer group (tailing never disturbs anyone).

    The start position is fixed when the follower is created, so a caller can create it, then submit, then read
    every event caused by its submission.
    """

    def __init__(self, kafka_conf: dict[str, str], topics: dict[str, str], serde: AvroSerde, *,
                 from_beginning: bool = False):
        self._topics = topics  # topic -> Avro record name
        self._serde = serde
        self._consumer = Consumer({**kafka_conf, "group.id": f"zimage-tail-{uuid.uuid4().hex[:8]}",
                                   "enable.auto.commit": False, "isolation.level": "read_committed"})
        meta = self._consumer.list_topics(timeout=10)
        missing = [t for t in topics if t not in meta.topics]
        if missing:
            self._consumer.close()
            raise RuntimeError(f"topics missing: {', '.join(missing)} (run `zimage topics apply`)")
        assignment = []
        for t in topics:
            for p in meta.topics[t].partitions:
                _low, high = self._end_offsets(TopicPartition(t, p))
                assignment.append(TopicPartition(t, p, OFFSET_BEGINNING if from_beginning else high))
        self._consumer.assign(assignment)

    def _end_offsets(self, tp: TopicPartition) -> tuple[int, int]:
        """A broker that just restarted answers "not leader" for a moment: not a reason to give up."""

        def ask() -> tuple[int, int]:
            return self._consumer.get_watermark_offsets(tp, timeout=10)

        return until_done(ask, is_infrastructure=lambda exc: isinstance(exc, KafkaException),
                          on_retry=lambda exc, attempt: None, within_s=60)

    def events(self, idle_timeout_s: float | None = None) -> Iterator[tuple[str, dict[str, Any] | None, bytes]]:
        """Yields (record name, decoded value or None when undecodable, raw bytes: empty for a tombstone)."""
        last = time.monotonic()
        while idle_timeout_s is None or time.monotonic() - last < idle_timeout_s:
            msg = self._consumer.poll(0.2)
            if msg is None:
                continue
            err = msg.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    raise RuntimeError(str(err))
                continue
            last = time.monotonic()
            name = self._topics[msg.topic()]  # type: ignore[index]  # a record, not an error: it has its topic
            raw = msg.value()
            try:
                yield name, self._serde.decode(name, raw, topic=msg.topic()), raw or b""
            except SerdeError:
                yield name, None, raw or b""

    def close(self) -> None:
        self._consumer.close()
