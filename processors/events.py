"""The shape of the events the pipeline publishes: pure functions from inputs to Avro-ready dicts."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from processors.requests import Limits, identity_of, priority_of

Source = tuple[str, int, int]  # topic, partition, offset
REASON_MAX_CHARS = 2000


def _reason(text: str) -> str:
    """At most REASON_MAX_CHARS, and valid UTF-8: a reason may quote the very bytes that broke a record."""
    return text[:REASON_MAX_CHARS].encode("utf-8", "replace").decode("utf-8")


def request_failed(*, code: str, reason: str, stage: str, source: Source, now_ms: int,
                   request: Mapping[str, Any] | None = None, retriable: bool = False,
                   limits: Limits | None = None) -> dict[str, Any]:
    """A RequestFailed for a request that may be unknown (None: the record did not decode) or malformed: its
    request_id, tenant and callback_url are copied only when each passes its rule under `limits` (default
    Limits()), so the event always encodes, fits its topic and never names a refused callback URL."""
    identity = identity_of(request, limits or Limits())
    topic, partition, offset = source
    return {
        "request_id": identity["request_id"],
        "tenant": identity["tenant"],
        "reason_code": code,
        "reason": _reason(reason),
        "stage": stage,
        "retriable": retriable,
        "source": {"topic": topic, "partition": partition, "offset": offset},
        "callback_url": identity["callback_url"],
        "failed_at": now_ms,
    }


def dead_letter_headers(*, code: str, reason: str, stage: str, source: Source, now_ms: int) -> list[tuple[str, bytes]]:
    """Headers of a dead-letter record; its value is the original bytes, untouched."""
    topic, partition, offset = source
    return [
        ("zimage.reason_code", code.encode()),
        ("zimage.reason", _reason(reason).encode()),
        ("zimage.stage", stage.encode()),
        ("zimage.source.topic", topic.encode()),
        ("zimage.source.partition", str(partition).encode()),
        ("zimage.source.offset", str(offset).encode()),
        ("zimage.failed_at", str(now_ms).encode()),
    ]


def image_rendered(*, request: Mapping[str, Any], images: Sequence[Mapping[str, Any]], model_id: str,
                   model_version: str, timings_ms: Mapping[str, float], batch_id: str, batch_size: int,
                   worker_id: str, source: Source, now_ms: int, generation: str | None = None,
                   cache_key: str | None = None, attempt: int = 0, replay_id: str | None = None, cached: bool = False,
                   quality: Mapping[str, float] | None = None,
                   sku_version: int | None = None, view: str | None = None) -> dict[str, Any]:
    """The ImageRendered of one request. `generation` and `cache_key` left None are taken from the gate's
    admission on the request when it carries one (else "" and None); `sku_version` and `view` left None are
    taken from the request's own fields of those names when it has them."""
    topic, partition, offset = source
    admission = request.get("admission") or {}
    return {
        "request_id": request["request_id"],
        "tenant": request["tenant"],
        "sku_id": request.get("sku_id"),
        "prompt": request["prompt"],
        "priority": priority_of(request),
        "model_id": model_id,
        "model_version": model_version,
        "width": request["width"],
        "height": request["height"],
        "steps": request["steps"],
        "guidance": float(request["guidance"]),
        "images": [dict(i) for i in images],
        "timings": {k: float(v) for k, v in timings_ms.items()},
        "batch_id": batch_id,
        "batch_size": batch_size,
        "worker_id": worker_id,
        "source": {"topic": topic, "partition": partition, "offset": offset},
        "callback_url": request.get("callback_url"),
        "submitted_at": request["submitted_at"],
        "rendered_at": now_ms,
        "metadata": dict(request.get("metadata") or {}),
        "generation": admission.get("generation", "") if generation is None else generation,
        "cache_key": admission.get("cache_key") if cache_key is None else cache_key,
        "attempt": attempt,
        "cached": cached,
        "quality": {name: float(score) for name, score in (quality or {}).items()},
        "replay_id": admission.get("replay_id") if replay_id is None else replay_id,
        "sku_version": request.get("sku_version") if sku_version is None else sku_version,
        "view": request.get("view") if view is None else view,
    }


def image_ready(rendered: Mapping[str, Any], now_ms: int, *, version: int = 1, supersedes: int | None = None,
                cached: bool | None = None, safety: Mapping[str, Any] | None = None,
                quality: Mapping[str, float] | None = None) -> dict[str, Any]:
    """ImageRendered -> ImageReady: what subscribers see, with the request's lineage. Generation, callback URL,
    replay id, SKU lineage and, unless `cached` is given, `cached` are copied from `rendered` (absent in a v1
    ImageRendered: their defaults);
    `safety` is a SafetyVerdict record (processors.safety.SafetyVerdict.as_record) or None when no safety stage
    ran; `version`/`supersedes` come from processors.publication_state."""
    images = sorted(rendered["images"], key=lambda i: i["index"])
    if not images:
        raise ValueError(f"ImageRendered {rendered['request_id']!r} carries no images")
    first = images[0]
    src = rendered["source"]
    timings = dict(rendered.get("timings") or {})
    timings["publish"] = float(max(0, now_ms - rendered["rendered_at"]))
    timings["total"] = float(max(0, now_ms - rendered["submitted_at"]))
    return {
        "request_id": rendered["request_id"],
        "tenant": rendered["tenant"],
        "sku_id": rendered.get("sku_id"),
        "image_uri": first["uri"],
        "sha256": first["sha256"],
        "seed": first["seed"],
        "width": rendered["width"],
        "height": rendered["height"],
        "images": [{"index": i["index"], "uri": i["uri"], "sha256": i["sha256"], "seed": i["seed"]} for i in images],
        "model_id": rendered["model_id"],
        "model_version": rendered["model_version"],
        "timings": timings,
        "lineage": {
            "source_topic": src["topic"],
            "source_partition": src["partition"],
            "source_offset": src["offset"],
            "batch_id": rendered["batch_id"],
            "worker_id": rendered["worker_id"],
        },
        "submitted_at": rendered["submitted_at"],
        "published_at": now_ms,
        "metadata": dict(rendered.get("metadata") or {}),
        "generation": rendered.get("generation") or "",
        "version": version,
        "supersedes": supersedes,
        "cached": bool(rendered.get("cached", False)) if cached is None else cached,
        "safety": None if safety is None else dict(safety),
        "quality": {name: float(score) for name, score in
                    ((rendered.get("quality") or {}) if quality is None else quality).items()},
        "callback_url": rendered.get("callback_url"),
        "replay_id": rendered.get("replay_id"),
        "sku_version": rendered.get("sku_version"),
        "view": rendered.get("view"),
    }
