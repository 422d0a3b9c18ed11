"""The shape of published events, checked against the Avro contracts: pure, no broker."""
from __future__ import annotations

from typing import Any

import fastavro

from processors.events import (
    REASON_MAX_CHARS,
    dead_letter_headers,
    image_ready,
    image_rendered,
    request_failed,
)
from processors.requests import Limits
from schemas.serde import load_schema
from streams.submit import build_request


def rendered_event(images=2):
    req = build_request({"request_id": "r-9", "prompt": "a vase", "width": 64, "height": 64, "steps": 2,
                         "seed": 5, "num_images": images, "metadata": {"shop": "eu"}})
    stored = [{"index": i, "uri": f"file:///x/{i}.png", "sha256": f"{i:064x}", "seed": 5 + i, "size_bytes": 10}
              for i in reversed(range(images))]
    return image_rendered(request=req, images=stored, model_id="tiny", model_version="v1",
                          timings_ms={"render": 12.5}, batch_id="b-1", batch_size=3, worker_id="w-1",
                          source=("zimage.requests.normal", 2, 41), now_ms=req["submitted_at"] + 100)


def test_rendered_and_ready_events_match_their_schemas():
    rendered = rendered_event()
    assert fastavro.validate(rendered, fastavro.parse_schema(load_schema("ImageRendered")))
    ready = image_ready(rendered, now_ms=rendered["rendered_at"] + 40)
    assert fastavro.validate(ready, fastavro.parse_schema(load_schema("ImageReady")))


def test_ready_carries_lineage_and_the_first_image():
    rendered = rendered_event()
    ready = image_ready(rendered, now_ms=rendered["rendered_at"] + 40)
    assert ready["lineage"] == {"source_topic": "zimage.requests.normal", "source_partition": 2,
                                "source_offset": 41, "batch_id": "b-1", "worker_id": "w-1"}
    assert ready["image_uri"] == "file:///x/0.png" and ready["seed"] == 5
    assert [i["index"] for i in ready["images"]] == [0, 1]
    assert ready["timings"]["publish"] == 40 and ready["timings"]["total"] == 140
    assert ready["metadata"] == {"shop": "eu"} and ready["model_version"] == "v1"


def test_failed_event_and_dead_letter_headers():
    failed = request_failed(code="invalid_request", reason="width=0", stage="worker:turbo",
                            source=("t", 1, 7), now_ms=1, request={"request_id": "r", "tenant": "a"})
    assert fastavro.validate(failed, fastavro.parse_schema(load_schema("RequestFailed")))
    undecodable = request_failed(code="undecodable", reason="bad", stage="worker", source=("t", 0, 3), now_ms=1)
    assert undecodable["request_id"] is None
    assert fastavro.validate(undecodable, fastavro.parse_schema(load_schema("RequestFailed")))
    headers = dict(dead_letter_headers(code="undecodable", reason="bad", stage="worker", source=("t", 0, 3),
                                       now_ms=1))
    assert headers["zimage.source.offset"] == b"3" and headers["zimage.reason_code"] == b"undecodable"


def test_a_failed_event_copies_only_the_request_fields_that_pass_their_rules():
    schema = fastavro.parse_schema(load_schema("RequestFailed"))
    good = {"request_id": "order-1", "tenant": "acme", "callback_url": "https://hooks.example.com/cb"}
    failed = request_failed(code="invalid_request", reason="width=0", stage="worker", source=("t", 0, 1), now_ms=1,
                            request={**good, "width": 0})
    assert {field: failed[field] for field in good} == good
    hostile = {"request_id": "r" * 1_000_000, "tenant": 42, "callback_url": "http://169.254.169.254/latest"}
    failed = request_failed(code="invalid_request", reason="x", stage="worker", source=("t", 0, 1), now_ms=1,
                            request=hostile)
    assert failed["request_id"] is None and failed["tenant"] is None and failed["callback_url"] is None
    assert fastavro.validate(failed, schema)
    for request in (None, {}, {"request_id": ["a"]}, {"request_id": "a b\n"}, {"tenant": "\ud800"}, "not a dict"):
        failed = request_failed(code="undecodable", reason="x", stage="w", source=("t", 0, 1), now_ms=1,
                                request=request)  # type: ignore[arg-type]  # hostile on purpose
        assert fastavro.validate(failed, schema)


def test_an_allow_listed_callback_url_is_kept_in_the_failed_event():
    request = {"request_id": "r", "tenant": "t", "callback_url": "http://hooks.internal/cb"}
    assert request_failed(code="c", reason="r", stage="s", source=("t", 0, 1), now_ms=1,
                          request=request)["callback_url"] is None
    kept = request_failed(code="c", reason="r", stage="s", source=("t", 0, 1), now_ms=1, request=request,
                          limits=Limits(callback_allowlist=("hooks.internal",)))
    assert kept["callback_url"] == "http://hooks.internal/cb"


def test_reasons_are_cut_and_always_valid_utf8():
    reason = "bad byte \udcff " + "é" * 5000
    failed = request_failed(code="c", reason=reason, stage="s", source=("t", 0, 1), now_ms=1)
    assert len(failed["reason"]) == REASON_MAX_CHARS
    failed["reason"].encode("utf-8")  # raises for a lone surrogate
    headers = dict(dead_letter_headers(code="c", reason=reason, stage="s", source=("t", 0, 1), now_ms=1))
    assert headers["zimage.reason"].decode("utf-8") == failed["reason"]


def test_rendered_and_ready_without_the_new_arguments_take_the_schema_defaults():
    rendered = rendered_event()
    assert {k: rendered[k] for k in ("generation", "cache_key", "attempt", "replay_id", "sku_version", "view")} == {
        "generation": "", "cache_key": None, "attempt": 0, "replay_id": None, "sku_version": None, "view": None}
    ready = image_ready(rendered, now_ms=rendered["rendered_at"] + 1)
    assert {k: ready[k] for k in ("generation", "version", "supersedes", "cached", "safety", "quality",
                                  "replay_id", "sku_version", "view")} == {
        "generation": "", "version": 1, "supersedes": None, "cached": False, "safety": None, "quality": {},
        "replay_id": None, "sku_version": None, "view": None}


def test_rendered_takes_generation_and_cache_key_from_the_gate_admission_unless_given():
    req = build_request({"request_id": "r-9", "prompt": "a vase", "width": 64, "height": 64, "steps": 2})
    req["admission"] = {"source_topic": "zimage.requests.high", "source_partition": 1, "source_offset": 9,
                        "generation": "m-7", "cache_key": "k" * 64, "pool": "turbo", "admitted_at": 1}
    image = {"index": 0, "uri": "u", "sha256": "0" * 64, "seed": 1, "size_bytes": 1}
    common: dict[str, Any] = {
              "request": req, "images": [image],
              "model_id": "tiny", "model_version": "m-7", "timings_ms": {}, "batch_id": "b", "batch_size": 1,
              "worker_id": "w", "source": ("zimage.render.turbo.high", 0, 3), "now_ms": 5}
    admitted = image_rendered(**common)
    assert (admitted["generation"], admitted["cache_key"]) == ("m-7", "k" * 64)
    rerendered = image_rendered(**common, generation="m-7+t2", cache_key="c", attempt=2, replay_id="backfill-1",
                                sku_version=4, view="front")
    assert {k: rerendered[k] for k in ("generation", "cache_key", "attempt", "replay_id", "sku_version", "view")} == {
        "generation": "m-7+t2", "cache_key": "c", "attempt": 2, "replay_id": "backfill-1", "sku_version": 4,
        "view": "front"}
    assert fastavro.validate(rerendered, fastavro.parse_schema(load_schema("ImageRendered")))


def test_ready_copies_lineage_from_rendered_and_carries_the_publication_fields():
    rendered = dict(rendered_event(), generation="m-7", replay_id="backfill-1", sku_version=4, view="side",
                    callback_url="https://hooks.example.com/cb")
    ready = image_ready(rendered, now_ms=rendered["rendered_at"] + 1, version=3, supersedes=2, cached=True,
                        safety={"decision": "PASS", "scanned": False, "top_label": None, "top_score": None},
                        quality={"sharpness": 250, "contrast": 31.5})
    assert {k: ready[k] for k in ("generation", "replay_id", "sku_version", "view", "callback_url", "version",
                                  "supersedes", "cached")} == {
        "generation": "m-7", "replay_id": "backfill-1", "sku_version": 4, "view": "side",
        "callback_url": "https://hooks.example.com/cb", "version": 3, "supersedes": 2, "cached": True}
    assert image_ready(dict(rendered, cached=True), now_ms=rendered["rendered_at"])["cached"] is True
    assert image_ready(dict(rendered, cached=True), now_ms=rendered["rendered_at"], cached=False)["cached"] is False
    assert ready["quality"] == {"sharpness": 250.0, "contrast": 31.5} and ready["safety"]["scanned"] is False
    assert fastavro.validate(ready, fastavro.parse_schema(load_schema("ImageReady")))


def test_ready_built_from_a_v1_rendered_event_has_the_defaults():
    rendered = rendered_event()
    for field in ("generation", "cache_key", "attempt", "replay_id", "sku_version", "view"):
        del rendered[field]
    ready = image_ready(rendered, now_ms=rendered["rendered_at"] + 1)
    assert (ready["generation"], ready["sku_version"], ready["view"], ready["replay_id"]) == ("", None, None, None)
    assert fastavro.validate(ready, fastavro.parse_schema(load_schema("ImageReady")))
