"""Publication's decisions, in process: versions, replays, the SKU view, review holds and decisions, unscanned."""
from __future__ import annotations

from typing import Any

import pytest
from confluent_kafka import TopicPartition

from processors.events import image_rendered
from processors.partitioning import home_partition
from processors.publication_state import PublicationState, SkuLatest
from schemas.serde import AvroSerde
from streams.changelog_table import RestoreFailed
from streams.homes import PartitionCountMismatch
from streams.publication import PublicationRelay
from streams.settings import Settings
from streams.submit import build_request
from tests.fake_kafka import FakeKafka, FakeMessage

PREFIX = "tp"


class MemoryState:
    """PublishedState without Kafka: the state starts empty, as for new topics."""

    def __init__(self) -> None:
        self.partitions: dict[int, PublicationState] = {}
        self.sku: dict[int, SkuLatest] = {}

    def of_partition(self, partition: int) -> PublicationState:
        return self.partitions.setdefault(partition, PublicationState())

    def sku_latest(self, partition: int) -> SkuLatest:
        return self.sku.setdefault(partition, SkuLatest())

    def forget(self, partitions=None) -> None:
        self.partitions.clear()
        self.sku.clear()


class Rig:
    def __init__(self) -> None:
        self.serde = AvroSerde()
        settings = Settings(_env_file=None, topic_prefix=PREFIX, output_partitions=3, storage_url="s3://bkt")
        self.relay = PublicationRelay(settings, self.serde)
        self.relay._published = MemoryState()  # type: ignore[assignment]
        self.relay._consumer = FakeKafka().consumer().mock  # three partitions a topic
        self.offset = 0

    def rendered(self, request, *, sha="aa", quality=None, generation="g1", **extra) -> dict:
        images = [{"index": 0, "uri": f"s3://bkt/{sha}.png", "sha256": sha * 32, "seed": 1, "size_bytes": 10}]
        return image_rendered(request=request, images=images, model_id="tiny", model_version=generation,
                              timings_ms={"render": 1.0}, batch_id="b", batch_size=1, worker_id="w",
                              source=("tp.requests.normal", 0, 1), now_ms=1, generation=generation,
                              quality=quality, **extra)

    def message(self, topic: str, value: bytes, key: bytes) -> FakeMessage:
        self.offset += 1
        return FakeMessage(f"{PREFIX}.{topic}", 1, self.offset, value, key)

    def publish(self, *values: dict) -> dict[str, list]:
        msgs = [self.message("rendered", self.serde.encode("ImageRendered", v), v["request_id"].encode())
                for v in values]
        return self.out(msgs)

    def out(self, msgs) -> dict[str, list]:
        records, _offsets = self.relay.publish(msgs)
        by_topic: dict[str, list] = {}
        for r in records:
            by_topic.setdefault(r.topic.removeprefix(f"{PREFIX}."), []).append(r)
        return by_topic

    def decode(self, records, name):
        return [self.serde.decode(name, r.value) for r in records]


def req(home=1, **fields):
    """A request whose id has partition `home` of three as its home (the rig reads on partition 1)."""
    while True:
        request = build_request({"prompt": "a chair", "seed": 1, "tenant": "acme", **fields})
        if home_partition(request["request_id"], 3) == home:
            return request


def test_one_publication_per_generation_and_content_and_new_generations_supersede():
    rig = Rig()
    request = req()
    [first] = rig.decode(rig.publish(rig.rendered(request))["images.ready"], "ImageReady")
    assert (first["version"], first["supersedes"]) == (1, None)
    assert first["safety"] == {"decision": "PASS", "scanned": False, "top_label": None, "top_score": None}
    assert "images.ready" not in rig.publish(rig.rendered(request))  # a replay publishes nothing new
    [second] = rig.decode(rig.publish(rig.rendered(request, sha="bb", generation="g2"))["images.ready"],
                          "ImageReady")
    assert (second["version"], second["supersedes"], second["generation"]) == (2, 1, "g2")


def test_the_sku_view_has_one_writer_per_sku_and_keeps_the_highest_sku_version():
    rig = Rig()
    newer = rig.rendered(req(sku_id="SKU-1"), sha="bb", sku_version=5, view="front")
    older = rig.rendered(req(sku_id="SKU-1"), sha="cc", sku_version=4, view="front")
    published = [rig.publish(event) for event in (newer, older)]
    assert all("images.by-sku" not in out for out in published)  # not where their requests are published...
    [first], [second] = (out["images.by-sku.repartition"] for out in published)
    assert first.key == second.key  # ...but on the one partition of their SKU and view, whoever published them
    [view] = rig.out([rig.message("images.by-sku.repartition", first.value, first.key)])["images.by-sku"]
    assert (view.key, view.value, view.partition) == (first.key, first.value, 1)  # the partition it restores from
    assert rig.decode([view], "ImageReady")[0]["sku_version"] == 5
    # decided later, but an older version of the SKU: the view keeps version 5
    assert rig.out([rig.message("images.by-sku.repartition", second.value, second.key)]) == {}


def test_a_broken_candidate_of_the_sku_view_fails_without_naming_its_published_request():
    rig = Rig()
    out = rig.out([rig.message("images.by-sku.repartition", b"\xc3\x01 not an ImageReady", b"k")])
    assert sorted(out) == ["dlq", "requests.failed"]
    [failed] = rig.decode(out["requests.failed"], "RequestFailed")
    assert failed["request_id"] is None and failed["reason_code"] == "unpublishable"


def test_an_image_below_the_quality_bar_is_held_for_review_then_approved_or_rejected():
    rig = Rig()
    held = rig.rendered(req(), quality={"sharpness": 3.0, "passed": 0.0})
    out = rig.publish(held)
    assert "images.ready" not in out and len(out["review"]) == 1
    assert rig.decode(out["status"], "RequestStatus")[0]["status"] == "in_review"
    item = out["review"][0].value

    def decision(verdict: str) -> FakeMessage:
        event = {"tenant": "acme", "request_id": held["request_id"], "decision": verdict, "reviewer": "ana",
                 "reason": "looks fine" if verdict == "approve" else "too blurry", "rendered": item,
                 "decided_at": 5}
        return rig.message("review.decisions", rig.serde.encode("ReviewDecision", event),
                           held["request_id"].encode())

    approved = rig.out([decision("approve")])
    [ready] = rig.decode(approved["images.ready"], "ImageReady")
    assert ready["request_id"] == held["request_id"] and ready["quality"]["passed"] == 0.0
    other = rig.rendered(req(), quality={"passed": 0.0})
    item = rig.publish(other)["review"][0].value
    held = other
    rejected = rig.out([decision("reject")])
    [failed] = rig.decode(rejected["requests.failed"], "RequestFailed")
    assert failed["reason_code"] == "rejected" and "too blurry" in failed["reason"]
    assert "dlq" not in rejected  # a decision, not a broken record


def test_a_copy_read_off_its_home_partition_is_forwarded_there_and_published_nothing_twice():
    rig = Rig()
    rendered = rig.rendered(req(home=1))
    assert len(rig.publish(rendered)["images.ready"]) == 1
    value = rig.serde.encode("ImageRendered", rendered)
    stray = FakeMessage(f"{PREFIX}.rendered", 0, 9, value, b"another key")  # produced again, placed otherwise
    records, offsets = rig.relay.publish([stray])  # type: ignore[list-item]  # a FakeMessage reads like a Message
    [forward] = records
    assert (forward.topic, forward.partition, forward.key, forward.value) == (
        f"{PREFIX}.rendered", 1, rendered["request_id"].encode(), value)
    assert offsets == {(f"{PREFIX}.rendered", 0): 10}
    assert rig.out([rig.message("rendered", value, forward.key or b"")]) == {}  # its home knew it


def test_a_stray_whose_headers_would_not_fit_its_forward_fails_alone():
    rig = Rig()
    value = rig.serde.encode("ImageRendered", rig.rendered(req(home=1)))
    headers = [("bulk", b"x" * 20_000)]
    stray = FakeMessage(f"{PREFIX}.rendered", 0, 3, value, b"k", headers)
    out = rig.out([stray])
    assert "rendered" not in out and len(out["dlq"]) == 1
    assert rig.decode(out["requests.failed"], "RequestFailed")[0]["reason_code"] == "unpublishable"


def test_a_review_decision_read_off_its_home_partition_is_forwarded_with_it():
    rig = Rig()
    held = rig.rendered(req(home=2), quality={"passed": 0.0})
    event = {"tenant": "acme", "request_id": held["request_id"], "decision": "approve", "reviewer": "ana",
             "reason": None, "rendered": rig.serde.encode("ImageRendered", held), "decided_at": 5}
    decided = rig.message("review.decisions", rig.serde.encode("ReviewDecision", event), b"")
    [forward] = rig.out([decided])["review.decisions"]
    assert (forward.partition, forward.value) == (2, decided.value())


def test_an_unreadable_record_fails_alone():
    rig = Rig()
    good = rig.rendered(req())
    msgs = [rig.message("rendered", b"\x00garbage", b"k"),
            rig.message("rendered", rig.serde.encode("ImageRendered", good), good["request_id"].encode())]
    out = rig.out(msgs)
    assert len(out["images.ready"]) == 1
    assert rig.decode(out["requests.failed"], "RequestFailed")[0]["reason_code"] == "unpublishable"


class Unreadable(MemoryState):
    """Publication state that Kafka cannot give back (a broker restarting)."""

    def of_partition(self, partition: int) -> PublicationState:
        raise RestoreFailed(f"restoring tp.images.ready[{partition}]: Local: Timed out")


def held_by_unreadable_state() -> tuple[Rig, Any, FakeMessage, dict]:
    """A relay whose state cannot be read back, after it decided one ImageRendered: nothing failed, nothing
    committed, its partition held (sought back and paused)."""
    rig = Rig()
    consumer = rig.relay._consumer
    rig.relay._published = Unreadable()  # type: ignore[assignment]
    request = req()
    msg = rig.message("rendered", rig.serde.encode("ImageRendered", rig.rendered(request)), b"k")
    assert rig.relay.publish([msg]) == ([], {})  # type: ignore[list-item]  # a FakeMessage reads like a Message
    return rig, consumer, msg, request


def test_state_that_cannot_be_read_back_holds_the_partition_and_fails_no_record():
    rig, consumer, msg, request = held_by_unreadable_state()
    consumer.seek.assert_called_once()  # read again after a backoff
    rig.relay._published = MemoryState()  # type: ignore[assignment]  # the broker answers again
    rig.relay._held.resume_all(rig.relay._consumer)
    ready = rig.decode(rig.out([msg])["images.ready"], "ImageReady")
    assert [v["request_id"] for v in ready] == [request["request_id"]]


def test_a_partition_revoked_while_held_is_resumed_so_it_does_not_come_back_paused():
    """librdkafka keeps a pause across a revoke and a re-assign: the hold is dropped with the partition, and so
    must the pause be, or the partition's images are never published once it is assigned back."""
    rig, consumer, _msg, _request = held_by_unreadable_state()
    [paused] = consumer.pause.call_args.args[0]
    rig.relay._on_revoke(consumer, [TopicPartition(paused.topic, paused.partition), TopicPartition("tp.rendered", 2)])
    [resumed] = consumer.resume.call_args.args[0]
    assert (resumed.topic, resumed.partition) == (paused.topic, paused.partition)  # only the held one
    assert (paused.topic, paused.partition) not in rig.relay._held


def test_a_restore_that_fails_part_way_is_read_again_whole_not_used_in_part():
    from streams.published_state import PublishedState

    serde = AvroSerde()
    topology = Settings(_env_file=None, topic_prefix=PREFIX, output_partitions=3).topology
    first, second = (image_ready_value(serde, req()) for _ in range(2))
    reads: list[int] = []

    def read(_base, _topic, _partitions, apply) -> None:
        reads.append(1)
        apply(b"k1", first)
        if len(reads) == 1:
            raise RuntimeError("the broker went away part-way")  # as read_to_end's RestoreFailed would
        apply(b"k2", second)

    state = PublishedState({}, topology, serde, 30.0, read=read)
    with pytest.raises(RuntimeError):
        state.of_partition(1)
    assert len(state.of_partition(1)) == 2 and len(reads) == 2


def test_a_failure_of_the_local_state_holds_the_partition_and_forgets_what_it_held():
    from streams.state_store import StateUnavailable

    rig = Rig()
    first, second = req(), req()
    state = rig.relay._published.of_partition(1)

    def apply(ready: dict) -> None:  # the disk fills up while the second is taken in
        if ready["request_id"] == second["request_id"]:
            raise StateUnavailable("the state's database: database or disk is full")
        PublicationState.apply(state, ready)

    state.apply = apply  # type: ignore[method-assign,assignment]
    msgs = [rig.message("rendered", rig.serde.encode("ImageRendered", rig.rendered(r)), r["request_id"].encode())
            for r in (first, second)]
    records, offsets = rig.relay.publish(msgs)  # type: ignore[arg-type]
    ready = [rig.serde.decode("ImageReady", r.value) for r in records if r.topic == f"{PREFIX}.images.ready"]
    assert [r["request_id"] for r in ready] == [first["request_id"]]
    assert offsets == {(f"{PREFIX}.rendered", 1): msgs[0].offset() + 1}  # the second waits: not failed, not lost
    assert (f"{PREFIX}.rendered", 1) in rig.relay._held
    assert rig.relay._published.partitions == {}  # type: ignore[attr-defined]  # what it held is read again from what commits


@pytest.mark.parametrize("on_disk", [False, True], ids=["memory", "disk"])
def test_a_restore_that_fails_part_way_is_read_again_whole_on_either_store(on_disk, tmp_path):
    from streams.published_state import PublishedState
    from streams.state_store import StateStore

    serde = AvroSerde()
    topology = Settings(_env_file=None, topic_prefix=PREFIX, output_partitions=3).topology
    values = [image_ready_value(serde, req()) for _ in range(300)]  # more than wait to be written at once
    reads: list[int] = []

    def read(_base, _topic, partitions, apply) -> None:
        reads.append(1)
        for n, value in enumerate(values if partitions == [1] else values[:1]):
            if len(reads) == 1 and n == 290:
                raise RuntimeError("the broker went away part-way")
            apply(b"k", value)

    store = StateStore(str(tmp_path), cache_mb=1) if on_disk else None
    state = PublishedState({}, topology, serde, 30.0, read=read, store=store)
    with pytest.raises(RuntimeError):
        state.of_partition(1)
    assert len(state.of_partition(1)) == 300 and len(state.of_partition(2)) == 1
    state.forget([1])
    if store is not None:  # a partition given up leaves no rows behind
        assert store.table("published").count(1) == 0 and store.table("published").count(2) == 1
    state.forget()
    assert len(state.of_partition(1)) == 300 and len(reads) == 4


def test_records_that_are_no_image_ready_are_skipped_when_the_state_is_restored():
    from schemas.serde import RegistryUnavailable
    from streams.published_state import PublishedState

    serde = AvroSerde()
    topology = Settings(_env_file=None, topic_prefix=PREFIX, output_partitions=3).topology
    good = [image_ready_value(serde, req()), image_ready_value(serde, req(sku_id="SKU-9", view="front"))]
    hostile = [b"\x00garbage", b"", b"[" * 100_000, serde.encode("RequestStatus", {
        "tenant": "acme", "request_id": "x", "status": "admitted", "stage": "gate", "at": 1, "final": False,
        "generation": None, "detail": None})]

    def read(_base, _topic, _partitions, apply) -> None:
        for value in [*hostile, *good, *hostile]:
            apply(b"k", value)

    state = PublishedState({}, topology, serde, 30.0, read=read)
    assert len(state.of_partition(1)) == 2
    assert len(state.sku_latest(1)) == 1  # the one of a SKU

    class RegistryDown(AvroSerde):
        def decode(self, *_args, **_kwargs):
            raise RegistryUnavailable("the registry does not answer")

    with pytest.raises(RegistryUnavailable):  # an outage is no record's fault: the restore is tried again
        PublishedState({}, topology, RegistryDown(), 30.0, read=read).of_partition(1)


def image_ready_value(serde: AvroSerde, request: dict) -> bytes:
    import time

    from processors.events import image_ready

    rendered = Rig().rendered(request)
    published_at = int(time.time() * 1000)  # within the state's window
    return serde.encode("ImageReady", image_ready(rendered, published_at, version=1, supersedes=None, safety=None))


def test_inputs_not_co_partitioned_with_images_ready_stop_publication():
    rig = Rig()
    rig.relay._consumer = (kafka := FakeKafka()).consumer().mock
    kafka.partition_counts[f"{PREFIX}.images.ready"] = 6
    with pytest.raises(PartitionCountMismatch, match=r"tp\.rendered has 3 partitions and tp\.images\.ready 6"):
        rig.publish(rig.rendered(req()))


def test_an_image_ready_goes_to_the_partition_its_state_is_restored_from():
    rig = Rig()
    [ready] = rig.publish(rig.rendered(req(home=1)))["images.ready"]
    assert ready.partition == 1  # whatever partitioner the producer has


def test_a_record_held_part_way_is_published_when_read_again():
    """The status cannot be encoded the first time (a Schema Registry outage): the record is held before the state
    knows it as published, so reading it again publishes it."""
    from schemas.serde import RegistryUnavailable

    class RegistryDownOnce(AvroSerde):
        down = True

        def encode(self, record_name, value, **kwargs):
            if record_name == "RequestStatus" and self.down:
                self.down = False
                raise RegistryUnavailable("the registry does not answer")
            return super().encode(record_name, value, **kwargs)

    rig = Rig()
    rig.relay._serde = RegistryDownOnce()
    request = req(sku_id="chair-1", view="front", sku_version=3)
    msg = rig.message("rendered", rig.serde.encode("ImageRendered", rig.rendered(request)), b"k")
    assert rig.relay.publish([msg]) == ([], {})  # type: ignore[list-item]  # held, nothing decided
    rig.relay._held.resume_all(rig.relay._consumer)
    out = rig.out([msg])
    assert [v["request_id"] for v in rig.decode(out["images.ready"], "ImageReady")] == [request["request_id"]]
    assert len(out["images.by-sku.repartition"]) == 1


def test_a_sku_candidate_held_while_the_view_cannot_be_read_is_decided_when_read_again():
    from confluent_kafka import KafkaError, KafkaException

    class SkuViewFailsOnce(MemoryState):
        failed = False

        def sku_latest(self, partition: int) -> SkuLatest:
            if not self.failed:
                self.failed = True
                raise KafkaException(KafkaError(KafkaError._TRANSPORT, "the broker went away"))
            return super().sku_latest(partition)

    rig = Rig()
    rig.relay._published = SkuViewFailsOnce()  # type: ignore[assignment]
    [candidate] = rig.publish(rig.rendered(req(sku_id="chair-1", view="front", sku_version=3)))[
        "images.by-sku.repartition"]
    msg = rig.message("images.by-sku.repartition", candidate.value, candidate.key)
    assert rig.relay.publish([msg]) == ([], {})  # type: ignore[list-item]  # held, nothing decided
    rig.relay._held.resume_all(rig.relay._consumer)
    assert len(rig.out([msg])["images.by-sku"]) == 1


def test_what_publication_never_announces_fails_whoever_wrote_it_to_its_input():
    rig = Rig()
    outside = rig.rendered(req())
    outside["images"][0]["uri"] = "file:///etc/passwd"
    other_bucket = rig.rendered(req(), sha="bb")
    other_bucket["images"][0]["uri"] = "s3://someone-elses/bb.png"
    nameless = {**rig.rendered(req(), sha="cc"), "tenant": ""}
    out = rig.publish(outside, other_bucket, nameless)
    assert "images.ready" not in out
    reasons = [f["reason"] for f in rig.decode(out["requests.failed"], "RequestFailed")]
    assert [r.split(":")[0] for r in reasons] == ["ValueError"] * 3
    assert "not in the object store" in reasons[0] and "not in the object store" in reasons[1]
    assert "tenant breaks the request rules" in reasons[2]


def test_a_review_decision_that_no_held_image_can_take_is_refused_without_naming_a_request():
    rig = Rig()
    held = rig.rendered(req(), quality={"passed": 0.0})
    item = rig.publish(held)["review"][0].value

    def decision(**fields) -> FakeMessage:
        event = {"tenant": "acme", "request_id": held["request_id"], "decision": "approve", "reviewer": "eve",
                 "reason": None, "rendered": item, "decided_at": 5, **fields}
        return rig.message("review.decisions", rig.serde.encode("ReviewDecision", event), b"k")

    for forged in (decision(decision="maybe"), decision(tenant="globex"), decision(request_id="someone-else")):
        out = rig.out([forged])
        assert sorted(out) == ["dlq", "requests.failed"]
        [failed] = rig.decode(out["requests.failed"], "RequestFailed")
        assert failed["reason_code"] == "invalid_request" and failed["request_id"] is None
    assert len(rig.out([decision()])["images.ready"]) == 1  # the reviewer's own approval still publishes
