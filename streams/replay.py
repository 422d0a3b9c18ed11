"""`zimage replay`: re-drive a topic's records by offsets, by time range or by SKU set, at low priority.

    zimage replay --since 2026-11-27T00:00 --until 2026-11-28T00:00            # yesterday's requests, again
    zimage replay --skus skus.txt --generation template.chairs@4               # a backfill of some SKUs
    zimage replay --topic zimage.sku.changes --category chairs --generation b2 # through the SKU connector

Records are re-driven as they were (key and value bytes), with the replay id, and the generation a backfill asks
for, in headers (processors/replay_plan.py). Request topics are re-driven into `requests.low` by default, so a
replay never overtakes live traffic: the workers' share rules hold. SKU events are re-driven into `sku.changes`,
where the connector turns them into low-priority requests.

What a replay leads to is decided downstream, not here: the gate's idempotency on (tenant, request_id,
generation) makes a second run of the same replay publish nothing, and the same requests with their seeds
render the same bytes; a new generation renders past the cache and publishes new versions.

The replay reads committed records only, with no consumer group (it never moves anyone's offsets), and ends at
the end offsets it saw when it started, so it is bounded even while producers go on writing.
"""
from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from connectors import kafka
from processors.replay_plan import TP, Bounds, InvalidReplay, Pace, PartitionRange, partition_range, redriven_headers
from schemas.serde import AvroSerde, SerdeError

log = logging.getLogger(__name__)

READ_BATCH = 10_000
TIMEOUT_S = 15.0


@dataclass(frozen=True)
class Replay:
    topics: tuple[str, ...]
    into: str
    replay_id: str
    bounds: Bounds = field(default_factory=Bounds)
    generation: str | None = None
    skus: frozenset[str] | None = None  # None: every record; else only records of these SKU ids
    category: str | None = None  # SKU events only: only events of this category
    dry_run: bool = False
    rate: float | None = None
    sample: int = 5


@dataclass
class Report:
    planned: int = 0  # offsets in the ranges
    scanned: int = 0  # records read
    matched: int = 0  # records that passed the filters (re-driven unless a dry run)
    produced: int = 0
    seconds: float = 0.0
    sample: list[dict[str, Any]] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.matched / self.seconds if self.seconds > 0 else 0.0


def _reader(conf: dict[str, str]) -> Consumer:
    return Consumer({**conf, "group.id": f"zimage-replay-{uuid.uuid4().hex[:12]}", "enable.auto.commit": False,
                     "isolation.level": "read_committed", "enable.partition.eof": True,
                     "fetch.max.bytes": 64 * 1024 * 1024, "queued.max.messages.kbytes": 256 * 1024})


def plan(consumer: Consumer, topics: tuple[str, ...], bounds: Bounds) -> dict[TP, PartitionRange]:
    """The offsets to re-drive per partition, from the watermarks and the offsets of the time bounds."""
    metadata = consumer.list_topics(timeout=TIMEOUT_S)
    parts: list[TP] = []
    for topic in topics:
        found = metadata.topics.get(topic)
        if found is None or found.error is not None:
            raise InvalidReplay(f"no topic {topic!r} on the cluster")
        parts += [(topic, p) for p in sorted(found.partitions)]

    def at(ms: int | None) -> dict[TP, int]:
        if ms is None:
            return {}
        answered = consumer.offsets_for_times([TopicPartition(t, p, ms) for t, p in parts], timeout=TIMEOUT_S)
        return {(tp.topic, tp.partition): tp.offset for tp in answered}

    since, until = at(bounds.since_ms), at(bounds.until_ms)
    ranges = {}
    for tp in parts:
        low, high = consumer.get_watermark_offsets(TopicPartition(*tp), timeout=TIMEOUT_S, cached=False)
        ranges[tp] = partition_range(bounds, low, high, since.get(tp), until.get(tp))
    return ranges


class _Filter:
    """Which records a replay re-drives: all of them, or those of a SKU set or a category (decoded to tell)."""

    def __init__(self, replay: Replay, serde: AvroSerde):
        self._skus = replay.skus
        self._category = replay.category
        self._serde = serde

    @property
    def decodes(self) -> bool:
        return self._skus is not None or self._category is not None

    def __call__(self, msg: Message) -> tuple[bool, dict[str, Any] | None]:
        if not self.decodes:
            return True, None
        value = self.decode(msg)
        if value is None:
            return False, None  # not ours to judge here: it was refused when first read, and is not re-driven
        if self._skus is not None and value.get("sku_id") not in self._skus:
            return False, value
        return self._category is None or value.get("category") == self._category, value

    def decode(self, msg: Message) -> dict[str, Any] | None:
        name = "SkuChanged" if (msg.topic() or "").endswith(".sku.changes") else "GenerationRequest"
        try:
            return self._serde.decode(name, msg.value() or b"", topic=msg.topic())
        except (SerdeError, ValueError, TypeError):
            return None


def _describe(msg: Message, value: dict[str, Any] | None) -> dict[str, Any]:
    shown: dict[str, Any] = {"topic": msg.topic(), "partition": msg.partition(), "offset": msg.offset(),
                             "key": (msg.key() or b"").decode("utf-8", "replace")[:80]}
    for name in ("request_id", "tenant", "sku_id", "version", "category", "prompt"):
        if value is not None and value.get(name) is not None:
            shown[name] = str(value[name])[:80]
    return shown


def run(conf: dict[str, str], serde: AvroSerde, replay: Replay,
        progress: Callable[[int, int], None] | None = None) -> Report:
    """Re-drives what `replay` selects and returns what it did. `progress(done, total)` is called as it goes."""
    started = time.monotonic()
    consumer = _reader(conf)
    producer: Producer | None = None
    report = Report()
    failures: list[str] = []
    try:
        ranges = plan(consumer, replay.topics, replay.bounds)
        remaining = {tp: r for tp, r in ranges.items() if r.size}
        report.planned = sum(r.size for r in remaining.values())
        if not remaining:
            return report
        consumer.assign([TopicPartition(t, p, r.start) for (t, p), r in remaining.items()])
        if not replay.dry_run:
            producer = kafka.producer(conf, **{"linger.ms": 20, "batch.size": 1_000_000,
                                               "queue.buffering.max.messages": 1_000_000,
                                               "queue.buffering.max.kbytes": 512 * 1024})
        keep = _Filter(replay, serde)
        pace = Pace(replay.rate)

        def delivered(err: KafkaError | None, _msg: Message) -> None:
            if err is not None:
                failures.append(str(err))

        done = 0
        while remaining:
            msgs = consumer.consume(READ_BATCH, timeout=1.0)
            matched = 0
            for msg in msgs:
                tp = (msg.topic() or "", msg.partition() or 0)
                span = remaining.get(tp)
                err = msg.error()
                if span is None:
                    continue
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        remaining.pop(tp)
                    else:
                        raise KafkaException(err)
                    continue
                offset = msg.offset() or 0
                if offset >= span.end:
                    remaining.pop(tp)
                    continue
                report.scanned += 1
                wanted, value = keep(msg)
                if wanted:
                    matched += 1
                    if len(report.sample) < replay.sample:
                        report.sample.append(_describe(msg, value if keep.decodes else keep.decode(msg)))
                    if producer is not None:
                        headers = redriven_headers(_header_pairs(msg), replay.replay_id, replay.generation)
                        _produce(producer, replay.into, msg, headers, delivered)
                if offset + 1 >= span.end:
                    remaining.pop(tp)
            # transaction markers take offsets but are never delivered: a partition whose position reached its end
            # is done even if the last record seen was before it
            # (one position query per partition serves both that check and the progress)
            left = 0
            for tp in list(remaining):
                span, position = remaining[tp], _position(consumer, tp)
                if position >= span.end:
                    remaining.pop(tp)
                else:
                    left += span.end - max(span.start, position)
            report.matched += matched
            done = report.planned - left
            if progress is not None:
                progress(done, report.planned)
            if producer is not None:
                producer.poll(0)
            pace.sent(matched)
        if producer is not None:
            left = producer.flush(60)
            if left:
                failures.append(f"{left} records not acknowledged within 60 s")
            report.produced = report.matched
    finally:
        consumer.close()
        report.seconds = time.monotonic() - started
    if failures:
        raise KafkaException(f"re-driving failed: {failures[0]} ({len(failures)} errors)")
    return report


def _position(consumer: Consumer, tp: TP) -> int:
    [position] = consumer.position([TopicPartition(*tp)])
    return max(0, position.offset)


def _header_pairs(msg: Message) -> list[tuple[str, bytes | None]]:
    raw = msg.headers() or []
    pairs = list(raw.items()) if isinstance(raw, dict) else raw
    return [(k, v.encode() if isinstance(v, str) else v) for k, v in pairs]


def _produce(producer: Producer, topic: str, msg: Message, headers: list[tuple[str, bytes]],
             delivered: Callable[[KafkaError | None, Message], None]) -> None:
    while True:
        try:
            wire: list[tuple[str, str | bytes | None]] = [(k, v) for k, v in headers]
            producer.produce(topic, msg.value(), msg.key(), headers=wire, on_delivery=delivered)
            return
        except BufferError:  # the producer's queue is full: let it drain (backpressure), then go on
            producer.poll(0.05)
