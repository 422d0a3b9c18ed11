"""The SDK's Kafka transport (ZImageClient.over_kafka): produce GenerationRequests to the request topics, read the
outcomes from `images.ready` and `requests.failed`. For services inside the cluster: no API, keys or limits; the
gate checks every request as it checks any producer's."""
from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any

from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

from connectors.client import Image, Result, ZImageError
from schemas.serde import AvroSerde, SerdeError

# what streams/submit.py fills in; the topic names follow streams/topology.py (<prefix>.requests.<priority>)
DEFAULTS: dict[str, Any] = {
    "sku_id": None, "negative_prompt": None, "model": "z-image-turbo", "width": 1024, "height": 1024, "steps": 8,
    "guidance": 0.0, "seed": None, "num_images": 1, "priority": "normal", "callback_url": None, "deadline": None,
    "metadata": {},
}


class KafkaTransport:
    def __init__(self, conf: Mapping[str, str], *, tenant: str, topic_prefix: str = "zimage",
                 serde: AvroSerde | None = None):
        self._tenant = tenant
        self._prefix = topic_prefix
        self._serde = serde or AvroSerde()
        # Keyed as Kafka's Java clients key (murmur2): the gate expects each request on its id's partition.
        self._producer = Producer({"partitioner": "murmur2_random", **conf, "enable.idempotence": True, "acks": "all",
                                   "linger.ms": 5})
        self._results: dict[str, Result] = {}
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._consumer = Consumer({**conf, "group.id": f"zimage-sdk-{uuid.uuid4().hex[:8]}",
                                   "enable.auto.commit": False, "isolation.level": "read_committed"})
        self._topics = {f"{topic_prefix}.images.ready": "ImageReady",
                        f"{topic_prefix}.requests.failed": "RequestFailed"}
        meta = self._consumer.list_topics(timeout=10)
        assignment = []
        for topic in self._topics:
            if topic not in meta.topics:
                raise ZImageError(f"topic {topic} does not exist")
            for p in meta.topics[topic].partitions:
                _low, high = self._consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
                assignment.append(TopicPartition(topic, p, high))  # outcomes of what is submitted from now on
        self._consumer.assign(assignment)
        self._thread = threading.Thread(target=self._follow, name="zimage-sdk-outcomes", daemon=True)
        self._thread.start()

    def submit(self, fields: Mapping[str, Any], idempotency_key: str, sync_timeout_s: float | None) -> str:
        request = {**DEFAULTS, **{k: v for k, v in fields.items() if k not in ("mode", "timeout_s")},
                   "request_id": idempotency_key, "tenant": self._tenant, "submitted_at": int(time.time() * 1000)}
        priority = str(request["priority"]).lower()
        request["priority"] = priority.upper()
        topic = f"{self._prefix}.requests.{priority}"
        try:
            value = self._serde.encode("GenerationRequest", request, topic=topic)
        except (SerdeError, ValueError, TypeError) as exc:
            raise ZImageError(f"not a GenerationRequest: {exc}") from exc
        errors: list[str] = []
        self._producer.produce(topic, value, idempotency_key.encode(),
                               on_delivery=lambda err, _msg: errors.append(str(err)) if err else None)
        if self._producer.flush(30) or errors:
            raise ZImageError(f"request {idempotency_key} not delivered: {errors or 'timeout'}")
        return idempotency_key

    def poll(self, request_id: str) -> Result | None:
        with self._changed:
            return self._results.get(request_id)

    def wait(self, request_id: str, timeout_s: float) -> Result:
        with self._changed:
            if not self._changed.wait_for(lambda: request_id in self._results, timeout_s):
                raise ZImageError(f"request {request_id} not finished within {timeout_s:.0f}s")
            return self._results[request_id]

    def cancel(self, request_id: str) -> None:
        raise ZImageError("cancelling needs the HTTP API (DELETE /v1/tasks/{id})")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _follow(self) -> None:
        try:
            while not self._stop.is_set():
                msg = self._consumer.poll(0.2)
                if msg is None or msg.error() is not None or not msg.value():
                    if msg is not None and msg.error() is not None \
                            and msg.error().code() != KafkaError._PARTITION_EOF:  # type: ignore[union-attr]
                        time.sleep(0.5)
                    continue
                topic = msg.topic() or ""
                try:
                    event = self._serde.decode(self._topics[topic], msg.value(), topic=topic)
                except SerdeError:
                    continue
                if event.get("tenant") != self._tenant or not event.get("request_id"):
                    continue
                result = _result_of(self._topics[topic], event)
                with self._changed:
                    self._results[event["request_id"]] = result
                    self._changed.notify_all()
        finally:
            self._consumer.close()


def _result_of(kind: str, event: dict[str, Any]) -> Result:
    if kind == "ImageReady":
        images = tuple(Image(i["index"], i["uri"], i["sha256"], i["seed"]) for i in event["images"])
        return Result(id=event["request_id"], state="completed", images=images, raw=event)
    state = "cancelled" if event["reason_code"] == "cancelled" else "failed"
    return Result(id=event["request_id"], state=state, error=f"{event['reason_code']}: {event['reason']}", raw=event)
