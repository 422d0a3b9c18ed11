"""`zimage processors --only gate`: the gate between the request topics and the render topics of each pool.

A transactional processor on the shared step: it reads committed requests, and everything it decides for a
batch (routed requests, cache answers, failures, status, its own changelog) commits with the batch's offsets.
Its stages, in order, for each request:

1. intake checks: decode and validation (streams/intake.py rules), then what the pool's announced model can
   place; a refused request gets RequestFailed plus a dead letter;
2. idempotency on (tenant, request_id, generation): a repeat within a generation renders and publishes nothing;
3. prompt moderation: a blocked prompt gets RequestFailed(`blocked`) and never reaches a render topic;
4. the L1 cache (Redis): a hit becomes an ImageRendered with zero GPU time, published like any other;
5. routing: the request, with its admission (lineage, generation, cache key), goes to its pool's render topic of
   its own priority, keyed by its cache key, so that identical requests meet on one worker, which renders them
   once (processors/inflight.py). A request cancelled while queued is failed (`cancelled`) instead.

Idempotency is kept per partition, so a valid request read off its home partition (processors/partitioning.py:
produced without a key, under another key, or by a client with another partitioner) is first forwarded there,
unchanged, and decided when it is read again: two copies of a request always meet on one partition.

A Schema Registry that does not answer, state that cannot be read back, or a pool that has not announced its model
yet holds the partition (read again after a backoff): not the request's fault. Redis down: no cache, no failure.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer, KafkaException, Message, TopicPartition

from connectors import kafka
from connectors.kafka import OutRecord, TransactionalStep
from connectors.redis_store import RedisStore, cache_entry_key
from connectors.storage import ObjectUris
from processors.admission import (
    GENERATION_HEADER,
    REPLAY_ID_HEADER,
    PoolInfo,
    admission,
    cache_key,
    check_against_pool,
    generation_of,
    header_text,
    idempotency_key,
    pool_of,
)
from processors.events import image_rendered
from processors.requests import InvalidRequest, check_headers, validate
from processors.status import request_status, status_key
from schemas.serde import AvroSerde, InvalidRecord, RegistryUnavailable, SerdeError, UnknownSchema
from streams import metrics
from streams.cancellation import Cancellations
from streams.changelog_table import RestoreFailed
from streams.failures import FailureRecords, Origin
from streams.gate_state import AdmittedKeys, PoolDirectory
from streams.holds import PartitionHolds
from streams.homes import Homes, PartitionCountMismatch, forward, lineage
from streams.processor_loop import ProcessorLoop
from streams.settings import Settings
from streams.topology import PRIORITIES

log = logging.getLogger(__name__)

CACHED_IMAGE_FIELDS = {"index", "uri", "sha256", "seed", "size_bytes"}
TP = tuple[str, int]
# [(prompt, negative prompt, tenant)] -> [(action "allow" | "review" | "block", what decided it)], in order
Verdict = tuple[str, str | None]
Moderate = Callable[[list[tuple[str, str | None, str]]], list[Verdict]]


class Hold(Exception):
    """The record cannot be decided now, through no fault of its own: read it again later."""


class Gate:
    def __init__(self, settings: Settings, serde: AvroSerde, *, moderate: Moderate, cache: RedisStore | None,
                 cancellations: Cancellations | None = None,
                 consumer_factory: Callable[..., Consumer] = kafka.consumer,
                 step_factory: Callable[..., TransactionalStep] = TransactionalStep, batch: int = 500):
        self.s = settings
        self.topology = settings.topology
        self._serde = serde
        self._moderate = moderate
        self._cache = cache
        self._cancellations = cancellations or Cancellations(cache, settings.topic_prefix)
        self._consumer_factory = consumer_factory
        self._step_factory = step_factory
        self._batch = batch
        self._limits = settings.limits()
        self._all_models = tuple(m for ms in settings.pools.values() for m in ms)
        self._failures = FailureRecords(self.topology, serde, stage="gate", limits=self._limits)
        self._held = PartitionHolds()
        self._urgency = {self.topology.request_topic(p): level for level, p in enumerate(PRIORITIES)}
        self._stop = threading.Event()
        self._cache_entries: dict[str, bytes | None] | None = {}  # the batch in hand's, by cache key
        self._homes = Homes(self.topology.gate_changelog)  # its state: the admitted keys
        self._store = ObjectUris.of(settings.storage_url)
        self.group_id = f"{settings.topic_prefix}-gate"

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        conf = self.s.kafka_config()
        self._consumer = self._consumer_factory(conf, self.group_id, **kafka.CO_PARTITIONED)
        self._step = self._step_factory(conf, f"{self.group_id}-{self.s.worker_id}")
        self._admitted = AdmittedKeys.of(conf, self.s)
        self._pools = PoolDirectory(conf, self.topology.pool_announcements, self._serde)
        self._subscribe()
        log.info("gate of %s in group %s", ", ".join(self.topology.request_topics), self.group_id)
        clean = False
        try:
            ProcessorLoop(self._consumer, self._step, self.decide, self._rewind, batch=self._batch, poll_s=0.05,
                          before_poll=self._resume_what_may_go).run(self._stop)
            clean = True
        finally:
            if clean:
                self._consumer.close()
            self._pools.close()
            self._admitted.close()
            self._step.close()

    def _subscribe(self) -> None:
        self._consumer.subscribe(list(self.topology.request_topics), on_assign=self._on_assign,
                                 on_revoke=self._on_revoke, on_lost=self._on_revoke)

    def _resume_what_may_go(self) -> None:
        if self._pools.refresh():
            self._held.resume_all(self._consumer)  # what waited for that pool goes now, all together
        self._held.resume_due(self._consumer)
        self._admitted.evict_when_due()

    # ------------------------------------------------------------------ deciding

    def decide(self, msgs: list[Message]) -> tuple[list[OutRecord], dict[TP, int]]:
        """The outputs of one batch and the offsets to commit with them. The prompts of a batch are moderated in
        one call: a classifier scores many texts for about the cost of one."""
        # The most urgent first (a stable sort keeps each partition's order): what a batch holds of each class is
        # routed, and reaches the workers, in priority order.
        origins = [Origin.of(m) for m in sorted(msgs, key=lambda m: self._urgency.get(m.topic() or "", 0))]
        checked = [self._checked_or_held(origin) for origin in origins]
        admitted = [(origin, check) for origin, check in zip(origins, checked, strict=True) if isinstance(check, tuple)]
        valid = [check for _, check in admitted]
        keyed = [self._keys_of(origin, request, info) for origin, (request, info) in admitted]
        cancelled, self._cache_entries = self._look_up(
            [request for request, _ in valid], sorted({k[1] for k in keyed if isinstance(k, tuple)}))
        verdicts = iter(self._moderated(admitted, keyed, cancelled))
        positions = iter(range(len(valid)))
        records: list[OutRecord] = []
        offsets: dict[TP, int] = {}
        for origin, check in zip(origins, checked, strict=True):
            verdict = next(verdicts) if isinstance(check, tuple) else None
            position = next(positions) if isinstance(check, tuple) else -1
            was_cancelled = position in cancelled
            tp = (origin.topic, origin.partition)
            if tp in self._held:
                continue  # read again from the held offset once the hold ends
            if isinstance(check, Hold):
                self._held.hold(self._consumer, tp, origin.offset, str(check))
                continue
            if isinstance(check, tuple):
                request, info = check
                try:
                    records += self._admitted_or_failed(origin, request, info, keyed[position], verdict, was_cancelled)
                except (RegistryUnavailable, RestoreFailed) as exc:  # an outage (registry, state): read it again later
                    self._held.hold(self._consumer, tp, origin.offset, f"{type(exc).__name__}: {exc}")
                    continue
            else:
                records += check
            offsets[tp] = origin.offset + 1
            self._held.decided(tp)
        return records, offsets

    def _moderated(self, admitted: list[tuple[Origin, tuple[dict[str, Any], PoolInfo]]],
                   keyed: list[tuple[str, str, str] | Exception], cancelled: set[int]) -> list[Verdict | None]:
        """The moderation verdict of each admitted request, the prompts of a batch in one call (a classifier scores
        many texts for about the cost of one). Only those whose fate it decides are asked: a repeat, a cancelled
        request or one past its deadline ends without it, and a cloud moderator is paid by the call. None for a
        request not asked (_outcome asks alone for one that turns out to need it after all)."""
        now_ms = int(time.time() * 1000)
        asked = [i for i, ((origin, (request, _)), keys) in enumerate(zip(admitted, keyed, strict=True))
                 if i not in cancelled and self._decided_by_moderation(origin, request, keys, now_ms)]
        texts = [(r["prompt"], r.get("negative_prompt"), r["tenant"]) for r, _ in (admitted[i][1] for i in asked)]
        verdicts: list[Verdict | None] = [None] * len(admitted)
        for i, verdict in zip(asked, self._moderate(texts), strict=True):
            verdicts[i] = verdict
        return verdicts

    def _decided_by_moderation(self, origin: Origin, request: dict[str, Any], keys: tuple[str, str, str] | Exception,
                               now_ms: int) -> bool:
        """False for a request that _admit ends before moderation counts: past its deadline, or a repeat."""
        deadline = request.get("deadline")
        if isinstance(keys, Exception) or (deadline is not None and deadline <= now_ms):
            return False
        try:
            return not self._admitted.seen(origin.partition, keys[2], now_ms)
        except Exception:  # noqa: BLE001 - the state cannot be read now: moderated, and decided in its turn
            return True

    def _admitted_or_failed(self, origin: Origin, request: dict[str, Any], info: PoolInfo,
                            keys: tuple[str, str, str] | Exception, verdict: Verdict | None,
                            cancelled: bool) -> list[OutRecord]:
        try:
            if isinstance(keys, Exception):
                raise keys
            return self._admit(origin, request, info, keys, verdict, cancelled)
        except (KafkaException, RestoreFailed, RegistryUnavailable):
            raise  # the state in Kafka, or the registry, could not be read: not the request's fault
        except Exception as exc:  # a record never ends the process
            log.exception("unexpected error on %s[%d]@%d", origin.topic, origin.partition, origin.offset)
            return self._failed("internal_error", f"{type(exc).__name__}: {exc}", origin, request)

    def _checked_or_held(self, origin: Origin) -> tuple[dict[str, Any], PoolInfo] | list[OutRecord] | Hold:
        try:
            return self._checked(origin)
        except RegistryUnavailable as exc:  # writing the failure of a bad record needs the registry too
            return Hold(str(exc))

    def _checked(self, origin: Origin) -> tuple[dict[str, Any], PoolInfo] | list[OutRecord] | Hold:
        """Intake checks: the request and its pool; or the failure records of a refused one; or a Hold."""
        request: dict[str, Any] | None = None
        try:
            request = self._serde.decode("GenerationRequest", origin.value, topic=origin.topic)
            validate(request, self._limits, self._all_models)
            check_headers(origin.headers, self._limits)  # they travel with it: to its home, to its render topic
            try:
                home = self._homes.of(self._consumer, origin.topic, request["request_id"])
            except KafkaException as exc:
                return Hold(str(exc))
            if home != origin.partition:  # decided at its home, where any copy of it is read too
                forwarded = forward(origin, request["request_id"], home, self.topology.max_record_bytes(origin.topic))
                metrics.GATE.labels("forwarded").inc()
                return [forwarded]
            pool = pool_of(request["model"], self.s.pools)
            assert pool is not None  # validate() refused unknown models
            info = self._pools.pools.get(pool)
            if info is None:
                return Hold(f"pool {pool} has not announced its model yet")
            check_against_pool(request, info)
        except RegistryUnavailable as exc:
            return Hold(str(exc))
        except PartitionCountMismatch:
            raise  # no request's fault, and nothing can be decided right: the process stops, saying why
        except (SerdeError, InvalidRequest) as exc:
            code = exc.code if isinstance(exc, InvalidRequest) else (
                "unknown_schema" if isinstance(exc, UnknownSchema) else "undecodable")
            return self._failed(code, str(exc), origin, request)
        except Exception as exc:  # a record never ends the process
            log.exception("unexpected error on %s[%d]@%d", origin.topic, origin.partition, origin.offset)
            return self._failed("internal_error", f"{type(exc).__name__}: {exc}", origin, request)
        return request, info

    @staticmethod
    def _keys_of(origin: Origin, request: dict[str, Any], info: PoolInfo) -> tuple[str, str, str] | Exception:
        """A request's generation, cache key and idempotency key; or what prevented them, failed in its own turn."""
        try:
            generation = generation_of(request, info.model_version, header_text(origin.headers, GENERATION_HEADER))
            return generation, cache_key(request, generation), idempotency_key(request["tenant"],
                                                                                request["request_id"], generation)
        except Exception as exc:  # noqa: BLE001 - the request's own turn fails it, with the reason
            return exc

    def _admit(self, origin: Origin, request: dict[str, Any], info: PoolInfo, keys: tuple[str, str, str],
               verdict: Verdict | None, cancelled: bool = False) -> list[OutRecord]:
        generation, ckey, key = keys
        now_ms = int(time.time() * 1000)
        deadline = request.get("deadline")
        if deadline is not None and deadline <= now_ms:
            return self._failed("deadline_exceeded", f"deadline passed {now_ms - deadline} ms before the gate read "
                                "the request", origin, request)
        if self._admitted.seen(origin.partition, key, now_ms):
            metrics.GATE.labels("duplicate").inc()
            return [self._status(request, "duplicate", generation, now_ms, final=True,
                                 detail="already admitted in this generation: the first outcome stands")]
        # Remembered only once its outputs are built: a request that fails on the way (internal_error) must find
        # nothing remembered when it is sent again, or the retry would be taken for a duplicate and never rendered.
        outcome = self._outcome(origin, request, info, generation, ckey, verdict, cancelled, now_ms)
        return [self._admitted.admit(origin.partition, key, now_ms), *outcome]

    def _outcome(self, origin: Origin, request: dict[str, Any], info: PoolInfo, generation: str, ckey: str,
                 verdict: Verdict | None, cancelled: bool, now_ms: int) -> list[OutRecord]:
        """What an admitted request turns into: a failure (cancelled, blocked), its cached answer, or its routed
        copy on the pool's render topic; each with its status."""
        if cancelled:
            metrics.GATE.labels("cancelled").inc()
            return self._failed("cancelled", "cancelled while queued, before it was routed", origin, request,
                                dead_letter=False)
        if verdict is None:  # not asked with its batch (it looked like a repeat then): never routed unmoderated
            [verdict] = self._moderate([(request["prompt"], request.get("negative_prompt"), request["tenant"])])
        action, why = verdict
        if action == "block":
            metrics.GATE.labels("blocked").inc()
            return self._failed("blocked", f"prompt blocked by {why}", origin, request, dead_letter=False)
        flagged = f"prompt flagged for review by {why}" if action == "review" else None
        answer = self._cached_answer(origin, request, info, generation, ckey, now_ms)
        if answer is not None:
            metrics.GATE.labels("cached").inc()
            return [answer, self._status(request, "cached", generation, now_ms, detail=flagged)]
        metrics.GATE.labels("admitted").inc()
        # The topic a request was read from is its priority: a replay re-drives high requests into the low topic,
        # unchanged, and they must not overtake live traffic.
        priority = PRIORITIES[self._urgency.get(origin.topic, 1)]
        admitted = admission(source=lineage(origin), generation=generation, cache_key=ckey, pool=info.pool,
                             now_ms=now_ms, replay_id=header_text(origin.headers, REPLAY_ID_HEADER))
        routed = {**request, "priority": priority.upper(), "admission": admitted}
        topic = self.topology.render_topic(info.pool, priority)
        value = self._serde.encode("GenerationRequest", routed, topic=topic, validate=False)
        # Keyed by cache key: identical requests of a pool meet on one worker, which renders them once.
        return [OutRecord(topic, value, ckey.encode(), list(origin.headers)),
                self._status(request, "admitted", generation, now_ms, detail=flagged)]

    def _cached_answer(self, origin: Origin, request: dict[str, Any], info: PoolInfo, generation: str, ckey: str,
                       now_ms: int) -> OutRecord | None:
        """The ImageRendered that answers a request from the cache, or None: no entry, Redis down, or an entry
        that does not make a valid event (Redis is a cache, not a source of truth: the request renders)."""
        hit = self._cached(ckey)
        if hit is None:
            return None
        try:  # checked in full: the entry came from Redis (its images too: in the store the workers write to)
            if not all(self._store.holds(image["uri"]) for image in hit["images"]):
                raise ValueError("an image outside the object store")
            rendered = image_rendered(
                request=request, images=hit["images"], model_id=hit["model_id"], model_version=info.model_version,
                timings_ms={"render": 0.0}, batch_id="cache", batch_size=0, worker_id="gate",
                source=lineage(origin), now_ms=now_ms, generation=generation, cache_key=ckey, cached=True,
                replay_id=header_text(origin.headers, REPLAY_ID_HEADER))
            value = self._serde.encode("ImageRendered", rendered, topic=self.topology.rendered)
        except (InvalidRecord, ValueError, TypeError, KeyError) as exc:
            log.warning("ignoring a cache entry for %s that makes no valid ImageRendered: %s", ckey, exc)
            return None
        return OutRecord(self.topology.rendered, value, request["request_id"].encode())

    def _look_up(self, requests: list[dict[str, Any]], ordered: list[str]
                 ) -> tuple[set[int], dict[str, bytes | None] | None]:
        """Which of a batch's requests were cancelled (by position), and the cache entries of the cache keys
        `ordered` (None when Redis cannot be asked): in one round trip where both live in the same Redis (a batch
        of 500 requests asked one by one spent most of the gate's time waiting for Redis)."""
        entry_keys = [cache_entry_key(self.s.topic_prefix, key) for key in ordered]
        if self._cache is None or not requests:
            return self._cancellations.cancelled(requests), {}
        if self._cancellations.store is not self._cache:
            cancelled = self._cancellations.cancelled(requests)
            found = self._cache.get_many(entry_keys) if entry_keys else []
            return cancelled, None if found is None else dict(zip(ordered, found, strict=True))
        cancel_keys = self._cancellations.keys(requests)
        both = self._cache.get_many(cancel_keys + entry_keys)
        if both is None:
            return set(), None
        return (Cancellations.cancelled_of(both[:len(cancel_keys)]),
                dict(zip(ordered, both[len(cancel_keys):], strict=True)))

    def _cached(self, key: str) -> dict[str, Any] | None:
        if self._cache is None:
            return None
        if self._cache_entries is None:
            metrics.GATE.labels("cache_skipped").inc()  # Redis down: rendered as if never seen
            return None
        raw = self._cache_entries.get(key)
        if not raw:
            return None
        try:
            entry = json.loads(raw)
            if (isinstance(entry.get("model_id"), str) and entry.get("images")
                    and all(image.keys() >= CACHED_IMAGE_FIELDS for image in entry["images"])):
                return entry
        except (ValueError, AttributeError, TypeError, RecursionError):
            pass
        log.warning("ignoring an unreadable cache entry for %s", key)  # rendered as if never seen
        return None

    def _failed(self, code: str, reason: str, origin: Origin, request: dict[str, Any] | None,
                dead_letter: bool = True) -> list[OutRecord]:
        records = self._failures(code, reason, origin, request)
        return records if dead_letter else [r for r in records if r.topic != self.topology.dlq]

    def _status(self, request: dict[str, Any], status: str, generation: str | None, now_ms: int,
                final: bool = False, detail: str | None = None) -> OutRecord:
        event = request_status(request=request, status=status, stage="gate", generation=generation, now_ms=now_ms,
                               final=final, detail=detail)
        return OutRecord(self.topology.status, self._serde.encode("RequestStatus", event, validate=False),
                         status_key(request["tenant"], request["request_id"]))

    # ------------------------------------------------------------------ holds, rewinds, rebalances

    def _rewind(self) -> None:
        self._step.rewind(self._consumer, lambda parts: self._admitted.forget({p for _t, p in parts}))

    def _on_assign(self, _consumer: Consumer, _partitions: list[TopicPartition]) -> None:
        self._homes.forget()  # partitions added to a topic come with an assignment

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        gone = {(tp.topic, tp.partition) for tp in partitions}
        self._held.drop(consumer, gone)
        still = {tp.partition for tp in consumer.assignment() if (tp.topic, tp.partition) not in gone}
        self._admitted.forget({p for _t, p in gone} - still)

