"""What a refused request turns into: a RequestFailed event and a dead letter with the original bytes."""
from __future__ import annotations

import time
from typing import Any

from connectors.kafka import OutRecord
from processors.events import dead_letter_headers, request_failed
from schemas.serde import AvroSerde
from streams.topology import Topology


class FailureRecords:
    def __init__(self, topology: Topology, serde: AvroSerde, stage: str):
        self._topology = topology
        self._serde = serde
        self._stage = stage

    def __call__(self, code: str, reason: str, source: tuple[str, int, int], raw: bytes,
                 request: dict[str, Any] | None, retriable: bool = False) -> list[OutRecord]:
        ts = int(time.time() * 1000)
        event = request_failed(code=code, reason=reason, stage=self._stage, source=source, now_ms=ts,
                               request=request, retriable=retriable)
        key = request["request_id"].encode() if request else None
        failed, dlq = self._topology.failed, self._topology.dlq
        return [
            OutRecord(failed, self._serde.encode("RequestFailed", event, topic=failed), key),
            OutRecord(dlq, raw, key, dead_letter_headers(code=code, reason=reason, stage=self._stage,
                                                         source=source, now_ms=ts)),
        ]
