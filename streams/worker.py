"""The render worker: one member of the consumer group of a model pool.

Main thread: poll the priority topics without pause, decode and check each request, hand it to the scheduler,
pause a priority's partitions while its buffer is full, and every few milliseconds commit the finished prefix
(outputs + consumed offsets) in one Kafka transaction. Render thread (streams/rendering.py): batches -> images
-> object storage -> ImageRendered, beside the main thread.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from connectors import kafka
from connectors.kafka import OutRecord
from connectors.storage import ObjectStore
from processors.batching import Batch, CompatKey, Pending
from processors.offsets import OffsetTracker
from processors.renderer import UnsupportedSettings
from processors.requests import InvalidRequest, Limits, settings_of, validate
from processors.scheduler import Scheduler, SchedulerConfig
from schemas.serde import AvroSerde, RegistryUnavailable, SerdeError, UnknownSchema
from streams import metrics
from streams.failures import FailureRecords
from streams.rendering import Admitted, BatchRenderer, RenderStage
from streams.settings import Settings
from streams.supervise import Watchdog

log = logging.getLogger(__name__)

TP = tuple[str, int]


class Outcome(NamedTuple):
    """A finished request as the tracker holds it until commit: its records and how to count it."""

    records: list[OutRecord]
    priority: str
    status: str | None  # None: not this worker's to count (another pool's request)


class RenderWorker:
    def __init__(self, settings: Settings, renderer: BatchRenderer, store: ObjectStore, serde: AvroSerde,
                 *, batch_key_extra=None, commit_interval_s: float = 0.05, consume_batch: int = 500):
        self.s = settings
        self.topology = settings.topology
        self._renderer = renderer
        self._serde = serde
        self._key_extra = batch_key_extra or (lambda request: ())
        self._commit_interval = commit_interval_s
        self._consume_batch = consume_batch
        self._limits = Limits(max_prompt_chars=settings.max_prompt_chars, max_width=settings.max_width,
                              max_height=settings.max_height, max_steps=settings.max_steps,
                              max_images=settings.max_images_per_request)
        self._all_models = tuple(m for ms in settings.pool_table.values() for m in ms)
        self._my_models = set(settings.pool_models)
        self._priority_of_topic = {t: p for p, t in self.topology.render_input_topics().items()}
        self._lock = threading.Condition()
        self._scheduler = Scheduler(SchedulerConfig(
            max_batch_size=settings.max_batch_size, max_wait_s=settings.max_wait_ms / 1000,
            capacity_per_priority=settings.buffer_per_priority,
            min_share={"normal": settings.min_share_normal, "low": settings.min_share_low},
            aging_s=settings.aging_s))
        self._tracker = OffsetTracker()
        self._epoch: dict[TP, int] = {}
        self._overflow: dict[str, list[Pending]] = {p: [] for p in self._priority_of_topic.values()}
        self._paused: set[str] = set()
        self._assigned: set[TP] = set()
        self._committed: dict[TP, int] = {}
        self._failure_records = FailureRecords(self.topology, serde, stage=f"worker:{settings.pool}")
        self._stop = threading.Event()
        self._needs_rewind = False
        self.group_id = f"{settings.topic_prefix}-render-{settings.pool}"
        self._stage = RenderStage(
            renderer=renderer, store=store, encode_rendered=lambda v: serde.encode("ImageRendered", v,
                                                                                   topic=self.topology.rendered),
            rendered_topic=self.topology.rendered, worker_id=settings.worker_id, take_batch=self._take_batch,
            on_done=self._on_done, on_fail=self._on_render_fail)

    # ------------------------------------------------------------------ lifecycle

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        conf = self.s.kafka_config()
        self._consumer = kafka.consumer(conf, self.group_id)
        self._outbox = kafka.TransactionalOutbox(
            conf, transactional_id=f"{self.group_id}-{self.s.worker_id}", timeout_s=10.0)
        self._commit_watchdog = Watchdog(limit_s=60.0, what="a Kafka transaction commit")
        self._consumer.subscribe(list(self._priority_of_topic), on_assign=self._on_assign,
                                 on_revoke=self._on_revoke, on_lost=self._on_lost)
        self._stage.start()
        self._mark_ready()
        log.info("worker %s serving pool %s (%s) in group %s", self.s.worker_id, self.s.pool,
                 ", ".join(sorted(self._my_models)), self.group_id)
        last_commit = last_gauges = time.monotonic()
        try:
            while not self._stop.is_set():
                if self._stage.failure is not None:
                    raise RuntimeError("the render stage failed") from self._stage.failure
                msgs = self._consumer.consume(self._consume_batch, timeout=0.02)
                if self._needs_rewind:  # a commit failed inside a rebalance callback during consume()
                    self._rewind()  # what this batch held is read again after the seek
                    msgs = []
                for msg in msgs:
                    self._ingest(msg)
                now = time.monotonic()
                self._housekeeping(now)
                if now - last_commit >= self._commit_interval:
                    self._commit()
                    last_commit = now
                if now - last_gauges >= 1.0:
                    self._update_gauges()
                    last_gauges = now
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        log.info("worker %s stopping: finishing the batch in hand", self.s.worker_id)
        with self._lock:
            self._lock.notify_all()
        self._stage.stop()
        try:
            self._commit()
        except KafkaException:
            log.exception("final commit failed; the uncommitted requests will be rendered again")
        self._consumer.close()
        self._outbox.close()
        metrics.READY.set(0)
        if self.s.health_file:
            Path(self.s.health_file).unlink(missing_ok=True)

    def _mark_ready(self) -> None:
        metrics.READY.set(1)
        if self.s.health_file:
            Path(self.s.health_file).parent.mkdir(parents=True, exist_ok=True)
            Path(self.s.health_file).write_text(f"ready {self.s.worker_id}\n")

    # ------------------------------------------------------------------ intake

    def _ingest(self, msg: Message) -> None:
        err = msg.error()
        if err is not None:
            if err.code() != KafkaError._PARTITION_EOF:
                metrics.ERRORS.labels("kafka").inc()
                log.warning("consume error: %s", err)
            return
        topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
        tp = (topic, partition)
        raw = msg.value() or b""
        source = (topic, partition, offset)
        priority = self._priority_of_topic[topic]
        with self._lock:
            self._tracker.track(topic, partition, offset)
            epoch = self._epoch.get(tp, 0)
        request: dict[str, Any] | None = None
        try:
            request = self._decode(raw, topic)
            validate(request, self._limits, self._all_models)
            if request["model"] in self._my_models:
                self._renderer.check_settings(settings_of(request))
        except (SerdeError, InvalidRequest, UnsupportedSettings) as exc:
            code = "invalid_request" if isinstance(exc, UnsupportedSettings) else (
                exc.code if isinstance(exc, InvalidRequest) else (
                    "unknown_schema" if isinstance(exc, UnknownSchema) else "undecodable"))
            # Exactly one pool reports: the pool of the request's model, else the first pool.
            mine = request is not None and request.get("model") in self._my_models
            unowned = request is None or request.get("model") not in self._all_models
            if mine or (unowned and self.s.reports_unroutable):
                outcome = Outcome(self._failure_records(code, str(exc), source, raw, request), priority, code)
            else:
                outcome = Outcome([], priority, None)
            self._complete(tp, offset, epoch, outcome)
            return
        if request["model"] not in self._my_models:
            self._complete(tp, offset, epoch, Outcome([], priority, None))  # another pool's group renders it
            return
        deadline = request.get("deadline")
        wall_now = int(time.time() * 1000)
        if deadline is not None and deadline <= wall_now:
            self._complete(tp, offset, epoch, Outcome(self._failure_records(
                "deadline_exceeded", f"deadline passed {wall_now - deadline} ms before the request was read",
                source, raw, request), priority, "deadline_exceeded"))
            return
        mono = time.monotonic()
        pending = Pending(
            request_id=request["request_id"], priority=priority,
            key=CompatKey(model=request["model"], model_version=self._renderer.model_version,
                          width=request["width"], height=request["height"], steps=request["steps"],
                          guidance=float(request["guidance"]), extra=tuple(self._key_extra(request))),
            source=source, enqueued_at=mono,
            deadline=None if deadline is None else mono + (deadline - wall_now) / 1000,
            payload=Admitted(request, raw, epoch, wall_now), cost=request["num_images"])
        with self._lock:
            if self._overflow[priority] or not self._scheduler.offer(pending):
                self._overflow[priority].append(pending)
                self._pause(priority)
            else:
                self._lock.notify()

    def _decode(self, raw: bytes, topic: str) -> dict[str, Any]:
        """Decodes a request; a Schema Registry outage is waited out (bounded), then stops the worker loudly."""
        for attempt in range(6):
            try:
                return self._serde.decode("GenerationRequest", raw, topic=topic)
            except RegistryUnavailable as exc:
                metrics.ERRORS.labels("schema_registry").inc()
                if attempt == 5:
                    raise
                log.warning("schema registry unavailable (%s); retrying", exc)
                time.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ scheduling (shared with the render thread)

    def _take_batch(self, timeout_s: float) -> Batch | None:
        with self._lock:
            now = time.monotonic()
            batch = self._scheduler.next_batch(now)
            if batch is None and not self._stop.is_set():
                wait = self._scheduler.time_until_ready(now)
                self._lock.wait(timeout_s if wait is None else min(timeout_s, max(wait, 0.0005)))
                batch = self._scheduler.next_batch(time.monotonic())
            return batch

    def _housekeeping(self, now: float) -> None:
        with self._lock:
            expired = self._scheduler.expire(now)
            for waiting in self._overflow.values():  # paused intake: these wait outside the scheduler
                late = [p for p in waiting if p.deadline is not None and p.deadline < now]
                for pending in late:
                    waiting.remove(pending)
                    expired.append(pending)
            for pending in expired:
                tp = pending.source[:2]
                records = self._failure_records("deadline_exceeded", "deadline passed while queued",
                                                pending.source, pending.payload.raw, pending.payload.request)
                self._complete_locked(tp, pending.source[2], pending.payload.epoch,
                                      Outcome(records, pending.priority, "deadline_exceeded"))
            for priority, waiting in self._overflow.items():
                while waiting and self._scheduler.offer(waiting[0]):
                    waiting.pop(0)
                    self._lock.notify()
                if not waiting and priority in self._paused and self._scheduler.has_room(priority):
                    self._resume(priority)

    def _pause(self, priority: str) -> None:
        if priority not in self._paused:
            self._paused.add(priority)
            self._consumer.pause(self._partitions_of(priority))

    def _resume(self, priority: str) -> None:
        self._paused.discard(priority)
        self._consumer.resume(self._partitions_of(priority))

    def _partitions_of(self, priority: str) -> list[TopicPartition]:
        topic = self.topology.render_input_topics()[priority]
        return [TopicPartition(t, p) for t, p in self._assigned if t == topic]

    # ------------------------------------------------------------------ completion and commits

    def _on_done(self, pending: Pending, records: list[OutRecord], status: str, _reason: str) -> None:
        with self._lock:
            self._complete_locked(pending.source[:2], pending.source[2], pending.payload.epoch,
                                  Outcome(records, pending.priority, status))

    def _on_render_fail(self, pending: Pending, code: str, reason: str, retriable: bool) -> None:
        request = pending.payload.request
        records = self._failure_records(code, reason, pending.source, pending.payload.raw, request, retriable)
        self._on_done(pending, records, code, reason)

    def _complete(self, tp: TP, offset: int, epoch: int, outcome: Outcome) -> None:
        with self._lock:
            self._complete_locked(tp, offset, epoch, outcome)

    def _complete_locked(self, tp: TP, offset: int, epoch: int, outcome: Outcome) -> None:
        if tp in self._assigned and self._epoch.get(tp, 0) == epoch:  # else: its next owner redoes it
            self._tracker.complete(tp[0], tp[1], offset, outcome)

    def _commit(self) -> None:
        with self._lock:
            results, offsets = self._tracker.release()
        if not offsets:
            return
        records = [r for outcome in results for r in outcome.records]
        try:
            with self._commit_watchdog:
                self._outbox.commit(records, offsets, self._consumer)
        except KafkaException as exc:
            metrics.ERRORS.labels("transaction").inc()
            if kafka.is_fatal(exc):
                raise
            log.warning("transaction aborted (%s); rewinding to the committed offsets", exc)
            # Rewound by the main loop, never inside a rebalance callback (consume() may still hand out
            # records fetched before the seek).
            self._needs_rewind = True
            return
        self._committed.update(offsets)
        for outcome in results:  # counted once committed: a request redone after an abort counts once
            if outcome.status is not None:
                metrics.REQUESTS.labels(outcome.priority, outcome.status).inc()

    def _rewind(self) -> None:
        """After an aborted transaction: read again from the committed offsets, then forget all local state."""
        with self._lock:
            parts = list(self._assigned)
        kafka.rewind_to_committed(self._consumer, parts)
        with self._lock:
            self._forget(parts)
        self._needs_rewind = False

    def _forget(self, parts: list[TP]) -> None:
        """Drops buffered and finished-but-uncommitted work of these partitions (lock held)."""
        for tp in parts:
            self._epoch[tp] = self._epoch.get(tp, 0) + 1
        self._tracker.revoke(parts)
        gone = set(parts)
        self._scheduler.drop_partitions(parts)
        for waiting in self._overflow.values():
            waiting[:] = [p for p in waiting if p.source[:2] not in gone]

    # ------------------------------------------------------------------ rebalancing

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        with self._lock:
            for tp in partitions:
                self._assigned.add((tp.topic, tp.partition))
        # librdkafka keeps an application pause across revoke and re-assign: set every new partition explicitly.
        paused = [tp for tp in partitions if self._priority_of_topic[tp.topic] in self._paused]
        running = [tp for tp in partitions if self._priority_of_topic[tp.topic] not in self._paused]
        if paused:
            consumer.pause(paused)
        if running:
            consumer.resume(running)
        log.info("assigned %s", ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Commit what is finished while the partitions are still ours, then drop the rest.
        try:
            self._commit()
        except KafkaException:
            log.exception("commit before revocation failed")
        self._drop(partitions)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._drop(partitions)

    def _drop(self, partitions: list[TopicPartition]) -> None:
        parts = [(tp.topic, tp.partition) for tp in partitions]
        with self._lock:
            self._forget(parts)
            self._assigned.difference_update(parts)
            for tp in parts:
                self._committed.pop(tp, None)
        log.info("revoked %s", ", ".join(f"{t}[{p}]" for t, p in parts))

    # ------------------------------------------------------------------ gauges

    def _update_gauges(self) -> None:
        metrics.GPU_UTILIZATION.set(self._stage.busy.fraction())
        lag = {p: 0 for p in self._overflow}
        for topic, part in list(self._assigned):
            try:
                _low, high = self._consumer.get_watermark_offsets(TopicPartition(topic, part), cached=True)
            except KafkaException:
                continue
            done = self._committed.get((topic, part))
            if high >= 0 and done is not None:
                lag[self._priority_of_topic[topic]] += max(0, high - done)
        for priority, value in lag.items():
            metrics.QUEUE_LENGTH.labels(priority).set(value)
