"""The gate's state, kept in Kafka: which (tenant, request_id, generation) it admitted, and what the pools loaded.

Admitted keys: the gate writes each to the compacted `gate.changelog` topic, in the same transaction as the
routed request, on the partition number of the request it came from (request topics are keyed by request id and
have the same partition count, so one changelog partition covers one partition of every priority). When the gate
is assigned a partition it reads that changelog partition to its end before it decides anything there; after an
abort it forgets the partition and reads it again. Entries older than the window are not loaded, and the topic
deletes them past its retention (30 days, the default window), so the state stays bounded; a running gate forgets
them too, every EVICT_EVERY_S. With a StateStore they are kept on local disk, not in the heap.

Pools: every worker announces its model on the compacted `pools` topic; the gate reads it from the beginning and
keeps reading it.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from connectors.kafka import OutRecord
from processors.admission import PoolInfo
from schemas.serde import AvroSerde, RegistryUnavailable, SerdeError
from streams.changelog_table import ChangelogTable, ReadTopic, read_to_end, restore_reader
from streams.settings import Settings
from streams.state_store import EVICT_EVERY_S, DiskMapping, StateStore, state_store

log = logging.getLogger(__name__)

DAY_MS = 24 * 3600 * 1000


def _admitted_at(raw: bytes) -> int:
    """A changelog entry's time; one no 64-bit integer can hold (a hostile write) is unreadable, and skipped."""
    at = int(json.loads(raw)["at"])
    if not -(2 ** 63) <= at < 2 ** 63:
        raise ValueError(f"{at} is out of range")
    return at


class AdmittedKeys(ChangelogTable[int]):
    """Per partition: idempotency key -> when it was admitted (ms). Entries past the window are not restored."""

    def __init__(self, base: dict[str, str], topic: str, window_days: float = 30.0,
                 restore: Callable[[int], dict[str, int]] | None = None, store: StateStore | None = None,
                 read: ReadTopic = read_to_end):
        self._window_ms = int(window_days * DAY_MS)
        self._store = store
        self._next_eviction = time.monotonic() + EVICT_EVERY_S
        super().__init__(base, topic, encode=lambda at: json.dumps({"at": at}).encode(),
                         decode=_admitted_at, merge=self._within_window,
                         restore=restore, what="admitted keys", read=read,
                         new_table=(lambda partition: {}) if store is None else (
                             lambda partition: DiskMapping(store, "admitted", partition, at_of=int, of_at=int)))

    @classmethod
    def of(cls, base: dict[str, str], settings: Settings) -> AdmittedKeys:
        return cls(base, settings.topology.gate_changelog, settings.idempotency_window_days,
                   store=state_store(settings))

    def close(self) -> None:
        self._partitions.clear()  # rows are not deleted one by one: closing the database returns its space
        if self._store is not None:
            self._store.close()

    def seen(self, partition: int, key: str, now_ms: int) -> bool:
        at = self.get(partition, key)
        return at is not None and now_ms - at < self._window_ms

    def admit(self, partition: int, key: str, now_ms: int) -> OutRecord:
        """Remembers `key` and returns the changelog record to produce with the outputs."""
        return self.put(partition, key, now_ms)

    def evict(self, now_ms: int) -> int:
        """Forgets every key admitted before the window as of now_ms (it no longer counts as seen); how many."""
        cutoff = now_ms - self._window_ms + 1
        evicted = 0
        for table in self.loaded():
            if isinstance(table, DiskMapping):
                evicted += table.evict_before(cutoff)
                continue
            for key in [key for key, at in table.items() if at < cutoff]:
                del table[key]
                evicted += 1
        return evicted

    def evict_when_due(self) -> None:
        if time.monotonic() >= self._next_eviction:
            self._next_eviction = time.monotonic() + EVICT_EVERY_S
            if evicted := self.evict(int(time.time() * 1000)):
                log.info("forgot %d admitted keys past the idempotency window", evicted)

    def _within_window(self, _old: int | None, at: int) -> int | None:
        return at if at >= int(time.time() * 1000) - self._window_ms else None  # past it: it would not count


class PoolDirectory:
    """The latest announcement of every pool, read from the compacted pools topic and kept up to date."""

    def __init__(self, base: dict[str, str], topic: str, serde: AvroSerde, consumer: Consumer | None = None):
        self._serde = serde
        self._topic = topic
        self._consumer = consumer if consumer is not None else restore_reader(base)
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
            except RegistryUnavailable as exc:  # not the announcement's fault: read it again at the next refresh
                log.warning("pool announcements wait for the Schema Registry: %s", exc)
                self._consumer.seek(TopicPartition(self._topic, 0, msg.offset() or 0))
                break
            except (SerdeError, KeyError, ValueError) as exc:
                log.warning("ignoring an unusable pool announcement: %s", exc)
                continue
            if self.pools.get(info.pool) != info:
                log.info("pool %s serves %s as %s", info.pool, info.model, info.model_version)
                changed = True
            self.pools[info.pool] = info
        return changed

    def close(self) -> None:
        self._consumer.close()
