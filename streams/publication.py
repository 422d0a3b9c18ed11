"""`zimage processors`: publication, ImageRendered (zimage.rendered) -> ImageReady (zimage.images.ready).

A transactional relay: it reads committed records only, and each batch's ImageReady events (and the
RequestFailed / dead letters of records it cannot publish) commit in one Kafka transaction with the offsets
they came from. A crash at any point leaves either both or neither, so every ImageRendered is published
exactly once. (faust-streaming's exactly_once mode sends records without a partition outside its
transactions; a SIGKILL test showed duplicates, hence this relay.)
"""
from __future__ import annotations

import json
import logging
import threading
import time

from confluent_kafka import KafkaError, Message

from connectors import kafka
from connectors.kafka import OutRecord, TransactionAborted, TransactionalStep
from connectors.redis_store import RedisStore, cache_entry_key
from processors.events import image_ready
from processors.publication_state import by_sku_key
from processors.status import request_status, status_key
from schemas.serde import AvroSerde
from streams.failures import FailureRecords, Origin
from streams.liveness import Deadlines
from streams.published_state import PublishedState
from streams.settings import Settings

log = logging.getLogger(__name__)

COMMIT_LIMIT_S = 60.0  # librdkafka can block past its own timeouts when the coordinator vanishes


class PublicationRelay:
    def __init__(self, settings: Settings, serde: AvroSerde, batch: int = 500, cache: RedisStore | None = None):
        self.s = settings
        self._cache = cache
        self._to_cache: list[tuple[str, dict]] = []  # (cache key, entry) of the batch being committed
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
        self._published = PublishedState(conf, self.topology, self._serde, self.s.publication_window_days)
        deadlines = Deadlines()
        self._consumer.subscribe([self.topology.rendered],
                                 on_revoke=lambda consumer, parts: self._published.forget(p.partition for p in parts))
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
                    self._rewind(step)
                    continue
                if not msgs:
                    continue
                records, offsets = self.publish(msgs)
                try:
                    with deadlines.guard("a transaction commit", COMMIT_LIMIT_S):
                        step.commit(records, offsets, self._consumer)
                except TransactionAborted as exc:
                    log.warning("transaction aborted (%s); reading again from the committed offsets", exc)
                    self._rewind(step)
                    continue
                self._fill_cache()
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
                state = self._published.of_partition(source[1])
                decision = state.decide(rendered, now_ms)
                if not decision.publish:
                    continue  # this request's generation and content are published already (a replay, a redo)
                ready = image_ready(rendered, now_ms, version=decision.version, supersedes=decision.supersedes)
                value = self._serde.encode("ImageReady", ready, topic=self.topology.images_ready)
                if len(value) > self._max_ready_bytes:
                    raise ValueError(f"ImageReady would be {len(value)} bytes; at most {self._max_ready_bytes}")
            except Exception as exc:  # noqa: BLE001 - a record never stops publication
                log.error("unpublishable record at %s: %s", source, exc)
                records += self._failures("unpublishable", f"{type(exc).__name__}: {exc}", Origin.of(msg), None)
                continue
            state.apply(ready)
            records.append(OutRecord(self.topology.images_ready, value, ready["request_id"].encode()))
            sku_key = by_sku_key(ready)
            if sku_key is not None and self._published.sku_latest().offer(ready):
                records.append(OutRecord(self.topology.images_by_sku, value, sku_key))
            status = request_status(request=ready, status="published", stage="publication", now_ms=now_ms,
                                    generation=ready["generation"], final=True,
                                    detail=f"version {decision.version}")
            records.append(OutRecord(self.topology.status, self._serde.encode("RequestStatus", status),
                                     status_key(ready["tenant"], ready["request_id"])))
            key = rendered.get("cache_key")
            if key and not rendered.get("cached"):  # what the gate answered from the cache is there already
                self._to_cache.append((key, {"model_id": rendered["model_id"], "images": rendered["images"]}))
        return records, offsets

    def _rewind(self, step: TransactionalStep) -> None:
        """After an abort: read again from the committed offsets, with the state as the topics hold it."""
        step.rewind(self._consumer, forget=lambda parts: self._published.forget())
        self._to_cache = []

    def _fill_cache(self) -> None:
        """Remembers what the committed batch rendered under its cache keys, for the gate to answer repeats with
        (best effort: with Redis down the next repeat is rendered again)."""
        entries, self._to_cache = self._to_cache, []
        if self._cache is None:
            return
        for key, entry in entries:
            self._cache.set(cache_entry_key(self.s.topic_prefix, key), json.dumps(entry).encode(), self.s.cache_ttl_s)

    @staticmethod
    def _usable(msg: Message) -> bool:
        err = msg.error()
        if err is not None and err.code() != KafkaError._PARTITION_EOF:
            log.warning("consume error: %s", err)
        return err is None
