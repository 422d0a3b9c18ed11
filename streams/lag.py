"""What a consumer still has to read, from its cached end offsets: no request to the broker.

`unfetched` feeds the scheduler (a class with records still in Kafka holds lower classes back for a bounded
time); `committed_lag` feeds the queue-length gauge.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

from confluent_kafka import Consumer, KafkaException, TopicPartition

from streams import metrics

TP = tuple[str, int]


def _watermarks(consumer: Consumer, topic: str, partition: int) -> tuple[int, int]:
    """The partition's (start, end) offsets as of the last fetch; negative when not known yet (never fetched)."""
    try:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), cached=True)
        return low, high
    except KafkaException:
        return -1, -1


def _end_offset(consumer: Consumer, topic: str, partition: int) -> int:
    return _watermarks(consumer, topic, partition)[1]


def unfetched(consumer: Consumer, partitions: Iterable[TP], class_of: Mapping[str, str],
              waiting: dict[str, bool]) -> dict[str, bool] | None:
    """Per class, whether any of `partitions` has records not yet handed to the application (an unknown end, or
    no position on a partition that is not empty, counts as waiting). `waiting` holds classes already known to be
    waiting (it is updated and returned); None when the positions are not available."""
    mine = [TopicPartition(t, p) for t, p in partitions]
    try:
        positions = consumer.position(mine) if mine else []
    except KafkaException:
        return None
    for tp in positions:
        cls = class_of[tp.topic]
        if not waiting[cls]:
            low, high = _watermarks(consumer, tp.topic, tp.partition)
            if high < 0:
                waiting[cls] = True  # never fetched: the end is not known yet
            elif tp.offset < 0:
                # Nothing consumed since the assignment, so no position: only an empty partition surely has
                # nothing waiting. (An empty one counted as waiting held every lower class on the start of a run.)
                waiting[cls] = high > low
            else:
                waiting[cls] = tp.offset < high
    return waiting


def committed_lag(consumer: Consumer, committed: Mapping[TP, int], class_of: Mapping[str, str]) -> dict[str, int]:
    """Per class, end offsets minus committed offsets over the partitions in `committed`."""
    lag = dict.fromkeys(class_of.values(), 0)
    for (topic, partition), done in list(committed.items()):
        high = _end_offset(consumer, topic, partition)
        if high >= 0:
            lag[class_of[topic]] += max(0, high - done)
    return lag


def export_backlog(consumer: Consumer, committed: Mapping[TP, int], assigned: Iterable[TP],
                   class_of: Mapping[str, str], busy_fraction: float) -> dict[str, int]:
    """Sets the worker's gauges (renderer busy fraction, committed lag per class) and returns the lag."""
    metrics.GPU_UTILIZATION.set(busy_fraction)
    mine = set(assigned)
    backlog = committed_lag(consumer, {tp: done for tp, done in committed.items() if tp in mine}, class_of)
    for priority, value in backlog.items():
        metrics.QUEUE_LENGTH.labels(priority).set(value)
    return backlog
