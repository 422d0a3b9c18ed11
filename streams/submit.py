"""Building and producing GenerationRequests: what `zimage submit`, the demo and the benchmarks share."""
from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from connectors import kafka
from schemas.serde import AvroSerde
from streams.topology import PRIORITIES, Topology

REQUEST_DEFAULTS: dict[str, Any] = {
    "tenant": "default", "sku_id": None, "negative_prompt": None, "model": "z-image-turbo",
    "width": 1024, "height": 1024, "steps": 8, "guidance": 0.0, "seed": None, "num_images": 1,
    "priority": "NORMAL", "callback_url": None, "deadline": None, "metadata": {},
}


def build_request(fields: dict[str, Any]) -> dict[str, Any]:
    """A complete request from partial fields (JSON lines, CLI options); priority may be given lower-case.
    Raises ValueError for fields that make no request."""
    if not isinstance(fields, dict):
        raise ValueError(f"a request is a JSON object, not {type(fields).__name__}")
    if not isinstance(fields.get("metadata") or {}, dict):
        raise ValueError("metadata must be an object of strings")
    req = {**REQUEST_DEFAULTS, **{k: v for k, v in fields.items() if v is not None}}
    req.setdefault("request_id", uuid.uuid4().hex)
    req.setdefault("submitted_at", int(time.time() * 1000))
    req["priority"] = str(req["priority"]).upper()
    if req["priority"].lower() not in PRIORITIES:
        raise ValueError(f"priority {req['priority']!r}: expected one of {', '.join(PRIORITIES)}")
    req["metadata"] = {str(k): str(v) for k, v in (req.get("metadata") or {}).items()}
    return req


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if line.strip() and not line.lstrip().startswith("#"):
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{n}: not JSON: {exc}") from exc


class Submitter:
    """Encodes requests and produces them to the topic of their priority, keyed by request id: the request topics
    the gate reads, or (`pool`, for benchmarks of the worker alone) that pool's render topics."""

    def __init__(self, kafka_conf: dict[str, str], topology: Topology, serde: AvroSerde, pool: str | None = None):
        self._producer = kafka.producer(kafka_conf, **{"linger.ms": 20})
        self._topology = topology
        self._serde = serde
        self._pool = pool
        self._errors: list[str] = []

    def submit(self, requests: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        sent = []
        for req in requests:
            priority = req["priority"].lower()
            topic = (self._topology.request_topic(priority) if self._pool is None
                     else self._topology.render_topic(self._pool, priority))
            value = self._serde.encode("GenerationRequest", req, topic=topic)
            self.produce_raw(topic, value, req["request_id"].encode())
            sent.append(req)
        return sent

    def produce_raw(self, topic: str, value: bytes, key: bytes | None = None) -> None:
        while True:
            try:
                self._producer.produce(topic, value, key, on_delivery=self._delivered)
                break
            except BufferError:
                self._producer.poll(0.05)
        self._producer.poll(0)

    def flush(self, timeout_s: float = 30.0) -> None:
        left = self._producer.flush(timeout_s)
        if left or self._errors:
            raise RuntimeError(f"{left} requests not delivered; errors: {self._errors[:5]}")

    def _delivered(self, err: object, _msg: object) -> None:  # confluent-kafka delivery callback
        if err is not None:
            self._errors.append(str(err))
