"""Every topic of the pipeline, declared once: name, partitions, configuration, who writes and who reads it.

`zimage topics apply` creates them idempotently and reports drift; `zimage topology` prints this table.
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
    pools: tuple[str, ...] = ("turbo",)
    status_partitions: int = 1

    def request_topic(self, priority: str) -> str:
        if priority not in PRIORITIES:
            raise ValueError(f"unknown priority {priority!r}; expected one of {PRIORITIES}")
        return f"{self.prefix}.requests.{priority}"

    @property
    def request_topics(self) -> tuple[str, ...]:
        return tuple(self.request_topic(p) for p in PRIORITIES)

    def render_input_topics(self, pool: str) -> dict[str, str]:
        """Priority -> topic the render workers of `pool` consume: what the gate admitted for that pool."""
        return {p: self.render_topic(pool, p) for p in PRIORITIES}

    def render_topic(self, pool: str, priority: str) -> str:
        """Admitted requests of one pool and priority: the gate writes them, that pool's workers read them."""
        if pool not in self.pools:
            raise ValueError(f"unknown pool {pool!r}; expected one of {self.pools}")
        if priority not in PRIORITIES:
            raise ValueError(f"unknown priority {priority!r}; expected one of {PRIORITIES}")
        return f"{self.prefix}.render.{pool}.{priority}"

    @property
    def pool_announcements(self) -> str:
        return f"{self.prefix}.pools"

    @property
    def gate_changelog(self) -> str:
        return f"{self.prefix}.gate.changelog"

    @property
    def rendered(self) -> str:
        return f"{self.prefix}.rendered"

    @property
    def review(self) -> str:
        return f"{self.prefix}.review"

    @property
    def review_decisions(self) -> str:
        return f"{self.prefix}.review.decisions"

    @property
    def images_by_sku(self) -> str:
        return f"{self.prefix}.images.by-sku"

    @property
    def images_by_sku_repartition(self) -> str:
        """Each SKU's candidates for the by-SKU view, keyed as images.by-sku: one member decides each SKU."""
        return f"{self.prefix}.images.by-sku.repartition"

    @property
    def status(self) -> str:
        return f"{self.prefix}.status"

    @property
    def webhook_deliveries(self) -> str:
        return f"{self.prefix}.webhooks.deliveries"

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

    @property
    def sku_changelog(self) -> str:
        """The SKU connector's state: the latest version rendered of each (tenant, SKU)."""
        return f"{self.prefix}.sku.changelog"

    def max_record_bytes(self, topic: str) -> int:
        """The topic's max.message.bytes: what one record may take in all (value, key, headers, framing)."""
        return self.max_bytes(topic) + RECORD_OVERHEAD_BYTES

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
                writers=("producers", "zimage submit", "zimage api", "sku connector", "zimage replay",
                         "gate (forwarded to their home partitions)"),
                readers=("gate", "zimage replay"),
                value="GenerationRequest",
            )
            for p in PRIORITIES
        ]
        output_bytes = str(OUTPUT_MAX_BYTES)
        specs += [
            TopicSpec(self.rendered, self.output_partitions, {"retention.ms": week, "max.message.bytes": output_bytes},
                      writers=("render worker", "gate (cache hits)", "processors: publication (forwarded)"),
                      readers=("processors: publication",),
                      value="ImageRendered"),
            # Kept long: a new subscriber reads the whole history of published images.
            TopicSpec(self.images_ready, self.output_partitions,
                      {"retention.ms": str(30 * DAY_MS), "max.message.bytes": output_bytes},
                      writers=("processors: publication",),
                      readers=("subscribers", "zimage tail", "webhooks", "zimage api", "publication (restore)"),
                      value="ImageReady"),
            TopicSpec(self.failed, self.output_partitions,
                      {"retention.ms": str(30 * DAY_MS), "max.message.bytes": output_bytes},
                      writers=("gate", "render worker", "processors"),
                      readers=("subscribers", "webhooks", "zimage api"),
                      value="RequestFailed"),
            TopicSpec(self.dlq, 1, {"retention.ms": str(30 * DAY_MS), "max.message.bytes": str(DLQ_MAX_BYTES)},
                      writers=("gate", "render worker", "processors"), readers=("operators",),
                      value="original bytes + reason headers"),
            TopicSpec(self.sku_changes, self.request_partitions, {"retention.ms": week},
                      writers=("catalogue services", "zimage replay"), readers=("sku connector", "zimage replay"),
                      value="SkuChanged"),
        ]
        compacted = {"cleanup.policy": "compact", "max.message.bytes": output_bytes}
        specs += [
            TopicSpec(self.render_topic(pool, p), self.request_partitions,
                      {"retention.ms": week, "max.message.bytes": output_bytes},
                      writers=("gate",), readers=(f"render worker ({pool})",), value="GenerationRequest")
            for pool in self.pools for p in PRIORITIES
        ]
        specs += [
            TopicSpec(self.pool_announcements, 1, dict(compacted), writers=("render worker",), readers=("gate",),
                      value="PoolAnnouncement"),
            # compacted, and deleted past the idempotency window so that the state read back stays bounded
            TopicSpec(self.gate_changelog, self.request_partitions,
                      {**compacted, "cleanup.policy": "compact,delete", "retention.ms": str(30 * DAY_MS)},
                      writers=("gate",), readers=("gate (restore)",), value="idempotency state"),
            # compacted only: the latest version of every SKU stays, however long ago it changed
            TopicSpec(self.sku_changelog, self.request_partitions, dict(compacted), writers=("sku connector",),
                      readers=("sku connector (restore)",), value="latest SKU versions"),
            TopicSpec(self.review, self.output_partitions,
                      {"retention.ms": str(30 * DAY_MS), "max.message.bytes": output_bytes},
                      writers=("processors: publication",), readers=("zimage review",), value="ImageRendered"),
            TopicSpec(self.review_decisions, self.output_partitions,
                      {"retention.ms": str(30 * DAY_MS), "max.message.bytes": output_bytes},
                      writers=("zimage review", "processors: publication (forwarded)"),
                      readers=("processors: publication", "zimage review"),
                      value="ReviewDecision"),
            TopicSpec(self.images_by_sku, self.output_partitions, dict(compacted),
                      writers=("processors: publication",), readers=("subscribers", "publication (restore)"),
                      value="ImageReady"),
            # keyed by (tenant, SKU, view) as images.by-sku, with as many partitions: the member that owns partition
            # q decides every SKU of by-sku partition q, so the view has one writer per key (Kafka Streams'
            # repartition topic before an aggregation)
            TopicSpec(self.images_by_sku_repartition, self.output_partitions,
                      {"retention.ms": week, "max.message.bytes": output_bytes},
                      writers=("processors: publication",), readers=("processors: publication (by-SKU view)",),
                      value="ImageReady"),
            TopicSpec(self.status, self.status_partitions, dict(compacted),
                      writers=("gate", "render worker", "processors"),
                      readers=("subscribers", "processors: status"), value="RequestStatus"),
            TopicSpec(self.webhook_deliveries, self.output_partitions,
                      {"retention.ms": str(30 * DAY_MS), "max.message.bytes": output_bytes},
                      writers=("processors: webhooks",), readers=("operators",), value="WebhookDelivery"),
            # faust's own: the changelog of the pending-deliveries table (it must match the source topics'
            # partitions), and its assignor's leader topic
            TopicSpec(f"{self.prefix}-webhooks-pending-changelog", self.output_partitions,
                      {"cleanup.policy": "compact"}, writers=("processors: webhooks",),
                      readers=("processors: webhooks (restore)",), value="pending deliveries (faust table)"),
            TopicSpec(f"{self.prefix}-webhooks-__assignor-__leader", 1, {},
                      writers=("processors: webhooks",), readers=("processors: webhooks",), value="faust internal"),
        ]
        return specs

    def describe(self) -> str:
        rows = [("topic", "parts", "value", "writers", "readers")]
        for t in self.topics():
            rows.append((t.name, str(t.partitions), t.value, ", ".join(t.writers), ", ".join(t.readers)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)
