"""The API's view of outcomes: one consumer thread per API process reads `images.ready` and `requests.failed`.

It is assigned every partition (no consumer group, nothing committed), reads committed records only, and for each
outcome (1) wakes the sync requests that wait for it, on the event loop, without polling anything, and (2) hands a
digest of it to the loop to store in Redis, where GET /v1/tasks/{id} finds the image URIs. A starting process reads
back the last `api_results_replay_s` of outcomes, so a short restart of every API process loses none of them.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from connectors import kafka
from connectors.retry import Stopping, until_done
from schemas.serde import AvroSerde, SerdeError
from streams.failures import waiting_out_registry

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (tenant, request_id)
Outcome = dict[str, Any]


def outcome_digest(kind: str, event: dict[str, Any]) -> Outcome:
    """What the API keeps of an ImageReady ("ready") or RequestFailed ("failed"): enough to answer a task."""
    if kind == "ready":
        return {"kind": "ready", "images": [{k: img[k] for k in ("index", "uri", "sha256", "seed")}
                                            for img in event["images"]],
                "width": event["width"], "height": event["height"], "seed": event["seed"],
                "model_id": event["model_id"], "model_version": event["model_version"],
                "version": event["version"], "cached": event["cached"], "at": event["published_at"]}
    return {"kind": "failed", "reason_code": event["reason_code"], "reason": event["reason"],
            "stage": event["stage"], "at": event["failed_at"]}


class OutcomeFeed:
    """Wakes waiters by (tenant, request_id) and stores digests through `store_digests` (run on the loop)."""

    def __init__(self, kafka_conf: dict[str, str], topics: dict[str, str], serde: AvroSerde, *,
                 replay_s: float, store_digests: Callable[[list[tuple[Key, Outcome]]], Coroutine[Any, Any, None]]):
        self._conf = kafka_conf
        self._topics = topics  # topic -> "ready" | "failed"
        self._serde = serde
        self._replay_s = replay_s
        self._store_digests = store_digests
        self._waiters: dict[Key, set[asyncio.Future[Outcome]]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.positioned = threading.Event()  # set once every partition has its start offset
        self.seen = 0

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="api-outcomes", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def wait_for(self, key: Key) -> asyncio.Future[Outcome]:
        """A future for the next outcome of `key`; call on the loop, before producing the request, so the outcome
        cannot pass unseen. Drop it with `forget` when no longer wanted."""
        assert self._loop is not None
        future: asyncio.Future[Outcome] = self._loop.create_future()
        self._waiters.setdefault(key, set()).add(future)
        return future

    def forget(self, key: Key, future: asyncio.Future[Outcome]) -> None:
        waiting = self._waiters.get(key)
        if waiting is not None:
            waiting.discard(future)
            if not waiting:
                del self._waiters[key]

    @property
    def waiting(self) -> int:
        return sum(len(w) for w in self._waiters.values())

    def _resolve(self, found: list[tuple[Key, Outcome]]) -> None:  # on the loop
        for key, outcome in found:
            for future in self._waiters.pop(key, ()):
                if not future.done():
                    future.set_result(outcome)

    def _run(self) -> None:
        assert self._loop is not None
        consumer = self._positioned_consumer()
        try:
            while not self._stop.is_set():
                found: list[tuple[Key, Outcome]] = []
                for msg in kafka.consume_ready(consumer, 500, 0.2):
                    err = msg.error()
                    if err is not None:
                        if err.code() != KafkaError._PARTITION_EOF:
                            log.warning("outcome feed: %s", err)
                        continue
                    item = self._decode(msg.topic() or "", msg.value())
                    if item is not None:
                        found.append(item)
                if found:
                    self.seen += len(found)
                    self._loop.call_soon_threadsafe(self._resolve, found)
                    asyncio.run_coroutine_threadsafe(self._store_digests(found), self._loop)
        except BaseException:
            # a dead feed would leave every sync request waiting out its timeout: end the process (its supervisor
            # starts a new one) rather than serve without it
            log.exception("the outcome feed stopped")
            os._exit(70)
        finally:
            consumer.close()

    def _decode(self, topic: str, value: bytes | None) -> tuple[Key, Outcome] | None:
        kind = self._topics.get(topic)
        if kind is None or not value:
            return None
        record = "ImageReady" if kind == "ready" else "RequestFailed"
        try:  # a Schema Registry outage is waited out: moving past the record would leave its waiter unanswered
            event = waiting_out_registry(lambda: self._serde.decode(record, value, topic=topic), self._stop)
        except (SerdeError, Stopping):
            return None
        if not event.get("tenant") or not event.get("request_id"):
            return None  # a failure of a record too broken to name its request: nobody can wait for it
        return (event["tenant"], event["request_id"]), outcome_digest(kind, event)

    def _positioned_consumer(self) -> Consumer:
        """Every partition of the topics, from `replay_s` ago (the end where nothing is that recent)."""
        consumer = kafka.consumer(self._conf, f"zimage-api-feed-{uuid.uuid4().hex[:8]}",
                                  **{"enable.auto.offset.store": False, "enable.partition.eof": False})
        meta = until_done(lambda: consumer.list_topics(timeout=10),
                          is_infrastructure=lambda exc: isinstance(exc, KafkaException),
                          on_retry=lambda exc, attempt: log.warning("outcome feed: %s", exc), within_s=120)
        since_ms = int((time.time() - self._replay_s) * 1000)
        wanted = [TopicPartition(t, p, since_ms) for t in self._topics for p in meta.topics[t].partitions]
        found = until_done(lambda: consumer.offsets_for_times(wanted, timeout=10),
                           is_infrastructure=lambda exc: isinstance(exc, KafkaException),
                           on_retry=lambda exc, attempt: log.warning("outcome feed: %s", exc), within_s=120)
        assignment = []
        for tp in found:
            if tp.offset < 0:  # nothing that recent: the end, as it is now
                _low, high = consumer.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), timeout=10)
                tp = TopicPartition(tp.topic, tp.partition, high)
            assignment.append(tp)
        consumer.assign(assignment)
        self.positioned.set()
        log.info("outcome feed reading %d partitions of %s", len(assignment), ", ".join(self._topics))
        return consumer
