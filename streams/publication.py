"""`zimage processors`: publication, ImageRendered (zimage.rendered) -> ImageReady (zimage.images.ready).

A transactional relay: it reads committed records only, and each batch's ImageReady events (and the
RequestFailed / dead letters of records it cannot publish) commit in one Kafka transaction with the offsets
they came from. A crash at any point leaves either both or neither, so every ImageRendered is published
exactly once. (faust-streaming's exactly_once mode sends records without a partition outside its
transactions; a SIGKILL test showed duplicates, hence this relay.)

Before an image is published, the image safety check (streams/image_safety.py) judges it: PASS publishes, REVIEW
holds it for a person (as a quality failure does), BLOCK fails the request as `unsafe` and moves its objects to
quarantine. A detector or storage outage holds the partition at that record and reads it again after a backoff.

What was published is known per partition, so a record read off the home partition of its request id (produced
again by a tool that places keys otherwise, say) is forwarded there first (streams/homes.py).

The by-SKU view has one writer per (tenant, SKU, view): two requests for one SKU can be published by two members,
so each ImageReady of a SKU goes to images.by-sku.repartition keyed by its SKU, and the member that owns its
partition q compares it with the latest of by-sku partition q and writes it there only if it is newer. Otherwise a
member could write an older SKU version after another wrote a newer one, and compaction would keep the older.
"""
from __future__ import annotations

import json
import logging
import threading
import time

from confluent_kafka import Consumer, KafkaException, Message, TopicPartition

from connectors import kafka
from connectors.kafka import OutRecord, TransactionalStep
from connectors.redis_store import RedisStore, cache_entry_key
from connectors.storage import ObjectUris
from processors.events import image_ready
from processors.publication_state import by_sku_key
from processors.requests import check_headers, identity_of
from processors.safety import UNSCANNED, SafetyVerdict, describe, metric_label
from processors.status import request_status, status_key
from schemas.serde import AvroSerde, RegistryUnavailable
from streams import metrics
from streams.changelog_table import RestoreFailed
from streams.failures import FailureRecords, Origin
from streams.holds import PartitionHolds
from streams.homes import Homes, PartitionCountMismatch, forward
from streams.image_safety import ImageSafety, SafetyUnavailable, Scanned, image_safety_from_settings
from streams.processor_loop import ProcessorLoop
from streams.published_state import PublishedState
from streams.settings import Settings
from streams.state_store import StateUnavailable, state_store

log = logging.getLogger(__name__)



class RefusedDecision(ValueError):
    """A review decision that no held image can take: an unknown decision, or one naming another request."""


class PublicationRelay:
    def __init__(self, settings: Settings, serde: AvroSerde, batch: int = 500, cache: RedisStore | None = None,
                 safety: ImageSafety | None = None):
        self.s = settings
        self._safety = safety if safety is not None else image_safety_from_settings(settings)
        self._held = PartitionHolds()
        self._cache = cache
        self._to_cache: list[tuple[str, dict]] = []  # (cache key, entry) of the batch being committed
        self.topology = settings.topology
        self._serde = serde
        # A batch's images are checked before it commits: few enough that detector timeouts stay far below the
        # consumer's max.poll.interval.ms
        self._batch = min(batch, 4 * self._safety.concurrency) if self._safety.enabled else batch
        self._limits = settings.limits()
        self._failures = FailureRecords(self.topology, serde, stage="processors:publication", limits=self._limits)
        self._stop = threading.Event()
        self.group_id = f"{settings.topic_prefix}-publication"
        self._max_ready_bytes = self.topology.max_bytes(self.topology.images_ready)
        self._homes = Homes(self.topology.images_ready)  # its state: what was published
        self._sku_homes = Homes(self.topology.images_by_sku)  # the by-SKU view's state, of its repartition topic
        self._store = ObjectUris.of(settings.storage_url)  # where the workers store: every image published is there

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        conf = self.s.kafka_config()
        self._consumer = kafka.consumer(conf, self.group_id, **kafka.CO_PARTITIONED)
        step = TransactionalStep(conf, f"{self.group_id}-{self.s.worker_id}")
        self._published = PublishedState(conf, self.topology, self._serde, self.s.publication_window_days,
                                         store=state_store(self.s))
        self._consumer.subscribe(
            [self.topology.rendered, self.topology.review_decisions, self.topology.images_by_sku_repartition],
            on_assign=lambda *_: self._forget_counts(),  # partitions added come with one
            on_revoke=self._on_revoke, on_lost=self._on_revoke)
        log.info("publishing %s -> %s in group %s", self.topology.rendered, self.topology.images_ready,
                 self.group_id)
        clean = False
        try:
            ProcessorLoop(self._consumer, step, self.publish, lambda: self._rewind(step), batch=self._batch,
                          poll_s=0.1, before_poll=self._before_poll,
                          after_commit=self._fill_cache).run(self._stop)
            clean = True
        finally:
            if clean:
                self._consumer.close()
            step.close()
            self._published.close()
            self._safety.close()

    def _before_poll(self) -> None:
        self._held.resume_due(self._consumer)
        self._published.evict_when_due()

    def publish(self, msgs: list[Message]) -> tuple[list[OutRecord], dict[tuple[str, int], int]]:
        """The records one batch (ImageRendered, and reviewers' decisions) turns into, and the offsets to commit
        with them. A record whose safety check waits for an outage holds its partition: neither it nor what
        follows it there commits now."""
        records: list[OutRecord] = []
        offsets: dict[tuple[str, int], int] = {}
        now_ms = int(time.time() * 1000)
        origins = [Origin.of(msg) for msg in msgs]
        scans = self._scan(origins, now_ms)
        for origin in origins:
            tp = (origin.topic, origin.partition)
            if tp in self._held:
                continue  # read again from the held offset once the hold ends
            try:
                if origin.topic == self.topology.review_decisions:
                    records += self._decided(origin, now_ms, scans.get(origin.source))
                elif origin.topic == self.topology.images_by_sku_repartition:
                    records += self._sku_candidate(origin)
                else:
                    records += self._rendered(origin, origin.value, now_ms, False, scans.get(origin.source))
            except SafetyUnavailable as exc:
                self._held.hold(self._consumer, tp, origin.offset, f"image safety: {exc}")
                continue
            except PartitionCountMismatch:
                raise  # nothing can be decided right: the process stops, saying why
            except (KafkaException, RestoreFailed) as exc:  # the state in Kafka could not be read: not the record's
                if isinstance(exc, StateUnavailable):  # it may hold this record's changes, never committed
                    self._published.forget([origin.partition])
                self._held.hold(self._consumer, tp, origin.offset, f"publication state: {exc}")
                continue
            except RegistryUnavailable as exc:  # an outage of the Schema Registry: not the record's fault either
                self._held.hold(self._consumer, tp, origin.offset, f"schema registry: {exc}")
                continue
            except Exception as exc:  # noqa: BLE001 - a record never stops publication
                log.error("unpublishable record at %s: %s", origin.source, exc)
                records += self._unpublishable(origin, exc)
            offsets[tp] = origin.offset + 1
            self._held.decided(tp)
        return records, offsets

    def _scan(self, origins: list[Origin], now_ms: int) -> dict[tuple[str, int, int], Scanned]:
        """The safety verdicts of the batch's images that are to be published, checked together: the new renders
        and the approved review items. Cached answers were checked when first rendered."""
        if not self._safety.enabled:
            return {}
        todo: dict[tuple[str, int, int], dict] = {}
        for origin in origins:
            if origin.topic == self.topology.images_by_sku_repartition:
                continue  # scanned before it was published
            try:
                rendered = self._to_publish(origin, now_ms)
            except Exception:  # noqa: BLE001 - the record fails on its own in publish()
                continue
            if rendered is not None and not rendered.get("cached"):
                todo[origin.source] = rendered
        try:
            return dict(zip(todo, self._safety.scan(list(todo.values())), strict=True))
        except Exception as exc:  # noqa: BLE001 - each record is then scanned alone, inside its own try
            log.warning("scanning a batch together failed (%r); scanning each record alone", exc)
            return {}

    def _unpublishable(self, origin: Origin, exc: Exception) -> list[OutRecord]:
        """RequestFailed and a dead letter. It names the request only where the request failed here: not for a
        by-SKU candidate (its request is published on images.ready) nor for a refused review decision (it may
        name a request of another tenant, or one published long ago)."""
        anonymous = origin.topic == self.topology.images_by_sku_repartition or isinstance(exc, RefusedDecision)
        code = "invalid_request" if isinstance(exc, RefusedDecision) else "unpublishable"
        return self._failures(code, f"{type(exc).__name__}: {exc}", origin,
                              None if anonymous else self._request_of(origin))

    def _request_of(self, origin: Origin) -> dict | None:
        """The ImageRendered a failed record carries, when it decodes: its RequestFailed then names the request
        (its status, its callback); None for a record that does not."""
        try:
            if origin.topic == self.topology.review_decisions:
                decision = self._serde.decode("ReviewDecision", origin.value, topic=origin.topic)
                return self._serde.decode("ImageRendered", decision["rendered"], topic=self.topology.rendered)
            return self._serde.decode("ImageRendered", origin.value, topic=self.topology.rendered)
        except Exception:  # noqa: BLE001 - undecodable: the failure names the record by its coordinates only
            return None

    def _to_publish(self, origin: Origin, now_ms: int) -> dict | None:
        value = origin.value
        if origin.topic == self.topology.review_decisions:
            decision = self._serde.decode("ReviewDecision", value, topic=origin.topic)
            if decision["decision"] != "approve":
                return None
            value = decision["rendered"]
        rendered = self._serde.decode("ImageRendered", value, topic=self.topology.rendered)
        if self._homes.of(self._consumer, origin.topic, rendered["request_id"]) != origin.partition:
            return None  # forwarded, not published, from here
        publish = self._published.of_partition(origin.partition).decide(rendered, now_ms).publish
        return rendered if publish else None

    def _verdict(self, rendered: dict, scanned: Scanned | None) -> SafetyVerdict:
        if rendered.get("cached"):  # what the cache holds was published before: checked when first rendered
            return SafetyVerdict("PASS", scanned=True) if self._safety.enabled else UNSCANNED
        if scanned is None:
            if self._safety.enabled:  # not scanned with its batch (a record decoded only now): scan it alone
                [scanned] = self._safety.scan([rendered])
            else:
                return UNSCANNED
        return scanned.result()

    def _rendered(self, origin: Origin, value: bytes, now_ms: int, reviewed: bool,
                  scanned: Scanned | None = None) -> list[OutRecord]:
        rendered = self._serde.decode("ImageRendered", value, topic=self.topology.rendered)
        home = self._homes.of(self._consumer, origin.topic, rendered["request_id"])
        if home != origin.partition:  # what was published of it is known at its home, where its copies are read
            check_headers(origin.headers, self._limits)  # a forward carries them, and must fit its topic
            return [forward(origin, rendered["request_id"], home, self.topology.max_record_bytes(origin.topic))]
        state = self._published.of_partition(origin.partition)
        decision = state.decide(rendered, now_ms)
        if not decision.publish:
            return []  # this request's generation and content are published already (a replay, a redo)
        self._check_publishable(rendered)
        safety = self._verdict(rendered, scanned)
        if safety.decision == "BLOCK":
            return self._blocked(origin, rendered, safety)
        held_why = describe(safety) if safety.decision == "REVIEW" else None
        if held_why is None and rendered.get("quality", {}).get("passed") == 0.0:
            held_why = "quality below the bar"  # still below it after its re-renders (or with the caller's seed)
        if held_why is not None and not reviewed:  # a person decides
            metrics.SAFETY.labels(metric_label(safety)).inc()
            status = request_status(request=rendered, status="in_review", stage="publication", now_ms=now_ms,
                                    generation=rendered.get("generation"), detail=held_why)
            return [OutRecord(self.topology.review, value, rendered["request_id"].encode()),
                    self._status(status)]
        # With no detector configured the image is marked unscanned, in its event and in the metrics.
        ready = image_ready(rendered, now_ms, version=decision.version, supersedes=decision.supersedes,
                            safety=safety.as_record())
        ready_value = self._serde.encode("ImageReady", ready, topic=self.topology.images_ready,
                                          validate=False)
        if len(ready_value) > self._max_ready_bytes:
            raise ValueError(f"ImageReady would be {len(ready_value)} bytes; at most {self._max_ready_bytes}")
        # Everything that can fail (encoding the status) comes before the state changes: a record held after a
        # change would find itself published when read again, and publish nothing.
        sku_key = by_sku_key(ready)
        published = self._status(request_status(request=ready, status="published", stage="publication", now_ms=now_ms,
                                                generation=ready["generation"], final=True,
                                                detail=f"version {decision.version}"))
        state.apply(ready)
        metrics.SAFETY.labels(metric_label(safety)).inc()
        # On the partition whose number it was read from: the state of partition p is restored from images.ready p,
        # whatever partitioner a producer of this process is configured with.
        out = [OutRecord(self.topology.images_ready, ready_value, ready["request_id"].encode(),
                         partition=origin.partition)]
        if sku_key is not None:  # a candidate for the by-SKU view, decided by the owner of its SKU (_sku_candidate)
            out.append(OutRecord(self.topology.images_by_sku_repartition, ready_value, sku_key))
        out.append(published)
        key = rendered.get("cache_key")
        if key and not rendered.get("cached"):  # what the gate answered from the cache is there already
            self._to_cache.append((key, {"model_id": rendered["model_id"], "images": rendered["images"]}))
        return out

    def _check_publishable(self, rendered: dict) -> None:
        """Raises for what publication never announces, whoever wrote it to its input: a request id or tenant that
        breaks the request rules, or an image outside the object store the workers write to."""
        identity = identity_of(rendered, self._limits)
        if identity["request_id"] is None or identity["tenant"] is None:
            raise ValueError("its request_id or tenant breaks the request rules")
        for image in rendered["images"]:
            if not self._store.holds(image["uri"]):
                raise ValueError(f"image {image['uri'][:200]!r} is not in the object store {self.s.storage_url!r}")

    def _sku_candidate(self, origin: Origin) -> list[OutRecord]:
        """An ImageReady of a SKU, on the partition of its (tenant, SKU, view): written to the same partition of
        images.by-sku when it is newer than the latest there (sku_order), else nothing."""
        self._sku_homes.count(self._consumer, origin.topic)  # stops on a partition count other than by-sku's
        ready = self._serde.decode("ImageReady", origin.value, topic=origin.topic)
        key = by_sku_key(ready)
        if key is None:
            raise ValueError("an ImageReady of no SKU on the by-SKU repartition topic")
        if not self._published.sku_latest(origin.partition).offer(ready):
            return []  # older than the latest image of its SKU and view, or that image again (a replay)
        return [OutRecord(self.topology.images_by_sku, origin.value, key, partition=origin.partition)]

    def _decided(self, origin: Origin, now_ms: int, scanned: Scanned | None) -> list[OutRecord]:
        """A reviewer's decision: an approval publishes the image held for review (unless the detector now
        blocks it), a rejection fails it."""
        decision = self._serde.decode("ReviewDecision", origin.value, topic=origin.topic)
        rendered = self._serde.decode("ImageRendered", decision["rendered"], topic=self.topology.rendered)
        if decision["decision"] not in ("approve", "reject"):
            raise RefusedDecision(f"decision {decision['decision'][:40]!r}: must be approve or reject")
        if (decision["tenant"], decision["request_id"]) != (rendered["tenant"], rendered["request_id"]):
            raise RefusedDecision("the decision names another request than the image it carries")
        if decision["decision"] == "approve":
            return self._rendered(origin, decision["rendered"], now_ms, True, scanned)
        reason = f"rejected by {decision.get('reviewer') or 'a reviewer'}: {decision.get('reason') or 'no reason'}"
        failure = self._failures("rejected", reason, origin, rendered)
        return [r for r in failure if r.topic != self.topology.dlq]  # a decision, not a broken record

    def _blocked(self, origin: Origin, rendered: dict, safety: SafetyVerdict) -> list[OutRecord]:
        """RequestFailed(`unsafe`), its objects moved to quarantine (or deleted) first: a replay after a crash
        between the two finds them moved and fails the request again. Only a detector's judgement of the bytes
        moves them: objects are shared by every request of the tenant that rendered the same bytes (their key is
        the sha256), and a BLOCK because the detector could not judge (the fail-closed policy) says nothing of
        them; moving them would break what another request published, or the cache answers with."""
        removed = self._safety.remove(rendered) if safety.scanned else "its images were kept (not judged unsafe)"
        metrics.SAFETY.labels(metric_label(safety)).inc()
        failure = self._failures("unsafe", f"{describe(safety)}; {removed}", origin, rendered)
        return [r for r in failure if r.topic != self.topology.dlq]  # a decision, not a broken record

    def _forget_counts(self) -> None:
        self._homes.forget()
        self._sku_homes.forget()

    def _on_revoke(self, consumer: Consumer, parts: list[TopicPartition]) -> None:
        self._held.drop(consumer, [(p.topic, p.partition) for p in parts])
        self._published.forget(p.partition for p in parts)

    def _status(self, status: dict) -> OutRecord:
        return OutRecord(self.topology.status, self._serde.encode("RequestStatus", status, validate=False),
                         status_key(status["tenant"], status["request_id"]))

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
        self._cache.set_many([(cache_entry_key(self.s.topic_prefix, key), json.dumps(entry).encode())
                              for key, entry in entries], self.s.cache_ttl_s)
