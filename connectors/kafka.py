"""Thin confluent-kafka wrappers: configured clients and the one transactional step every processor uses.

They carry records and offsets; every decision about what to produce lives in the caller.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer, TopicPartition

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
