"""SKU events to published images on the real stack: `zimage sku-connector` in front of the gate, a worker and
publication, with a duplicate, an older version and an unknown category among the events."""
from __future__ import annotations

import time
import uuid

import pytest
from confluent_kafka import Consumer, TopicPartition

from processors.sku_requests import request_id_for
from tests.test_worker_delivery import committed_values

pytestmark = pytest.mark.stack

TEMPLATES = """
[defaults]
width = 32
height = 32
steps = 2

[templates.chair]
version = "5"
prompt = "{title}, a {color} chair, {view}"
views = { front = "front view", side = "side view", detail = "close-up" }

[catalogues."*"]
categories = { chairs = "chair" }
"""


def sku(sku_id: str, version: int, category: str = "chairs") -> dict:
    return {"sku_id": sku_id, "tenant": "acme", "version": version, "title": "Oslo armchair",
            "attributes": {"color": "red"}, "template": None, "priority": None, "changed_at": int(time.time() * 1000),
            "change_kind": "new_listing", "category": category}


def committed_offsets(pipeline, group: str) -> dict[int, int]:
    c = Consumer({"bootstrap.servers": pipeline.env["ZIMAGE_BOOTSTRAP_SERVERS"], "group.id": group,
                  "enable.auto.commit": False})
    try:
        topic = pipeline.topology.sku_changes
        parts = c.committed([TopicPartition(topic, p) for p in range(pipeline.settings.request_partitions)],
                            timeout=10)
        return {tp.partition: tp.offset for tp in parts}
    finally:
        c.close()


def test_sku_events_become_one_published_image_per_view(fresh_pipeline, tmp_path):
    p = fresh_pipeline
    templates = tmp_path / "sku-templates.toml"
    templates.write_text(TEMPLATES)
    p.start("worker-1", "worker")
    p.start("processors", "processors", wait_ready=False)
    p.start("sku", "sku-connector --no-restart", wait_ready=False, ZIMAGE_SKU_TEMPLATES=str(templates))

    chair, sofa = f"CH-{uuid.uuid4().hex[:6]}", f"SO-{uuid.uuid4().hex[:6]}"
    delivered: list = []
    producer = p.producer()
    for event in (sku(chair, 2), sku(chair, 2), sku(chair, 1), sku(sofa, 1, category="sofas")):
        producer.produce(p.topology.sku_changes, p.serde.encode("SkuChanged", event), event["sku_id"].encode(),
                         on_delivery=lambda err, msg: delivered.append(msg))
    assert producer.flush(10) == 0 and len(delivered) == 4
    first = min((m for m in delivered if m.key() == chair.encode()), key=lambda m: m.offset())  # reports come per batch

    ids = {request_id_for("acme", chair, 2, view): view for view in ("front", "side", "detail")}
    seen = p.collect(ids, timeout_s=240, settle_s=3)
    assert sorted(seen) == sorted(ids), p.log("sku")[-3000:]
    for rid, events in seen.items():
        [(kind, image)] = events  # once, though the event came twice
        assert kind == "ImageReady" and image["view"] == ids[rid] and image["sku_version"] == 2
        assert image["sku_id"] == chair and image["generation"].endswith("+template.5")
        lineage = image["lineage"]
        assert lineage["source_topic"] == p.topology.request_topic("high")  # a new listing
        [request] = [r for r in committed_values(p, lineage["source_topic"], "GenerationRequest")
                     if r["request_id"] == rid]
        assert request["sku_event"] == {"topic": first.topic(), "partition": first.partition(),
                                        "offset": first.offset()}
        assert (request["template_version"], request["view"]) == ("5", ids[rid])

    watch = p.follower()
    try:
        failed = [v for name, v, _ in watch.events(idle_timeout_s=5)
                  if name == "RequestFailed" and sofa in (v or {}).get("reason", "")]
    finally:
        watch.close()
    assert [(f["reason_code"], f["stage"], f["tenant"]) for f in failed] == [
        ("invalid_request", "sku-connector", "acme")]
    assert "unknown category 'sofas'" in failed[0]["reason"]

    # every event decided: the duplicate and the older version produced no request at all
    wait_decided(p, delivered, "sku")
    assert sorted(produced_ids(p)) == sorted(ids)

    # a new connector process rebuilds the latest versions from its changelog: the duplicate is still one
    p.kill("sku")
    p.start("sku-2", "sku-connector --no-restart", wait_ready=False, ZIMAGE_SKU_TEMPLATES=str(templates))
    again: list = []
    producer.produce(p.topology.sku_changes, p.serde.encode("SkuChanged", sku(chair, 2)), chair.encode(),
                     on_delivery=lambda err, msg: again.append(msg))
    assert producer.flush(10) == 0
    wait_decided(p, again, "sku-2")
    assert sorted(produced_ids(p)) == sorted(ids)
    p.check_alive()


def wait_decided(p, delivered: list, log: str) -> None:
    """Until the connector has committed past every one of these records."""
    group, ends = f"{p.prefix}-sku-connector", {msg.partition(): msg.offset() + 1 for msg in delivered}
    deadline = time.monotonic() + 60
    while any(committed_offsets(p, group).get(part, -1) < end for part, end in ends.items()):
        assert time.monotonic() < deadline, p.log(log)[-3000:]
        time.sleep(0.5)


def produced_ids(p) -> list[str]:
    return [r["request_id"] for topic in p.topology.request_topics
            for r in committed_values(p, topic, "GenerationRequest")]
