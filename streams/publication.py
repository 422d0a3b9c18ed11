"""`zimage processors`: publication, ImageRendered (zimage.rendered) -> ImageReady (zimage.images.ready).

A transactional relay: it reads committed records only, and each batch's ImageReady events (and the
RequestFailed / dead letters of records it cannot publish) commit in one Kafka transaction with the offsets
they came from. A crash at any point leaves either both or neither, so every ImageRendered is published
exactly once. (faust-streaming's exactly_once mode sends records without a partition outside its
transactions; a SIGKILL test showed duplicates, hence this relay.)
"""
from __future__ import annotations

import logging
import threading
import time

from confluent_kafka import KafkaError, Message

from connectors import kafka
from connectors.kafka import OutRecord, TransactionAborted, TransactionalStep
from processors.events import image_ready
from schemas.serde import AvroSerde
from streams.failures import FailureRecords, Origin
from streams.liveness import Deadlines
from streams.settings import Settings

log = logging.getLogger(__name__)

COMMIT_LIMIT_S = 60.0  # librdkafka can block past its own timeouts when the coordinator vanishes


class PublicationRelay:
    def __init__(self, settings: Settings, serde: AvroSerde, batch: int = 500):
        self.s = settings
        self.topology = settings.topology
        self._serde = serde
        self._batch = batch
        self._failures = FailureRecords(self.topology, serde, stage="processors:publication",
                                        limits=settings.limits())
        self._stop = threading.Event()
        self.group_id = f"{settings.topic_prefix}-publication"
        self._max_ready_bytes = self.topology.max_bytes(self.topology.images_ready)

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        conf = self.s.kafka_config()
        self._consumer = kafka.consumer(conf, self.group_id)
        step = TransactionalStep(conf, f"{self.group_id}-{self.s.worker_id}")
        deadlines = Deadlines()
        self._consumer.subscribe([self.topology.rendered])
        log.info("publishing %s -> %s in group %s", self.topology.rendered, self.topology.images_ready,
                 self.group_id)
        clean = False
        try:
            while not self._stop.is_set():
                msgs = self._consumer.consume(self._batch, timeout=0.1)
                assigned = {(tp.topic, tp.partition) for tp in self._consumer.assignment()}
                # a partition revoked during consume() is its next owner's to publish
                msgs = [m for m in msgs if self._usable(m) and (m.topic(), m.partition()) in assigned]
                if step.needs_rewind:  # the records in hand were fetched before the rewind: read again
                    step.rewind(self._consumer, forget=lambda parts: None)
                    continue
                if not msgs:
                    continue
                records, offsets = self.publish(msgs)
                try:
                    with deadlines.guard("a transaction commit", COMMIT_LIMIT_S):
                        step.commit(records, offsets, self._consumer)
                except TransactionAborted as exc:
                    log.warning("transaction aborted (%s); reading again from the committed offsets", exc)
                    step.rewind(self._consumer, forget=lambda parts: None)
            clean = True
        finally:
            if clean:
                self._consumer.close()
            step.close()

    def publish(self, msgs: list[Message]) -> tuple[list[OutRecord], dict[tuple[str, int], int]]:
        """The records one batch of ImageRendered turns into, and the offsets to commit with them."""
        records: list[OutRecord] = []
        offsets: dict[tuple[str, int], int] = {}
        now_ms = int(time.time() * 1000)
        for msg in msgs:
            # A consumed record always has all three (the client's types allow None for error events).
            source: tuple[str, int, int] = (msg.topic(), msg.partition(), msg.offset())  # type: ignore[assignment]
            offsets[source[:2]] = source[2] + 1
            try:
                rendered = self._serde.decode("ImageRendered", msg.value() or b"", topic=source[0])
                ready = image_ready(rendered, now_ms)
                value = self._serde.encode("ImageReady", ready, topic=self.topology.images_ready)
                if len(value) > self._max_ready_bytes:
                    raise ValueError(f"ImageReady would be {len(value)} bytes; at most {self._max_ready_bytes}")
            except Exception as exc:  # noqa: BLE001 - a record never stops publication
                log.error("unpublishable record at %s: %s", source, exc)
                records += self._failures("unpublishable", f"{type(exc).__name__}: {exc}", Origin.of(msg), None)
                continue
            records.append(OutRecord(self.topology.images_ready, value, ready["request_id"].encode()))
        return records, offsets

    @staticmethod
    def _usable(msg: Message) -> bool:
        err = msg.error()
        if err is not None and err.code() != KafkaError._PARTITION_EOF:
            log.warning("consume error: %s", err)
        return err is None
