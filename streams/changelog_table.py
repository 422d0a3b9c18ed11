"""State kept in Kafka, as Kafka Streams keeps a state store: a table per input partition, backed by a compacted
changelog topic.

A processor writes each change to the changelog in the same transaction as the outputs it explains, on the
partition number of the record it came from (the input topics are keyed so that one input partition's keys all
land there). The first time it decides a record of a partition, it reads that changelog partition to its end;
after an abort or a revocation it forgets the partition and reads it again. What it reads back is exactly what
committed, so the state matches the committed outputs.

The gate's admitted keys (streams/gate_state.py) and the SKU connector's latest versions (streams/sku_state.py)
are such tables.
"""
from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable, MutableMapping
from typing import Generic, TypeVar

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from connectors.kafka import OutRecord
from connectors.retry import until_done

log = logging.getLogger(__name__)

V = TypeVar("V")
# how a topic's committed records are read: (base config, topic, partitions, apply(key, value)); read_to_end
ReadTopic = Callable[[dict[str, str], str, list[int], Callable[[bytes | None, bytes | None], None]], None]


class RestoreFailed(RuntimeError):
    """State kept in Kafka could not be read back: an infrastructure fault, never a request's."""


def restore_reader(base: dict[str, str]) -> Consumer:
    """A consumer that reads committed records only, in no group, and says where each partition ends."""
    return Consumer({**base, "group.id": f"zimage-restore-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False,
                     "isolation.level": "read_committed", "enable.partition.eof": True})


def read_to_end(base: dict[str, str], topic: str, partitions: list[int],
                apply: Callable[[bytes | None, bytes | None], None]) -> None:
    """Feeds every committed record of these partitions, from the beginning to their current end, to `apply`
    (key, value): how state kept in Kafka is restored."""
    consumer = restore_reader(base)

    def end_of(partition: int) -> int:
        # a topic just created, or a broker just started, answers "unknown partition" for a moment
        try:
            return until_done(lambda: consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)[1],
                              is_infrastructure=lambda exc: isinstance(exc, KafkaException),
                              on_retry=lambda exc, n: log.warning("reading the end of %s[%d] (%r)", topic, partition,
                                                                  exc), within_s=60)
        except KafkaException as exc:
            raise RestoreFailed(f"restoring {topic}[{partition}]: {exc}") from exc

    try:
        ends = {p: end_of(p) for p in partitions}
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


class ChangelogTable(Generic[V]):
    """Per input partition: key -> value. `decode` reads a changelog value (an entry that it or `merge` raises on
    is skipped); `merge(old, new)` is what a restored entry leaves (None: the key is dropped); `restore` replaces
    restoring a partition, `read` how the topic is read (tests); `new_table(partition)` gives the empty table a
    partition is restored into (a dict, or rows on disk: streams/state_store.py)."""

    def __init__(self, base: dict[str, str], topic: str, *, encode: Callable[[V], bytes],
                 decode: Callable[[bytes], V], merge: Callable[[V | None, V], V | None] = lambda old, new: new,
                 restore: Callable[[int], dict[str, V]] | None = None, what: str = "entries",
                 read: ReadTopic = read_to_end,
                 new_table: Callable[[int], MutableMapping[str, V]] = lambda _partition: {}):
        self._read = read
        self._new_table = new_table
        self._base = base
        self._topic = topic
        self._encode = encode
        self._decode = decode
        self._merge = merge
        self._what = what
        self._partitions: dict[int, MutableMapping[str, V]] = {}
        self._restore: Callable[[int], MutableMapping[str, V]] = restore or self._read_changelog

    def get(self, partition: int, key: str) -> V | None:
        table = self._load(partition)
        try:
            return table.get(key)
        except RestoreFailed:
            self.forget([partition])  # a table that failed (on disk) may miss what it was told: it is read again
            raise

    def put(self, partition: int, key: str, value: V) -> OutRecord:
        """Remembers `value` and returns the changelog record to commit with the outputs it explains."""
        table = self._load(partition)
        try:
            table[key] = value
        except RestoreFailed:
            self.forget([partition])  # it may hold `value`, whose record will not be committed: it is read again
            raise
        return OutRecord(self._topic, self._encode(value), key.encode(), partition=partition)

    def forget(self, partitions: Iterable[int]) -> None:
        for partition in partitions:
            table = self._partitions.pop(partition, None)
            if table is not None:
                table.clear()  # rows on disk would otherwise stay until the partition is restored again
            # (a table whose database failed may raise here too: the partition is forgotten all the same)

    def loaded(self) -> list[MutableMapping[str, V]]:
        return list(self._partitions.values())

    def _load(self, partition: int) -> MutableMapping[str, V]:
        loaded = self._partitions.get(partition)
        if loaded is None:
            loaded = self._partitions[partition] = self._restore(partition)
        return loaded

    def _read_changelog(self, partition: int) -> MutableMapping[str, V]:
        started = time.monotonic()
        table = self._new_table(partition)

        def apply(key: bytes | None, raw: bytes | None) -> None:
            name = (key or b"").decode("utf-8", "replace")
            if raw is None:  # a tombstone
                table.pop(name, None)
                return
            try:
                merged = self._merge(table.get(name), self._decode(raw))
            except Exception as exc:  # noqa: BLE001 - one bad entry (cut short, too deep, a number out of range,
                # a wrong type) is skipped: stopping on it would stop the restore, and the partition, for good
                log.warning("ignoring an unreadable entry of %s[%d]: %s", self._topic, partition, type(exc).__name__)
                return
            if merged is None:
                table.pop(name, None)
            else:
                table[name] = merged

        try:
            self._read(self._base, self._topic, [partition], apply)
        except BaseException:
            table.clear()  # rows on disk of a restore that failed part-way: it is read again whole, later
            raise
        log.info("restored %d %s of %s[%d] in %.2fs", len(table), self._what, self._topic, partition,
                 time.monotonic() - started)
        return table
