"""The loop of every exactly-once processor (gate, publication, SKU connector): consume what is ready, decide it,
and commit the outputs with the consumed offsets in one transaction of the shared step.

After an abort, or when a commit inside a rebalance callback aborted, the records in hand are dropped and the
processor rewinds (every assigned partition back to its committed offset, its local state forgotten) before
anything else commits. A record of a partition revoked during consume() is left to its next owner.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from confluent_kafka import Consumer, KafkaError, Message

from connectors import kafka
from connectors.kafka import OutRecord, TransactionAborted, TransactionalStep
from streams import metrics
from streams.heap import freeze_start_up_heap
from streams.liveness import Deadlines

log = logging.getLogger(__name__)

COMMIT_LIMIT_S = 60.0  # librdkafka can block past its own timeouts when the coordinator vanishes
TP = tuple[str, int]
Decide = Callable[[list[Message]], tuple[list[OutRecord], dict[TP, int]]]


def _nothing() -> None:
    return None


@dataclass
class ProcessorLoop:
    consumer: Consumer
    step: TransactionalStep
    decide: Decide  # a batch -> its outputs and the offsets to commit with them (none: nothing to commit yet)
    rewind: Callable[[], None]
    batch: int = 500
    poll_s: float = 0.1
    fill_s: float = 0.005  # under load, how long a batch may wait to fill (nothing waits at light load)
    before_poll: Callable[[], None] = _nothing  # holds that are due, new pool announcements, ...
    after_commit: Callable[[], None] = _nothing  # what may happen only once the outputs are committed
    on_abort: Callable[[int], None] = field(default=lambda records: None)

    def run(self, stop: threading.Event) -> None:
        deadlines = Deadlines()
        freeze_start_up_heap()
        while not stop.is_set():
            self.before_poll()
            msgs = kafka.consume_ready(self.consumer, self.batch, self.poll_s)
            if 1 < len(msgs) < self.batch and self.fill_s > 0:
                # Under load (more than one record was waiting), a moment more fills the batch: the transaction's
                # fixed cost (five round trips, markers on every partition) is then shared by more records.
                msgs += self.consumer.consume(self.batch - len(msgs), timeout=self.fill_s)
            if self.step.needs_rewind:  # what is in hand was fetched before the rewind: read it again
                self.rewind()
                continue
            assigned = {(tp.topic, tp.partition) for tp in self.consumer.assignment()}
            msgs = [m for m in msgs if usable(m) and (m.topic(), m.partition()) in assigned]
            if not msgs:
                continue
            records, offsets = self.decide(msgs)
            if not offsets:
                continue  # everything in hand waits (a hold): nothing to commit yet
            try:
                with deadlines.guard("a transaction commit", COMMIT_LIMIT_S):
                    self.step.commit(records, offsets, self.consumer)
            except TransactionAborted as exc:
                metrics.ERRORS.labels("transaction").inc()
                self.on_abort(len(msgs))
                log.warning("transaction aborted (%s); reading again from the committed offsets", exc)
                self.rewind()
                continue
            self.after_commit()


def usable(msg: Message) -> bool:
    """A record to decide (not an error event; an error other than end-of-partition is logged)."""
    err = msg.error()
    if err is not None and err.code() != KafkaError._PARTITION_EOF:
        log.warning("consume error: %s", err)
    return err is None
