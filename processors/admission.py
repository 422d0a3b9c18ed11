"""What the gate decides for a valid request: its pool, its generation, its idempotency and cache keys.

Pure: the gate (streams/gate.py) feeds it what the pools announced and the keys it has seen.

- The generation of a request is the model version of the pool it is routed to, plus the template version of a
  SKU request, plus the generation a backfill asked for (its `zimage-generation` header): a change of any of
  them is a new generation, rendered and published anew; a repeat within one generation is not.
- The cache key covers everything that changes the bytes: the tenant (no hit ever crosses tenants), the
  generation, the model and every render parameter, and the effective seed of each image.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from processors.requests import InvalidRequest, image_seeds


@dataclass(frozen=True)
class PoolInfo:
    """What a pool announced: the model it serves, the version it renders with, the sizes it can place."""

    pool: str
    model: str
    model_id: str
    model_version: str
    max_side: int
    size_multiple: int

    def __post_init__(self) -> None:
        # Read from a topic anyone with access can write: an announcement that would fail every request of its
        # pool (a size multiple of 0 divides by zero) is refused here, and the pool's last good one stands.
        for name in ("pool", "model", "model_id", "model_version"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"a pool announcement needs a non-empty {name}")
        for name in ("max_side", "size_multiple"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"a pool announcement needs a positive {name}, got {value!r}")

    @classmethod
    def from_announcement(cls, event: Mapping[str, Any]) -> PoolInfo:
        return cls(event["pool"], event["model"], event["model_id"], event["model_version"], event["max_side"],
                   event["size_multiple"])

    def announcement(self, worker_id: str, now_ms: int) -> dict[str, Any]:
        """The PoolAnnouncement a worker of this pool writes when it starts."""
        return {"pool": self.pool, "model": self.model, "model_id": self.model_id,
                "model_version": self.model_version, "max_side": self.max_side,
                "size_multiple": self.size_multiple, "worker_id": worker_id, "announced_at": now_ms}


# Headers a replay or backfill sets on the records it re-drives (their bytes are left as they were).
REPLAY_ID_HEADER = "zimage-replay-id"
GENERATION_HEADER = "zimage-generation"
HEADER_VALUE_MAX_CHARS = 128


def generation_of(request: Mapping[str, Any], model_version: str, asked: str | None = None) -> str:
    """What a re-render must change to count as new: the model version, the SKU template's version, and the
    generation a backfill names."""
    generation = model_version
    if request.get("template_version"):
        generation += f"+template.{request['template_version']}"
    if asked:
        generation += f"+{asked}"
    return generation


def header_text(headers: Any, name: str) -> str | None:
    """A short printable header value, or None (absent, empty, not UTF-8, too long or with control characters:
    a hostile header is ignored, never trusted)."""
    for key, raw in headers or ():
        if key != name or not raw:
            continue
        try:
            text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
        except UnicodeDecodeError:
            return None
        if len(text) > HEADER_VALUE_MAX_CHARS or not text.isprintable():
            return None
        return text
    return None


def _digest(parts: Mapping[str, Any]) -> str:
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


def idempotency_key(tenant: str, request_id: str, generation: str) -> str:
    return _digest({"tenant": tenant, "request_id": request_id, "generation": generation})


def cache_key(request: Mapping[str, Any], generation: str) -> str:
    """Equal for two requests exactly when they render the same bytes, for the same tenant."""
    return _digest({
        "tenant": request["tenant"], "generation": generation, "model": request["model"],
        "prompt": request["prompt"], "negative_prompt": request.get("negative_prompt"),
        "width": request["width"], "height": request["height"], "steps": request["steps"],
        "guidance": float(request["guidance"]), "seeds": image_seeds(request),
    })


def pool_of(model: str, pools: Mapping[str, tuple[str, ...]]) -> str | None:
    """The configured pool that serves `model`, or None (an unknown model)."""
    return next((pool for pool, models in pools.items() if model in models), None)


def check_against_pool(request: Mapping[str, Any], pool: PoolInfo) -> None:
    """What only the loaded model can tell, known from its announcement: sizes it cannot place."""
    width, height = request["width"], request["height"]
    if width % pool.size_multiple or height % pool.size_multiple:
        raise InvalidRequest("invalid_request", f"width and height must be multiples of {pool.size_multiple} for "
                                                f"{pool.model}, got {width}x{height}")
    if max(width, height) > pool.max_side:
        raise InvalidRequest("invalid_request", f"{width}x{height} is larger than {pool.model} renders "
                                                f"({pool.max_side} a side at most)")


def lineage_source(request: Mapping[str, Any], consumed: tuple[str, int, int]) -> tuple[str, int, int]:
    """Where a request was produced: its admission's source when the gate routed it, else where it was read."""
    admitted = request.get("admission")
    if not admitted:
        return consumed
    return admitted["source_topic"], admitted["source_partition"], admitted["source_offset"]


def admission(*, source: tuple[str, int, int], generation: str, cache_key: str, pool: str,
              now_ms: int, replay_id: str | None = None) -> dict[str, Any]:
    """The `admission` field the gate sets on a request it routes to a render topic."""
    topic, partition, offset = source
    return {"source_topic": topic, "source_partition": partition, "source_offset": offset,
            "generation": generation, "cache_key": cache_key, "pool": pool, "replay_id": replay_id,
            "admitted_at": now_ms}
