"""Every topic of the pipeline, declared once: name, partitions, configuration, who writes and who reads it.

`zimage topics apply` creates them idempotently and reports drift; `zimage topology` prints this table.
Moving the render workers behind a gate is a change of `render_input_topics` alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from processors.events import REASON_MAX_CHARS
from processors.requests import Limits

PRIORITIES = ("high", "normal", "low")
DAY_MS = 24 * 3600 * 1000
REQUEST_MAX_BYTES = 1_048_588  # Kafka's default; stated so the dead-letter topic can always hold a request
# Outputs (ImageRendered, ImageReady, RequestFailed) of a valid request stay under about 75 KB with the default
# Limits (largest_output_bytes): 1 MiB leaves room for limits raised tenfold.
OUTPUT_MAX_BYTES = 1024 * 1024
# A dead letter is the original record (value, key and headers: at most REQUEST_MAX_BYTES) plus reason headers.
DEAD_LETTER_HEADER_BYTES = 16 * 1024  # a reason of 2000 characters, up to 8000 bytes, and six short ones
DLQ_MAX_BYTES = 4 * 1024 * 1024
BROKER_DEFAULT_MAX_BYTES = 1_048_588
# What a record holds besides its value, within max.message.bytes: batch framing (61 bytes), record framing,
# a key (a request id, at most 256 bytes) and headers.
RECORD_OVERHEAD_BYTES = 16 * 1024

# Bounds of what the pipeline itself writes into outputs, beside what it copies from the request.
IMAGE_URI_MAX_BYTES = 2048
OWN_TEXT_MAX_BYTES = 512  # model id, model version, batch id, worker id, topic, reason code, stage
TIMING_ENTRIES_MAX = 16
_UTF8_MAX = 4  # bytes per character
_VARINT = 10  # the longest Avro int or long


def _text(chars: int, bytes_per_char: int = _UTF8_MAX) -> int:
    return _VARINT + chars * bytes_per_char


def largest_output_bytes(limits: Limits) -> int:
    """An upper bound on the Avro value (framing included) of any ImageRendered, ImageReady or RequestFailed that
    a request passing `limits` gives: the sum over the fields of the three records, each at its longest."""
    copied = (_text(limits.max_request_id_chars, 1) + _text(limits.max_tenant_chars) + _text(limits.max_sku_id_chars)
              + _text(limits.max_prompt_chars) + _text(limits.max_callback_url_chars)
              + limits.max_metadata_bytes + limits.max_metadata_entries * 2 * _VARINT + 2 * _VARINT)
    image = 4 * _VARINT + _text(IMAGE_URI_MAX_BYTES, 1) + _text(64, 1)  # index, seed, size, uri, sha256
    images = (limits.max_images + 1) * image + 2 * _VARINT  # ImageReady repeats the first image's uri and sha256
    own = (8 * _text(OWN_TEXT_MAX_BYTES, 1) + _text(REASON_MAX_CHARS)
           + TIMING_ENTRIES_MAX * (_text(32, 1) + 8) + 2 * _VARINT)
    scalars = 24 * _VARINT  # framing header, sizes, steps, guidance, seeds, offsets, timestamps, union branches
    return copied + images + own + scalars


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

    def max_bytes(self, topic: str) -> int:
        """The largest value a record on `topic` may carry: its max.message.bytes (the broker's default where the
        topic sets none) less room for the key, headers and batch framing. Check an encoded value against it
        before producing: a record over the limit fails the whole transaction."""
        spec = next((t for t in self.topics() if t.name == topic), None)
        if spec is None:
            raise ValueError(f"unknown topic {topic!r}; known: {', '.join(t.name for t in self.topics())}")
        return int(spec.config.get("max.message.bytes", BROKER_DEFAULT_MAX_BYTES)) - RECORD_OVERHEAD_BYTES

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
        output_bytes = str(OUTPUT_MAX_BYTES)
        specs += [
            TopicSpec(self.rendered, self.output_partitions, {"retention.ms": week, "max.message.bytes": output_bytes},
                      writers=("render worker",), readers=("processors: publication",), value="ImageRendered"),
            # Kept long: a new subscriber reads the whole history of published images.
            TopicSpec(self.images_ready, self.output_partitions,
                      {"retention.ms": str(30 * DAY_MS), "max.message.bytes": output_bytes},
                      writers=("processors: publication",), readers=("subscribers", "zimage tail"),
                      value="ImageReady"),
            TopicSpec(self.failed, self.output_partitions,
                      {"retention.ms": str(30 * DAY_MS), "max.message.bytes": output_bytes},
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
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)
