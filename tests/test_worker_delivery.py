"""Delivery through the consumer group: a worker killed mid-batch loses nothing and publishes nothing twice."""
from __future__ import annotations

import json
import time
import uuid
from collections import Counter

import pytest
from confluent_kafka import Consumer, TopicPartition

from streams.submit import Submitter, build_request
from tests.harness import Pipeline

pytestmark = [pytest.mark.stack, pytest.mark.slow]

SMALL = {"width": 32, "height": 32, "steps": 2}


def committed_values(pipeline, topic: str, name: str) -> list[dict]:
    """Every committed record of a topic, decoded (read_committed: aborted transactions are invisible)."""
    c = Consumer({"bootstrap.servers": pipeline.env["ZIMAGE_BOOTSTRAP_SERVERS"], "group.id": uuid.uuid4().hex,
                  "isolation.level": "read_committed", "enable.auto.commit": False})
    meta = c.list_topics(topic, timeout=10).topics[topic]
    ends = {}
    for p in meta.partitions:
        ends[p] = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
    c.assign([TopicPartition(topic, p, 0) for p in meta.partitions])
    out, deadline = [], time.monotonic() + 60
    done = {p for p, end in ends.items() if end == 0}
    while len(done) < len(ends) and time.monotonic() < deadline:
        msg = c.poll(0.5)
        if msg is None or msg.error():
            # control records (transaction markers) are never returned: ask where we are
            for p, end in ends.items():
                pos = c.position([TopicPartition(topic, p)])[0].offset
                if pos >= end:
                    done.add(p)
            continue
        out.append(pipeline.serde.decode(name, msg.value()))
        if msg.offset() + 1 >= ends[msg.partition()]:  # type: ignore[operator]  # a record has its offset
            done.add(msg.partition())
    c.close()
    return out


def test_sigkill_of_one_of_two_workers_mid_batch_loses_and_duplicates_nothing(fresh_pipeline):
    p = fresh_pipeline
    p.start("processors", "processors", wait_ready=False)
    p.start("worker-a", "worker")
    p.start("worker-b", "worker")
    follower = p.follower(from_beginning=True)
    sub = Submitter(p.settings.kafka_config(), p.topology, p.serde)
    requests = [build_request({"prompt": f"item {i}", "priority": ("high", "normal", "low")[i % 3],
                               "seed": i, **SMALL}) for i in range(300)]
    ids = [r["request_id"] for r in requests]

    # Requests flow while the kill happens: the first third now, the rest after worker-a has died.
    sub.submit(requests[:100])
    sub.flush()
    p.wait_published(30, timeout_s=30)
    p.kill("worker-a")  # SIGKILL: no revocation, no final commit, an open transaction left behind
    sub.submit(requests[100:])
    sub.flush()

    events = p.collect(ids, timeout_s=240, settle_s=8, follower=follower)
    follower.close()
    missing = [i for i in ids if i not in events]
    assert not missing, (f"{len(missing)} of {len(ids)} requests never published; "
                         f"worker-b log:\n{p.log('worker-b')[-3000:]}")
    for rid in ids:
        kinds = [n for n, _ in events[rid]]
        assert kinds == ["ImageReady"], f"{rid}: {kinds}"

    # The guarantee holds one stage earlier too: one committed ImageRendered per request, whoever rendered it.
    rendered = Counter(v["request_id"] for v in committed_values(p, p.topology.rendered, "ImageRendered"))
    assert set(rendered) == set(ids)
    assert max(rendered.values()) == 1, [r for r, n in rendered.items() if n > 1][:5]
    workers = {v["lineage"]["worker_id"] for evs in events.values() for _, v in evs}
    assert workers == {"worker-a", "worker-b"}


def test_sigkill_of_the_processors_mid_flow_publishes_each_request_once(fresh_pipeline):
    p = fresh_pipeline
    p.start("processors", "processors", wait_ready=False)
    p.start("worker", "worker")
    sub = Submitter(p.settings.kafka_config(), p.topology, p.serde)
    requests = [build_request({"prompt": f"chair {i}", "seed": i, **SMALL}) for i in range(150)]
    sub.submit(requests)
    sub.flush()
    p.wait_published(20)
    p.kill("processors")  # mid-transaction: its sends and table updates of the open transaction are aborted
    p.start("processors-2", "processors", wait_ready=False)
    ids = [r["request_id"] for r in requests]
    events = p.collect(ids, timeout_s=240, settle_s=8)
    missing = [i for i in ids if i not in events]
    assert not missing, f"{len(missing)} never published:\n{p.log('processors-2')[-3000:]}"
    doubled = {i: len(e) for i, e in events.items() if len(e) != 1}
    assert not doubled, f"published more than once: {doubled}"


@pytest.mark.parametrize("victim", ["gate", "publication"])
def test_sigkill_of_the_gate_or_of_publication_mid_stream_publishes_each_request_once(fresh_pipeline, victim):
    p = fresh_pipeline
    for name in ("gate", "publication"):
        p.start(name, f"processors --only {name}", wait_ready=False)
    p.start("worker", "worker")
    sub = Submitter(p.settings.kafka_config(), p.topology, p.serde)
    requests = [build_request({"prompt": f"lamp {i}", "seed": i, **SMALL}) for i in range(300)]
    sub.submit(requests[:150])
    sub.flush()
    p.wait_published(20)
    p.kill(victim)  # SIGKILL mid-stream: an open transaction, uncommitted offsets, state in memory
    sub.submit(requests[150:])
    sub.flush()
    p.start(f"{victim}-2", f"processors --only {victim}", wait_ready=False, ZIMAGE_WORKER_ID=victim)
    ids = [r["request_id"] for r in requests]
    p.collect(ids, timeout_s=300)
    # Counted over the whole topic, read committed: not a settle window.
    published = Counter(v["request_id"] for v in committed_values(p, p.topology.images_ready, "ImageReady"))
    assert set(published) == set(ids), f"{len(set(ids) - set(published))} never published"
    assert max(published.values()) == 1, [r for r, n in published.items() if n > 1][:5]


def batch_in_render(p, name: str, timeout_s: float = 120, holding: list | None = None) -> list:
    """Waits until the worker `name` holds a batch in render (its crash journal names it), one with a record of
    `holding` when given, and returns it."""
    path = p.tmp / "state" / f"{p.settings.topic_prefix}-render-{p.settings.pool}-{name}.render"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        p.check_alive()
        try:
            held = json.loads(path.read_bytes().rstrip(b"\0 ") or b"[]")
        except (FileNotFoundError, ValueError):
            held = []
        if held and (holding is None or any(record in holding for record in held)):
            return held
        time.sleep(0.005)
    raise AssertionError(f"{name} never rendered: {p.log(name)[-3000:]}")


def test_a_worker_killed_twice_from_outside_mid_render_fails_no_healthy_request(tmp_path):
    """A deploy that kills the worker after its grace period, twice, while the same records render: they are
    rendered again (alone, as suspects) and published, never dead-lettered as poison."""
    p = Pipeline(tmp_path, ZIMAGE_STATE_DIR=str(tmp_path / "state"), ZIMAGE_MAX_BATCH_SIZE="4",
                 ZIMAGE_MAX_WAIT_MS="200")
    try:
        p.start("processors", "processors", wait_ready=False)
        p.start("w", "worker")
        sub = Submitter(p.settings.kafka_config(), p.topology, p.serde)
        # large enough for the tiny model to take a while: the kills land while a batch renders
        requests = [build_request({"prompt": f"lamp {i}", "seed": i, "width": 256, "height": 256, "steps": 8})
                    for i in range(4)]
        ids = [r["request_id"] for r in requests]
        sub.submit(requests)
        sub.flush()
        first = batch_in_render(p, "w")
        p.kill("w")  # SIGKILL with the batch in hand: no fault of its records
        p.start("w", "worker")
        second = batch_in_render(p, "w", holding=first)  # one of those records again: a suspect, so alone
        p.kill("w")
        p.start("w", "worker")
        events = p.collect(ids, timeout_s=240)
        assert len(second) == 1 and second[0] in first  # the second kill hit one of the first batch, alone
        kinds = {rid: [n for n, _ in events.get(rid, [])] for rid in ids}
        assert all(k == ["ImageReady"] for k in kinds.values()), (kinds, p.log("w")[-3000:])
    finally:
        p.stop_all()
