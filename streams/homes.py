"""Home partitions for the processors that keep state per partition (the gate, publication).

Each keeps what it has seen of a request (admitted keys, published versions) beside the partition the request was
read from, so two copies of one request must meet on one partition: its home (processors/partitioning.py). A
record read anywhere else is forwarded to its home, unchanged, in the transaction of the offset it was read at,
and decided when it is read there.
"""
from __future__ import annotations

from confluent_kafka import Consumer, KafkaError, KafkaException

from connectors.kafka import OutRecord
from processors.admission import header_text
from processors.partitioning import FORWARDED_FROM_HEADER, forwarded_from, home_partition, parse_forwarded_from
from streams.failures import Origin

METADATA_TIMEOUT_S = 10


class Homes:
    """The home partition of a request id in the topics a consumer reads (their partition counts are asked once
    per assignment: partitions added to a topic come with a new assignment)."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    def forget(self) -> None:
        self._counts.clear()

    def of(self, consumer: Consumer, topic: str, request_id: str) -> int:
        """Raises KafkaException while the broker does not say how many partitions `topic` has: not the record's
        fault, so its partition waits."""
        count = self._counts.get(topic)
        if count is None:
            partitions = consumer.list_topics(topic, timeout=METADATA_TIMEOUT_S).topics.get(topic)
            if partitions is None or partitions.error is not None or not partitions.partitions:
                raise KafkaException(KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART,
                                                f"the partitions of {topic} are not known"))
            count = self._counts[topic] = len(partitions.partitions)
        return home_partition(request_id, count)


def forward(origin: Origin, request_id: str, home: int) -> OutRecord:
    """The record as it was read (value, headers, timestamp), keyed by its request id, on its home partition; with
    a header that names where it was produced, unless an earlier forward named it already."""
    headers = list(origin.headers)
    if parse_forwarded_from(header_text(headers, FORWARDED_FROM_HEADER), origin.topic) is None:
        headers = [(k, v) for k, v in headers if k != FORWARDED_FROM_HEADER]
        headers.append((FORWARDED_FROM_HEADER, forwarded_from(origin.source)))
    return OutRecord(origin.topic, origin.value, request_id.encode(), headers, origin.timestamp, partition=home)


def lineage(origin: Origin) -> tuple[str, int, int]:
    """Where a record was produced: the position that its forward names, else where it was read. Like the replay
    headers, any producer can set that header; it names a position and decides nothing."""
    return parse_forwarded_from(header_text(origin.headers, FORWARDED_FROM_HEADER), origin.topic) or origin.source
