"""The loop every exactly-once processor runs, in process with autospecced clients: what it decides commits with
its offsets; after an abort it rewinds before anything else commits; what waits commits nothing."""
from __future__ import annotations

import threading

from confluent_kafka import KafkaError, KafkaException

from connectors.kafka import OutRecord, TransactionalStep
from streams.processor_loop import ProcessorLoop
from tests.fake_kafka import FakeKafka, kafka_error

TOPIC = "t.in"


class Rig:
    def __init__(self, records: int = 5, abort_first_commit: bool = False):
        self.kafka = FakeKafka()
        for i in range(records):
            self.kafka.append(TOPIC, 0, f"v{i}".encode(), f"k{i}".encode())
        self.consumer = self.kafka.consumer()
        self.consumer.mock.subscribe([TOPIC], on_assign=lambda c, p: None, on_revoke=lambda c, p: None)
        self.producer = self.kafka.producer()
        if abort_first_commit:
            real = self.producer.commit_transaction.side_effect
            calls = {"n": 0}

            def commit(timeout=None):
                calls["n"] += 1
                if calls["n"] == 1:
                    raise KafkaException(kafka_error(KafkaError._FENCED, abortable=True))
                return real(timeout)

            self.producer.commit_transaction.side_effect = commit
        self.step = TransactionalStep({}, "tx", client=self.producer)
        self.stop = threading.Event()
        self.rewinds = 0
        self.aborted: list[int] = []
        self.after = 0
        self.seen: list[bytes] = []

    def decide(self, msgs):
        self.seen += [m.value() for m in msgs]
        records = [OutRecord("t.out", m.value(), m.key()) for m in msgs]
        return records, {(TOPIC, 0): msgs[-1].offset() + 1}

    def rewind(self):
        self.rewinds += 1
        self.step.rewind(self.consumer.mock, lambda parts: None)

    def after_commit(self):
        self.after += 1
        if self.kafka.committed.get((TOPIC, 0)) == 5:
            self.stop.set()

    def run(self, decide=None, timeout_s: float = 10.0, batch: int = 2, fill_s: float = 0.005):
        loop = ProcessorLoop(self.consumer.mock, self.step, decide or self.decide, self.rewind, batch=batch,
                             poll_s=0.01, fill_s=fill_s, after_commit=self.after_commit,
                             on_abort=self.aborted.append)
        threading.Timer(timeout_s, self.stop.set).start()
        loop.run(self.stop)


def test_each_decided_batch_commits_with_its_offsets_and_nothing_twice():
    rig = Rig()
    rig.run()
    assert [v for _t, _k, v in rig.kafka.outputs] == [f"v{i}".encode() for i in range(5)]
    assert rig.kafka.committed[(TOPIC, 0)] == 5 and rig.after == rig.kafka.transactions == 3  # batches of 2


def test_an_aborted_commit_rewinds_and_reads_again_before_anything_else_commits():
    rig = Rig(abort_first_commit=True)
    rig.run()
    assert rig.rewinds == 1 and rig.aborted == [2]
    assert [v for _t, _k, v in rig.kafka.outputs] == [f"v{i}".encode() for i in range(5)]  # once each
    assert rig.seen[:4] == [b"v0", b"v1", b"v0", b"v1"]  # the aborted batch was read again


def test_a_batch_that_decides_to_wait_commits_nothing():
    rig = Rig()
    rig.run(decide=lambda msgs: ([], {}), timeout_s=0.5)
    assert rig.kafka.transactions == 0 and rig.kafka.outputs == []


def test_under_load_a_batch_waits_a_moment_to_fill_and_a_lone_record_does_not():
    busy = Rig(records=5)
    busy.run(batch=10, fill_s=0.05)
    fills = [c for c in busy.consumer.mock.consume.call_args_list if c.kwargs.get("timeout") == 0.05]
    assert [c.args for c in fills] == [(5,)]  # five were waiting: up to five more, for at most fill_s
    assert busy.kafka.transactions == 1 and busy.kafka.committed[(TOPIC, 0)] == 5
    lone = Rig(records=1)
    lone.run(batch=10, fill_s=0.05, timeout_s=0.5)
    assert not [c for c in lone.consumer.mock.consume.call_args_list if c.kwargs.get("timeout") == 0.05]
    assert lone.kafka.committed[(TOPIC, 0)] == 1
