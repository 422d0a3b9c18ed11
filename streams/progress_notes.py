"""The statuses a render worker writes about the requests in its hands.

- `rendering`, when a batch is still rendering ZIMAGE_RENDERING_NOTE_AFTER_MS after it started (streams/rendering.py):
  best effort, from a plain idempotent producer outside the transaction, because it must show while the batch
  renders, not when it commits. A note that is lost or late costs nothing: the status view keeps the latest by
  time, and the final status always follows.
- `rendered`, produced in the transaction with the request's ImageRendered, so it is true when it shows.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from confluent_kafka import KafkaException, Producer

from connectors import kafka
from connectors.kafka import OutRecord
from processors.status import request_status, status_key
from schemas.serde import AvroSerde
from streams.topology import Topology

log = logging.getLogger(__name__)


class ProgressNotes:
    def __init__(self, topology: Topology, serde: AvroSerde, stage: str,
                 producer_factory: Callable[[dict[str, str]], Producer] = kafka.producer):
        self._topic = topology.status
        self._serde = serde
        self._stage = stage
        self._producer_factory = producer_factory
        self._producer: Producer | None = None

    def open(self, conf: dict[str, str]) -> None:
        self._producer = self._producer_factory(conf)

    def rendering(self, requests: Sequence[dict[str, Any]]) -> None:
        if self._producer is None:
            return
        now_ms = int(time.time() * 1000)
        for request in requests:
            try:
                self._producer.produce(self._topic, self._encode(request, "rendering", now_ms),
                                       status_key(request["tenant"], request["request_id"]))
            except (BufferError, KafkaException) as exc:  # best effort: the final status will follow
                log.debug("a rendering status was not sent: %r", exc)
        self._producer.poll(0)

    def rendered(self, request: dict[str, Any]) -> OutRecord:
        return OutRecord(self._topic, self._encode(request, "rendered", int(time.time() * 1000)),
                         status_key(request["tenant"], request["request_id"]))

    def close(self, timeout_s: float = 1.0) -> None:
        if self._producer is not None:
            self._producer.flush(timeout_s)
            self._producer = None

    def _encode(self, request: dict[str, Any], status: str, now_ms: int) -> bytes:
        generation = (request.get("admission") or {}).get("generation")
        event = request_status(request=request, status=status, stage=self._stage, generation=generation,
                               now_ms=now_ms)
        return self._serde.encode("RequestStatus", event, topic=self._topic, validate=False)
