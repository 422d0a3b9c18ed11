"""`zimage replay` on the real stack, with the gate and publication as processes and a worker whose renderer is
simulated (a batch costs a + b*n seconds): an hour of requests re-driven at low priority while high-priority
traffic keeps its latency; a second run publishes nothing; a dry run changes nothing."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid

import pytest
from confluent_kafka import Consumer, TopicPartition

from bench.simulated import MemoryStore, SimulatedRenderer
from connectors.storage import ObjectStore
from schemas.serde import AvroSerde
from streams.submit import build_request
from streams.worker import RenderWorker
from tests.harness import ROOT
from tests.test_worker_delivery import committed_values

pytestmark = [pytest.mark.stack, pytest.mark.slow]

A_S, B_S, MAX_BATCH = 0.2, 0.01, 8
BATCH_S = A_S + B_S * MAX_BATCH
MINUTE_MS = 60_000


@pytest.fixture
def sim(fresh_pipeline, tmp_path):
    """The gate and publication as processes, and a worker with a simulated renderer in this process."""
    p = fresh_pipeline
    p.start("processors", "processors", wait_ready=False)
    settings = p.settings.model_copy(update={"worker_id": "sim", "state_dir": str(tmp_path / "sim"),
                                             "max_batch_size": MAX_BATCH})
    store: ObjectStore = MemoryStore(settings.storage_url)
    worker = RenderWorker(settings, SimulatedRenderer(A_S, B_S), store, AvroSerde())
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    yield p
    worker.stop()
    thread.join(60)


def produce(p, requests, priority, timestamps=None):
    producer = p.producer(**{"linger.ms": 5})
    topic = p.topology.request_topic(priority)
    for i, request in enumerate(requests):
        producer.produce(topic, p.serde.encode("GenerationRequest", request, topic=topic),
                         request["request_id"].encode(), timestamp=timestamps[i] if timestamps else 0)
    producer.flush(30)


def replay(p, *args):
    out = subprocess.run([sys.executable, "-m", "streams.cli", "replay", "--no-progress", *args], cwd=ROOT,
                         env=p.env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def end_offsets(p, topic):
    c = Consumer({"bootstrap.servers": p.env["ZIMAGE_BOOTSTRAP_SERVERS"], "group.id": uuid.uuid4().hex})
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        return [c.get_watermark_offsets(TopicPartition(topic, n), timeout=10)[1] for n in sorted(parts)]
    finally:
        c.close()


def ready_of(p, ids):
    return [v for v in committed_values(p, p.topology.images_ready, "ImageReady") if v["request_id"] in ids]


def test_an_hour_of_requests_is_replayed_at_low_priority_without_delaying_high_traffic(sim):
    p = sim
    now_ms = int(time.time() * 1000)
    stamps = [now_ms - (60 - i) * MINUTE_MS for i in range(60)]  # one a minute over the last hour
    originals = [build_request({"prompt": f"a catalogue lamp {i}", "seed": i, "width": 16, "height": 16,
                                "steps": 1, "tenant": "acme", "sku_id": f"LAMP-{i}", "submitted_at": stamps[i]})
                 for i in range(60)]
    produce(p, originals, "normal", stamps)
    first = p.collect([r["request_id"] for r in originals], timeout_s=180)
    assert all(events[0][0] == "ImageReady" for events in first.values()) and len(first) == 60

    # the middle half hour, re-driven as a backfill (a new generation renders again) ...
    since, until = now_ms - 45 * MINUTE_MS, now_ms - 15 * MINUTE_MS
    replayed = {r["request_id"] for r, ts in zip(originals, stamps, strict=True) if since <= ts < until}
    args = ["--since", str(since), "--until", str(until), "--replay-id", "r-hour", "--generation", "backfill-1"]
    dry = replay(p, *args, "--dry-run")
    assert (dry["matched"], dry["redriven"]) == (len(replayed), 0) and dry["sample"]
    low_before = end_offsets(p, p.topology.request_topic("low"))
    assert sum(low_before) == 0  # the dry run re-drove nothing

    # ... while high-priority requests keep arriving
    highs = [build_request({"prompt": f"an urgent chair {i}", "seed": 1000 + i, "width": 16, "height": 16,
                            "steps": 1, "tenant": "acme", "priority": "HIGH"}) for i in range(20)]

    producer, topic = p.producer(**{"linger.ms": 0}), p.topology.request_topic("high")
    producer.list_topics(timeout=10)  # connected before the clock starts

    def trickle():
        for request in highs:
            request = {**request, "submitted_at": int(time.time() * 1000)}
            producer.produce(topic, p.serde.encode("GenerationRequest", request, topic=topic),
                             request["request_id"].encode())
            producer.poll(0)
            time.sleep(0.1)
        producer.flush(30)

    sender = threading.Thread(target=trickle)
    report = replay(p, *args)  # returns once re-driven; the renders follow
    sender.start()
    sender.join()
    assert report["redriven"] == len(replayed) and report["into"] == p.topology.request_topic("low")

    p.collect(replayed | {r["request_id"] for r in highs}, timeout_s=180, settle_s=1)
    rendered = committed_values(p, p.topology.rendered, "ImageRendered")
    again = [v for v in rendered if v["replay_id"] == "r-hour"]
    assert {v["request_id"] for v in again} == replayed and {v["priority"] for v in again} == {"low"}
    waits = sorted((v["rendered_at"] - v["submitted_at"] - v["timings"]["render"] - v["timings"].get("encode", 0)
                    - v["timings"].get("store", 0)) / 1000 for v in rendered if v["priority"] == "high")
    p99 = waits[min(len(waits) - 1, round(0.99 * len(waits)))]
    print(f"high-priority wait during the replay: p50 {waits[len(waits) // 2] * 1000:.0f} ms, "
          f"p99 {p99 * 1000:.0f} ms (bound {(2 * BATCH_S + 0.1) * 1000:.0f} ms)")
    assert len(waits) == len(highs) and p99 <= 2 * BATCH_S + 0.1

    versions = ready_of(p, replayed)
    assert len(versions) == 2 * len(replayed)  # the first publication and the backfill's new version of each
    by_id: dict[str, list] = {}
    for v in versions:
        by_id.setdefault(v["request_id"], []).append(v)
    for pair in by_id.values():
        old, new = sorted(pair, key=lambda v: v["version"])
        assert new["supersedes"] == old["version"] and new["replay_id"] == "r-hour"
        assert new["sha256"] == old["sha256"]  # same request, same seed: the same bytes

    # the per-SKU view ends at the backfill's versions (the latest generation), and untouched SKUs keep theirs;
    # it is written one hop after images.ready (through its repartition topic)
    def view_now() -> list[tuple[object, bool] | None]:
        latest: dict[str, dict] = {}
        for v in committed_values(p, p.topology.images_by_sku, "ImageReady"):
            latest[v["sku_id"]] = v  # compacted: the last record per key is the view
        return [(w["replay_id"], w["generation"].endswith("+backfill-1")) if (w := latest.get(r["sku_id"])) else None
                for r in originals]

    wanted: list[tuple[object, bool] | None] = [
        ("r-hour", True) if r["request_id"] in replayed else (None, False) for r in originals]
    deadline = time.monotonic() + 30
    while (view := view_now()) != wanted and time.monotonic() < deadline:
        time.sleep(0.5)
    assert view == wanted

    # the same replay again: re-driven, and nothing new is published
    assert replay(p, *args)["redriven"] == len(replayed)
    time.sleep(6)
    assert len(ready_of(p, replayed)) == 2 * len(replayed)
