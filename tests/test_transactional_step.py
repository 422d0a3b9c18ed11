"""The shared transactional step with an autospecced producer: each error at each call, the deadline, the rewind."""
from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
from confluent_kafka import OFFSET_BEGINNING, KafkaError, KafkaException, TopicPartition

from connectors.kafka import (
    OutRecord,
    RewindRequired,
    TransactionAborted,
    TransactionalStep,
    TransactionStuck,
    rewind_to_committed,
)
from tests.fake_kafka import FakeKafka, kafka_error

TOPIC = "in"
RECORDS = [OutRecord("out", b"v1", b"k1"), OutRecord("out", b"v2", b"k2", timestamp=123)]
OFFSETS = {(TOPIC, 0): 2}
CALLS = ["begin_transaction", "produce", "send_offsets_to_transaction", "commit_transaction"]


def setup(**step_options):
    kafka = FakeKafka()
    kafka.append(TOPIC, 0, b"a")
    producer = kafka.producer()
    consumer = kafka.consumer()
    consumer.assigned.append((TOPIC, 0))
    step = TransactionalStep({}, "tx", client=producer, **step_options)
    return kafka, producer, consumer, step


def fail_once(mock_method, error):
    """Make the first call of `mock_method` raise `error`, later ones behave as before."""
    original = mock_method.side_effect
    failed = False

    def side_effect(*args, **kwargs):
        nonlocal failed
        if failed:
            return original(*args, **kwargs)
        failed = True
        raise error

    mock_method.side_effect = side_effect


def test_a_commit_produces_sends_offsets_and_commits_in_order():
    kafka, producer, consumer, step = setup()
    step.commit(RECORDS, OFFSETS, consumer.mock)
    assert kafka.outputs == [("out", b"k1", b"v1"), ("out", b"k2", b"v2")]
    assert kafka.committed == {(TOPIC, 0): 2}
    names = [c[0] for c in producer.method_calls if c[0] in CALLS]
    assert names == ["begin_transaction", "produce", "produce", "send_offsets_to_transaction", "commit_transaction"]
    assert producer.produce.call_args_list[1].kwargs["timestamp"] == 123  # dead letters keep the original time


@pytest.mark.parametrize("call", CALLS)
def test_an_abortable_error_at_each_call_aborts_and_demands_a_rewind(call):
    kafka, producer, consumer, step = setup()
    fail_once(getattr(producer, call), kafka_error(abortable=True))
    with pytest.raises(TransactionAborted):
        step.commit(RECORDS, OFFSETS, consumer.mock)
    producer.abort_transaction.assert_called_once()
    assert kafka.outputs == [] and kafka.committed == {}
    assert step.needs_rewind
    produced = producer.produce.call_count
    with pytest.raises(RewindRequired):  # a commit from a revocation or shutdown commits nothing
        step.commit(RECORDS, {(TOPIC, 0): 1}, consumer.mock)
    assert producer.produce.call_count == produced and kafka.committed == {}
    forgotten: list[tuple[str, int]] = []
    step.rewind(consumer.mock, forgotten.extend)
    assert not step.needs_rewind and forgotten == [(TOPIC, 0)]
    step.commit(RECORDS, OFFSETS, consumer.mock)
    assert kafka.committed == {(TOPIC, 0): 2} and len(kafka.outputs) == 2


@pytest.mark.parametrize("call", ["send_offsets_to_transaction", "commit_transaction"])
def test_a_retriable_error_is_retried_within_the_deadline(call):
    kafka, producer, consumer, step = setup()
    fail_once(getattr(producer, call), kafka_error(retriable=True))
    step.commit(RECORDS, OFFSETS, consumer.mock)
    assert getattr(producer, call).call_count == 2
    producer.abort_transaction.assert_not_called()
    assert kafka.committed == {(TOPIC, 0): 2} and len(kafka.outputs) == 2


def test_retries_share_one_deadline_below_the_transaction_timeout():
    _kafka, producer, consumer, step = setup(deadline_s=0.3)
    producer.send_offsets_to_transaction.side_effect = kafka_error(retriable=True)
    started = time.monotonic()
    with pytest.raises(TransactionAborted):
        step.commit(RECORDS, OFFSETS, consumer.mock)
    assert time.monotonic() - started < 0.3 + 0.2  # given up at the deadline, not after a backoff past it
    producer.abort_transaction.assert_called_once()
    for call in producer.send_offsets_to_transaction.call_args_list:  # each gets what is left of one deadline
        assert 0 < call.args[2] <= 0.3
    with pytest.raises(ValueError):
        TransactionalStep({}, "tx", client=producer, deadline_s=10.0)


def test_a_commit_whose_outcome_cannot_be_had_is_stuck_and_never_aborted():
    _kafka, producer, consumer, step = setup(deadline_s=0.3, outcome_wait_s=0.3)
    producer.commit_transaction.side_effect = kafka_error(retriable=True)
    with pytest.raises(TransactionStuck, match="outcome"):
        step.commit(RECORDS, OFFSETS, consumer.mock)
    producer.abort_transaction.assert_not_called()  # it would conflict with the commit still running


@pytest.mark.parametrize("call", CALLS)
def test_a_fatal_error_at_each_call_means_a_new_process(call):
    kafka, producer, consumer, step = setup()
    fail_once(getattr(producer, call), kafka_error(KafkaError._FENCED, fatal=True))
    with pytest.raises(TransactionStuck):
        step.commit(RECORDS, OFFSETS, consumer.mock)
    assert kafka.committed == {} and step.needs_rewind


def test_an_abort_that_fails_is_stuck():
    _kafka, producer, consumer, step = setup()
    fail_once(producer.commit_transaction, kafka_error(abortable=True))
    producer.abort_transaction.side_effect = kafka_error(KafkaError._STATE)
    with pytest.raises(TransactionStuck, match="abort"):
        step.commit(RECORDS, OFFSETS, consumer.mock)


def test_aborts_in_a_row_end_in_stuck():
    _kafka, producer, consumer, step = setup(max_aborts_in_a_row=3)
    producer.commit_transaction.side_effect = kafka_error(abortable=True)
    for _ in range(2):
        with pytest.raises(TransactionAborted):
            step.commit(RECORDS, OFFSETS, consumer.mock)
        step.rewind(consumer.mock, lambda parts: None)
    with pytest.raises(TransactionStuck, match="3 transactions aborted"):
        step.commit(RECORDS, OFFSETS, consumer.mock)


def test_init_failure_is_stuck():
    producer = FakeKafka().producer()
    producer.init_transactions.side_effect = kafka_error(KafkaError._FENCED, fatal=True)
    with pytest.raises(TransactionStuck):
        TransactionalStep({}, "tx", client=producer)


def test_rewind_seeks_to_committed_and_never_falls_back_on_an_error():
    kafka, _producer, consumer, _step = setup()
    kafka.committed[(TOPIC, 0)] = 5
    consumer.mock.committed.side_effect = lambda tps, timeout=None: [
        TopicPartition(TOPIC, 0, 5), TopicPartition(TOPIC, 1, -1001)]
    rewind_to_committed(consumer.mock, [(TOPIC, 0), (TOPIC, 1)])
    seeks = [(c.args[0].partition, c.args[0].offset) for c in consumer.mock.seek.call_args_list]
    assert seeks == [(0, 5), (1, OFFSET_BEGINNING)]  # never committed: where a new member would start

    consumer.mock.seek.reset_mock()
    broken = SimpleNamespace(topic=TOPIC, partition=1, offset=-1001,
                             error=KafkaError(KafkaError.COORDINATOR_NOT_AVAILABLE))
    consumer.mock.committed.side_effect = lambda tps, timeout=None: [TopicPartition(TOPIC, 0, 5), broken]
    with pytest.raises(KafkaException):
        rewind_to_committed(consumer.mock, [(TOPIC, 0), (TOPIC, 1)])
    assert all(c.args[0].offset != OFFSET_BEGINNING for c in consumer.mock.seek.call_args_list)


def test_a_failed_rewind_keeps_commits_refused():
    _kafka, producer, consumer, step = setup()
    fail_once(producer.commit_transaction, kafka_error(abortable=True))
    with pytest.raises(TransactionAborted):
        step.commit(RECORDS, OFFSETS, consumer.mock)
    consumer.mock.assignment.side_effect = lambda: [TopicPartition(TOPIC, 0)]
    consumer.mock.committed.side_effect = kafka_error(KafkaError._FENCED, fatal=True)
    with pytest.raises(KafkaException):
        step.rewind(consumer.mock, lambda parts: None)
    assert step.needs_rewind
    with pytest.raises(RewindRequired):
        step.commit(RECORDS, OFFSETS, consumer.mock)


def test_a_commit_that_outlives_the_deadline_is_waited_for_not_aborted():
    kafka, producer, consumer, step = setup(deadline_s=0.3)
    calls = {"n": 0}

    def slow_commit(timeout=None):  # librdkafka: the commit goes on in the background after an API timeout
        calls["n"] += 1
        if calls["n"] <= 2:
            raise kafka_error(retriable=True)
        kafka._commit()

    producer.commit_transaction.side_effect = slow_commit
    producer.abort_transaction.side_effect = kafka_error(KafkaError._CONFLICT)  # as while a commit runs
    step.commit(RECORDS, OFFSETS, consumer.mock)
    producer.abort_transaction.assert_not_called()
    assert kafka.committed == {(TOPIC, 0): 2} and len(kafka.outputs) == 2 and not step.needs_rewind


def test_a_late_commit_that_fails_is_aborted():
    kafka, producer, consumer, step = setup(deadline_s=0.3)
    outcomes = [kafka_error(retriable=True), kafka_error(retriable=True), kafka_error(abortable=True)]
    producer.commit_transaction.side_effect = lambda timeout=None: (_ for _ in ()).throw(outcomes.pop(0))
    with pytest.raises(TransactionAborted):
        step.commit(RECORDS, OFFSETS, consumer.mock)
    producer.abort_transaction.assert_called_once()
    assert kafka.committed == {}


def test_consume_ready_returns_as_soon_as_a_record_is_there():
    from unittest.mock import create_autospec

    from confluent_kafka import Consumer

    from connectors.kafka import consume_ready

    consumer = create_autospec(Consumer, instance=True)
    consumer.consume.side_effect = [[], ["second", "third"]]
    consumer.poll.return_value = "first"
    assert consume_ready(consumer, 500, 0.5) == ["first", "second", "third"]
    consumer.poll.assert_called_once_with(0.5)  # waits for one record, not for a full batch
    assert [c.kwargs["timeout"] for c in consumer.consume.call_args_list] == [0, 0]


def test_consume_ready_with_no_timeout_reads_only_what_is_there():
    from unittest.mock import create_autospec

    from confluent_kafka import Consumer

    from connectors.kafka import consume_ready

    consumer = create_autospec(Consumer, instance=True)
    consumer.consume.return_value = []
    assert consume_ready(consumer, 500, 0) == []
    consumer.poll.assert_not_called()  # the render worker waits on its own finishes instead
