"""A broker restart in the middle of the flow: the worker and the processors ride it out, nothing lost or doubled."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from streams.submit import Submitter
from tests.harness import ROOT, assert_each_published_once, mixed_requests

pytestmark = [pytest.mark.stack, pytest.mark.slow]

PID_FILE = Path(os.environ.get("ZIMAGE_STACK_DIR", ROOT / ".stack")) / "pids" / "kafka.pid"


def restart_broker() -> None:
    pid = int(PID_FILE.read_text().split()[0])
    os.kill(pid, signal.SIGTERM)  # a clean broker shutdown, as in a rolling restart
    deadline = time.monotonic() + 60
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    up = subprocess.run([str(ROOT / "ops" / "stack"), "up"], capture_output=True, text=True, timeout=180)
    assert up.returncode == 0, up.stdout + up.stderr


def wait_for_leaders(prefix: str, timeout_s: float = 240) -> None:
    """The broker answers before it has loaded every partition (a broker with many partitions takes a while):
    wait until each of this test's partitions has a leader again, as a rolling restart waits before the next."""
    admin = AdminClient({"bootstrap.servers": os.environ.get("ZIMAGE_BOOTSTRAP_SERVERS", "127.0.0.1:9092")})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            topics = [t for name, t in admin.list_topics(timeout=10).topics.items() if name.startswith(prefix)]
        except KafkaException:
            topics = []
        if topics and all(t.error is None and all(p.leader >= 0 and p.error is None for p in t.partitions.values())
                          for t in topics):
            return
        time.sleep(1)
    raise AssertionError(f"the partitions of {prefix} have no leader {timeout_s:.0f}s after the restart")


@pytest.mark.skipif(not PID_FILE.exists(), reason="the broker was not started by ops/stack")
def test_requests_survive_a_broker_restart(fresh_pipeline):
    p = fresh_pipeline
    p.start("processors", "processors", wait_ready=False)
    p.start("worker", "worker")
    sub = Submitter(p.settings.kafka_config(), p.topology, p.serde)
    first, second = mixed_requests("lamp", 0, 60), mixed_requests("lamp", 60, 60)
    sub.submit(first)
    sub.flush()
    p.wait_published(10)
    restart_broker()
    wait_for_leaders(p.prefix)
    sub = Submitter(p.settings.kafka_config(), p.topology, p.serde)
    sub.submit(second)
    sub.flush(60)
    ids = [r["request_id"] for r in first + second]
    events = p.collect(ids, timeout_s=150, settle_s=5)
    if any(i not in events for i in ids):
        # A one-broker restart can leave a hanging transaction (Kafka skips markers for partitions whose leader it
        # does not know yet as it starts): readers stop at it until an operator aborts it. `ops/stack heal` is
        # that operator step (docs/operations.md); a cluster of three brokers does not need it.
        healed = subprocess.run([str(ROOT / "ops" / "stack"), "heal"], capture_output=True, text=True, timeout=300)
        print(healed.stdout, healed.stderr)
        events = p.collect(ids, timeout_s=150, settle_s=5)
    assert_each_published_once(p, ids, events)
