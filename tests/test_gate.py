"""The gate's decisions, in process: routing with lineage, idempotency, moderation, the cache, holds."""
from __future__ import annotations

import json
from unittest.mock import create_autospec

import pytest
import redis
from confluent_kafka import KafkaError, KafkaException

from connectors.redis_store import RedisStore
from processors.admission import PoolInfo, cache_key
from processors.partitioning import FORWARDED_FROM_HEADER, home_partition
from schemas.serde import AvroSerde
from streams.failures import Origin
from streams.gate import Gate
from streams.gate_state import AdmittedKeys
from streams.homes import PartitionCountMismatch
from streams.settings import Settings
from streams.submit import build_request
from tests.fake_kafka import FakeKafka, FakeMessage

PREFIX = "tg"
POOL = PoolInfo("turbo", "z-image-turbo", "tiny", "tiny-v1+fp32-cpu", max_side=1024, size_multiple=16)


class Pools:
    def __init__(self, pools):
        self.pools = pools

    def refresh(self, timeout_s=0.0):
        return False


def moderate(items):
    return [("block", "rule:violence/en") if "gore" in prompt else ("allow", None) for prompt, _neg, _t in items]


class Rig:
    def __init__(self, cache=None, pools=None):
        self.serde = AvroSerde()
        self.kafka = FakeKafka()
        self.consumer = self.kafka.consumer()
        self.settings = Settings(_env_file=None, topic_prefix=PREFIX, request_partitions=3, output_partitions=3,
                                 worker_id="g1", storage_url="s3://bkt")
        self.gate = Gate(self.settings, self.serde, moderate=moderate, cache=cache)
        self.gate._consumer = self.consumer.mock
        self.gate._admitted = AdmittedKeys({}, self.settings.topology.gate_changelog, restore=lambda p: {})
        self.gate._pools = Pools({"turbo": POOL} if pools is None else pools)  # type: ignore[assignment]
        self.offset = 0

    def message(self, request, priority="normal", partition=1, headers=()):
        value = self.serde.encode("GenerationRequest", request)
        self.offset += 1
        return FakeMessage(f"{PREFIX}.requests.{priority}", partition, self.offset, value,
                           request["request_id"].encode(), list(headers))

    def decode_all(self, records, name):
        return [self.serde.decode(name, r.value) for r in records]

    def decide(self, *messages):
        records, offsets = self.gate.decide(list(messages))
        by_topic: dict[str, list] = {}
        for r in records:
            by_topic.setdefault(r.topic.removeprefix(f"{PREFIX}."), []).append(r)
        return by_topic, offsets


def req(home=1, **fields):
    """A request whose id has partition `home` of the rig's three as its home (where the gate decides it)."""
    while True:
        request = build_request({"prompt": "a red chair", "seed": 5, "width": 64, "height": 64, "steps": 2,
                                 "tenant": "acme", **fields})
        if home_partition(request["request_id"], 3) == home:
            return request


def test_a_valid_request_is_routed_to_its_pool_with_its_lineage_and_generation():
    rig = Rig()
    request = req(home=2, priority="high")
    out, offsets = rig.decide(rig.message(request, "high", partition=2))
    [routed] = out["render.turbo.high"]
    value = rig.serde.decode("GenerationRequest", routed.value)
    assert value["request_id"] == request["request_id"] and routed.key == value["admission"]["cache_key"].encode()
    assert value["admission"]["source_topic"] == f"{PREFIX}.requests.high"
    assert (value["admission"]["source_partition"], value["admission"]["source_offset"]) == (2, 1)
    assert value["admission"]["generation"] == POOL.model_version
    assert value["admission"]["cache_key"] == cache_key(request, POOL.model_version)
    [changelog] = out["gate.changelog"]
    assert changelog.partition == 2  # beside the partition it was read from
    [status] = out["status"]
    assert rig.serde.decode("RequestStatus", status.value)["status"] == "admitted"
    assert offsets == {(f"{PREFIX}.requests.high", 2): 2}


def test_a_repeat_within_a_generation_is_not_rendered_again():
    rig = Rig()
    request = req()
    first, _ = rig.decide(rig.message(request))
    again, _ = rig.decide(rig.message(request), rig.message(dict(request)))
    assert "render.turbo.normal" in first and "render.turbo.normal" not in again
    statuses = [rig.serde.decode("RequestStatus", r.value)["status"] for r in again["status"]]
    assert statuses == ["duplicate", "duplicate"]
    other_tenant, _ = rig.decide(rig.message({**request, "tenant": "globex"}))
    assert "render.turbo.normal" in other_tenant  # the key is (tenant, request_id, generation)


def test_a_new_generation_is_rendered_again():
    rig = Rig()
    request = req()
    rig.decide(rig.message(request))
    rig.gate._pools = Pools({"turbo": PoolInfo("turbo", "z-image-turbo", "tiny", "tiny-v2+fp32-cpu", 1024, 16)})  # type: ignore[assignment]
    out, _ = rig.decide(rig.message(request))
    [routed] = out["render.turbo.normal"]
    assert rig.serde.decode("GenerationRequest", routed.value)["admission"]["generation"] == "tiny-v2+fp32-cpu"


def test_a_blocked_prompt_never_reaches_a_render_topic():
    rig = Rig()
    out, offsets = rig.decide(rig.message(req(prompt="a scene full of gore")))
    assert not any(topic.startswith("render.") for topic in out)
    [failed] = out["requests.failed"]
    event = rig.serde.decode("RequestFailed", failed.value)
    assert event["reason_code"] == "blocked" and "rule:violence/en" in event["reason"]
    assert offsets  # its offset commits: the request has its outcome


def test_a_cache_hit_is_answered_without_a_render_and_never_across_tenants():
    request = req()
    key = cache_key(request, POOL.model_version)
    entry = {"model_id": "tiny", "images": [{"index": 0, "uri": "s3://bkt/images/acme-x/ab/ab.png",
                                             "sha256": "ab" * 32, "seed": 5, "size_bytes": 10}]}
    client = create_autospec(redis.Redis, instance=True)
    client.mget.side_effect = lambda keys: [json.dumps(entry).encode() if k == f"zimage:{PREFIX}:cache:{key}" else None
                                            for k in keys]
    rig = Rig(cache=RedisStore("redis://unused", client=client))
    out, _ = rig.decide(rig.message(request))
    assert "render.turbo.normal" not in out
    [rendered] = out["rendered"]
    event = rig.serde.decode("ImageRendered", rendered.value)
    assert event["images"][0]["sha256"] == "ab" * 32 and event["worker_id"] == "gate"
    assert event["source"]["topic"] == f"{PREFIX}.requests.normal"
    out, _ = rig.decide(rig.message({**request, "tenant": "globex", "request_id": "other"}))
    assert "render.turbo.normal" in out  # another tenant's identical request is rendered


def test_redis_is_asked_once_per_batch_and_a_hit_among_misses_is_answered():
    hit, misses = req(), [req(seed=100 + i) for i in range(3)]
    entry = {"model_id": "tiny", "images": [{"index": 0, "uri": "s3://bkt/images/acme-x/ab/ab.png",
                                             "sha256": "ab" * 32, "seed": 5, "size_bytes": 10}]}
    stored = f"zimage:{PREFIX}:cache:{cache_key(hit, POOL.model_version)}"
    client = create_autospec(redis.Redis, instance=True)
    client.mget.side_effect = lambda keys: [json.dumps(entry).encode() if k == stored else None for k in keys]
    rig = Rig(cache=RedisStore("redis://unused", client=client))
    out, _ = rig.decide(*[rig.message(r) for r in [misses[0], hit, *misses[1:]]])
    [call] = client.mget.call_args_list  # cancellation marks and cache entries together: one round trip
    assert sum(":cache:" in k for k in call.args[0]) == 4 and sum(":cancel:" in k for k in call.args[0]) == 4
    assert len(out["render.turbo.normal"]) == 3
    [rendered] = out["rendered"]
    assert rig.serde.decode("ImageRendered", rendered.value)["request_id"] == hit["request_id"]


def test_redis_down_means_no_cache_never_a_failed_request():
    client = create_autospec(redis.Redis, instance=True)
    client.mget.side_effect = redis.ConnectionError("connection refused")
    cache = RedisStore("redis://unused", client=client)
    rig = Rig(cache=cache)
    out, _ = rig.decide(rig.message(req()), rig.message(req()))
    assert len(out["render.turbo.normal"]) == 2 and "requests.failed" not in out
    assert cache.failures == 1  # asked once, then left alone for a while: no timeout per request


def test_a_pool_that_has_not_announced_holds_the_partition():
    rig = Rig(pools={})
    m1, m2 = rig.message(req()), rig.message(req())
    out, offsets = rig.decide(m1, m2)
    assert out == {} and offsets == {}
    rig.consumer.mock.seek.assert_called_once()
    assert rig.consumer.mock.seek.call_args.args[0].offset == m1.offset()
    assert (f"{PREFIX}.requests.normal", 1) in rig.consumer.paused


@pytest.mark.parametrize(("change", "code"), [({"width": 0}, "invalid_request"), ({"model": "nope"}, "unknown_model"),
                                              ({"width": 2048, "height": 2048}, "invalid_request")])
def test_refused_requests_fail_with_a_dead_letter(change, code):
    rig = Rig()
    out, _ = rig.decide(rig.message(req(**change)))
    [failed] = out["requests.failed"]
    assert rig.serde.decode("RequestFailed", failed.value)["reason_code"] == code
    assert len(out["dlq"]) == 1 and not any(t.startswith("render.") for t in out)


def test_a_batch_is_routed_most_urgent_first_keeping_each_partitions_order():
    rig = Rig()
    low, normal, high1, high2 = req(priority="low"), req(priority="normal"), req(priority="high"), req(priority="high")
    msgs = [rig.message(low, "low"), rig.message(high1, "high"), rig.message(normal, "normal"),
            rig.message(high2, "high")]
    records, _ = rig.gate.decide(msgs)
    routed = [rig.serde.decode("GenerationRequest", r.value)["request_id"] for r in records
              if r.topic.startswith(f"{PREFIX}.render.")]
    assert routed == [high1["request_id"], high2["request_id"], normal["request_id"], low["request_id"]]


@pytest.mark.parametrize("entry", [
    b"not json", b"[]", b'{"model_id": "tiny", "images": [{"uri": "x"}]}', b"[" * 100_000,
    b'{"model_id": "m", "images": [{"index": "x", "uri": 1, "sha256": 2, "seed": 3, "size_bytes": 4}]}'])
def test_an_unreadable_cache_entry_is_a_miss_not_a_failure(entry):
    client = create_autospec(redis.Redis, instance=True)
    client.mget.side_effect = lambda keys: [entry for _ in keys]
    rig = Rig(cache=RedisStore("redis://unused", client=client))
    out, _ = rig.decide(rig.message(req()))
    assert len(out["render.turbo.normal"]) == 1 and "requests.failed" not in out


def test_an_unexpected_error_after_the_checks_fails_that_request_alone():
    rig = Rig()
    bad, good = req(), req()
    encode = rig.serde.encode

    def flaky(name, value, **kwargs):
        if name == "GenerationRequest" and value.get("request_id") == bad["request_id"]:
            raise RuntimeError("boom")
        return encode(name, value, **kwargs)

    m1, m2 = rig.message(bad), rig.message(good)
    rig.serde.encode = flaky  # type: ignore[method-assign,assignment]  # an encode that fails once
    out, offsets = rig.decide(m1, m2)
    [failed] = [rig.serde.decode("RequestFailed", r.value) for r in out["requests.failed"]]
    assert failed["reason_code"] == "internal_error" and failed["request_id"] == bad["request_id"]
    assert len(out["render.turbo.normal"]) == 1 and len(out["dlq"]) == 1
    assert offsets == {(f"{PREFIX}.requests.normal", 1): m2.offset() + 1}
    assert [r.key for r in out["gate.changelog"]] == [records_key(rig, good)]  # only what was admitted is kept

    rig.serde.encode = encode  # type: ignore[method-assign]
    again, _ = rig.decide(rig.message(bad))  # sent again: rendered, not taken for a duplicate of the failure
    assert len(again["render.turbo.normal"]) == 1 and "requests.failed" not in again


def records_key(rig, request: dict) -> bytes:
    from processors.admission import idempotency_key

    generation = rig.gate._pools.pools["turbo"].model_version
    return idempotency_key(request["tenant"], request["request_id"], generation).encode()


def test_generation_covers_the_template_version_and_the_generation_a_backfill_asks_for() -> None:
    from processors.admission import generation_of

    plain = {"template_version": None}
    assert generation_of(plain, "m@1") == "m@1"
    assert generation_of({"template_version": "chairs@3"}, "m@1") == "m@1+template.chairs@3"
    assert generation_of({"template_version": "chairs@3"}, "m@1", "backfill-2") == "m@1+template.chairs@3+backfill-2"
    assert len({generation_of(plain, "m@1"), generation_of(plain, "m@2"), generation_of(plain, "m@1", "b")}) == 3


def test_a_hostile_replay_header_is_ignored_not_trusted() -> None:
    from processors.admission import REPLAY_ID_HEADER, header_text

    assert header_text([(REPLAY_ID_HEADER, b"replay-1")], REPLAY_ID_HEADER) == "replay-1"
    assert header_text([(REPLAY_ID_HEADER, b"a\x1b[31mred")], REPLAY_ID_HEADER) is None
    assert header_text([(REPLAY_ID_HEADER, b"\xff\xfe")], REPLAY_ID_HEADER) is None
    assert header_text([(REPLAY_ID_HEADER, b"x" * 500)], REPLAY_ID_HEADER) is None
    assert header_text([("other", b"v")], REPLAY_ID_HEADER) is None
    assert header_text(None, REPLAY_ID_HEADER) is None


def test_a_request_cancelled_while_queued_is_failed_not_routed_and_a_repeat_changes_nothing():
    from connectors.redis_store import cancel_entry_key

    cancelled, kept = req(), req()
    client = create_autospec(redis.Redis, instance=True)
    marked = cancel_entry_key(PREFIX, "acme", cancelled["request_id"])
    client.mget.side_effect = lambda keys: [b"cancelled" if k == marked else None for k in keys]
    rig = Rig(cache=RedisStore("redis://unused", client=client))
    out, offsets = rig.decide(rig.message(cancelled), rig.message(kept))
    [routed] = out["render.turbo.normal"]
    assert rig.serde.decode("GenerationRequest", routed.value)["request_id"] == kept["request_id"]
    [failed] = out["requests.failed"]
    event = rig.serde.decode("RequestFailed", failed.value)
    assert (event["request_id"], event["reason_code"]) == (cancelled["request_id"], "cancelled")
    assert "dlq" not in out and offsets  # asked for, not broken: no dead letter; the offset moves on
    out, _ = rig.decide(rig.message(cancelled))
    assert "requests.failed" not in out  # a repeat of a cancelled request fails nothing twice


def test_a_partition_revoked_while_held_is_read_again_once_assigned_back():
    """librdkafka keeps a pause across a revoke and a re-assign: a partition held when a rebalance took it (a gate
    just restarted, its pools not read yet) must come back unpaused, or its requests are never routed."""
    rig = Rig(pools={})
    tp = (f"{PREFIX}.requests.normal", 1)
    request = req()
    rig.kafka.append(*tp, rig.serde.encode("GenerationRequest", request), request["request_id"].encode())
    rig.gate._subscribe()
    [held] = rig.consumer.mock.consume(10, timeout=0)
    assert rig.decide(held) == ({}, {}) and tp in rig.consumer.paused
    rig.consumer.revoke([tp])  # the group rebalances before the hold is due
    rig.consumer.assign([tp])
    rig.gate._pools = Pools({"turbo": POOL})  # type: ignore[assignment]
    [again] = rig.consumer.mock.consume(10, timeout=0)
    out, offsets = rig.decide(again)
    [routed] = out["render.turbo.normal"]
    assert rig.serde.decode("GenerationRequest", routed.value)["request_id"] == request["request_id"]
    assert offsets == {tp: again.offset() + 1}


def test_a_request_read_off_its_home_partition_is_forwarded_there_unchanged_and_decided_nowhere_else():
    rig = Rig()
    request = req(home=2)
    stray = rig.message(request, partition=0, headers=[("trace", b"t-1")])
    out, offsets = rig.decide(stray)
    [forward] = out["requests.normal"]
    assert set(out) == {"requests.normal"}  # no route, no changelog, no status: its home decides it
    assert (forward.partition, forward.key, forward.value) == (2, request["request_id"].encode(), stray.value())
    assert forward.timestamp == stray.timestamp()[1]
    assert forward.headers == [("trace", b"t-1"), (FORWARDED_FROM_HEADER, f"{PREFIX}.requests.normal/0/1".encode())]
    assert offsets == {(f"{PREFIX}.requests.normal", 0): stray.offset() + 1}


def test_copies_of_a_request_produced_to_any_partitions_render_once_with_the_lineage_of_the_first():
    rig = Rig()
    request = req(home=2)
    out, _ = rig.decide(rig.message(request, partition=0))
    [forward] = out["requests.normal"]
    arrived = FakeMessage(forward.topic, 2, 7, forward.value, forward.key, forward.headers)
    at_home, _ = rig.decide(arrived)
    [routed] = at_home["render.turbo.normal"]
    admitted = rig.serde.decode("GenerationRequest", routed.value)["admission"]
    assert (admitted["source_partition"], admitted["source_offset"]) == (0, 1)  # where it was produced
    again, _ = rig.decide(rig.message(request, partition=1))
    copy = again["requests.normal"][0]
    repeat, _ = rig.decide(FakeMessage(copy.topic, 2, 8, copy.value, copy.key, copy.headers))
    assert "render.turbo.normal" not in repeat
    assert [rig.serde.decode("RequestStatus", r.value)["status"] for r in repeat["status"]] == ["duplicate"]


@pytest.mark.parametrize("named", [b"elsewhere.requests.normal/0/1", b"tg.requests.normal/x/1", b"\x00", b"/1/2"])
def test_a_forwarded_from_header_that_names_no_position_of_the_topic_is_ignored(named):
    rig = Rig()
    request = req(home=1)
    out, _ = rig.decide(rig.message(request, partition=1, headers=[(FORWARDED_FROM_HEADER, named)]))
    [routed] = out["render.turbo.normal"]
    admitted = rig.serde.decode("GenerationRequest", routed.value)["admission"]
    assert (admitted["source_partition"], admitted["source_offset"]) == (1, rig.offset)  # where the gate read it


def test_a_refused_request_fails_where_it_was_read_and_is_not_forwarded():
    rig = Rig()
    out, _ = rig.decide(rig.message(req(home=2, width=0), partition=0))
    assert "requests.normal" not in out and len(out["requests.failed"]) == 1


def test_partition_counts_that_cannot_be_read_hold_the_partitions_and_fail_nothing():
    rig = Rig()
    rig.consumer.mock.list_topics.side_effect = KafkaException(KafkaError(KafkaError._TRANSPORT))
    message, *others = [rig.message(req(home=p), partition=p) for p in (1, 0, 2)]
    assert rig.decide(message, *others) == ({}, {})
    assert rig.consumer.mock.seek.call_args_list[0].args[0].offset == message.offset()
    assert rig.consumer.mock.seek.call_count == 3  # each partition held
    assert rig.consumer.mock.list_topics.call_count == 1  # asked once for the batch, not once per record
    rig.consumer.mock.list_topics.side_effect = rig.consumer._list_topics  # the broker answers again
    rig.gate._on_assign(rig.consumer.mock, [])  # a new assignment asks at once (else: a second after the failure)
    rig.gate._held.resume_all(rig.consumer.mock)  # the hold's backoff is over
    out, offsets = rig.decide(message)
    assert "render.turbo.normal" in out and offsets == {(message.topic(), 1): message.offset() + 1}


@pytest.mark.parametrize("partition", [1, 0])  # at its home, and where it would be forwarded from
def test_a_request_whose_headers_would_not_fit_on_its_outputs_fails_alone(partition):
    rig = Rig()
    bulky, fine = req(home=1), req(home=1)
    headers = [(f"h{i}", b"x" * 2000) for i in range(9)]  # over the 16 KiB that travel with a request
    out, offsets = rig.decide(rig.message(bulky, partition=partition, headers=headers),
                              rig.message(fine, partition=partition))
    [failed] = rig.decode_all(out["requests.failed"], "RequestFailed")
    assert (failed["request_id"], failed["reason_code"]) == (bulky["request_id"], "invalid_request")
    assert "headers hold" in failed["reason"] and len(out["dlq"]) == 1
    moved_on = out["render.turbo.normal"] if partition == 1 else out["requests.normal"]
    assert len(moved_on) == 1 and offsets == {(f"{PREFIX}.requests.normal", partition): rig.offset + 1}


def test_inputs_not_co_partitioned_with_the_changelog_stop_the_gate_deciding_nothing():
    rig = Rig()
    rig.kafka.partition_counts[f"{PREFIX}.requests.low"] = 6  # partitions added to one request topic only
    assert "render.turbo.normal" in rig.decide(rig.message(req()))[0]
    with pytest.raises(PartitionCountMismatch, match=r"requests\.low has 6 partitions and tg\.gate\.changelog 3"):
        rig.decide(rig.message(req(), "low"))


def test_headers_just_under_the_cap_are_admitted_at_home_after_their_forward():
    rig = Rig()
    request = req(home=2)
    headers = [("trace", b"x" * (16384 - 8 - len("trace") - 8 - 1))]  # 16,383 bytes counted: under the cap
    out, _ = rig.decide(rig.message(request, partition=0, headers=headers))
    [forward] = out["requests.normal"]
    at_home, _ = rig.decide(FakeMessage(forward.topic, 2, 5, forward.value, forward.key, forward.headers))
    assert "render.turbo.normal" in at_home and "requests.failed" not in at_home


def test_many_forwarded_from_headers_count_against_the_cap_all_but_one():
    rig = Rig()
    headers = [("zimage-forwarded-from", b"tg.requests.normal/0/1")] * 600  # ~600 x 50 bytes
    out, _ = rig.decide(rig.message(req(home=1), partition=1, headers=headers))
    [failed] = rig.decode_all(out["requests.failed"], "RequestFailed")
    assert failed["reason_code"] == "invalid_request" and "headers hold" in failed["reason"]


def test_a_pool_announcement_that_would_fail_its_pool_is_ignored_and_the_last_good_one_stands():
    from confluent_kafka import Consumer

    from schemas.serde import RegistryUnavailable
    from streams.gate_state import PoolDirectory
    from tests.fake_kafka import FakeMessage

    serde = AvroSerde()
    good, later = POOL.announcement("w1", 1), {**POOL.announcement("w2", 2), "model_version": "tiny-v2"}
    hostile = [{**good, "size_multiple": 0}, {**good, "max_side": -1}, {**good, "model_version": ""}]
    consumer = create_autospec(Consumer, instance=True)
    messages = [FakeMessage("tg.pools", 0, n, serde.encode("PoolAnnouncement", event))
                for n, event in enumerate([good, *hostile])]
    consumer.consume.side_effect = [messages, [FakeMessage("tg.pools", 0, 9, serde.encode("PoolAnnouncement", later))],
                                    [FakeMessage("tg.pools", 0, 9, serde.encode("PoolAnnouncement", later))]]
    pools = PoolDirectory({}, "tg.pools", serde, consumer=consumer)
    assert pools.refresh() and pools.pools == {"turbo": POOL}

    class RegistryDown(AvroSerde):
        def decode(self, *_args, **_kwargs):
            raise RegistryUnavailable("the registry does not answer")

    pools._serde = RegistryDown()  # an outage: the announcement is read again later, not skipped
    assert not pools.refresh() and pools.pools == {"turbo": POOL}
    [seek] = consumer.seek.call_args_list
    assert seek.args[0].offset == 9
    pools._serde = serde
    assert pools.refresh() and pools.pools["turbo"].model_version == "tiny-v2"


def test_a_registry_outage_while_writing_a_failure_holds_that_partition_only():
    from tests.fake_kafka import registry_down_for

    rig = Rig()
    registry_down_for(rig.serde, "RequestFailed")
    garbage = FakeMessage(f"{PREFIX}.requests.normal", 1, 40, b"\x00not avro", b"k")
    good = rig.message(req(home=2), partition=2)
    out, offsets = rig.decide(garbage, good)
    assert len(out["render.turbo.normal"]) == 1 and "requests.failed" not in out
    assert offsets == {(f"{PREFIX}.requests.normal", 2): good.offset() + 1}
    assert (f"{PREFIX}.requests.normal", 1) in rig.consumer.paused  # held at the record, read again later


def test_only_requests_whose_fate_moderation_decides_are_sent_to_the_moderators():
    """A cloud moderator is paid by the call: a repeat, a cancelled request and one past its deadline end
    without asking it, and nothing reaches a render topic unmoderated."""
    from connectors.redis_store import cancel_entry_key

    asked: list[str] = []

    def counting(items):
        asked.extend(prompt for prompt, _neg, _tenant in items)
        return moderate(items)

    cancelled, fresh, repeat = req(prompt="cancelled"), req(prompt="fresh"), req(prompt="repeat")
    expired = req(prompt="expired", deadline=1)
    client = create_autospec(redis.Redis, instance=True)
    marked = cancel_entry_key(PREFIX, "acme", cancelled["request_id"])
    client.mget.side_effect = lambda keys: [b"cancelled" if k == marked else None for k in keys]
    rig = Rig(cache=RedisStore("redis://unused", client=client))
    rig.gate._moderate = counting
    rig.decide(rig.message(repeat))
    asked.clear()
    out, _ = rig.decide(*(rig.message(r) for r in (cancelled, fresh, repeat, expired)))
    assert asked == ["fresh"]
    routed = [rig.serde.decode("GenerationRequest", r.value)["prompt"] for r in out["render.turbo.normal"]]
    assert routed == ["fresh"]
    # a request not asked with its batch that still reaches routing is moderated alone first
    gory = req(prompt="a scene full of gore")
    outcome = rig.gate._outcome(Origin.of(rig.message(gory)), gory, POOL, "g", "k", None, False, 1)
    assert [r.topic.removeprefix(f"{PREFIX}.") for r in outcome] == ["requests.failed", "status"]
    assert asked[-1] == "a scene full of gore"


def test_a_cache_entry_whose_images_lie_outside_the_object_store_is_a_miss():
    request = req()
    entry = {"model_id": "tiny", "images": [{"index": 0, "uri": "file:///etc/passwd", "sha256": "ab" * 32,
                                             "seed": 5, "size_bytes": 10}]}
    client = create_autospec(redis.Redis, instance=True)
    client.mget.side_effect = lambda keys: [json.dumps(entry).encode() if ":cache:" in k else None for k in keys]
    rig = Rig(cache=RedisStore("redis://unused", client=client))
    out, _ = rig.decide(rig.message(request))
    assert len(out["render.turbo.normal"]) == 1 and "rendered" not in out


def test_state_that_cannot_be_read_or_written_holds_its_partition_and_is_read_again(tmp_path):
    from streams.changelog_table import RestoreFailed
    from streams.state_store import DiskMapping, StateStore

    rig = Rig()
    broker_away = [True]

    def restore(partition: int):  # partition 1's changelog cannot be read while the broker is away
        if partition == 1 and broker_away[0]:
            raise RestoreFailed("restoring tp.gate.changelog[1]: Local: Timed out")
        return {}

    rig.gate._admitted = AdmittedKeys({}, rig.settings.topology.gate_changelog, restore=restore)
    stuck, fine = rig.message(req(home=1), partition=1), rig.message(req(home=2), partition=2)
    out, offsets = rig.decide(stuck, fine)
    assert len(out["render.turbo.normal"]) == 1 and "requests.failed" not in out  # held: not failed, not lost
    assert offsets == {(f"{PREFIX}.requests.normal", 2): fine.offset() + 1}
    assert (f"{PREFIX}.requests.normal", 1) in rig.gate._held
    broker_away[0] = False
    rig.gate._held.resume_all(rig.consumer.mock)  # the hold's backoff is over
    out, offsets = rig.decide(stuck)  # read again
    assert len(out["render.turbo.normal"]) == 1 and offsets == {(f"{PREFIX}.requests.normal", 1): stuck.offset() + 1}

    store = StateStore(str(tmp_path), cache_mb=1)  # now on disk, and the disk fails while a key is admitted
    rig.gate._admitted = AdmittedKeys({}, rig.settings.topology.gate_changelog, store=store,
                                      read=lambda _base, _topic, _partitions, _apply: None)
    broken = rig.message(req(home=1), partition=1)
    table = rig.gate._admitted._load(1)
    assert isinstance(table, DiskMapping)
    store.close()
    out, offsets = rig.decide(broken)
    assert "render.turbo.normal" not in out and "requests.failed" not in out and offsets == {}
    assert rig.gate._admitted.loaded() == []  # what it may have kept of the key is forgotten, to be read again
