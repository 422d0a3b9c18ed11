"""Partitions held back through no fault of their records (a Schema Registry that does not answer, a pool that
has not announced its model): sought back to the record that could not be decided, paused, and read again after
a backoff that grows until a record there is decided."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from confluent_kafka import Consumer, KafkaException, TopicPartition

from connectors.retry import backoff_delay

log = logging.getLogger(__name__)

TP = tuple[str, int]


class PartitionHolds:
    def __init__(self) -> None:
        self._until: dict[TP, float] = {}
        self._attempts: dict[TP, int] = {}

    def __contains__(self, tp: object) -> bool:
        return tp in self._until

    def __len__(self) -> int:
        return len(self._until)

    def hold(self, consumer: Consumer, tp: TP, offset: int, reason: str) -> None:
        attempt = self._attempts[tp] = self._attempts.get(tp, 0) + 1
        delay = backoff_delay(attempt)
        log.warning("%s[%d]@%d read again in %.1fs: %s", tp[0], tp[1], offset, delay, reason)
        consumer.seek(TopicPartition(tp[0], tp[1], offset))
        consumer.pause([TopicPartition(*tp)])
        self._until[tp] = time.monotonic() + delay

    def decided(self, tp: TP) -> None:
        """A record of `tp` was decided: the next hold there starts from the shortest backoff again."""
        self._attempts.pop(tp, None)

    def resume_due(self, consumer: Consumer, may_resume: Callable[[TP], bool] = lambda tp: True) -> None:
        now = time.monotonic()
        for tp, until in list(self._until.items()):
            if now >= until:
                del self._until[tp]
                if may_resume(tp):
                    consumer.resume([TopicPartition(*tp)])

    def resume_all(self, consumer: Consumer) -> None:
        """What held them is over (a pool announced its model): read every held partition again now, together,
        so that none waits out a longer backoff than another."""
        for tp in list(self._until):
            self._until[tp] = 0.0
        self.resume_due(consumer)

    def drop(self, consumer: Consumer, partitions: Iterable[TP]) -> None:
        """Forgets the holds of partitions being revoked (or lost), and resumes those still paused: librdkafka
        keeps an application's pause across a revoke and a re-assign, so a partition revoked while held would
        come back paused, with nothing left to resume it, and its records would never be read again."""
        partitions = list(partitions)
        paused = [tp for tp in partitions if self._until.pop(tp, None) is not None]
        for tp in partitions:
            self._attempts.pop(tp, None)
        if paused:
            try:
                consumer.resume([TopicPartition(*tp) for tp in paused])
            except KafkaException as exc:  # a rebalance callback must not raise; the partition is going anyway
                log.warning("resuming %s as it is revoked: %s", paused, exc)


class ClassPauses:
    """Priority classes whose partitions are paused while the class's buffer is full: intake stops reading what
    it has no room for, and a held partition stays paused when its class resumes."""

    def __init__(self, class_of: dict[str, str]) -> None:
        self._class_of = class_of  # topic -> class
        self.paused: set[str] = set()

    def __contains__(self, cls: object) -> bool:
        return cls in self.paused

    def pause(self, consumer: Consumer, cls: str, assigned: Iterable[TP]) -> None:
        if cls not in self.paused:
            self.paused.add(cls)
            consumer.pause([TopicPartition(t, p) for t, p in assigned if self._class_of[t] == cls])

    def resume(self, consumer: Consumer, cls: str, assigned: Iterable[TP], held: PartitionHolds) -> None:
        self.paused.discard(cls)
        consumer.resume([TopicPartition(t, p) for t, p in assigned if self._class_of[t] == cls and (t, p) not in held])

    def assigned(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """librdkafka keeps an application pause across revoke and re-assign: sets every new partition explicitly."""
        paused = [tp for tp in partitions if self._class_of[tp.topic] in self.paused]
        running = [tp for tp in partitions if self._class_of[tp.topic] not in self.paused]
        if paused:
            consumer.pause(paused)
        if running:
            consumer.resume(running)
