"""A rebalance while the gate holds its partitions, as after a restart (the pools not read yet): librdkafka keeps
a partition's pause across a revoke and a re-assign, so every partition revoked while held must be resumed, or
its requests are never routed. On the real stack, with a second gate member joining and leaving the group."""
from __future__ import annotations

import signal
import time

import pytest

from streams.submit import Submitter, build_request

pytestmark = [pytest.mark.stack, pytest.mark.slow]

SMALL = {"width": 32, "height": 32, "steps": 2, "tenant": "acme"}
HELD = "has not announced its model yet"


def wait_for_log(pipeline, name: str, text: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in pipeline.log(name):
        pipeline.check_alive()
        assert time.monotonic() < deadline, f"{name} never logged {text!r}:\n{pipeline.log(name)[-3000:]}"
        time.sleep(0.2)


def test_partitions_held_through_a_rebalance_are_read_again_once_the_pool_announces(fresh_pipeline):
    p = fresh_pipeline
    requests = [build_request({"prompt": f"a stool {i}", "priority": ("high", "normal", "low")[i % 3], "seed": i,
                               **SMALL}) for i in range(30)]
    sub = Submitter(p.settings.kafka_config(), p.topology, p.serde)
    sub.submit(requests)
    sub.flush()
    p.start("gate1", "processors --only gate --no-restart", wait_ready=False)
    wait_for_log(p, "gate1", HELD)  # no worker yet: the first gate holds what it reads
    p.start("gate2", "processors --only gate --no-restart", wait_ready=False)
    wait_for_log(p, "gate2", HELD)  # the group rebalanced: the second member holds its share too
    p.kill("gate2", signal.SIGTERM)  # it leaves: the first gate is assigned every partition again
    p.start("publication", "processors --only publication --no-restart", wait_ready=False)
    p.start("worker", "worker")  # the pool announces: what the gate held is routed now
    ids = [r["request_id"] for r in requests]
    events = p.collect(ids, timeout_s=120)
    missing = [i for i in ids if i not in events]
    assert not missing, f"{len(missing)} never routed; gate log:\n{p.log('gate1')[-3000:]}"
    assert all(len(e) == 1 and e[0][0] == "ImageReady" for e in events.values())
