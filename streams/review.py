"""`zimage review list|approve|reject`: the people's side of the review flow.

Images held for review are on `zimage.review` (their ImageRendered); a decision is a ReviewDecision event on
`zimage.review.decisions`, which carries the item it decides, so that publication acts on it alone: an
approval publishes the image, a rejection gives RequestFailed(`rejected`).
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from connectors import kafka
from schemas.serde import AvroSerde, SerdeError
from streams.changelog_table import read_to_end
from streams.settings import Settings


@dataclass(frozen=True)
class ReviewItem:
    rendered: dict[str, Any]
    value: bytes  # as it is on the review topic: what a decision carries

    @property
    def key(self) -> tuple[str, str]:
        return self.rendered["tenant"], self.rendered["request_id"]


class ReviewDesk:
    def __init__(self, settings: Settings, serde: AvroSerde):
        self.s = settings
        self._serde = serde

    def _read(self, topic: str, record: str) -> Iterator[tuple[dict[str, Any], bytes]]:
        found: list[tuple[dict[str, Any], bytes]] = []

        def keep(_key: bytes | None, value: bytes | None) -> None:
            if value is None:
                return
            with contextlib.suppress(SerdeError):  # not ours to show
                found.append((self._serde.decode(record, value), value))

        read_to_end(self.s.kafka_config(), topic, list(range(self.s.topology.output_partitions)), keep)
        return iter(found)

    def waiting(self) -> list[ReviewItem]:
        """Items held for review that no decision covers yet, oldest first (the latest item of each request)."""
        items = {}
        for rendered, value in self._read(self.s.topology.review, "ImageRendered"):
            item = ReviewItem(rendered, value)
            items[item.key] = item
        for decision, _value in self._read(self.s.topology.review_decisions, "ReviewDecision"):
            items.pop((decision["tenant"], decision["request_id"]), None)
        return sorted(items.values(), key=lambda i: i.rendered["rendered_at"])

    def decide(self, tenant: str, request_id: str, decision: str, reviewer: str | None, reason: str | None) -> None:
        item = next((i for i in self.waiting() if i.key == (tenant, request_id)), None)
        if item is None:
            raise LookupError(f"nothing of tenant {tenant!r} waits for review under request id {request_id!r}")
        event = {"tenant": tenant, "request_id": request_id, "decision": decision, "reviewer": reviewer,
                 "reason": reason, "rendered": item.value, "decided_at": int(time.time() * 1000)}
        topic = self.s.topology.review_decisions
        producer = kafka.producer(self.s.kafka_config())
        producer.produce(topic, self._serde.encode("ReviewDecision", event, topic=topic), request_id.encode())
        if producer.flush(30):
            raise RuntimeError(f"the decision could not be written to {topic}")
