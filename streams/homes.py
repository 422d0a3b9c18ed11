"""Home partitions for the processors that keep state per partition (the gate, publication).

Each keeps what it has seen of a request (admitted keys, published versions) on the partition of its state topic
that has the number of the partition the request was read from, so two copies of one request must meet on one
partition: its home, murmur2 of its request id over the state topic's partition count
(processors/partitioning.py). A record read anywhere else is forwarded to its home, unchanged, in the
transaction of the offset it was read at, and decided when it is read there.

The inputs and the state topic must have the same partition count (`zimage topics apply` creates them so): with
other counts a home could lie outside an input, or state outside its partition, so a processor that finds them
different stops, naming them, as Kafka Streams refuses inputs that are not co-partitioned.
"""
from __future__ import annotations

import time

from confluent_kafka import Consumer, KafkaError, KafkaException

from connectors.kafka import OutRecord
from processors.admission import header_text
from processors.partitioning import FORWARDED_FROM_HEADER, forwarded_from, home_partition, parse_forwarded_from
from processors.requests import InvalidRequest
from streams.failures import Origin

METADATA_TIMEOUT_S = 10
RETRY_AFTER_S = 1.0  # after a failed metadata request, the records of the batch in hand are held at once
FRAMING_BYTES = 1024  # a record batch's and a record's own framing, within the topic's max.message.bytes


class PartitionCountMismatch(RuntimeError):
    """An input and the state topic have different partition counts: the processor cannot keep its state right,
    and stops rather than decide anything (an operator aligns the topics)."""


class Homes:
    """The home partition of a request id, for inputs co-partitioned with `state_topic`; partition counts are asked
    once per assignment (partitions added to a topic come with a new assignment)."""

    def __init__(self, state_topic: str) -> None:
        self._state_topic = state_topic
        self._counts: dict[str, int] = {}
        self._retry_at = 0.0

    def forget(self) -> None:
        """After an assignment: every count is asked again, at once."""
        self._counts.clear()
        self._retry_at = 0.0

    def of(self, consumer: Consumer, topic: str, request_id: str) -> int:
        """Raises KafkaException while the broker does not say how many partitions the topics have (not the
        record's fault: its partition waits), PartitionCountMismatch when they differ."""
        return home_partition(request_id, self.count(consumer, topic))

    def count(self, consumer: Consumer, topic: str) -> int:
        """The partition count of `topic`, once checked equal to the state topic's (raises as `of`)."""
        count = self._counts.get(topic)
        if count is None:
            count = self._counts[topic] = self._co_partitioned(consumer, topic)
        return count

    def _co_partitioned(self, consumer: Consumer, topic: str) -> int:
        if time.monotonic() < self._retry_at:  # one slow failure per second, not one per record of a batch
            raise KafkaException(KafkaError(KafkaError._TRANSPORT, f"the partitions of {topic} are not known yet"))
        try:
            have, state = (self._count(consumer, t) for t in (topic, self._state_topic))
        except KafkaException:
            self._retry_at = time.monotonic() + RETRY_AFTER_S
            raise
        if have != state:
            raise PartitionCountMismatch(
                f"{topic} has {have} partitions and {self._state_topic} {state}: they must be equal (the state of "
                f"partition p is kept on partition p); add partitions to the smaller (`zimage topics apply --check`)")
        return have

    @staticmethod
    def _count(consumer: Consumer, topic: str) -> int:
        found = consumer.list_topics(topic, timeout=METADATA_TIMEOUT_S).topics.get(topic)
        if found is None or found.error is not None or not found.partitions:
            raise KafkaException(KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART, f"the partitions of {topic} are "
                                            "not known"))
        return len(found.partitions)


def forward(origin: Origin, request_id: str, home: int, max_record_bytes: int) -> OutRecord:
    """The record as it was read (value, headers, timestamp), keyed by its request id, on its home partition; with
    a header that names where it was produced, unless an earlier forward named it already. InvalidRequest when
    that would not fit its topic (`max_record_bytes`): a write the broker refuses would abort every transaction
    that holds it."""
    headers = list(origin.headers)
    if parse_forwarded_from(header_text(headers, FORWARDED_FROM_HEADER), origin.topic) is None:
        headers = [(k, v) for k, v in headers if k != FORWARDED_FROM_HEADER]
        headers.append((FORWARDED_FROM_HEADER, forwarded_from(origin.source)))
    key = request_id.encode()
    size = len(origin.value) + len(key) + sum(len(k) + len(v or b"") for k, v in headers) + FRAMING_BYTES
    if size > max_record_bytes:
        raise InvalidRequest("invalid_request", f"read off its home partition, and too large to forward there "
                             f"({size} bytes with its key and headers; {origin.topic} takes {max_record_bytes})")
    return OutRecord(origin.topic, origin.value, key, headers, origin.timestamp, partition=home)


def lineage(origin: Origin) -> tuple[str, int, int]:
    """Where a record was produced: the position that its forward names, else where it was read. Like the replay
    headers, any producer can set that header; it names a position and decides nothing."""
    return parse_forwarded_from(header_text(origin.headers, FORWARDED_FROM_HEADER), origin.topic) or origin.source
