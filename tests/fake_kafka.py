"""An in-memory Kafka behind autospecced confluent-kafka clients, for in-process tests of the transactional steps.

`FakeKafka` keeps topics as lists of records, the group's committed offsets, and what committed transactions
produced. `producer()` and `consumer()` return `create_autospec` mocks of the real classes (so every call is
checked against the real signatures) whose side effects act on it; tests inject an error at any call by
wrapping a side effect.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any
from unittest.mock import create_autospec

from confluent_kafka import (
    OFFSET_BEGINNING,
    TIMESTAMP_CREATE_TIME,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)

TP = tuple[str, int]


def kafka_error(code: int = KafkaError._TIMED_OUT, *, retriable: bool = False, abortable: bool = False,
                fatal: bool = False) -> KafkaException:
    return KafkaException(KafkaError(code, "injected", fatal=fatal, retriable=retriable,
                                     txn_requires_abort=abortable))


@dataclass
class FakeMessage:
    _topic: str
    _partition: int
    _offset: int
    _value: bytes | None
    _key: bytes | None = None
    _headers: list = field(default_factory=list)
    _timestamp: int = 1_700_000_000_000

    def error(self):
        return None

    def topic(self):
        return self._topic

    def partition(self):
        return self._partition

    def offset(self):
        return self._offset

    def value(self):
        return self._value

    def key(self):
        return self._key

    def headers(self):
        return list(self._headers)

    def timestamp(self):
        return TIMESTAMP_CREATE_TIME, self._timestamp


class FakeKafka:
    def __init__(self) -> None:
        self.logs: dict[TP, list[tuple[bytes | None, bytes | None]]] = {}
        self.committed: dict[TP, int] = {}
        self.outputs: list[tuple[str, bytes | None, bytes | None]] = []  # (topic, key, value) of committed txns
        self.transactions = 0
        self.partitions = 3  # of every topic, as list_topics() tells, unless `partition_counts` names it
        self.partition_counts: dict[str, int] = {}
        self._txn: list[tuple[str, bytes | None, bytes | None]] = []
        self._txn_offsets: dict[TP, int] = {}
        self.lock = threading.Lock()

    def append(self, topic: str, partition: int, value: bytes | None, key: bytes | None = None) -> None:
        self.logs.setdefault((topic, partition), []).append((key, value))

    # ---------------------------------------------------------------- producer

    def producer(self) -> Any:  # an autospec of Producer: its calls, and the mock's side_effect, call_count, ...
        p = create_autospec(Producer, instance=True)
        p.init_transactions.side_effect = lambda *a, **k: None
        p.begin_transaction.side_effect = self._begin
        p.produce.side_effect = self._produce
        p.send_offsets_to_transaction.side_effect = self._send_offsets
        p.commit_transaction.side_effect = self._commit
        p.abort_transaction.side_effect = self._abort
        p.flush.return_value = 0
        p.poll.return_value = 0
        return p

    def _begin(self) -> None:
        self._txn, self._txn_offsets = [], {}

    def _produce(self, topic, value=None, key=None, *args, **kwargs) -> None:
        self._txn.append((topic, key, value))

    def _send_offsets(self, offsets, metadata, timeout=None) -> None:
        self._txn_offsets.update({(tp.topic, tp.partition): tp.offset for tp in offsets})

    def _commit(self, timeout=None) -> None:
        with self.lock:
            self.outputs += self._txn
            self.committed.update(self._txn_offsets)
            self.transactions += 1
        self._txn, self._txn_offsets = [], {}

    def _abort(self, timeout=None) -> None:
        self._txn, self._txn_offsets = [], {}

    # ---------------------------------------------------------------- consumer

    def consumer(self) -> FakeConsumer:
        return FakeConsumer(self)


class FakeConsumer:
    """The state behind one autospecced Consumer (`.mock`)."""

    def __init__(self, kafka: FakeKafka):
        self.kafka = kafka
        self.assigned: list[TP] = []
        self.cursor: dict[TP, int] = {}
        self.paused: set[TP] = set()
        self.callbacks: dict[str, Any] = {}
        self.before_consume: list = []  # callables run at the start of the next consume() (a rebalance, say)
        m = create_autospec(Consumer, instance=True)
        m.subscribe.side_effect = self._subscribe
        m.consume.side_effect = self._consume
        m.poll.side_effect = lambda timeout=None: next(iter(self._consume(1, timeout or 0)), None)
        m.seek.side_effect = self._seek
        m.committed.side_effect = self._committed
        m.assignment.side_effect = lambda: [TopicPartition(t, p) for t, p in self.assigned]
        m.position.side_effect = lambda tps: [TopicPartition(tp.topic, tp.partition, self.cursor.get(
            (tp.topic, tp.partition), -1001)) for tp in tps]
        m.get_watermark_offsets.side_effect = lambda tp, *a, **k: (0, len(self.kafka.logs.get(
            (tp.topic, tp.partition), [])))
        m.pause.side_effect = lambda tps: self.paused.update((tp.topic, tp.partition) for tp in tps)
        m.resume.side_effect = lambda tps: self.paused.difference_update((tp.topic, tp.partition) for tp in tps)
        m.consumer_group_metadata.return_value = object()
        m.list_topics.side_effect = self._list_topics
        m.close.side_effect = self._close
        self.mock = m

    def _subscribe(self, topics, on_assign=None, on_revoke=None, on_lost=None) -> None:
        self.callbacks = {"assign": on_assign, "revoke": on_revoke, "lost": on_lost}
        self.before_consume.append(lambda: self.assign([tp for tp in self.kafka.logs if tp[0] in topics]))

    def assign(self, parts: list[TP]) -> None:
        for tp in parts:
            self.assigned.append(tp)
            self.cursor[tp] = self.kafka.committed.get(tp, 0)
        if self.callbacks.get("assign"):
            self.callbacks["assign"](self.mock, [TopicPartition(t, p) for t, p in parts])

    def revoke(self, parts: list[TP]) -> None:
        self.callbacks["revoke"](self.mock, [TopicPartition(t, p) for t, p in parts])
        for tp in parts:
            self.assigned.remove(tp)
            self.cursor.pop(tp, None)

    def _consume(self, num_messages=1, timeout=-1):
        while self.before_consume:
            self.before_consume.pop(0)()
        out: list[FakeMessage] = []
        for tp in self.assigned:
            if tp in self.paused:
                continue
            log = self.kafka.logs.get(tp, [])
            while self.cursor[tp] < len(log) and len(out) < num_messages:
                key, value = log[self.cursor[tp]]
                out.append(FakeMessage(tp[0], tp[1], self.cursor[tp], value, key))
                self.cursor[tp] += 1
        if not out:
            time.sleep(min(max(timeout, 0), 0.005))
        return out

    def _list_topics(self, topic=None, timeout=-1) -> Any:
        """Metadata as the client gives it, for the partitions only: `.topics[name].partitions`."""
        names = [topic] if topic else sorted({t for t, _p in self.kafka.logs})
        counts = {name: self.kafka.partition_counts.get(name, self.kafka.partitions) for name in names}
        return SimpleNamespace(topics={name: SimpleNamespace(
            topic=name, partitions={p: SimpleNamespace(id=p) for p in range(count)}, error=None)
            for name, count in counts.items()})

    def _seek(self, tp) -> None:
        self.cursor[(tp.topic, tp.partition)] = 0 if tp.offset == OFFSET_BEGINNING else tp.offset

    def _committed(self, tps, timeout=None):
        return [TopicPartition(tp.topic, tp.partition, self.kafka.committed.get((tp.topic, tp.partition), -1001))
                for tp in tps]

    def _close(self) -> None:
        if self.assigned and self.callbacks.get("revoke"):
            self.revoke(list(self.assigned))


def registry_down_for(serde: Any, *record_names: str) -> None:
    """Makes `serde` answer as a Schema Registry outage when it encodes these records; the others encode."""
    from schemas.serde import RegistryUnavailable

    encode = serde.encode

    def encode_or_fail(name: str, value: Any, **kwargs: Any) -> bytes:
        if name in record_names:
            raise RegistryUnavailable("the registry does not answer")
        return encode(name, value, **kwargs)

    serde.encode = encode_or_fail
