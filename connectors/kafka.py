"""Thin confluent-kafka wrappers: configured clients, topic administration, a transactional outbox.

They carry records and offsets; every decision about what to produce lives in the caller.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource, NewPartitions, NewTopic, ResourceType

log = logging.getLogger(__name__)

Headers = list[tuple[str, bytes]]


@dataclass(frozen=True)
class OutRecord:
    """One record to produce: the unit a worker hands to the outbox."""

    topic: str
    value: bytes | None
    key: bytes | None = None
    headers: Headers = field(default_factory=list)


def consumer(base: dict[str, str], group_id: str, **overrides: object) -> Consumer:
    """A consumer for exactly-once pipelines: manual commits, read committed, cooperative rebalancing."""
    conf: dict[str, object] = {
        **base,
        "group.id": group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "isolation.level": "read_committed",
        "partition.assignment.strategy": "cooperative-sticky",
        "session.timeout.ms": 10000,
        "heartbeat.interval.ms": 1000,
        "max.poll.interval.ms": 300000,
    }
    conf.update(overrides)
    return Consumer(conf)


def producer(base: dict[str, str], **overrides: object) -> Producer:
    conf: dict[str, object] = {**base, "enable.idempotence": True, "linger.ms": 5, "compression.type": "lz4"}
    conf.update(overrides)
    return Producer(conf)


class TransactionStuck(RuntimeError):
    """The producer could neither commit nor abort: only a new process (a new producer) can go on."""


class TransactionalOutbox:
    """Produces a set of records and commits consumed offsets in one Kafka transaction.

    Either every record and the offsets become visible to read-committed consumers, or none do.
    """

    def __init__(self, base: dict[str, str], transactional_id: str, timeout_s: float = 30.0,
                 max_aborts_in_a_row: int = 5, **overrides: object):
        self._timeout = timeout_s
        # Aborts with no commit between: past this, something is wrong that a rewind does not cure (a record the
        # broker always refuses), and commit() raises TransactionStuck instead of letting the caller loop.
        self._max_aborts = max_aborts_in_a_row
        self._aborts = 0
        self._producer = producer(base, **{"transactional.id": transactional_id,
                                           # short: a killed process's open transaction blocks read-committed
                                           # readers until it times out
                                           "transaction.timeout.ms": 10000,
                                           # a dead letter carries a whole request plus its reason
                                           "message.max.bytes": 5 * 1024 * 1024, **overrides})
        self._producer.init_transactions(timeout_s)

    def commit(self, records: Sequence[OutRecord], offsets: dict[tuple[str, int], int], consumer: Consumer) -> None:
        """Raises KafkaException when the transaction did not commit; it has then been aborted, and the caller
        must rewind to the committed offsets. Raises TransactionStuck when it could not even be aborted, or after
        `max_aborts_in_a_row` aborts."""
        if not records and not offsets:
            return
        p = self._producer
        p.begin_transaction()
        try:
            for r in records:
                self._produce(r)
            if offsets:
                tps = [TopicPartition(t, part, off) for (t, part), off in offsets.items()]
                self._retrying(lambda: p.send_offsets_to_transaction(tps, consumer.consumer_group_metadata(),
                                                                     self._timeout))
            self._retrying(lambda: p.commit_transaction(self._timeout))
        except KafkaException as exc:
            self._abort()
            self._aborts += 1
            if self._aborts >= self._max_aborts:
                raise TransactionStuck(f"{self._aborts} transactions aborted in a row; last: {exc}") from exc
            raise
        self._aborts = 0

    def _retrying(self, call: Callable[[], None]) -> None:
        """Repeats a transactional call while librdkafka calls its error retriable (a coordinator moving)."""
        deadline = time.monotonic() + self._timeout
        while True:
            try:
                call()
                return
            except KafkaException as exc:
                err = exc.args[0] if exc.args else None
                if not (isinstance(err, KafkaError) and err.retriable()) or time.monotonic() > deadline:
                    raise
                log.warning("transactional call failed (%s); retrying", err)
                time.sleep(0.5)

    def _abort(self) -> None:
        try:
            self._retrying(lambda: self._producer.abort_transaction(self._timeout))
        except KafkaException as exc:
            raise TransactionStuck(f"could not abort the transaction: {exc}") from exc

    def _produce(self, r: OutRecord) -> None:
        while True:
            try:
                self._producer.produce(r.topic, r.value, r.key, headers=r.headers or None)
                return
            except BufferError:  # local queue full: serve delivery reports, then retry
                self._producer.poll(0.05)

    def close(self) -> None:
        self._producer.flush(self._timeout)


def rewind_to_committed(consumer: Consumer, partitions: Sequence[tuple[str, int]], timeout_s: float = 120.0) -> None:
    """Seeks each partition back to the group's committed offset (after an aborted transaction).

    The committed offsets are asked for again while the coordinator moves (a broker restart). A partition whose
    fetch has not started yet is skipped: it starts from the committed offset anyway. Any other failure raises,
    so that the caller stops rather than commit past work it has dropped.
    """
    tps = [TopicPartition(t, p) for t, p in partitions]
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            committed = consumer.committed(tps, timeout=10) if tps else []
            break
        except KafkaException as exc:
            if is_fatal(exc) or time.monotonic() > deadline:
                raise
            log.warning("committed offsets not available yet (%s); asking again", exc)
            time.sleep(1.0)
    for tp in committed:
        try:
            consumer.seek(TopicPartition(tp.topic, tp.partition, tp.offset if tp.offset >= 0 else OFFSET_BEGINNING))
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError._STATE:
                raise


def is_fatal(exc: KafkaException) -> bool:
    err = exc.args[0] if exc.args else None
    return isinstance(err, KafkaError) and err.fatal()


# ---------------------------------------------------------------- administration


@dataclass(frozen=True)
class TopicWanted:
    name: str
    partitions: int
    config: dict[str, str]


@dataclass
class TopicReport:
    created: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    drift: list[str] = field(default_factory=list)  # differences that apply cannot or will not fix


def apply_topics(base: dict[str, str], wanted: Iterable[TopicWanted], *, fix: bool = True,
                 timeout_s: float = 30.0) -> TopicReport:
    """Creates missing topics, raises partition counts and sets configs that differ; reports the rest as drift.

    Partitions are never removed (Kafka cannot); a topic with more partitions than declared is drift.
    """
    admin = AdminClient(dict(base))
    wanted = list(wanted)
    meta = admin.list_topics(timeout=timeout_s)
    report = TopicReport()
    to_create = [w for w in wanted if w.name not in meta.topics]
    if to_create and fix:
        futures = admin.create_topics(
            [NewTopic(w.name, w.partitions, 1, config=dict(w.config)) for w in to_create], request_timeout=timeout_s)
        for name, fut in futures.items():
            try:
                fut.result()
                report.created.append(name)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise
                report.unchanged.append(name)
    elif to_create:
        report.drift += [f"{w.name}: missing" for w in to_create]

    existing = [w for w in wanted if w.name in meta.topics]
    if not existing:
        return report
    resources = [ConfigResource(ResourceType.TOPIC, w.name) for w in existing]
    described = {r.name: f.result() for r, f in admin.describe_configs(resources, request_timeout=timeout_s).items()}
    for w in existing:
        have_parts = len(meta.topics[w.name].partitions)
        changes: list[str] = []
        if have_parts < w.partitions:
            changes.append(f"partitions {have_parts} -> {w.partitions}")
            if fix:
                admin.create_partitions([NewPartitions(w.name, w.partitions)])[w.name].result()
        elif have_parts > w.partitions:
            report.drift.append(f"{w.name}: has {have_parts} partitions, declared {w.partitions} (cannot shrink)")
        current = described[w.name]
        differing = {k: v for k, v in w.config.items() if k not in current or current[k].value != v}
        if differing:
            changes.append(", ".join(f"{k}={current[k].value if k in current else '?'} -> {v}"
                                     for k, v in differing.items()))
            if fix:
                _set_configs(admin, w.name, differing, timeout_s)
        if changes and fix:
            report.updated.append(f"{w.name}: {'; '.join(changes)}")
        elif changes:
            report.drift.append(f"{w.name}: {'; '.join(changes)}")
        else:
            report.unchanged.append(w.name)
    return report


def _set_configs(admin: AdminClient, topic: str, values: dict[str, str], timeout_s: float) -> None:
    from confluent_kafka.admin import AlterConfigOpType, ConfigEntry

    entries = [ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET) for k, v in values.items()]
    res = ConfigResource(ResourceType.TOPIC, topic, incremental_configs=entries)
    for fut in admin.incremental_alter_configs([res], request_timeout=timeout_s).values():
        fut.result()


def wait_for_broker(base: dict[str, str], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            AdminClient(dict(base)).list_topics(timeout=2)
            return
        except KafkaException as exc:
            last = exc
            time.sleep(0.5)
    raise RuntimeError(f"Kafka at {base.get('bootstrap.servers')} did not answer within {timeout_s:.0f}s: {last}")


def group_lag(base: dict[str, str], group_id: str, topics: Sequence[str], timeout_s: float = 10.0) -> dict[str, int]:
    """Per topic: end offset minus the group's committed offset (what the group still has to read)."""
    c = Consumer({**base, "group.id": group_id, "enable.auto.commit": False})
    try:
        meta = c.list_topics(timeout=timeout_s)
        tps = [TopicPartition(t, p) for t in topics if t in meta.topics for p in meta.topics[t].partitions]
        committed = c.committed(tps, timeout=timeout_s) if tps else []
        lag: dict[str, int] = {t: 0 for t in topics}
        for tp in committed:
            low, high = c.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), timeout=timeout_s)
            start = tp.offset if tp.offset >= 0 else low
            lag[tp.topic] += max(0, high - start)
        return lag
    finally:
        c.close()


OnAssign = Callable[[Consumer, list[TopicPartition]], None]
