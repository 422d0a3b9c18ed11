"""A table kept in a compacted changelog, restored from the real broker: tombstones, unreadable entries, merges."""
from __future__ import annotations

import json
import os
import time
import uuid

import pytest
from confluent_kafka import Producer

from connectors.kafka_admin import TopicWanted, apply_topics
from streams.gate_state import DAY_MS, AdmittedKeys
from streams.sku_state import LatestVersions

pytestmark = pytest.mark.stack


@pytest.fixture
def changelog() -> tuple[dict[str, str], str]:
    base = {"bootstrap.servers": os.environ.get("ZIMAGE_BOOTSTRAP_SERVERS", "127.0.0.1:9092")}
    topic = f"ct{uuid.uuid4().hex[:8]}.changelog"
    apply_topics(base, [TopicWanted(topic, 2, {"cleanup.policy": "compact"})])
    return base, topic


def write(base, topic, entries):
    producer = Producer(base)
    for key, value, partition in entries:
        producer.produce(topic, value, key.encode(), partition=partition)
    producer.flush(10)


def test_the_latest_versions_come_back_as_the_highest_per_key_with_tombstones_and_garbage_handled(changelog):
    base, topic = changelog
    v = lambda n: json.dumps({"version": n}).encode()  # noqa: E731
    write(base, topic, [("a", v(3), 1), ("a", v(2), 1), ("b", v(5), 1), ("b", None, 1), ("c", b"{not json", 1),
                        ("c", v(1), 1), ("d", v(9), 0)])
    table = LatestVersions(base, topic)
    assert {k: table.latest(1, k) for k in "abcd"} == {"a": 3, "b": None, "c": 1, "d": None}  # d: partition 0
    record = table.advance(1, "a", 4)
    assert (record.topic, record.partition, record.key) == (topic, 1, b"a") and table.latest(1, "a") == 4
    table.forget([1])
    assert table.latest(1, "a") == 3  # forgotten, then read again: what committed, not what was put


def test_admitted_keys_past_the_window_are_not_restored(changelog):
    base, topic = changelog
    now = int(time.time() * 1000)
    at = lambda ms: json.dumps({"at": ms}).encode()  # noqa: E731
    write(base, topic, [("fresh", at(now - DAY_MS), 0), ("stale", at(now - 3 * DAY_MS), 0)])
    keys = AdmittedKeys(base, topic, window_days=2)
    assert keys.seen(0, "fresh", now) and not keys.seen(0, "stale", now)
    assert keys.get(0, "stale") is None  # not even held in memory
