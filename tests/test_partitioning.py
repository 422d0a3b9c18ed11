"""Home partitions: Kafka's murmur2 as the Java clients compute it, and the header a forwarded request carries."""
from __future__ import annotations

import random

import pytest
from aiokafka.partitioner import murmur2 as aiokafka_murmur2

from processors.partitioning import forwarded_from, home_partition, murmur2, parse_forwarded_from


@pytest.mark.parametrize(("data", "java"), [  # org.apache.kafka.common.utils.UtilsTest#testMurmur2
    (b"21", -973932308), (b"foobar", -790332482), (b"a-little-bit-long-string", -985981536),
    (b"a-little-bit-longer-string", -1486304829), (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
    (b"abc", 479470107)])
def test_murmur2_is_the_java_clients(data, java):
    assert murmur2(data) == java & 0xFFFFFFFF


def test_murmur2_agrees_with_aiokafka_on_every_length_and_byte():
    rng = random.Random(7)
    for length in range(70):
        for _ in range(20):
            data = bytes(rng.randrange(256) for _ in range(length))
            assert murmur2(data) == aiokafka_murmur2(data)


def test_home_partition_is_the_java_default_partitioners():
    # Java: Utils.toPositive(Utils.murmur2(key)) % numPartitions
    assert home_partition("21", 6) == (-973932308 & 0x7FFFFFFF) % 6
    assert {home_partition(f"r-{i}", 6) for i in range(200)} == set(range(6))
    with pytest.raises(ValueError):
        home_partition("21", 0)


def test_the_forwarded_from_header_names_a_position_of_the_same_topic_only():
    header = forwarded_from(("zimage.requests.low", 4, 1234)).decode()
    assert parse_forwarded_from(header, "zimage.requests.low") == ("zimage.requests.low", 4, 1234)
    for hostile in ["", None, "zimage.requests.high/4/1234", "zimage.requests.low/-1/3", "zimage.requests.low/4",
                    "zimage.requests.low/4/1e3", "zimage.requests.low/4/\uff19", f"zimage.requests.low/4/{2**63}",
                    f"zimage.requests.low/{2**31}/0"]:
        assert parse_forwarded_from(hostile, "zimage.requests.low") is None, hostile
