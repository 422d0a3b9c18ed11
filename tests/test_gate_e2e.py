"""The gate on the real stack: moderation before the GPU, idempotency, the L1 cache, and replays that publish
nothing new."""
from __future__ import annotations

import time
import uuid

import pytest
from confluent_kafka import Producer

from processors.partitioning import home_partition
from streams.submit import Submitter, build_request
from tests.test_worker_delivery import committed_values

pytestmark = pytest.mark.stack

SMALL = {"width": 32, "height": 32, "steps": 2, "tenant": "acme"}


def submit(pipeline, requests):
    sub = Submitter(pipeline.settings.kafka_config(), pipeline.topology, pipeline.serde)
    sub.submit(requests)
    sub.flush()


def test_a_blocked_prompt_is_never_rendered(pipeline):
    blocked = build_request({"prompt": "a porn scene", **SMALL})
    fine = build_request({"prompt": "a porcelain vase", **SMALL})
    submit(pipeline, [blocked, fine])
    seen = pipeline.collect([blocked["request_id"], fine["request_id"]])
    [(kind, failed)] = seen[blocked["request_id"]]
    assert (kind, failed["reason_code"]) == ("RequestFailed", "blocked") and "sexual" in failed["reason"]
    assert seen[fine["request_id"]][0][0] == "ImageReady"
    rendered = {v["request_id"] for v in committed_values(pipeline, pipeline.topology.rendered, "ImageRendered")}
    routed = {v["request_id"] for p in ("high", "normal", "low")
              for v in committed_values(pipeline, pipeline.topology.render_topic("turbo", p), "GenerationRequest")}
    assert fine["request_id"] in rendered and blocked["request_id"] not in rendered | routed


def test_a_repeat_is_answered_from_the_cache_without_a_render(pipeline):
    first = build_request({"prompt": f"a cached lamp {uuid.uuid4().hex[:6]}", "seed": 11, **SMALL})
    submit(pipeline, [first])
    [(kind, original)] = pipeline.collect([first["request_id"]])[first["request_id"]]
    assert kind == "ImageReady" and not original["cached"]
    time.sleep(0.5)  # the cache is filled once the first publication commits
    again = {**first, "request_id": f"again-{uuid.uuid4().hex[:8]}", "submitted_at": int(time.time() * 1000)}
    submit(pipeline, [again])
    [(kind, cached)] = pipeline.collect([again["request_id"]])[again["request_id"]]
    assert kind == "ImageReady" and cached["cached"]
    assert cached["sha256"] == original["sha256"] and cached["lineage"]["worker_id"] == "gate"
    assert cached["timings"]["render"] == 0.0
    print(f"cache hit published {cached['timings']['total']:.0f} ms after submission")
    other_tenant = {**again, "request_id": f"other-{uuid.uuid4().hex[:8]}", "tenant": "globex"}
    submit(pipeline, [other_tenant])
    [(kind, rendered)] = pipeline.collect([other_tenant["request_id"]])[other_tenant["request_id"]]
    assert kind == "ImageReady" and not rendered["cached"]  # no hit ever crosses tenants


def test_the_same_request_id_submitted_twice_renders_and_publishes_once(pipeline):
    request = build_request({"prompt": f"a twice-sent chair {uuid.uuid4().hex[:6]}", **SMALL})
    submit(pipeline, [request])
    submit(pipeline, [{**request, "submitted_at": int(time.time() * 1000)}])
    seen = pipeline.collect([request["request_id"]], settle_s=4)
    assert [kind for kind, _ in seen[request["request_id"]]] == ["ImageReady"]
    routed = [v for p in ("high", "normal", "low")
              for v in committed_values(pipeline, pipeline.topology.render_topic("turbo", p), "GenerationRequest")
              if v["request_id"] == request["request_id"]]
    assert len(routed) == 1


def test_copies_produced_without_a_key_to_any_partitions_render_and_publish_once(pipeline):
    """A producer that knows only the schema and the topic names: no key, any partition. The gate forwards each
    copy to the home of its request id, where the second is seen as a repeat; lineage names where it was
    produced. A request that the project's own producer keys lands at its home directly."""
    request = build_request({"prompt": f"an unkeyed bench {uuid.uuid4().hex[:6]}", **SMALL})
    partitions = pipeline.settings.request_partitions
    home = home_partition(request["request_id"], partitions)
    elsewhere = [p for p in range(partitions) if p != home]
    producer = Producer({"bootstrap.servers": pipeline.env["ZIMAGE_BOOTSTRAP_SERVERS"]})
    topic = pipeline.topology.request_topic("normal")
    value = pipeline.serde.encode("GenerationRequest", request)
    placed = []
    for partition in (elsewhere[0], elsewhere[-1]):
        producer.produce(topic, value, partition=partition,
                         on_delivery=lambda err, msg: placed.append((msg.partition(), msg.offset())))
        assert producer.flush(10) == 0
    seen = pipeline.collect([request["request_id"]], settle_s=4)
    [(kind, ready)] = seen[request["request_id"]]
    assert kind == "ImageReady"
    assert (ready["lineage"]["source_partition"], ready["lineage"]["source_offset"]) in placed
    routed = [v for v in committed_values(pipeline, pipeline.topology.render_topic("turbo", "normal"),
                                          "GenerationRequest") if v["request_id"] == request["request_id"]]
    assert len(routed) == 1

    keyed = build_request({"prompt": f"a keyed bench {uuid.uuid4().hex[:6]}", **SMALL})
    submit(pipeline, [keyed])
    [(kind, ready)] = pipeline.collect([keyed["request_id"]])[keyed["request_id"]]
    assert ready["lineage"]["source_partition"] == home_partition(keyed["request_id"], partitions)


def test_a_replay_of_the_rendered_topic_publishes_nothing_new(pipeline):
    request = build_request({"prompt": f"a replayed stool {uuid.uuid4().hex[:6]}", **SMALL})
    submit(pipeline, [request])
    pipeline.collect([request["request_id"]])
    topology = pipeline.topology
    before = committed_values(pipeline, topology.images_ready, "ImageReady")
    history = committed_values(pipeline, topology.rendered, "ImageRendered")
    producer = Producer({"bootstrap.servers": pipeline.env["ZIMAGE_BOOTSTRAP_SERVERS"]})
    for value in history:  # every ImageRendered since offset 0, once more
        producer.produce(topology.rendered, pipeline.serde.encode("ImageRendered", value),
                         value["request_id"].encode())
    assert producer.flush(10) == 0
    time.sleep(6)
    after = committed_values(pipeline, topology.images_ready, "ImageReady")
    assert len(after) == len(before), "a replay published again"
    pipeline.check_alive()


def test_zimage_status_answers_from_the_view_of_the_status_topic(pipeline):
    import json
    import subprocess
    import sys

    from tests.harness import ROOT

    request = build_request({"prompt": f"a status lamp {uuid.uuid4().hex[:6]}", **SMALL})
    submit(pipeline, [request])
    pipeline.collect([request["request_id"]])
    env = {**pipeline.env}
    deadline = time.monotonic() + 30
    while True:
        out = subprocess.run([sys.executable, "-m", "streams.cli", "status", request["request_id"], "--tenant",
                              "acme", "--json"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        if out.returncode == 0 and json.loads(out.stdout)["status"] == "published":
            break
        assert time.monotonic() < deadline, out.stdout + out.stderr
        time.sleep(0.5)
    status = json.loads(out.stdout)
    assert status["final"] and status["stage"] == "publication"
    missing = subprocess.run([sys.executable, "-m", "streams.cli", "status", "no-such-request"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "no status" in missing.stderr


def test_two_identical_concurrent_requests_render_once_and_both_are_published(pipeline):
    prompt = f"a twin teapot {uuid.uuid4().hex[:6]}"
    first, second = (build_request({"prompt": prompt, "seed": 21, **SMALL}) for _ in range(2))
    submit(pipeline, [first, second])  # one flush: both are queued before either is rendered
    seen = pipeline.collect([first["request_id"], second["request_id"]], settle_s=2)
    ready = [seen[r["request_id"]] for r in (first, second)]
    assert [[kind for kind, _ in events] for events in ready] == [["ImageReady"], ["ImageReady"]]
    assert ready[0][0][1]["sha256"] == ready[1][0][1]["sha256"]
    rendered = [v for v in committed_values(pipeline, pipeline.topology.rendered, "ImageRendered")
                if v["request_id"] in (first["request_id"], second["request_id"])]
    assert len(rendered) == 2
    assert sorted(v["batch_size"] > 0 for v in rendered) == [False, True]  # one render; the copy spent no GPU
    copy = next(v for v in rendered if v["batch_size"] == 0)
    assert copy["timings"]["render"] == 0.0 and copy["worker_id"] != "gate"  # not a cache hit: a shared render


def test_every_stage_writes_its_status_in_order(pipeline):
    request = build_request({"prompt": f"a staged lamp {uuid.uuid4().hex[:6]}", **SMALL})
    submit(pipeline, [request])
    [(kind, _)] = pipeline.collect([request["request_id"]])[request["request_id"]]
    assert kind == "ImageReady"
    statuses = [v for v in committed_values(pipeline, pipeline.topology.status, "RequestStatus")
                if v["request_id"] == request["request_id"]]
    in_order = [s["status"] for s in sorted(statuses, key=lambda s: s["at"])]
    assert in_order == ["admitted", "rendering", "rendered", "published"]
    assert [s["final"] for s in sorted(statuses, key=lambda s: s["at"])] == [False, False, False, True]


def test_a_request_cancelled_while_queued_fails_as_cancelled_and_is_never_rendered(pipeline):
    from connectors.redis_store import RedisStore
    from streams.cancellation import Cancellations

    request = build_request({"prompt": f"a cancelled stool {uuid.uuid4().hex[:6]}", **SMALL})
    cancellations = Cancellations(RedisStore(pipeline.settings.redis_url), pipeline.settings.topic_prefix)
    assert cancellations.cancel(request["tenant"], request["request_id"]) == "cancelled"
    submit(pipeline, [request])
    [(kind, failed)] = pipeline.collect([request["request_id"]], settle_s=2)[request["request_id"]]
    assert (kind, failed["reason_code"]) == ("RequestFailed", "cancelled")
    routed = [v for p in ("high", "normal", "low")
              for v in committed_values(pipeline, pipeline.topology.render_topic("turbo", p), "GenerationRequest")
              if v["request_id"] == request["request_id"]]
    dead = [v for v in committed_values(pipeline, pipeline.topology.failed, "RequestFailed")
            if v["request_id"] == request["request_id"]]
    assert routed == [] and len(dead) == 1
    assert cancellations.cancel(request["tenant"], request["request_id"]) == "cancelled"  # asking again: same
