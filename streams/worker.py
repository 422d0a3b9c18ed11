"""The render worker: one member of the consumer group of a model pool.

Main thread: poll the pool's render topics (one per priority, fed by the gate), decide on each record
(streams/intake.py), hand what a round admitted to the scheduler, pause a priority's partitions while its buffer
is full, tell the scheduler which classes still wait in Kafka, and commit the finished prefix (outputs + consumed
offsets) through the shared transactional step: every few milliseconds, or at once when nothing else is
unfinished. While anything is unfinished it waits for the last of it to finish, not in librdkafka's poll (which
nothing can wake): that finish commits at once. Render thread (streams/rendering.py): batches -> images -> storage.

After an aborted transaction the step refuses every commit until the main loop has rewound every assigned
partition and forgotten its local state: nothing commits past work that was dropped.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition

from connectors import kafka
from connectors.kafka import TP, OutRecord, TransactionAborted, TransactionalStep
from connectors.storage import ObjectStore
from processors.batching import Batch, Pending
from processors.commit_policy import commit_due
from processors.offsets import OffsetTracker
from processors.render_settings import BatchRenderer
from processors.scheduler import Scheduler
from schemas.serde import AvroSerde
from streams import lag, metrics
from streams.cancellation import Cancellations
from streams.crash_journal import INTAKE_STEP, CrashJournal
from streams.failures import FailureRecords, Origin, waiting_out_registry
from streams.heap import freeze_start_up_heap
from streams.holds import ClassPauses, PartitionHolds
from streams.intake import Admit, Finish, Hold, Intake, Outcome, pending_of
from streams.liveness import Deadlines, Heartbeat
from streams.progress_notes import ProgressNotes
from streams.rendering import RenderStage, StageLimits
from streams.settings import Settings

log = logging.getLogger(__name__)

INTAKE_LIMIT_S = 120.0  # one round of consume + decode; a record that spins the decoder ends the process
COMMIT_LIMIT_S = 60.0  # librdkafka can block past its own timeouts when the coordinator vanishes


class RenderWorker:
    def __init__(self, settings: Settings, renderer: BatchRenderer, store: ObjectStore, serde: AvroSerde, *,
                 consumer_factory: Callable[..., Consumer] = kafka.consumer,
                 step_factory: Callable[..., TransactionalStep] = TransactionalStep,
                 commit_interval_s: float | None = None, consume_batch: int = 500,
                 cancellations: Cancellations | None = None,
                 notes_producer_factory: Callable[[dict[str, str]], Producer] = kafka.producer):
        self.s = settings
        self.topology = settings.topology
        self._renderer = renderer
        self._serde = serde
        self._consumer_factory = consumer_factory
        self._step_factory = step_factory
        self._commit_interval = settings.commit_interval_ms / 1000 if commit_interval_s is None else commit_interval_s
        self._consume_batch = consume_batch
        self._priority_of_topic = {t: p for p, t in self.topology.render_input_topics(settings.pool).items()}
        self._lock = threading.Condition()
        self._scheduler = Scheduler(settings.scheduler_config())
        self._tracker = OffsetTracker()
        self._epoch: dict[TP, int] = {}
        self._overflow: dict[str, list[Pending]] = {p: [] for p in self._priority_of_topic.values()}
        self._paused = ClassPauses(self._priority_of_topic)
        self._unfetched: dict[str, bool] = {}  # last reported to the scheduler: records of the class wait in Kafka
        self._incoming: list[Pending] = []  # admitted by the current consume() round, not yet offered
        self._held = PartitionHolds()  # partitions to read again once the registry answers
        self._assigned: set[TP] = set()
        self._committed: dict[TP, int] = {}
        self._commits_allowed = True
        self._announced = False  # until the pool's announcement commits, the gate routes nothing here
        self._last_state_log = self._unfetched_at = 0.0
        self._intake = Intake(settings, serde, renderer, FailureRecords(
            self.topology, serde, stage=f"worker:{settings.pool}", limits=settings.limits()))
        self._stop = threading.Event()
        self._all_finished_now = threading.Event()  # set by the finish that leaves none unfinished
        self.group_id = f"{settings.topic_prefix}-render-{settings.pool}"
        self._journal = CrashJournal(settings.state_dir, f"{self.group_id}-{settings.worker_id}")
        self._deadlines = Deadlines(on_overdue=self._journal.overdue, dump_to=self._journal.fault_file)  # evidence
        self._notes = ProgressNotes(self.topology, serde, f"worker:{settings.pool}", notes_producer_factory)
        self._heartbeat = Heartbeat(settings.health_file, settings.worker_id)
        self._stage = RenderStage(
            renderer=renderer, store=store,
            encode_rendered=lambda v: waiting_out_registry(lambda: serde.encode(  # built from decoded records
                "ImageRendered", v, topic=self.topology.rendered, validate=False), self._stop),
            rendered_topic=self.topology.rendered, max_rendered_bytes=self.topology.max_bytes(self.topology.rendered),
            worker_id=settings.worker_id, take_batch=self._take_batch, on_done=self._on_done,
            on_fail=self._on_render_fail, journal=self._journal, deadlines=self._deadlines,
            heartbeat=self._heartbeat, limits=StageLimits(
                device_fault_exit_s=settings.device_fault_exit_s,
                batch_timeout_factor=settings.batch_timeout_factor,
                batch_timeout_floor_s=settings.batch_timeout_floor_s, max_rerenders=settings.quality_max_rerenders,
                rendering_note_after_s=settings.rendering_note_after_ms / 1000, post_threads=settings.post_threads),
            quality=settings.quality_policy(),
            cancelled=cancellations.start_rendering if cancellations else lambda requests: set(),
            on_start=self._notes.rendering)

    # ------------------------------------------------------------------ lifecycle

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        conf = self.s.kafka_config()
        self._consumer = self._consumer_factory(conf, self.group_id)
        self._step = self._step_factory(conf, f"{self.group_id}-{self.s.worker_id}")
        self._notes.open(conf)
        self._consumer.subscribe(list(self._priority_of_topic), on_assign=self._on_assign,
                                 on_revoke=self._on_revoke, on_lost=self._on_lost)
        self._stage.start()
        freeze_start_up_heap()
        metrics.READY.set(1)
        self._heartbeat.ready()
        log.info("worker %s serving pool %s (%s) in group %s", self.s.worker_id, self.s.pool,
                 ", ".join(self.s.pool_models), self.group_id)
        last_commit = last_gauges = time.monotonic()
        clean = False
        try:
            while not self._stop.is_set():
                if self._stage.failure is not None:
                    raise RuntimeError("the render stage failed") from self._stage.failure
                self._heartbeat.beat("main")
                with self._lock:
                    unfinished = self._tracker.pending_count()
                with self._deadlines.guard(INTAKE_STEP, INTAKE_LIMIT_S):
                    msgs = kafka.consume_ready(self._consumer, self._consume_batch, 0 if unfinished else 0.02)
                    if not msgs and unfinished:  # the last finish ends the wait: it commits at once
                        self._all_finished_now.wait(0.002)
                        self._all_finished_now.clear()
                    if self._step.needs_rewind:  # a commit inside a rebalance callback aborted
                        self._rewind()  # what this batch held is read again after the seek
                        msgs = []
                    for msg in msgs:
                        self._ingest(msg)
                    self._offer_incoming()
                now = time.monotonic()
                self._housekeeping(now)
                if commit_due(now, last_commit, len(msgs), self._consume_batch, self._commit_interval,
                              self._all_finished()):
                    self._commit()
                    last_commit = now
                if self._step.needs_rewind:
                    self._rewind()
                elif not self._announced:
                    self._announce()
                if now - last_gauges >= 1.0:
                    self._update_gauges()
                    last_gauges = now
            clean = True
        finally:
            self._shutdown(clean)

    def _announce(self) -> None:
        topic, event = self.topology.pool_announcements, self._intake.pool_announcement(int(time.time() * 1000))
        try:
            self._step.commit([OutRecord(topic, self._serde.encode("PoolAnnouncement", event, topic=topic),
                                         self.s.pool.encode())], {}, self._consumer)
        except TransactionAborted as exc:
            log.warning("announcing the pool failed (%s); trying again", exc)
            return
        self._announced = True

    def _shutdown(self, clean: bool) -> None:
        log.info("worker %s stopping: finishing the batch in hand", self.s.worker_id)
        self._stop.set()
        with self._lock:
            self._lock.notify_all()
        self._stage.stop()
        # After a failure nothing commits, not even from the revocation that closing the consumer triggers.
        self._commits_allowed = clean
        if clean:
            try:
                self._commit()
            except kafka.TransactionStuck:
                log.exception("final commit failed; the uncommitted requests will be rendered again")
        self._consumer.close()
        self._step.close()
        self._notes.close()
        self._journal.close()
        metrics.READY.set(0)
        self._heartbeat.clear()

    # ------------------------------------------------------------------ intake

    def _ingest(self, msg: Message) -> None:
        err = msg.error()
        if err is not None:
            if err.code() != KafkaError._PARTITION_EOF:
                metrics.ERRORS.labels("kafka").inc()
                log.warning("consume error: %s", err)
            return
        tp = (msg.topic(), msg.partition())
        if tp not in self._assigned or tp in self._held:
            return  # revoked during consume(), or to be read again once the registry answers
        origin = Origin.of(msg)
        priority = self._priority_of_topic[origin.topic]
        deaths = self._journal.deaths(origin.source)
        if deaths is not None and self._journal.is_poison(deaths):
            self._track_finished(origin, self._intake.poison(origin, priority, deaths))
            return
        with self._journal.holding("intake", [origin.source]):
            decision = self._intake.decide(origin, priority)
        if isinstance(decision, Hold):  # the registry, not the record, failed
            metrics.ERRORS.labels("schema_registry").inc()
            self._held.hold(self._consumer, tp, origin.offset, decision.reason)
            return
        self._held.decided(tp)
        if isinstance(decision, Finish):
            self._track_finished(origin, decision.outcome)
        else:
            self._admit(origin, priority, decision, solo=deaths is not None)

    def _track_finished(self, origin: Origin, outcome: Outcome) -> None:
        with self._lock:
            self._tracker.track(origin.topic, origin.partition, origin.offset)
            self._tracker.complete(origin.topic, origin.partition, origin.offset, outcome)

    def _admit(self, origin: Origin, priority: str, admit: Admit, solo: bool) -> None:
        with self._lock:
            self._tracker.track(origin.topic, origin.partition, origin.offset)
            epoch = self._epoch.get((origin.topic, origin.partition), 0)
            self._incoming.append(pending_of(origin, priority, admit, self._renderer.model_version, epoch, solo))

    def _offer_incoming(self) -> None:
        """Hands what one consume() admitted to the scheduler at once, so that the render thread never cuts a
        batch from the first records of a round while more urgent ones of the same round are still being read."""
        with self._lock:
            for pending in self._incoming:
                if self._overflow[pending.priority] or not self._scheduler.offer(pending):
                    self._overflow[pending.priority].append(pending)
                    self._paused.pause(self._consumer, pending.priority, self._assigned)
            if self._incoming:
                self._lock.notify()
            self._incoming.clear()

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
        self._held.resume_due(self._consumer, lambda tp: self._priority_of_topic[tp[0]] not in self._paused)
        with self._lock:
            if now - self._unfetched_at >= 0.005:  # the loop goes round far more often than fetches arrive
                self._unfetched_at = now
                self._report_unfetched(now)
            expired = self._scheduler.expire(now)
            for waiting in self._overflow.values():  # paused intake: these wait outside the scheduler
                late = [p for p in waiting if p.deadline is not None and p.deadline < now]
                for pending in late:
                    waiting.remove(pending)
                    expired.append(pending)
            for pending in expired:
                self._complete_locked(pending, self._intake.failed(
                    "deadline_exceeded", "deadline passed while queued", pending.payload.origin,
                    pending.payload.request, pending.priority))
            for priority, waiting in self._overflow.items():
                while waiting and self._scheduler.offer(waiting[0]):
                    waiting.pop(0)
                    self._lock.notify()
                if not waiting and priority in self._paused and self._scheduler.has_room(priority):
                    self._paused.resume(self._consumer, priority, self._assigned, self._held)

    def _report_unfetched(self, now: float) -> None:
        """Tells the scheduler which classes still have records in Kafka not read yet (a partition just assigned
        counts as waiting; the scheduler bounds the hold), so that lower classes do not go first (lock held)."""
        waiting = lag.unfetched(self._consumer, [tp for tp in self._assigned if tp not in self._held],
                                self._priority_of_topic, {p: p in self._paused for p in self._overflow})
        if waiting is None:
            return
        for priority, has_lag in waiting.items():
            self._scheduler.set_unfetched(priority, has_lag, now)
        if any(self._unfetched.get(p) and not has_lag for p, has_lag in waiting.items()):
            self._lock.notify()  # a hold ended: the render thread may start a batch now
        self._unfetched = waiting

    # ------------------------------------------------------------------ completion and commits

    def _on_done(self, pending: Pending, records: list, status: str) -> None:
        if status in ("rendered", "deduplicated"):
            request = pending.payload.request
            records = [*records, waiting_out_registry(lambda: self._notes.rendered(request), self._stop)]
        with self._lock:
            self._complete_locked(pending, Outcome(records, pending.priority, status))

    def _on_render_fail(self, pending: Pending, code: str, reason: str) -> None:
        outcome = waiting_out_registry(lambda: self._intake.failed(
            code, reason, pending.payload.origin, pending.payload.request, pending.priority), self._stop)
        records = outcome.records
        if code == "cancelled":  # asked for, not broken: no dead letter
            records = [r for r in records if r.topic != self.topology.dlq]
        self._on_done(pending, records, code)

    def _complete_locked(self, pending: Pending, outcome: Outcome) -> None:
        tp, offset = pending.source[:2], pending.source[2]
        if tp in self._assigned and self._epoch.get(tp, 0) == pending.payload.epoch:  # else: redone by its owner
            self._tracker.complete(tp[0], tp[1], offset, outcome)
            if self._tracker.pending_count() == 0:  # under load a partial finish would wake it for nothing
                self._all_finished_now.set()

    def _all_finished(self) -> bool:
        """Every record read is finished and some wait to commit: at light load (the last round did not fill up)
        nothing is gained by waiting for the interval, which batches the commits of a backlog."""
        with self._lock:
            return self._tracker.pending_count() == 0 and self._tracker.held_count() > 0

    def _commit(self) -> None:
        """Commits the finished prefix with its outputs. Does nothing while a rewind is due (the main loop does
        it first) or after a failure: nothing may commit past work that an abort dropped."""
        if not self._commits_allowed or self._step.needs_rewind:
            return
        with self._lock:
            results, offsets = self._tracker.release()
        if not offsets:
            return
        records = [r for outcome in results for r in outcome.records]
        try:
            with self._deadlines.guard("a transaction commit", COMMIT_LIMIT_S):
                self._step.commit(records, offsets, self._consumer)
        except TransactionAborted as exc:
            metrics.ERRORS.labels("transaction").inc()
            log.warning("transaction aborted (%s); rewinding to the committed offsets", exc)
            return
        self._committed.update(offsets)
        self._journal.committed(offsets)
        for outcome in results:  # counted once committed: a request redone after an abort counts once
            if outcome.status is not None:
                metrics.REQUESTS.labels(outcome.priority, outcome.status).inc()

    def _rewind(self) -> None:
        """After an aborted transaction: read again from the committed offsets, then forget all local state."""
        self._step.rewind(self._consumer, self._forget_locked)

    def _forget_locked(self, parts: list[TP]) -> None:
        with self._lock:
            self._forget(parts)

    def _forget(self, parts: list[TP]) -> None:
        """Drops buffered and finished-but-uncommitted work of these partitions (lock held)."""
        for tp in parts:
            self._epoch[tp] = self._epoch.get(tp, 0) + 1
        self._tracker.revoke(parts)
        gone = set(parts)
        self._scheduler.drop_partitions(parts)
        self._incoming[:] = [p for p in self._incoming if p.source[:2] not in gone]
        for waiting in self._overflow.values():
            waiting[:] = [p for p in waiting if p.source[:2] not in gone]

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        with self._lock:
            for tp in partitions:
                self._assigned.add((tp.topic, tp.partition))
        self._paused.assigned(consumer, partitions)
        log.info("assigned %s", ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Commit what is finished while the partitions are still ours (unless an abort is pending), then drop them.
        try:
            self._commit()
        except kafka.TransactionStuck:
            self._commits_allowed = False  # ends the process (consume() raises it); nothing commits after it
            raise
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
            self._held.drop(self._consumer, parts)
        log.info("revoked %s", ", ".join(f"{t}[{p}]" for t, p in parts))

    def _update_gauges(self) -> None:
        backlog = lag.export_backlog(self._consumer, self._committed, self._assigned, self._priority_of_topic,
                                     self._stage.busy.fraction())
        if any(backlog.values()) and time.monotonic() - self._last_state_log >= 30.0:  # a stall explains itself
            self._last_state_log = time.monotonic()
            with self._lock:
                log.info("lag %s; buffered %s; unfinished %d; paused %s; held %d partition(s)", backlog,
                         self._scheduler.queue_lengths(), self._tracker.pending_count(), sorted(self._paused.paused),
                         len(self._held))
