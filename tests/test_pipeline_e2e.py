"""A request travels the real path: Kafka -> render worker (diffusers, tiny model) -> storage -> publication relay
-> ImageReady."""
from __future__ import annotations

import hashlib
import io
import json
import struct
import time
import uuid
from pathlib import Path

import fastavro
import pytest
from PIL import Image

from connectors.storage import open_object_store
from tests.avro_spec import crc64_avro

pytestmark = pytest.mark.stack

AVSC = Path(__file__).resolve().parent.parent / "schemas" / "avro" / "GenerationRequest.avsc"


def plain_request(**fields) -> dict:
    """A request written the way an outside producer would: every field spelled out from the .avsc."""
    req = {"request_id": f"ext-{uuid.uuid4().hex[:12]}", "tenant": "acme", "sku_id": "SKU-1", "prompt": "a teapot",
           "negative_prompt": None, "model": "z-image-turbo", "width": 64, "height": 64, "steps": 2,
           "guidance": 0.0, "seed": 7, "num_images": 1, "priority": "HIGH", "callback_url": None, "deadline": None,
           "submitted_at": int(time.time() * 1000), "metadata": {"origin": "plain-fastavro"}}
    req.update(fields)
    return req


def single_object(schema_json: dict, record: dict) -> bytes:
    """Avro single-object encoding using only fastavro and the spec (no project code)."""
    parsed = fastavro.parse_schema(schema_json)
    canonical = fastavro.schema.to_parsing_canonical_form(parsed)
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, parsed, record)
    return b"\xc3\x01" + struct.pack("<Q", crc64_avro(canonical.encode())) + buf.getvalue()


def test_plain_fastavro_request_is_rendered_and_published(pipeline):
    schema = json.loads(AVSC.read_text())
    req = plain_request()
    follower = pipeline.follower(from_beginning=True)
    prod = pipeline.producer()
    topic = f"{pipeline.prefix}.requests.high"
    prod.produce(topic, single_object(schema, req), req["request_id"].encode())
    assert prod.flush(10) == 0
    seen = pipeline.collect([req["request_id"]], follower=follower)
    follower.close()
    [(name, ready)] = seen[req["request_id"]]
    assert name == "ImageReady", ready
    assert (ready["width"], ready["height"], ready["seed"]) == (64, 64, 7)
    assert ready["lineage"]["source_topic"] == topic
    assert ready["lineage"]["source_offset"] >= 0 and ready["lineage"]["batch_id"]
    assert ready["metadata"] == {"origin": "plain-fastavro"}
    data = open_object_store(pipeline.env["ZIMAGE_STORAGE_URL"], None).get(ready["image_uri"])
    assert hashlib.sha256(data).hexdigest() == ready["sha256"]
    img = Image.open(io.BytesIO(data))
    assert img.format == "PNG" and img.size == (64, 64)


def test_same_request_and_seed_give_the_same_bytes(pipeline):
    a, b = plain_request(seed=99, prompt="a chair"), plain_request(seed=99, prompt="a chair")
    c = plain_request(seed=100, prompt="a chair")
    schema = json.loads(AVSC.read_text())
    follower = pipeline.follower(from_beginning=True)
    prod = pipeline.producer()
    for r in (a, b, c):
        prod.produce(f"{pipeline.prefix}.requests.normal", single_object(schema, r), r["request_id"].encode())
    prod.flush(10)
    seen = pipeline.collect([a["request_id"], b["request_id"], c["request_id"]], follower=follower)
    follower.close()
    sha = {rid: events[0][1]["sha256"] for rid, events in seen.items()}
    assert sha[a["request_id"]] == sha[b["request_id"]]
    assert sha[a["request_id"]] != sha[c["request_id"]]


def test_bad_input_fails_cleanly_and_good_requests_around_it_render(pipeline):
    schema = json.loads(AVSC.read_text())
    topic = f"{pipeline.prefix}.requests.normal"
    good = [plain_request(priority="NORMAL") for _ in range(3)]
    bad = {
        "width0": plain_request(width=0),
        "steps-1": plain_request(steps=-1),
        "huge-prompt": plain_request(prompt="x" * 1_000_000),
        "unknown-model": plain_request(model="no-such-model"),
    }
    unknown_schema = b"\xc3\x01" + struct.pack("<Q", 0x1234_5678_9ABC_DEF0) + b"\x02\x04ab"
    garbage = b"\xffnot avro at all\x13\x37"
    follower = pipeline.follower(from_beginning=True)
    dlq = _dlq_reader(pipeline)
    prod = pipeline.producer(**{"message.max.bytes": 2_000_000})
    prod.produce(topic, single_object(schema, good[0]), good[0]["request_id"].encode())
    prod.produce(topic, garbage, b"garbage")
    for r in bad.values():
        prod.produce(topic, single_object(schema, r), r["request_id"].encode())
    prod.produce(topic, single_object(schema, good[1]), good[1]["request_id"].encode())
    prod.produce(topic, unknown_schema, b"unknown")
    prod.produce(topic, single_object(schema, good[2]), good[2]["request_id"].encode())
    assert prod.flush(10) == 0

    ids = [r["request_id"] for r in good] + [r["request_id"] for r in bad.values()]
    seen = pipeline.collect(ids, follower=follower)
    for r in good:
        assert [n for n, _ in seen[r["request_id"]]] == ["ImageReady"]
    reasons = {name: seen[r["request_id"]][0][1] for name, r in bad.items()}
    assert all(v["reason_code"] in ("invalid_request", "unknown_model") for v in reasons.values())
    assert "width" in reasons["width0"]["reason"] and "steps" in reasons["steps-1"]["reason"]
    assert "prompt" in reasons["huge-prompt"]["reason"]
    assert reasons["unknown-model"]["reason_code"] == "unknown_model"

    # The undecodable records have no request id: find their RequestFailed by source offset instead,
    # and their original bytes on the dead-letter topic.
    letters = _drain(dlq, expected=6)
    by_value = {v: dict(h) for _k, v, h in letters}
    assert {k for k, _v, _h in letters} >= {b"garbage", b"unknown"}  # dead letters keep the original key
    assert garbage in by_value and by_value[garbage]["zimage.reason_code"] == b"undecodable"
    assert unknown_schema in by_value and by_value[unknown_schema]["zimage.reason_code"] == b"unknown_schema"
    assert b"fingerprint" in by_value[unknown_schema]["zimage.reason"]
    for r in bad.values():
        assert single_object(schema, r) in by_value


def _dlq_reader(pipeline):
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": pipeline.env["ZIMAGE_BOOTSTRAP_SERVERS"], "group.id": "t-dlq",
                  "isolation.level": "read_committed", "enable.auto.commit": False})
    c.assign([TopicPartition(pipeline.topology.dlq, 0, 0)])
    return c


def _drain(consumer, expected: int, timeout_s: float = 60):
    out: list[tuple] = []  # (key, value, headers)
    deadline = time.monotonic() + timeout_s
    while len(out) < expected and time.monotonic() < deadline:
        msg = consumer.poll(0.5)
        if msg is not None and not msg.error():
            out.append((msg.key(), msg.value(), [(k, v) for k, v in (msg.headers() or [])]))
    consumer.close()
    return out
