"""Where a request belongs among the partitions of its topic, whoever produced it.

The gate keeps its idempotency state per partition of the request topics, so two copies of one request must meet
on one partition to be seen as a repeat. A request's *home* is the partition that Kafka's Java clients give its
`request_id` as key (murmur2, the default partitioner of the Java producer, Kafka Streams, Kafka Connect, aiokafka
and librdkafka's `murmur2_random`); the project's own producers place keyed records the same way. A request read
anywhere else (produced without a key, under another key, or by a client with another partitioner) is forwarded
by the gate to its home, unchanged, in the transaction of the offset it was read at, with a header that names
where it was produced, and is decided there.

Pure: no Kafka client. The hash is the Java client's `Utils.murmur2`, written here rather than imported: the one
installed implementation (aiokafka's) sits behind its package's import of a whole asyncio client.
"""
from __future__ import annotations

import struct

FORWARDED_FROM_HEADER = "zimage-forwarded-from"

_SEED = 0x9747B28C
_M = 0x5BD1E995
_MASK = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 of `data`, as an unsigned 32-bit value (org.apache.kafka.common.utils.Utils.murmur2)."""
    length = len(data)
    h = (_SEED ^ length) & _MASK
    whole = length // 4
    for k in struct.unpack_from(f"<{whole}I", data):
        k = (k * _M) & _MASK
        k ^= k >> 24
        k = (k * _M) & _MASK
        h = ((h * _M) & _MASK) ^ k
    tail = length & 3
    at = length - tail
    if tail == 3:
        h ^= data[at + 2] << 16
    if tail >= 2:
        h ^= data[at + 1] << 8
    if tail >= 1:
        h ^= data[at]
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return h


def home_partition(request_id: str, partitions: int) -> int:
    """The partition of `partitions` that a Java client's default partitioner gives the key `request_id`."""
    if partitions < 1:
        raise ValueError(f"a topic has at least one partition, not {partitions}")
    return (murmur2(request_id.encode("utf-8")) & 0x7FFFFFFF) % partitions


def forwarded_from(source: tuple[str, int, int]) -> bytes:
    """The header value that names where a forwarded request was produced: `topic/partition/offset`."""
    topic, partition, offset = source
    return f"{topic}/{partition}/{offset}".encode()


def parse_forwarded_from(text: str | None, topic: str) -> tuple[str, int, int] | None:
    """Where a forwarded request was produced, from its header: None unless it names a position in `topic` (a
    request is forwarded within its topic), with a partition and an offset that could be real."""
    if not text:
        return None
    parts = text.rsplit("/", 2)
    if len(parts) != 3 or parts[0] != topic or not all(p.isascii() and p.isdigit() for p in parts[1:]):
        return None  # ASCII digits only: int() would also read other scripts' digits
    partition, offset = int(parts[1]), int(parts[2])
    if partition >= 2**31 or offset >= 2**63:
        return None
    return topic, partition, offset
