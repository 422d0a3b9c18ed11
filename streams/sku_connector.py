"""`zimage sku-connector`: SkuChanged (`sku.changes`, keyed by sku_id) -> the GenerationRequests of the SKU.

A transactional processor on the shared step, like the gate: it reads committed SKU events, and the requests of a
batch, its failures and its own changelog commit with the batch's offsets. For each event, in order:

1. decode and check it; pick the template of its tenant's catalogue (by category, or the template it names), fill
   it from the SKU's attributes, one request per view (processors/sku_requests.py); an unknown category, a
   missing attribute or a request that intake would refuse gives RequestFailed (naming the SKU) plus a dead
   letter, and renders nothing;
2. the version rule on (tenant, SKU): a repeated or older version produces nothing; a backfill (header
   `zimage-generation`) of the latest version produces the same requests again, header copied, and the gate
   renders them as a new generation;
3. the requests go to `requests.<priority>` keyed by request id, with the event's `zimage-replay-id` and
   `zimage-generation` headers; a new latest version goes to `sku.changelog` (streams/sku_state.py).

A Schema Registry that does not answer holds the partition (read again after a backoff): not the event's fault.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer, KafkaException, Message, TopicPartition
from prometheus_client import Counter

from connectors import kafka
from connectors.kafka import Headers, OutRecord, TransactionalStep
from processors.admission import GENERATION_HEADER, REPLAY_ID_HEADER, header_text
from processors.requests import priority_of
from processors.sku_requests import SkuRefused, describe, sku_requests, sku_state_key, version_decision
from processors.sku_templates import SkuTemplates
from schemas.serde import AvroSerde, RegistryUnavailable, SerdeError, UnknownSchema
from streams.changelog_table import RestoreFailed
from streams.failures import FailureRecords, Origin
from streams.holds import PartitionHolds
from streams.processor_loop import ProcessorLoop
from streams.settings import Settings
from streams.sku_state import LatestVersions

log = logging.getLogger(__name__)

STAGE = "sku-connector"
TP = tuple[str, int]
EVENTS = Counter("zimage_sku_events_total", "SkuChanged events decided by the SKU connector, by outcome",
                 ["outcome"])
REQUESTS = Counter("zimage_sku_requests_total", "GenerationRequests produced by the SKU connector, by priority",
                   ["priority"])


class Hold(Exception):
    """The event cannot be decided now, through no fault of its own: read it again later."""


class SkuConnector:
    def __init__(self, settings: Settings, serde: AvroSerde, templates: SkuTemplates, *,
                 consumer_factory: Callable[..., Consumer] = kafka.consumer,
                 step_factory: Callable[..., TransactionalStep] = TransactionalStep, batch: int = 200):
        self.s = settings
        self.topology = settings.topology
        self._serde = serde
        self._templates = templates
        self._consumer_factory = consumer_factory
        self._step_factory = step_factory
        self._batch = batch
        self._limits = settings.limits()
        self._models = tuple(m for ms in settings.pools.values() for m in ms)
        self._failures = FailureRecords(self.topology, serde, stage=STAGE, limits=self._limits)
        self._held = PartitionHolds()
        self._stop = threading.Event()
        self.group_id = f"{settings.topic_prefix}-sku-connector"
        self._versions = LatestVersions(settings.kafka_config(), self.topology.sku_changelog)

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        conf = self.s.kafka_config()
        self._consumer = self._consumer_factory(conf, self.group_id)
        self._step = self._step_factory(conf, f"{self.group_id}-{self.s.worker_id}")
        self._consumer.subscribe([self.topology.sku_changes], on_assign=self._on_assign, on_revoke=self._on_revoke,
                                 on_lost=self._on_revoke)
        log.info("SKU connector of %s in group %s", self.topology.sku_changes, self.group_id)
        clean = False
        try:
            ProcessorLoop(self._consumer, self._step, self.decide, self._rewind, batch=self._batch, poll_s=0.1,
                          before_poll=lambda: self._held.resume_due(self._consumer),
                          on_abort=lambda records: EVENTS.labels("aborted").inc(records)).run(self._stop)
            clean = True
        finally:
            if clean:
                self._consumer.close()
            self._step.close()

    # ------------------------------------------------------------------ deciding

    def decide(self, msgs: list[Message]) -> tuple[list[OutRecord], dict[TP, int]]:
        """The outputs of one batch and the offsets to commit with them, each partition in its own order."""
        records: list[OutRecord] = []
        offsets: dict[TP, int] = {}
        for msg in msgs:
            origin = Origin.of(msg)
            tp = (origin.topic, origin.partition)
            if tp in self._held:
                continue  # read again from the held offset once the hold ends
            try:
                records += self._decide_one(origin)
            except (Hold, RegistryUnavailable) as exc:  # also an outage while writing a refused event's failure
                self._held.hold(self._consumer, tp, origin.offset, str(exc))
                continue
            offsets[tp] = origin.offset + 1
            self._held.decided(tp)
        return records, offsets

    def _decide_one(self, origin: Origin) -> list[OutRecord]:
        event: dict[str, Any] | None = None
        try:
            event = self._serde.decode("SkuChanged", origin.value, topic=origin.topic)
            if origin.key != event["sku_id"].encode("utf-8", "surrogatepass"):
                raise SkuRefused(f"{describe(event)}: the record's key must be its sku_id (the events of a SKU keep "
                                 "their order only on one partition)")
            key = sku_state_key(event["tenant"], event["sku_id"])
            backfill = header_text(origin.headers, GENERATION_HEADER) is not None
            decision = version_decision(self._versions.latest(origin.partition, key), event["version"], backfill)
            if decision in ("repeat", "older"):
                EVENTS.labels(decision).inc()
                log.info("%s: %s version %d; nothing to render", describe(event),
                         "a repeated" if decision == "repeat" else "an older", event["version"])
                return []
            requests = sku_requests(event, source=origin.source, templates=self._templates, limits=self._limits,
                                    models=self._models, now_ms=int(time.time() * 1000))
            EVENTS.labels(decision).inc()
            out = [self._request(request, origin.headers) for request in requests]
            if decision == "new":
                out.append(self._versions.advance(origin.partition, key, event["version"]))
            return out
        except RegistryUnavailable as exc:
            raise Hold(str(exc)) from None
        except (KafkaException, RestoreFailed):
            raise  # the state in Kafka could not be read: not the event's fault; a new process retries
        except SkuRefused as exc:
            EVENTS.labels("refused").inc()
            return self._failed("invalid_request", str(exc), origin, event)
        except SerdeError as exc:
            EVENTS.labels("undecodable").inc()
            return self._failed("unknown_schema" if isinstance(exc, UnknownSchema) else "undecodable", str(exc),
                                origin, None)
        except Exception as exc:  # a record never ends the process
            log.exception("unexpected error on %s[%d]@%d", origin.topic, origin.partition, origin.offset)
            EVENTS.labels("internal_error").inc()
            return self._failed("internal_error", f"{type(exc).__name__}: {exc}", origin, event)

    def _request(self, request: dict[str, Any], headers: Headers) -> OutRecord:
        if header_text(headers, REPLAY_ID_HEADER) is not None:  # a replay or backfill: never ahead of live traffic
            request = {**request, "priority": "LOW"}
        priority = priority_of(request)
        topic = self.topology.request_topic(priority)
        copied: Headers = []
        for name in (REPLAY_ID_HEADER, GENERATION_HEADER):
            value = header_text(headers, name)
            if value is not None:
                copied.append((name, value.encode()))
        REQUESTS.labels(priority).inc()
        return OutRecord(topic, self._serde.encode("GenerationRequest", request, topic=topic),
                         request["request_id"].encode(), copied)

    def _failed(self, code: str, reason: str, origin: Origin, event: dict[str, Any] | None) -> list[OutRecord]:
        # RequestFailed has no SKU field: its reason names the SKU, its tenant is the event's, its key the
        # event's key (the sku_id); no request exists, so it has no request_id.
        tenant = {"tenant": event.get("tenant")} if isinstance(event, dict) else None
        return self._failures(code, reason, origin, tenant)

    # ------------------------------------------------------------------ rewinds and rebalances

    def _rewind(self) -> None:
        self._step.rewind(self._consumer, lambda parts: self._versions.forget({p for _t, p in parts}))

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Another member may have advanced these SKUs while the partition was away: read the changelog again.
        self._versions.forget({tp.partition for tp in partitions})

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        gone = {(tp.topic, tp.partition) for tp in partitions}
        self._held.drop(consumer, gone)
        self._versions.forget({p for _t, p in gone})

