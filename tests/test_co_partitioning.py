"""Against the real broker: the members of a gate or publication group get partition p of every topic they read
together, since their state of partition p serves all of those topics' partition p."""
from __future__ import annotations

import os
import time
import uuid

import pytest
from confluent_kafka import Consumer

from connectors import kafka
from connectors.kafka_admin import TopicWanted, apply_topics

pytestmark = pytest.mark.stack


def assignments(members: list[Consumer], want: int, timeout_s: float = 60.0) -> list[set[tuple[str, int]]]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for member in members:
            member.poll(0.1)
        held = [{(tp.topic, tp.partition) for tp in member.assignment()} for member in members]
        if sum(map(len, held)) == want and all(held):
            return held
    raise AssertionError(f"the group did not settle: {held}")


def test_each_member_gets_the_same_partition_numbers_of_every_input_topic_as_members_come_and_go():
    base = {"bootstrap.servers": os.environ.get("ZIMAGE_BOOTSTRAP_SERVERS", "127.0.0.1:9092")}
    prefix = f"cp{uuid.uuid4().hex[:8]}"
    topics = [f"{prefix}.requests.{p}" for p in ("high", "normal", "low")]
    apply_topics(base, [TopicWanted(t, 6, {}) for t in topics])
    members: list[Consumer] = []

    def aligned() -> None:
        for held in assignments(members, want=18):
            numbers = [{p for t, p in held if t == topic} for topic in topics]
            assert numbers[0] and numbers[0] == numbers[1] == numbers[2], held

    try:
        for _ in range(4):  # members join one by one: each rebalance moves some partitions
            members.append(kafka.consumer(base, f"{prefix}-gate", **kafka.CO_PARTITIONED))
            members[-1].subscribe(topics)
            aligned()
        for leaving in (1, 0):  # and leave
            members.pop(leaving).close()
            aligned()
    finally:
        for member in members:
            member.close()
