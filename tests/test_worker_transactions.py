"""The render worker's commits with autospecced Kafka clients: after an abort, nothing commits past dropped work.

Each scenario ends with the invariant that matters: the committed offsets of the input partition cover exactly
the requests whose outputs were committed, each once.
"""
from __future__ import annotations

import json
import threading
import time
from typing import Any

import numpy as np
import pytest

from bench.simulated import MemoryStore, routed
from connectors.kafka import TransactionalStep, TransactionStuck
from schemas.serde import AvroSerde, RegistryUnavailable
from streams.crash_journal import CrashJournal
from streams.settings import Settings
from streams.submit import build_request
from streams.worker import RenderWorker
from tests.fake_kafka import FakeKafka, FakeMessage, kafka_error

PREFIX = "tw"
TOPIC = f"{PREFIX}.render.turbo.normal"
TP = (TOPIC, 0)


class InstantRenderer:
    model_id = "instant"
    model_version = "instant-1"
    max_side = 1024
    size_multiple = 16

    def render(self, items, settings):
        return [np.full((16, 16, 3), item.seed % 251, np.uint8) for item in items]

    def check_settings(self, settings):
        pass

    def warmup(self):
        pass


class Rig:
    def __init__(self, tmp_path, count: int = 12, renderer: InstantRenderer | None = None, **settings: Any):
        self.kafka = FakeKafka()
        self.serde = AvroSerde()
        self.ids = []
        for i in range(count):
            request = routed(build_request({"prompt": f"chair {i}", "seed": i, "width": 32, "height": 32, "steps": 1,
                                            "priority": "normal"}))
            self.ids.append(request["request_id"])
            self.kafka.append(TOPIC, 0, self.serde.encode("GenerationRequest", request), request["request_id"].encode())
        self.producer = self.kafka.producer()
        self.consumer = self.kafka.consumer()
        config = Settings(_env_file=None, topic_prefix=PREFIX, request_partitions=1, output_partitions=1,
                          state_dir=str(tmp_path / "state"), worker_id="w1", max_wait_ms=0, health_file=None,
                          **{"max_batch_size": 2, **settings})
        self.worker = RenderWorker(config, renderer or InstantRenderer(), MemoryStore(), self.serde,
                                   consumer_factory=lambda conf, group: self.consumer.mock,
                                   step_factory=lambda conf, tid: TransactionalStep(conf, tid, client=self.producer))

    # ---- stepping the worker by hand, as its main loop would

    def open(self) -> None:
        w = self.worker
        w._consumer, w._step = self.consumer.mock, w._step_factory({}, "tx")
        w._consumer.subscribe([TOPIC], on_assign=w._on_assign, on_revoke=w._on_revoke, on_lost=w._on_lost)
        self.consumer.assign([TP])
        w._stage.start()

    def ingest(self, offsets: range) -> None:
        for offset in offsets:
            key, value = self.kafka.logs[TP][offset]
            self.worker._ingest(FakeMessage(TOPIC, 0, offset, value, key))  # type: ignore[arg-type]  # a Message
        self.worker._offer_incoming()  # as the main loop does after each consume() round
        deadline = time.monotonic() + 10
        while True:  # until the render stage has finished all of them
            with self.worker._lock:
                if self.worker._tracker.pending_count() == 0:
                    return
            assert time.monotonic() < deadline, "the render stage did not finish"
            time.sleep(0.005)

    def run_until_all_committed(self, timeout_s: float = 30) -> None:
        """Runs the worker's own loop in a thread until every request's offset is committed (or time is up)."""
        runner = threading.Thread(target=self.worker.run)
        runner.start()
        deadline = time.monotonic() + timeout_s
        while self.kafka.committed.get(TP, 0) < len(self.ids) and time.monotonic() < deadline:
            time.sleep(0.01)
        self.worker.stop()
        runner.join(30)

    # ---- what committed

    def committed_output_ids(self) -> list[str]:
        topics = (f"{PREFIX}.rendered", f"{PREFIX}.requests.failed")
        return [key.decode() for topic, key, _value in self.kafka.outputs if topic in topics]

    def assert_offsets_match_outputs(self) -> None:
        committed = self.kafka.committed.get(TP, 0)
        outputs = self.committed_output_ids()
        assert sorted(outputs) == sorted(i for i in self.ids[:committed] if i), (committed, len(outputs))
        assert len(outputs) == len(set(outputs)), "an output was committed twice"


@pytest.mark.parametrize("threads", [1, 3])
def test_the_storing_pool_has_the_threads_configured(tmp_path, threads):
    rig = Rig(tmp_path, post_threads=threads)
    assert rig.worker._stage._pool._max_workers == threads


class GatedRenderer(InstantRenderer):
    def __init__(self) -> None:
        self.entered, self.release = threading.Event(), threading.Event()

    def render(self, items, settings):
        self.entered.set()
        assert self.release.wait(10), "the test never released the render"
        return super().render(items, settings)


def test_while_a_request_renders_the_main_loop_waits_for_its_finish_not_in_the_consumers_poll(tmp_path):
    """Nothing can wake librdkafka's poll when a request finishes: a main loop blocked in it held each finish's
    commit until the poll's timeout ran out. It waits for the finish instead, and reads Kafka without blocking."""
    renderer = GatedRenderer()
    rig = Rig(tmp_path, count=1, renderer=renderer)
    runner = threading.Thread(target=rig.worker.run)
    runner.start()
    try:
        assert renderer.entered.wait(10), "the request was never rendered"
        polls_before, consumes_before = rig.consumer.mock.poll.call_count, rig.consumer.mock.consume.call_count
        time.sleep(0.05)  # the main loop goes round while the request renders
        while_rendering = rig.consumer.mock.poll.call_args_list[polls_before:]
        assert rig.consumer.mock.consume.call_count > consumes_before + 1, "the main loop stopped going round"
        blocking = [c for c in while_rendering if (c.kwargs.get("timeout") or (c.args or [0])[0]) > 0]
        assert blocking == [], f"the main loop blocked in the consumer's poll while a request rendered: {blocking}"
        renderer.release.set()
        deadline = time.monotonic() + 10
        while rig.kafka.committed.get(TP, 0) < 1 and time.monotonic() < deadline:
            time.sleep(0.005)
    finally:
        renderer.release.set()
        rig.worker.stop()
        runner.join(30)
    assert rig.kafka.committed.get(TP) == 1
    rig.assert_offsets_match_outputs()
    assert rig.committed_output_ids() == rig.ids


class OneAtATimeRenderer(InstantRenderer):
    def __init__(self) -> None:
        self.allowed = threading.Semaphore(0)

    def render(self, items, settings):
        assert self.allowed.acquire(timeout=10), "the test never allowed this render"
        return super().render(items, settings)


def test_only_the_finish_that_leaves_nothing_unfinished_wakes_the_main_loop(tmp_path):
    """Under load the commits wait for their interval anyway: waking the main loop at every finish only cost
    context switches. The last finish wakes it, so that at light load a result commits at once."""
    renderer = OneAtATimeRenderer()
    rig = Rig(tmp_path, count=2, renderer=renderer, max_batch_size=1)
    rig.open()
    for offset in range(2):
        key, value = rig.kafka.logs[TP][offset]
        rig.worker._ingest(FakeMessage(TOPIC, 0, offset, value, key))  # type: ignore[arg-type]  # a Message
    rig.worker._offer_incoming()
    woken = rig.worker._all_finished_now

    def unfinished_becomes(count: int) -> None:
        deadline = time.monotonic() + 10
        while True:
            with rig.worker._lock:
                if rig.worker._tracker.pending_count() == count:
                    return
            assert time.monotonic() < deadline, f"never {count} unfinished"
            time.sleep(0.002)

    try:
        renderer.allowed.release()  # the first request renders and finishes; the second still waits
        unfinished_becomes(1)
        assert not woken.is_set(), "a finish with another request still unfinished woke the main loop"
        renderer.allowed.release()
        unfinished_becomes(0)
        assert woken.is_set(), "the last finish did not wake the main loop"
    finally:
        renderer.allowed.release()
        rig.worker._stage.stop()


def abort_next_commit(rig: Rig) -> None:
    original = rig.producer.commit_transaction.side_effect

    def once(*args, **kwargs):
        rig.producer.commit_transaction.side_effect = original
        raise kafka_error(abortable=True)

    rig.producer.commit_transaction.side_effect = once


def test_an_abort_then_a_revocation_commits_nothing_past_the_aborted_records(tmp_path):
    rig = Rig(tmp_path)
    rig.open()
    rig.ingest(range(0, 3))
    abort_next_commit(rig)
    rig.worker._commit()  # offsets 0-2 and their images: aborted
    assert rig.kafka.committed == {} and rig.worker._step.needs_rewind
    rig.ingest(range(3, 6))
    rig.consumer.revoke([TP])  # a rebalance before the main loop rewinds: its commit must not go through
    rig.assert_offsets_match_outputs()
    assert rig.kafka.committed == {}
    rig.worker._stage.stop()


def test_an_abort_then_sigterm_commits_nothing_past_the_aborted_records(tmp_path):
    rig = Rig(tmp_path)
    rig.open()
    rig.ingest(range(0, 3))
    abort_next_commit(rig)
    rig.worker._commit()
    rig.ingest(range(3, 6))
    rig.worker.stop()  # SIGTERM's handler
    rig.worker._shutdown(clean=True)  # the final commit and the close's revocation
    rig.assert_offsets_match_outputs()
    assert rig.kafka.committed == {}


def test_an_abort_then_a_stuck_transaction_commits_nothing_more(tmp_path):
    rig = Rig(tmp_path)
    rig.open()
    rig.ingest(range(0, 3))
    rig.worker._commit()  # offsets 0-2 commit
    rig.ingest(range(3, 6))
    rig.producer.commit_transaction.side_effect = kafka_error(abortable=True)
    rig.producer.abort_transaction.side_effect = kafka_error()
    with pytest.raises(TransactionStuck):
        rig.worker._commit()
    rig.ingest(range(6, 9))
    rig.producer.commit_transaction.side_effect = rig.kafka._commit  # would succeed now: must not be asked
    rig.worker._shutdown(clean=False)
    rig.assert_offsets_match_outputs()
    assert rig.kafka.committed == {TP: 3}


def test_a_record_of_a_partition_revoked_during_consume_is_not_tracked(tmp_path):
    rig = Rig(tmp_path)
    rig.open()
    rig.consumer.revoke([TP])
    rig.ingest(range(0, 2))  # fetched before the revocation, handed out after it
    assert rig.worker._tracker.partitions() == []
    rig.worker._stage.stop()


def test_the_running_worker_with_aborts_now_and_then_publishes_everything_once(tmp_path):
    rig = Rig(tmp_path, count=40)
    calls = {"n": 0}
    original = rig.producer.commit_transaction.side_effect

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] % 3 == 1:
            raise kafka_error(abortable=True)
        return original(*args, **kwargs)

    rig.producer.commit_transaction.side_effect = flaky
    rig.run_until_all_committed()
    assert rig.kafka.committed.get(TP) == len(rig.ids)
    rig.assert_offsets_match_outputs()
    assert rig.producer.abort_transaction.call_count >= 1


def died_holding(tmp_path, offset: int, *, by_fault: bool) -> None:
    """Leaves the journal as a worker process that died decoding `offset` leaves it, and lets the next one open it."""
    name = f"{PREFIX}-render-turbo-w1"
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    (state / f"{name}.intake").write_text(json.dumps([[TOPIC, 0, offset]]))
    # faulthandler's traceback: the process ended itself (nothing is written when it is killed from outside)
    (state / f"{name}.fault").write_text("Fatal Python error: Segmentation fault\n" if by_fault else "")
    CrashJournal(state, name).close()


def test_a_record_the_worker_died_with_twice_by_a_fault_is_dead_lettered_undecoded(tmp_path):
    for _ in range(2):  # two segfaults while decoding offset 3
        died_holding(tmp_path, 3, by_fault=True)
    rig = Rig(tmp_path, count=6)
    rig.kafka.logs[TP][3] = (b"poison-key", b"\xc3\x01 whatever made the decoder crash")
    rig.ids[3] = None
    rig.open()
    rig.ingest(range(0, 6))
    rig.worker._commit()
    failed = [rig.serde.decode("RequestFailed", v) for t, _k, v in rig.kafka.outputs if t.endswith(".failed")]
    assert [(f["reason_code"], f["source"]["offset"]) for f in failed] == [("poison_record", 3)]
    assert "2 by a fault" in failed[0]["reason"]
    letters = [(k, v) for t, k, v in rig.kafka.outputs if t.endswith(".dlq")]
    assert letters == [(b"poison-key", b"\xc3\x01 whatever made the decoder crash")]
    assert rig.kafka.committed[TP] == 6
    rig.worker._stage.stop()


def test_a_healthy_record_held_through_two_kills_from_outside_is_still_rendered(tmp_path):
    for _ in range(2):  # a deploy's SIGKILL after its grace period, twice, each while offset 3 was in hand
        died_holding(tmp_path, 3, by_fault=False)
    rig = Rig(tmp_path, count=6)
    rig.open()
    rig.ingest(range(0, 6))
    rig.worker._commit()
    assert not [v for t, _k, v in rig.kafka.outputs if t.endswith((".failed", ".dlq"))]
    rig.assert_offsets_match_outputs()
    assert rig.kafka.committed[TP] == 6
    rig.worker._stage.stop()


def test_a_schema_registry_outage_holds_the_partition_and_dead_letters_nothing(tmp_path):
    rig = Rig(tmp_path, count=10)
    serde = rig.worker._intake._serde
    outage = {"left": 3}

    class RegistryDown:
        def decode(self, *args, **kwargs):
            if outage["left"]:
                outage["left"] -= 1
                raise RegistryUnavailable("Schema Registry unreachable: connection refused")
            return serde.decode(*args, **kwargs)

    rig.worker._intake._serde = RegistryDown()  # type: ignore[assignment]  # decode() is all intake calls
    rig.run_until_all_committed()
    assert outage["left"] == 0
    assert rig.kafka.committed.get(TP) == len(rig.ids)
    rig.assert_offsets_match_outputs()
    assert not [t for t, _k, _v in rig.kafka.outputs if t.endswith((".failed", ".dlq"))]
    assert rig.consumer.mock.seek.called and not rig.consumer.paused  # held, read again, resumed


def test_a_registry_outage_while_writing_a_failure_holds_the_record_and_ends_nothing():
    from bench.simulated import SimulatedRenderer
    from streams.failures import FailureRecords, Origin
    from streams.intake import Hold, Intake
    from streams.settings import Settings

    class RegistryDown(AvroSerde):
        def encode(self, record_name, value, **kwargs):
            if record_name == "RequestFailed":
                raise RegistryUnavailable("Schema Registry unreachable: connection refused")
            return super().encode(record_name, value, **kwargs)

    settings = Settings(_env_file=None, topic_prefix="tw")
    intake = Intake(settings, AvroSerde(), SimulatedRenderer(0.0, 0.0),
                    FailureRecords(settings.topology, RegistryDown(), "worker:turbo"))
    garbage = Origin("tw.render.turbo.normal", 0, 7, b"\x00not avro")
    assert isinstance(intake.decide(garbage, "normal"), Hold)  # read again once the registry answers


def test_a_registry_outage_after_rendering_is_waited_out_and_fails_nothing(tmp_path):
    rig = Rig(tmp_path, count=6)
    encode = rig.serde.encode
    outage = {"ImageRendered": 1, "RequestStatus": 1}

    def registry_down_a_while(name, value, **kwargs):
        if outage.get(name):
            outage[name] -= 1
            raise RegistryUnavailable("Schema Registry unreachable: connection refused")
        return encode(name, value, **kwargs)

    rig.serde.encode = registry_down_a_while  # type: ignore[method-assign,assignment]
    rig.run_until_all_committed()
    assert outage == {"ImageRendered": 0, "RequestStatus": 0}  # met, and waited out
    assert not [t for t, _k, _v in rig.kafka.outputs if t.endswith((".failed", ".dlq"))]
    rig.assert_offsets_match_outputs()
    assert rig.worker._stage.failure is None


def test_a_request_the_gate_did_not_admit_for_this_pool_is_refused_not_rendered(tmp_path):
    rig = Rig(tmp_path, count=4)
    bare = build_request({"prompt": "past the gate", "seed": 1, "width": 32, "height": 32, "steps": 1})
    elsewhere = routed(build_request({"prompt": "another pool's", "seed": 2, "width": 32, "height": 32,
                                      "steps": 1}), pool="other")
    for offset, request in ((1, bare), (2, elsewhere)):
        rig.kafka.logs[TP][offset] = (request["request_id"].encode(), rig.serde.encode("GenerationRequest", request))
        rig.ids[offset] = request["request_id"]
    rig.open()
    rig.ingest(range(0, 4))
    rig.worker._commit()
    failed = [rig.serde.decode("RequestFailed", v) for t, _k, v in rig.kafka.outputs if t.endswith(".failed")]
    assert sorted((f["request_id"], f["reason_code"]) for f in failed) == sorted(
        [(bare["request_id"], "invalid_request"), (elsewhere["request_id"], "invalid_request")])
    assert all("not admitted by the gate" in f["reason"] for f in failed)
    rendered = [k or b"" for t, k, _v in rig.kafka.outputs if t.endswith(".rendered")]
    assert sorted(rendered) == sorted(i.encode() for n, i in enumerate(rig.ids) if n in (0, 3))
    rig.worker._stage.stop()
