"""The gate's state, kept in Kafka: which (tenant, request_id, generation) it admitted, and what the pools loaded.

Admitted keys: the gate writes each to the compacted `gate.changelog` topic, in the same transaction as the
routed request, on the partition number of the request it came from (request topics are keyed by request id and
have the same partition count, so one changelog partition covers one partition of every priority). When the gate
is assigned a partition it reads that changelog partition to its end before it decides anything there; after an
abort it forgets the partition and reads it again. Entries older than the window are not loaded, and the topic
deletes them past its retention (30 days, the default window), so the state stays bounded.

Pools: every worker announces its model on the compacted `pools` topic; the gate reads it from the beginning and
keeps reading it.
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from connectors.kafka import OutRecord
from processors.admission import PoolInfo
from schemas.serde import AvroSerde, SerdeError

log = logging.getLogger(__name__)

DAY_MS = 24 * 3600 * 1000


def _reader(base: dict[str, str]) -> Consumer:
    return Consumer({**base, "group.id": f"zimage-gate-restore-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False,
                     "isolation.level": "read_committed", "enable.partition.eof": True})


class AdmittedKeys:
    """Per partition: idempotency key -> when it was admitted (ms)."""

    def __init__(self, base: dict[str, str], topic: str, window_days: float = 30.0,
                 restore: Callable[[int], dict[str, int]] | None = None):
        self._base = base
        self._topic = topic
        self._window_ms = int(window_days * DAY_MS)
        self._partitions: dict[int, dict[str, int]] = {}
        self._restore = restore or self._read_changelog

    def seen(self, partition: int, key: str, now_ms: int) -> bool:
        at = self._load(partition).get(key)
        return at is not None and now_ms - at < self._window_ms

    def admit(self, partition: int, key: str, now_ms: int) -> OutRecord:
        """Remembers `key` and returns the changelog record to produce with the outputs."""
        self._load(partition)[key] = now_ms
        return OutRecord(self._topic, json.dumps({"at": now_ms}).encode(), key.encode(), partition=partition)

    def forget(self, partitions: set[int]) -> None:
        for partition in partitions:
            self._partitions.pop(partition, None)

    def _load(self, partition: int) -> dict[str, int]:
        loaded = self._partitions.get(partition)
        if loaded is None:
            loaded = self._partitions[partition] = self._restore(partition)
        return loaded

    def _read_changelog(self, partition: int) -> dict[str, int]:
        started = time.monotonic()
        keys: dict[str, int] = {}

        oldest = int(time.time() * 1000) - self._window_ms

        def apply(key: bytes | None, value: bytes | None) -> None:
            name = (key or b"").decode()
            at = None if value is None else int(json.loads(value)["at"])
            if at is None or at < oldest:  # deleted, or past the window: it would not count anyway
                keys.pop(name, None)
            else:
                keys[name] = at

        read_to_end(self._base, self._topic, [partition], apply)
        log.info("restored %d admitted keys of partition %d in %.2fs", len(keys), partition,
                 time.monotonic() - started)
        return keys


class RestoreFailed(RuntimeError):
    """State kept in Kafka could not be read back: an infrastructure fault, never a request's."""


def read_to_end(base: dict[str, str], topic: str, partitions: list[int],
                apply: Callable[[bytes | None, bytes | None], None]) -> None:
    """Feeds every committed record of these partitions, from the beginning to their current end, to `apply`
    (key, value): how state kept in Kafka is restored."""
    consumer = _reader(base)
    try:
        ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in partitions}
        todo = {p for p, end in ends.items() if end > 0}
        if not todo:
            return
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in todo])
        while todo:
            msg = consumer.poll(1.0)
            if msg is None:
                continue
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    todo.discard(msg.partition())
                    continue
                raise RestoreFailed(f"restoring {topic}: {err}")
            apply(msg.key(), msg.value())
    finally:
        consumer.close()


class PoolDirectory:
    """The latest announcement of every pool, read from the compacted pools topic and kept up to date."""

    def __init__(self, base: dict[str, str], topic: str, serde: AvroSerde, consumer: Consumer | None = None):
        self._serde = serde
        self._consumer = consumer if consumer is not None else _reader(base)
        self._consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        self.pools: dict[str, PoolInfo] = {}

    def refresh(self, timeout_s: float = 0.0) -> bool:
        """Reads new announcements; True when a pool's model changed (or a pool appeared)."""
        changed = False
        for msg in self._consumer.consume(100, timeout=timeout_s):
            if msg.error() is not None or msg.value() is None:
                continue
            try:
                info = PoolInfo.from_announcement(self._serde.decode("PoolAnnouncement", msg.value()))
            except (SerdeError, KeyError) as exc:
                log.warning("ignoring an unreadable pool announcement: %s", exc)
                continue
            if self.pools.get(info.pool) != info:
                log.info("pool %s serves %s as %s", info.pool, info.model, info.model_version)
                changed = True
            self.pools[info.pool] = info
        return changed

    def close(self) -> None:
        self._consumer.close()
