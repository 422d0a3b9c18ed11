"""Every topic of the pipeline, declared once: name, partitions, configuration, who writes and who reads it.

`zimage topics apply` creates them idempotently and reports drift; `zimage topology` prints this table.
Moving the render workers behind a gate is a change of `render_input_topics` alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field

PRIORITIES = ("high", "normal", "low")
DAY_MS = 24 * 3600 * 1000
REQUEST_MAX_BYTES = 1_048_588  # Kafka's default; stated so the dead-letter topic can always hold a request
DLQ_MAX_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str] = field(default_factory=dict)
    writers: tuple[str, ...] = ()
    readers: tuple[str, ...] = ()
    value: str = ""  # Avro record name carried, or a word for raw payloads


@dataclass(frozen=True)
class Topology:
    prefix: str = "zimage"
    request_partitions: int = 6
    output_partitions: int = 6

    def request_topic(self, priority: str) -> str:
        if priority not in PRIORITIES:
            raise ValueError(f"unknown priority {priority!r}; expected one of {PRIORITIES}")
        return f"{self.prefix}.requests.{priority}"

    @property
    def request_topics(self) -> tuple[str, ...]:
        return tuple(self.request_topic(p) for p in PRIORITIES)

    def render_input_topics(self) -> dict[str, str]:
        """Priority -> topic the render workers consume."""
        return {p: self.request_topic(p) for p in PRIORITIES}

    @property
    def rendered(self) -> str:
        return f"{self.prefix}.rendered"

    @property
    def images_ready(self) -> str:
        return f"{self.prefix}.images.ready"

    @property
    def failed(self) -> str:
        return f"{self.prefix}.requests.failed"

    @property
    def dlq(self) -> str:
        return f"{self.prefix}.dlq"

    @property
    def sku_changes(self) -> str:
        return f"{self.prefix}.sku.changes"

    def topics(self) -> list[TopicSpec]:
        week = str(7 * DAY_MS)
        specs = [
            TopicSpec(
                self.request_topic(p), self.request_partitions,
                {"retention.ms": week, "cleanup.policy": "delete", "max.message.bytes": str(REQUEST_MAX_BYTES)},
                writers=("producers", "zimage submit", "sku connector"), readers=("render worker",),
                value="GenerationRequest",
            )
            for p in PRIORITIES
        ]
        specs += [
            TopicSpec(self.rendered, self.output_partitions, {"retention.ms": week},
                      writers=("render worker",), readers=("processors: publication",), value="ImageRendered"),
            # Kept long: a new subscriber reads the whole history of published images.
            TopicSpec(self.images_ready, self.output_partitions, {"retention.ms": str(30 * DAY_MS)},
                      writers=("processors: publication",), readers=("subscribers", "zimage tail"),
                      value="ImageReady"),
            TopicSpec(self.failed, self.output_partitions, {"retention.ms": str(30 * DAY_MS)},
                      writers=("render worker", "processors"), readers=("subscribers",), value="RequestFailed"),
            TopicSpec(self.dlq, 1, {"retention.ms": str(30 * DAY_MS), "max.message.bytes": str(DLQ_MAX_BYTES)},
                      writers=("render worker", "processors"), readers=("operators",),
                      value="original bytes + reason headers"),
            TopicSpec(self.sku_changes, self.request_partitions, {"retention.ms": week},
                      writers=("catalogue services",), readers=("sku connector",), value="SkuChanged"),
        ]
        return specs

    def describe(self) -> str:
        rows = [("topic", "parts", "value", "writers", "readers")]
        for t in self.topics():
            rows.append((t.name, str(t.partitions), t.value, ", ".join(t.writers), ", ".join(t.readers)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
