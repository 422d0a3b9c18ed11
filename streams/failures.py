"""What a refused request turns into: a RequestFailed event and a dead letter that keeps the original record.

The dead letter is the consumed record as it was (key, value, headers, timestamp), as Kafka Connect's dead-letter
queue keeps it, plus `zimage.*` headers that say why, where and when: the key is often the only thing that names
an undecodable record for an operator. A value too large for the topic is cut, with a `zimage.truncated_from`
header. So are a key and headers too large to carry (a compressed batch carries records of many megabytes that no
topic takes uncompressed): a key too long for its record becomes `sha256:<hex>` of itself, and headers past
HEADERS_MAX_BYTES are left out, each with a `zimage.*` header saying so. Otherwise the failure of such a record
would itself be refused by the broker, abort every transaction it is in, and stop the processor for good.
"""
from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Message

from connectors.kafka import Headers, OutRecord
from connectors.retry import until_done
from processors.events import dead_letter_headers, request_failed
from processors.requests import Limits
from processors.status import request_status, status_key
from schemas.serde import AvroSerde, RegistryUnavailable
from streams.topology import Topology

log = logging.getLogger(__name__)
T = TypeVar("T")
# What a failure carries of the original record: on the dead letter (4 MiB), all that an uncompressed record of a
# request topic (1 MiB) can hold; the RequestFailed (1 MiB, its event beside) keys by a request id (at most 256).
DLQ_KEY_MAX_BYTES = HEADERS_MAX_BYTES = 1024 * 1024
FAILED_KEY_MAX_BYTES = 1024


def bounded_key(key: bytes | None, most: int) -> bytes | None:
    """`key`, or `sha256:<hex>` of it when it is longer than `most` bytes."""
    if key is None or len(key) <= most:
        return key
    return b"sha256:" + hashlib.sha256(key).hexdigest().encode()


@dataclass(frozen=True)
class Origin:
    """A consumed record, kept until its outcome commits."""

    topic: str
    partition: int
    offset: int
    value: bytes
    key: bytes | None = None
    headers: Headers = field(default_factory=list)
    timestamp: int | None = None

    @classmethod
    def of(cls, msg: Message) -> Origin:
        kind, ts = msg.timestamp()
        # A consumed record always has a topic, partition and offset, and its headers are a list of pairs (the
        # client's types also allow None and the dict that `produce` accepts).
        return cls(msg.topic(), msg.partition(), msg.offset(),  # type: ignore[arg-type]
                   msg.value() or b"", msg.key(),
                   list(msg.headers() or []),  # type: ignore[arg-type]
                   None if kind == TIMESTAMP_NOT_AVAILABLE else ts)

    @property
    def source(self) -> tuple[str, int, int]:
        return self.topic, self.partition, self.offset


class FailureRecords:
    def __init__(self, topology: Topology, serde: AvroSerde, stage: str, limits: Limits | None = None):
        self._topology = topology
        self._serde = serde
        self._stage = stage
        self._limits = limits or Limits()
        self._dlq_max = topology.max_bytes(topology.dlq)

    def __call__(self, code: str, reason: str, origin: Origin, request: dict[str, Any] | None,
                 retriable: bool = False) -> list[OutRecord]:
        ts = int(time.time() * 1000)
        event = request_failed(code=code, reason=reason, stage=self._stage, source=origin.source, now_ms=ts,
                               request=request, retriable=retriable, limits=self._limits)
        original_key = bounded_key(origin.key, DLQ_KEY_MAX_BYTES)
        key = event["request_id"].encode() if event["request_id"] else bounded_key(origin.key, FAILED_KEY_MAX_BYTES)
        failed, dlq = self._topology.failed, self._topology.dlq
        why = dead_letter_headers(code=code, reason=reason, stage=self._stage, source=origin.source, now_ms=ts)
        if original_key is not origin.key:
            why.append(("zimage.key_truncated_from", str(len(origin.key or b"")).encode()))
        headers = kept_headers(origin.headers, why)
        value = origin.value
        room = self._dlq_max - sum(header_bytes(k, v) for k, v in [*headers, *why]) - len(original_key or b"")
        if len(value) > room:  # a compressed batch can carry a value larger than any topic takes uncompressed
            why.append(("zimage.truncated_from", str(len(value)).encode()))
            value = value[:max(0, room - 64)]
        records = [
            OutRecord(failed, self._serde.encode("RequestFailed", event, topic=failed), key),
            OutRecord(dlq, value, original_key, [*headers, *why], origin.timestamp),
        ]
        if event["request_id"] and event["tenant"]:  # the final status of a request that can be named
            status = request_status(request=event, status="failed", stage=self._stage, now_ms=ts, final=True,
                                    detail=f"{code}: {reason}")
            records.append(OutRecord(self._topology.status, self._serde.encode("RequestStatus", status),
                                     status_key(event["tenant"], event["request_id"])))
        return records


def header_bytes(name: str, value: str | bytes | None) -> int:
    encoded = value.encode("utf-8", "surrogatepass") if isinstance(value, str) else value or b""
    return len(name.encode("utf-8", "surrogatepass")) + len(encoded)


def kept_headers(headers: Headers, why: list[tuple[str, bytes]]) -> Headers:
    """The original headers that fit HEADERS_MAX_BYTES, in order; the count of those left out is added to `why`."""
    kept: Headers = []
    size = 0
    for name, value in headers:
        size += header_bytes(name, value)
        if size > HEADERS_MAX_BYTES:
            why.append(("zimage.headers_dropped", str(len(headers) - len(kept)).encode()))
            break
        kept.append((name, value))
    return kept


def waiting_out_registry(call: Callable[[], T], stop: threading.Event) -> T:
    """`call()` (an encoding), retried with backoff while the Schema Registry does not answer: an outage is no
    request's fault, so a request rendered already waits for it rather than fail. Raises Stopping on `stop`."""
    return until_done(call, is_infrastructure=lambda exc: isinstance(exc, RegistryUnavailable), stop=stop,
                      on_retry=lambda exc, attempt: log.warning("the Schema Registry does not answer (attempt %d): %s",
                                                                attempt, exc))
