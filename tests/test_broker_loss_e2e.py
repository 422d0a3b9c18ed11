"""A broker of three killed mid-flow (SIGKILL): the pipeline goes on, and nothing is lost or published twice.

Runs its own three-node cluster (`ZIMAGE_KAFKA_BROKERS=3 ops/stack up`, in a scratch state directory on ports of its
own, with the jars of the running stack), so that topics get three replicas and min.insync.replicas 2.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from streams.submit import Submitter
from tests.harness import ROOT, Pipeline, assert_each_published_once, mixed_requests

pytestmark = [pytest.mark.stack, pytest.mark.slow]

STACK = ROOT / "ops" / "stack"
JARS = Path(os.environ.get("ZIMAGE_STACK_DIR") or ROOT / ".stack") / "kafka" / "libs"


def free_ports(count: int, start: int = 19300) -> int:
    """The first of `count` consecutive loopback ports that nothing listens on."""
    for base in range(start, 30000, 10):
        if all(socket.socket().connect_ex(("127.0.0.1", base + i)) != 0 for i in range(count)):
            return base
    raise AssertionError("no free ports for a three-node cluster")


@pytest.fixture
def three_brokers(tmp_path: Path) -> Iterator[dict[str, str]]:
    state = tmp_path / "stack"
    (state / "kafka").mkdir(parents=True)
    (state / "kafka" / "libs").symlink_to(JARS)  # the running stack's jars: nothing is fetched
    base = free_ports(8)
    env = {**os.environ, "ZIMAGE_STACK_DIR": str(state), "ZIMAGE_KAFKA_BROKERS": "3",
           "ZIMAGE_KAFKA_PORT": str(base), "ZIMAGE_KAFKA_CONTROLLER_PORT": str(base + 1),
           "ZIMAGE_REDIS_PORT": str(base + 6), "ZIMAGE_S3_PORT": str(base + 7)}
    up = subprocess.run([str(STACK), "up"], env=env, capture_output=True, text=True, timeout=300)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield {**env, "bootstrap": ",".join(f"127.0.0.1:{base + 2 * i}" for i in range(3))}
    finally:
        subprocess.run([str(STACK), "down", "--purge"], env=env, capture_output=True, timeout=180)


def leader_of(bootstrap: str, topic: str, partition: int) -> int:
    meta = AdminClient({"bootstrap.servers": bootstrap}).list_topics(topic, timeout=10)
    assert all(len(p.replicas) == 3 for p in meta.topics[topic].partitions.values())  # what losing one relies on
    return meta.topics[topic].partitions[partition].leader


def committed_keys(bootstrap: str, topic: str) -> list[bytes]:
    """The key of every committed record of `topic`, read whole from offset 0."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"count-{uuid.uuid4().hex[:8]}",
                         "isolation.level": "read_committed", "enable.auto.commit": False})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in partitions}
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        keys: list[bytes] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for msg in consumer.consume(500, timeout=0.5):
                if msg.error() is None:
                    keys.append(msg.key() or b"")
            positions = consumer.position([TopicPartition(topic, p) for p in partitions])
            if all(tp.offset >= ends[tp.partition] or ends[tp.partition] == 0 for tp in positions):
                break
        return keys
    finally:
        consumer.close()


@pytest.mark.skipif(not JARS.is_dir(), reason="Kafka's jars are fetched by `ops/stack up` of the main stack")
def test_a_broker_killed_mid_flow_loses_nothing_and_publishes_nothing_twice(three_brokers, tmp_path, monkeypatch):
    bootstrap = three_brokers["bootstrap"]
    monkeypatch.setenv("ZIMAGE_BOOTSTRAP_SERVERS", bootstrap)
    (tmp_path / "pipeline").mkdir()
    p = Pipeline(tmp_path / "pipeline")
    try:
        p.start("processors", "processors", wait_ready=False)
        p.start("worker", "worker")
        sub = Submitter(p.settings.kafka_config(), p.topology, p.serde)
        first, second = mixed_requests("stool", 0, 60), mixed_requests("stool", 60, 60)
        sub.submit(first)
        sub.flush(60)
        p.wait_published(10, timeout_s=120)

        victim = leader_of(bootstrap, p.topology.images_ready, 0)  # it leads output that is being written
        pid = int((Path(three_brokers["ZIMAGE_STACK_DIR"]) / "pids" / f"kafka{victim}.pid").read_text().split()[0])
        os.kill(pid, signal.SIGKILL)
        sub.submit(second)
        sub.flush(120)

        ids = [r["request_id"] for r in first + second]
        assert_each_published_once(p, ids, p.collect(ids, timeout_s=300, settle_s=5))
        keys = committed_keys(bootstrap, p.topology.images_ready)  # the whole topic, not a settle window
        assert sorted(keys) == sorted(i.encode() for i in ids)
        p.check_alive()
    finally:
        p.stop_all()
