"""What a refused request turns into: a RequestFailed event and a dead letter that keeps the original record.

The dead letter is the consumed record as it was (key, value, headers, timestamp), as Kafka Connect's dead-letter
queue keeps it, plus `zimage.*` headers that say why, where and when: the key is often the only thing that names
an undecodable record for an operator. A value too large for the topic is cut, with a `zimage.truncated_from`
header.
"""
from __future__ import annotations

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
        key = event["request_id"].encode() if event["request_id"] else origin.key
        failed, dlq = self._topology.failed, self._topology.dlq
        why = dead_letter_headers(code=code, reason=reason, stage=self._stage, source=origin.source, now_ms=ts)
        value = origin.value
        room = self._dlq_max - sum(len(k) + len(v or b"") for k, v in [*origin.headers, *why]) - len(origin.key or b"")
        if len(value) > room:  # a compressed batch can carry a value larger than any topic takes uncompressed
            why.append(("zimage.truncated_from", str(len(value)).encode()))
            value = value[:max(0, room - 64)]
        records = [
            OutRecord(failed, self._serde.encode("RequestFailed", event, topic=failed), key),
            OutRecord(dlq, value, origin.key, [*origin.headers, *why], origin.timestamp),
        ]
        if event["request_id"] and event["tenant"]:  # the final status of a request that can be named
            status = request_status(request=event, status="failed", stage=self._stage, now_ms=ts, final=True,
                                    detail=f"{code}: {reason}")
            records.append(OutRecord(self._topology.status, self._serde.encode("RequestStatus", status),
                                     status_key(event["tenant"], event["request_id"])))
        return records


def waiting_out_registry(call: Callable[[], T], stop: threading.Event) -> T:
    """`call()` (an encoding), retried with backoff while the Schema Registry does not answer: an outage is no
    request's fault, so a request rendered already waits for it rather than fail. Raises Stopping on `stop`."""
    return until_done(call, is_infrastructure=lambda exc: isinstance(exc, RegistryUnavailable), stop=stop,
                      on_retry=lambda exc, attempt: log.warning("the Schema Registry does not answer (attempt %d): %s",
                                                                attempt, exc))
