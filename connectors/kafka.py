"""Thin confluent-kafka wrappers: configured clients and the one transactional step every processor uses.

They carry records and offsets; every decision about what to produce lives in the caller.

The step (`TransactionalStep`) is the only way a processor commits. One `commit()` produces the outputs, sends the
consumed offsets and commits, all under ONE deadline that stays below `transaction.timeout.ms`. When anything
fails the transaction is aborted and the step refuses every later commit until `rewind()` has sought every
assigned partition back to its committed offset and the caller has forgotten the local state of those
partitions. So a commit from a rebalance callback or from shutdown can never commit offsets past aborted work.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from connectors.retry import until_done

log = logging.getLogger(__name__)

Headers = list[tuple[str, str | bytes | None]]  # as confluent-kafka hands them out and takes them
TP = tuple[str, int]
T = TypeVar("T")

TRANSACTION_TIMEOUT_MS = 10_000  # short: a killed process's open transaction blocks read-committed readers
COMMIT_DEADLINE_S = 8.0  # produce + send offsets + commit, together; below the transaction timeout
ABORT_DEADLINE_S = 20.0


@dataclass(frozen=True)
class OutRecord:
    """One record to produce: the unit a processor hands to the transactional step."""

    topic: str
    value: bytes | None
    key: bytes | None = None
    headers: Headers = field(default_factory=list)
    timestamp: int | None = None  # ms since the epoch; None: the producer's clock (dead letters keep the original)
    partition: int | None = None  # None: by key; set where state must sit beside its input (a changelog)


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


# For a processor whose state of partition p serves partition p of every topic it reads (the gate: the three request
# topics; publication: rendered and review.decisions): the range assignor gives the same partition numbers of
# topics with equal counts to one member, as Kafka Streams assigns co-partitioned inputs as one task.
# cooperative-sticky places each topic-partition on its own, and two members would each decide on partition p
# from their own copy of its state. Rebalances are then eager (every partition revoked and assigned again).
CO_PARTITIONED: dict[str, object] = {"partition.assignment.strategy": "range"}


def producer(base: dict[str, str], **overrides: object) -> Producer:
    """An idempotent producer. Uncompressed unless the base settings ask (ZIMAGE_KAFKA_EXTRA=compression.type=lz4,
    say, where the network is the bottleneck): the records are small Avro, and compressing cost the broker a
    quarter of its CPU per request here (it decompresses every batch to check it) for little saved.

    Keyed records go where Kafka's Java clients put them (murmur2, not librdkafka's default CRC32): the gate and
    publication keep their state per partition and expect each request on the partition of its id as key
    (processors/partitioning.py), and so do consumers in other languages that join these topics by key."""
    conf: dict[str, object] = {"compression.type": "none", "partitioner": "murmur2_random", **base,
                               "enable.idempotence": True, "linger.ms": 5}
    conf.update(overrides)
    return Producer(conf)


def consume_ready(consumer: Consumer, max_messages: int, timeout_s: float) -> list[Message]:
    """Up to `max_messages`, returned as soon as one is there. (consume() waits out its whole timeout unless the
    batch fills: every stage would add that timeout to a request's latency at light load.)"""
    msgs = consumer.consume(max_messages, timeout=0)
    if msgs or timeout_s <= 0:
        return msgs
    first = consumer.poll(timeout_s)
    if first is None:
        return []
    return [first, *consumer.consume(max_messages - 1, timeout=0)] if max_messages > 1 else [first]


class TransactionAborted(RuntimeError):
    """The transaction did not commit and was aborted: call `TransactionalStep.rewind()` before anything else."""


class RewindRequired(RuntimeError):
    """A commit was asked for after an abort and before the rewind: refused, nothing was produced."""


class TransactionStuck(RuntimeError):
    """The producer could neither commit nor abort, or is fenced: only a new process (a new producer) can go on."""


class _DeadlinePassed(Exception):
    pass


def _kafka_error(exc: KafkaException) -> KafkaError | None:
    err = exc.args[0] if exc.args else None
    return err if isinstance(err, KafkaError) else None


def _retriable(exc: BaseException) -> bool:
    """An error that the same transactional call may succeed after (a coordinator moving), not one that aborts."""
    err = _kafka_error(exc) if isinstance(exc, KafkaException) else None
    return err is not None and err.retriable() and not err.fatal() and not err.txn_requires_abort()


def is_fatal(exc: KafkaException) -> bool:
    err = _kafka_error(exc)
    return err is not None and err.fatal()


class TransactionalStep:
    """Produces records and commits consumed offsets in one Kafka transaction, or neither."""

    def __init__(self, base: dict[str, str], transactional_id: str, *, deadline_s: float = COMMIT_DEADLINE_S,
                 max_aborts_in_a_row: int = 5, client: Producer | None = None,
                 outcome_wait_s: float = ABORT_DEADLINE_S, **overrides: object):
        if deadline_s * 1000 >= TRANSACTION_TIMEOUT_MS:
            raise ValueError("the commit deadline must stay below transaction.timeout.ms")
        self._deadline_s = deadline_s
        self._outcome_wait_s = outcome_wait_s  # how long an abort, or the outcome of a late commit, is waited for
        # Aborts with no commit between: past this, something is wrong that a rewind does not cure (a record the
        # broker always refuses), and commit() raises TransactionStuck instead of letting the caller loop.
        self._max_aborts = max_aborts_in_a_row
        self._aborts = 0
        self._needs_rewind = False
        self.aborted_total = 0
        self._producer = client if client is not None else producer(base, **{
            "transactional.id": transactional_id, "transaction.timeout.ms": TRANSACTION_TIMEOUT_MS,
            "message.max.bytes": 5 * 1024 * 1024,  # a dead letter carries a whole request plus its reason
            # A transaction begun while the markers of the one before are still being written is refused with
            # CONCURRENT_TRANSACTIONS and retried after this backoff: librdkafka's 100 ms default made one commit
            # in ten take 100 ms longer at light load (the Java client retries it after 20 ms; KAFKA-5477). The
            # backoff still doubles up to librdkafka's 1 s cap: a commit retried every few milliseconds through a
            # broker restart reached the broker before it knew its partitions' leaders, and Kafka then skipped
            # the commit markers of some partitions.
            "retry.backoff.ms": 2,
            # Records go out while the offsets are being sent, not when the commit flushes them: a transaction
            # produces all of its records at once, so they still travel in few requests.
            "linger.ms": 0,
            **overrides})
        try:
            self._call("init_transactions", self._producer.init_transactions, time.monotonic() + ABORT_DEADLINE_S)
        except (KafkaException, _DeadlinePassed) as exc:
            raise TransactionStuck(f"could not initialise transactions: {exc}") from exc

    @property
    def needs_rewind(self) -> bool:
        return self._needs_rewind

    def commit(self, records: Sequence[OutRecord], offsets: dict[TP, int], consumer: Consumer) -> None:
        """Commits `records` and `offsets` atomically. Raises RewindRequired (nothing done) while a rewind is due,
        TransactionAborted (aborted; rewind now), or TransactionStuck (the process must end)."""
        if self._needs_rewind:
            raise RewindRequired("a transaction was aborted; rewind() before committing again")
        if not records and not offsets:
            return
        deadline = time.monotonic() + self._deadline_s
        p = self._producer
        committing = False
        try:
            p.begin_transaction()
            for record in records:
                self._produce(record, deadline)
            if offsets:
                tps = [TopicPartition(t, part, off) for (t, part), off in offsets.items()]
                metadata = consumer.consumer_group_metadata()
                self._call("send_offsets_to_transaction",
                           lambda left: p.send_offsets_to_transaction(tps, metadata, left), deadline)
            committing = True
            self._call("commit_transaction", p.commit_transaction, deadline)
        except (KafkaException, _DeadlinePassed) as exc:
            if committing and _retriable(exc) and self._commit_finished():
                self._aborts = 0  # committed after all, only later than the deadline
                return
            self._needs_rewind = True
            self.aborted_total += 1
            if isinstance(exc, KafkaException) and is_fatal(exc):
                raise TransactionStuck(f"the producer failed fatally: {exc}") from exc
            self._abort()
            self._aborts += 1
            if self._aborts >= self._max_aborts:
                raise TransactionStuck(f"{self._aborts} transactions aborted in a row; last: {exc}") from exc
            raise TransactionAborted(str(exc) or type(exc).__name__) from exc
        self._aborts = 0

    def rewind(self, consumer: Consumer, forget: Callable[[list[TP]], None]) -> None:
        """After an abort: seek every assigned partition to its committed offset, then let the caller forget
        their local state (`forget`). Commits are allowed again only once both are done."""
        parts = [(tp.topic, tp.partition) for tp in consumer.assignment()]
        rewind_to_committed(consumer, parts)
        forget(parts)
        self._needs_rewind = False

    def _call(self, what: str, call: Callable[[float], T], deadline: float) -> T:
        """Repeats a transactional call while librdkafka calls its error retriable, until the deadline; each try
        gets what is left of it."""

        def attempt() -> T:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _DeadlinePassed(f"{what}: the transaction's deadline passed")
            return call(left)

        return until_done(attempt, is_infrastructure=_retriable,
                          on_retry=lambda exc, n: log.warning("%s failed (%s); retrying", what, exc),
                          within_s=max(0.0, deadline - time.monotonic()))

    def _commit_finished(self) -> bool:
        """A commit_transaction that ran out of time goes on in the background, and an abort cannot start until it
        ends: ask for its outcome once more. True: it committed. False: it failed in a way that an abort cures.
        TransactionStuck: no outcome could be had (the process must end; the next producer fences this one)."""
        try:
            self._call("commit_transaction", self._producer.commit_transaction,
                       time.monotonic() + self._outcome_wait_s)
            return True
        except (KafkaException, _DeadlinePassed) as exc:
            if isinstance(exc, KafkaException) and not is_fatal(exc) and not _retriable(exc):
                return False
            raise TransactionStuck(f"the outcome of a commit could not be had: {exc}") from exc

    def _abort(self) -> None:
        try:
            self._call("abort_transaction", self._producer.abort_transaction,
                       time.monotonic() + self._outcome_wait_s)
        except (KafkaException, _DeadlinePassed) as exc:
            raise TransactionStuck(f"could not abort the transaction: {exc}") from exc

    def _produce(self, r: OutRecord, deadline: float) -> None:
        extra: dict[str, Any] = {}
        if r.timestamp is not None:
            extra["timestamp"] = r.timestamp
        if r.partition is not None:
            extra["partition"] = r.partition
        while True:
            try:
                self._producer.produce(r.topic, r.value, r.key, headers=r.headers or None, **extra)
                return
            except BufferError:  # local queue full: serve delivery reports, then retry
                if time.monotonic() > deadline:
                    raise _DeadlinePassed("produce: the local queue stayed full until the deadline") from None
                self._producer.poll(0.05)

    def close(self) -> None:
        """Delivers what is queued outside transactions. Never raises: it runs while a process ends, often because
        of the very error it would raise again, and must not hide that one."""
        try:
            self._producer.flush(self._deadline_s)
        except KafkaException as exc:
            log.warning("closing the producer: %s", exc)


def rewind_to_committed(consumer: Consumer, partitions: Sequence[TP], timeout_s: float = 120.0) -> None:
    """Seeks each partition back to the group's committed offset (after an aborted transaction).

    The committed offsets are asked for again while the coordinator moves (a broker restart). A partition the group
    never committed starts where a new member would (auto.offset.reset: the beginning). A partition whose fetch
    has not started yet is skipped: it starts from the committed offset anyway. Any other failure, including an
    error for one partition, raises, so that the caller stops rather than commit past work it has dropped.
    """
    tps = [TopicPartition(t, p) for t, p in partitions]
    if not tps:
        return
    committed = until_done(
        lambda: consumer.committed(tps, timeout=10),
        is_infrastructure=lambda exc: isinstance(exc, KafkaException) and not is_fatal(exc),
        on_retry=lambda exc, attempt: log.warning("committed offsets not available yet (%s); asking again", exc),
        within_s=timeout_s)
    for tp in committed:
        if tp.error is not None:
            raise KafkaException(tp.error)
        try:
            consumer.seek(TopicPartition(tp.topic, tp.partition, tp.offset if tp.offset >= 0 else OFFSET_BEGINNING))
        except KafkaException as exc:
            err = _kafka_error(exc)
            if err is None or err.code() != KafkaError._STATE:
                raise
