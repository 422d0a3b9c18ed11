"""Forwards to a home partition: what they carry, and what they refuse to write."""
from __future__ import annotations

import pytest
from confluent_kafka import Consumer

from processors.partitioning import FORWARDED_FROM_HEADER
from processors.requests import InvalidRequest
from streams.failures import Origin
from streams.homes import Homes, PartitionCountMismatch, forward, lineage
from tests.fake_kafka import FakeKafka


def test_a_forward_keeps_the_record_and_names_where_it_was_produced_once():
    origin = Origin("p.requests.low", 0, 41, b"value", None, [("trace", b"t")], 1_700_000_000_000)
    record = forward(origin, "r-1", 2, 1_048_588)
    assert (record.topic, record.partition, record.key, record.value, record.timestamp) == (
        "p.requests.low", 2, b"r-1", b"value", 1_700_000_000_000)
    assert record.headers == [("trace", b"t"), (FORWARDED_FROM_HEADER, b"p.requests.low/0/41")]
    again = Origin("p.requests.low", 2, 7, b"value", b"r-1", record.headers)
    assert forward(again, "r-1", 1, 1_048_588).headers == record.headers  # a second forward keeps the first place
    assert lineage(again) == ("p.requests.low", 0, 41)


def test_a_forward_that_would_not_fit_its_topic_is_refused_as_the_records_fault():
    origin = Origin("p.requests.low", 0, 41, b"v" * 5000, None, [])
    with pytest.raises(InvalidRequest, match="too large to forward"):
        forward(origin, "r-1", 2, 5000)


def test_inputs_and_state_topic_must_be_co_partitioned():
    kafka = FakeKafka()
    consumer: Consumer = kafka.consumer().mock
    homes = Homes("p.gate.changelog")
    assert homes.of(consumer, "p.requests.low", "21") == (-973932308 & 0x7FFFFFFF) % 3
    kafka.partition_counts["p.requests.high"] = 6
    with pytest.raises(PartitionCountMismatch, match=r"p\.requests\.high has 6 partitions and p\.gate\.changelog 3"):
        homes.of(consumer, "p.requests.high", "21")
