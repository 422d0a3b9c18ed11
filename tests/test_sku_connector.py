"""The SKU connector in process, with autospecced Kafka clients: requests, the version rule and its changelog,
backfills, failures that name the SKU, holds, and an abort that rewinds and forgets."""
from __future__ import annotations

import json
import threading
import time

from connectors.kafka import TransactionalStep
from processors.admission import GENERATION_HEADER, REPLAY_ID_HEADER
from processors.sku_requests import request_id_for
from schemas.serde import AvroSerde, RegistryUnavailable
from streams.settings import Settings
from streams.sku_connector import SkuConnector
from streams.sku_state import LatestVersions
from tests.fake_kafka import FakeKafka, FakeMessage, kafka_error, registry_down_for
from tests.test_sku_templates import FILE, templates

PREFIX = "ts"
TOPIC = f"{PREFIX}.sku.changes"
CHANGELOG = f"{PREFIX}.sku.changelog"


def sku(**fields):
    return {"sku_id": "CH-1", "tenant": "acme", "version": 3, "title": "Oslo", "category": "chairs",
            "attributes": {"color": "red", "material": "oak"}, "template": None, "priority": None,
            "change_kind": "new_listing", "changed_at": 1, **fields}


class Rig:
    def __init__(self, text: str = FILE):
        self.serde = AvroSerde()
        self.kafka = FakeKafka()
        self.producer = self.kafka.producer()
        self.consumer = self.kafka.consumer()
        self.settings = Settings(_env_file=None, topic_prefix=PREFIX, request_partitions=3, output_partitions=3,
                                 worker_id="s1")
        self.restores = 0
        self.connector = SkuConnector(
            self.settings, self.serde, templates(text),
            consumer_factory=lambda conf, group: self.consumer.mock,
            step_factory=lambda conf, tid: TransactionalStep(conf, tid, client=self.producer))
        self.connector._versions = LatestVersions({}, CHANGELOG, restore=self.restore)
        self.connector._consumer = self.consumer.mock
        self.offset = 0

    def restore(self, partition: int) -> dict[str, int]:
        """What reading the changelog gives: every committed entry (the tests keep each SKU on one partition)."""
        self.restores += 1
        return {(key or b"").decode(): json.loads(value or b"")["version"] for topic, key, value in self.kafka.outputs
                if topic == CHANGELOG}

    def message(self, event, partition=1, headers=(), key=None):
        self.offset += 1
        return FakeMessage(TOPIC, partition, self.offset, self.serde.encode("SkuChanged", event),
                           key if key is not None else event["sku_id"].encode(), list(headers))

    def decide(self, *messages):
        records, offsets = self.connector.decide(list(messages))
        by_topic: dict[str, list] = {}
        for r in records:
            by_topic.setdefault(r.topic.removeprefix(f"{PREFIX}."), []).append(r)
        return by_topic, offsets


def test_an_event_becomes_one_request_per_view_with_its_version_in_the_changelog():
    rig = Rig()
    out, offsets = rig.decide(rig.message(sku(), partition=2))
    routed = out["requests.high"]  # a new listing
    values = [rig.serde.decode("GenerationRequest", r.value) for r in routed]
    assert [v["view"] for v in values] == ["front", "side", "detail"]
    assert [r.key for r in routed] == [request_id_for("acme", "CH-1", 3, v).encode() for v in ("front", "side",
                                                                                                "detail")]
    assert all(v["sku_event"] == {"topic": TOPIC, "partition": 2, "offset": 1} for v in values)
    [changelog] = out["sku.changelog"]
    assert changelog.partition == 2 and json.loads(changelog.value) == {"version": 3}
    assert offsets == {(TOPIC, 2): 2}


def test_a_repeated_or_older_version_renders_nothing_but_commits_its_offset():
    rig = Rig()
    rig.decide(rig.message(sku()))
    out, offsets = rig.decide(rig.message(sku()), rig.message(sku(version=2, category="sofas")))
    assert out == {} and offsets == {(TOPIC, 1): 4}
    newer, _ = rig.decide(rig.message(sku(version=4, change_kind="bulk_import")))
    assert len(newer["requests.low"]) == 3 and json.loads(newer["sku.changelog"][0].value) == {"version": 4}


def test_a_backfill_produces_the_latest_version_again_with_the_same_ids_and_headers():
    rig = Rig()
    live, _ = rig.decide(rig.message(sku()))
    headers = [(GENERATION_HEADER, b"backfill-2"), (REPLAY_ID_HEADER, b"r-8"), ("other", b"x")]
    again, _ = rig.decide(rig.message(sku(), headers=headers), rig.message(sku(version=2), headers=headers))
    # the same ids, at low priority (a replay never overtakes live traffic); the older version: nothing
    assert [r.key for r in again["requests.low"]] == [r.key for r in live["requests.high"]]
    assert "requests.high" not in again
    assert all(r.headers == [(REPLAY_ID_HEADER, b"r-8"), (GENERATION_HEADER, b"backfill-2")]
               for r in again["requests.low"])
    assert "sku.changelog" not in again  # the latest version did not change


def test_an_unknown_category_fails_naming_the_sku_with_a_dead_letter():
    rig = Rig()
    msg = rig.message(sku(category="sofas", sku_id="SO-9"))
    out, offsets = rig.decide(msg)
    assert not any(t.startswith("requests.high") for t in out) and "sku.changelog" not in out
    [failed] = out["requests.failed"]
    event = rig.serde.decode("RequestFailed", failed.value)
    assert event["reason_code"] == "invalid_request" and event["tenant"] == "acme" and event["request_id"] is None
    assert "SKU 'SO-9' version 3" in event["reason"] and "unknown category 'sofas'" in event["reason"]
    assert event["stage"] == "sku-connector" and failed.key == b"SO-9"
    [dead] = out["dlq"]
    assert dead.value == msg.value() and dead.key == b"SO-9"
    assert offsets == {(TOPIC, 1): 2}
    again, _ = rig.decide(rig.message(sku(category="chairs", sku_id="SO-9")))
    assert len(again["requests.high"]) == 3  # a refused version was never remembered


def test_undecodable_and_wrongly_keyed_records_fail_alone():
    rig = Rig()
    garbage = FakeMessage(TOPIC, 1, 1, b"\x00garbage", b"k")
    rig.offset = 1
    out, offsets = rig.decide(garbage, rig.message(sku(), key=b"other"), rig.message(sku(sku_id="CH-2")))
    reasons = [rig.serde.decode("RequestFailed", r.value)["reason_code"] for r in out["requests.failed"]]
    assert reasons == ["unknown_schema", "invalid_request"] and len(out["dlq"]) == 2
    assert "key must be its sku_id" in rig.serde.decode("RequestFailed", out["requests.failed"][1].value)["reason"]
    assert len(out["requests.high"]) == 3 and offsets == {(TOPIC, 1): 4}


def test_a_registry_that_does_not_answer_holds_the_partition():
    rig = Rig()
    rig.consumer.assigned = [(TOPIC, 1)]
    real = rig.serde.decode
    calls = []

    def flaky(name, data, topic=None):
        calls.append(name)
        if len(calls) == 2:
            raise RegistryUnavailable("registry down")
        return real(name, data, topic=topic)

    rig.serde.decode = flaky  # type: ignore[method-assign]
    first, second, third = rig.message(sku()), rig.message(sku(sku_id="CH-2")), rig.message(sku(sku_id="CH-3"))
    out, offsets = rig.decide(first, second, third)
    assert offsets == {(TOPIC, 1): 2} and len(out["requests.high"]) == 3  # the first only; the rest is read again
    assert (TOPIC, 1) in rig.consumer.paused and rig.consumer.cursor[(TOPIC, 1)] == 2


def test_a_registry_outage_while_writing_a_refused_events_failure_holds_it():
    rig = Rig()
    rig.consumer.assigned = [(TOPIC, 1)]
    registry_down_for(rig.serde, "RequestFailed")
    good, garbage = rig.message(sku()), FakeMessage(TOPIC, 1, 2, b"\x00not avro", b"CH-9")
    out, offsets = rig.decide(good, garbage)
    assert offsets == {(TOPIC, 1): 2} and len(out["requests.high"]) == 3 and "requests.failed" not in out
    assert (TOPIC, 1) in rig.consumer.paused  # the refused event waits for the registry, like any other


def abort_next_commit(rig: Rig) -> None:
    original = rig.producer.commit_transaction.side_effect

    def once(*args, **kwargs):
        rig.producer.commit_transaction.side_effect = original
        raise kafka_error(abortable=True)

    rig.producer.commit_transaction.side_effect = once


def test_an_abort_rewinds_and_forgets_so_the_events_render_once_after_all():
    rig = Rig()
    events = [sku(), sku(), sku(sku_id="CH-2", version=1), sku(version=2)]  # a repeat and an older version
    for event in events:
        rig.kafka.append(TOPIC, 0, rig.serde.encode("SkuChanged", event), event["sku_id"].encode())
    abort_next_commit(rig)
    runner = threading.Thread(target=rig.connector.run, daemon=True)
    runner.start()
    deadline = time.monotonic() + 10
    while rig.kafka.committed.get((TOPIC, 0)) != len(events) and time.monotonic() < deadline:
        time.sleep(0.01)
    rig.connector.stop()
    runner.join(10)
    assert not runner.is_alive() and rig.kafka.committed[(TOPIC, 0)] == len(events)
    assert rig.producer.abort_transaction.call_count == 1
    assert rig.restores >= 2  # read again from the changelog after the abort: what the aborted batch saw is gone
    requests = [key or b"" for topic, key, _ in rig.kafka.outputs if topic.startswith(f"{PREFIX}.requests.")]
    expected = [request_id_for("acme", s, 3 if s == "CH-1" else 1, v).encode()
                for s in ("CH-1", "CH-2") for v in ("front", "side", "detail")]
    assert sorted(requests) == sorted(expected)  # each once: neither lost with the abort nor doubled
    changelog = {key: json.loads(value or b"") for topic, key, value in rig.kafka.outputs if topic == CHANGELOG}
    assert changelog == {b'["acme","CH-1"]': {"version": 3}, b'["acme","CH-2"]': {"version": 1}}
