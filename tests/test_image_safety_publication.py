"""Publication with the image safety check, in process: a scripted detector, a local object store, no broker.

PASS publishes with the verdict in ImageReady.safety; REVIEW holds the image for a person; BLOCK fails the request
as `unsafe` and quarantines its objects; a detector outage holds the partition (nothing committed for it, no dead
letter) until the detector answers; cached answers are not scanned again."""
from __future__ import annotations

from confluent_kafka import TopicPartition

from connectors.storage import LocalObjectStore
from processors.events import image_rendered
from schemas.moderation import ImageVerdict
from schemas.serde import AvroSerde
from streams import metrics
from streams.image_safety import ImageSafety
from streams.publication import PublicationRelay
from streams.settings import Settings
from tests.fake_kafka import FakeKafka, FakeMessage
from tests.test_publication import PREFIX, MemoryState, req


class Detector:
    """Answers by image bytes; `down` makes every call a timeout until it is cleared."""

    def __init__(self, answers: dict[bytes, dict[str, float]]) -> None:
        self.answers, self.down, self.calls = answers, False, 0

    def check_image(self, data: bytes, tenant: str) -> ImageVerdict:
        self.calls += 1
        if self.down:
            return ImageVerdict({}, (), "fake", failure="timeout", failure_action="review")
        return ImageVerdict(self.answers[data], (), "fake")


class Rig:
    def __init__(self, tmp_path, answers: dict[bytes, dict[str, float]], **safety_options) -> None:
        self.serde = AvroSerde()
        self.store = LocalObjectStore(tmp_path / "objects")
        self.detector = Detector(answers)
        settings = Settings(_env_file=None, topic_prefix=PREFIX, output_partitions=3,
                            storage_url=str(tmp_path / "objects"))
        self.safety = ImageSafety(self.detector, self.store, **safety_options)
        self.relay = PublicationRelay(settings, self.serde, safety=self.safety)
        self.relay._published = MemoryState()  # type: ignore[assignment]
        self.consumer = FakeKafka().consumer().mock  # three partitions a topic
        self.relay._consumer = self.consumer
        self.offset = 0

    def rendered(self, prompt: str, data: bytes, home: int = 1, **extra) -> dict:
        key = f"acme/{data.hex()}.png"
        images = [{"index": 0, "uri": self.store.put(key, data), "sha256": data.hex().ljust(64, "0")[:64],
                   "seed": 1, "size_bytes": len(data)}]
        return image_rendered(request=req(prompt=prompt, home=home), images=images, model_id="tiny", model_version="g1",
                              timings_ms={"render": 1.0}, batch_id="b", batch_size=1, worker_id="w",
                              source=("tp.requests.normal", 0, 1), now_ms=1, generation="g1", **extra)

    def message(self, topic: str, value: bytes, key: bytes, partition: int = 1) -> FakeMessage:
        self.offset += 1
        return FakeMessage(f"{PREFIX}.{topic}", partition, self.offset, value, key)

    def publish(self, *values: dict, partition: int = 1) -> tuple[dict[str, list], dict]:
        msgs = [self.message("rendered", self.serde.encode("ImageRendered", v), v["request_id"].encode(), partition)
                for v in values]
        return self.out(msgs)

    def out(self, msgs) -> tuple[dict[str, list], dict]:
        records, offsets = self.relay.publish(msgs)
        by_topic: dict[str, list] = {}
        for r in records:
            by_topic.setdefault(r.topic.removeprefix(f"{PREFIX}."), []).append(r)
        return by_topic, offsets

    def decode(self, records, name):
        return [self.serde.decode(name, r.value) for r in records]


def count(verdict: str) -> float:
    return metrics.SAFETY.labels(verdict)._value.get()


def test_pass_review_and_block_in_one_batch(tmp_path) -> None:
    rig = Rig(tmp_path, {b"chair": {"nudity": 0.01}, b"beach": {"nudity": 0.6}, b"nude": {"nudity": 0.97}})
    clean, flagged, unsafe = (rig.rendered(p, d) for p, d in [("a chair", b"chair"), ("a beach", b"beach"),
                                                               ("nude", b"nude")])
    before = {v: count(v) for v in ("pass", "review", "block")}
    out, offsets = rig.publish(clean, flagged, unsafe)

    [ready] = rig.decode(out["images.ready"], "ImageReady")
    assert ready["request_id"] == clean["request_id"]
    assert ready["safety"] == {"decision": "PASS", "scanned": True, "top_label": "nudity", "top_score": 0.01}

    [held] = rig.decode(out["review"], "ImageRendered")
    assert held["request_id"] == flagged["request_id"]
    statuses = {s["request_id"]: s for s in rig.decode(out["status"], "RequestStatus")}
    assert statuses[flagged["request_id"]]["status"] == "in_review"
    assert "image safety REVIEW: nudity 0.600" in statuses[flagged["request_id"]]["detail"]

    [failed] = rig.decode(out["requests.failed"], "RequestFailed")
    assert (failed["request_id"], failed["reason_code"]) == (unsafe["request_id"], "unsafe")
    assert "nudity 0.970" in failed["reason"] and "quarantine/" in failed["reason"]
    assert "dlq" not in out  # a verdict, not a broken record
    key = f"acme/{b'nude'.hex()}.png"
    assert not rig.store.exists(key) and rig.store.get(f"quarantine/{key}") == b"nude"

    assert offsets == {(f"{PREFIX}.rendered", 1): rig.offset + 1}
    assert {v: count(v) - before[v] for v in before} == {"pass": 1, "review": 1, "block": 1}


def test_an_approved_review_item_is_published_with_its_verdict(tmp_path) -> None:
    rig = Rig(tmp_path, {b"beach": {"nudity": 0.6}})
    flagged = rig.rendered("a beach", b"beach")
    out, _ = rig.publish(flagged)
    event = {"tenant": "acme", "request_id": flagged["request_id"], "decision": "approve", "reviewer": "ana",
             "reason": "a swimsuit", "rendered": out["review"][0].value, "decided_at": 5}
    approved, _ = rig.out([rig.message("review.decisions", rig.serde.encode("ReviewDecision", event),
                                       flagged["request_id"].encode())])
    [ready] = rig.decode(approved["images.ready"], "ImageReady")
    assert ready["request_id"] == flagged["request_id"]
    assert ready["safety"]["decision"] == "REVIEW" and ready["safety"]["scanned"] is True  # a person approved it


def test_a_detector_outage_holds_the_partition_then_the_answer_publishes(tmp_path) -> None:
    rig = Rig(tmp_path, {b"chair": {"nudity": 0.01}, b"lamp": {"nudity": 0.02}})
    first, second = rig.rendered("a chair", b"chair"), rig.rendered("a lamp", b"lamp")
    other = rig.rendered("a lamp on partition 2", b"lamp", home=2)
    rig.detector.down = True
    msgs = [rig.message("rendered", rig.serde.encode("ImageRendered", v), v["request_id"].encode(), p)
            for v, p in [(first, 1), (second, 1), (other, 2)]]
    out, offsets = rig.out(msgs)
    assert out == {} and offsets == {}  # nothing committed, nothing failed, no dead letter
    held = [call.args[0] for call in rig.consumer.seek.call_args_list]
    assert held == [TopicPartition(f"{PREFIX}.rendered", 1, msgs[0].offset()),
                    TopicPartition(f"{PREFIX}.rendered", 2, msgs[2].offset())]
    assert rig.consumer.pause.call_count == 2

    rig.relay._held.resume_all(rig.consumer)  # the backoff is over; the detector answers again
    rig.detector.down = False
    out, offsets = rig.out(msgs)  # read again from the held offsets
    assert sorted(r["request_id"] for r in rig.decode(out["images.ready"], "ImageReady")) == sorted(
        [first["request_id"], second["request_id"], other["request_id"]])
    assert offsets == {(f"{PREFIX}.rendered", 1): msgs[1].offset() + 1, (f"{PREFIX}.rendered", 2): msgs[2].offset() + 1}


def test_fail_open_and_fail_closed_policies_decide_without_waiting(tmp_path) -> None:
    for policy, topic in [("review", "review"), ("block", "requests.failed")]:
        rig = Rig(tmp_path / policy, {}, on_timeout=policy)
        rig.detector.down = True
        out, offsets = rig.publish(rig.rendered("a chair", b"chair"))
        assert topic in out and "images.ready" not in out and offsets  # decided and committed
        rig.consumer.seek.assert_not_called()


def test_cached_answers_and_replays_are_not_scanned_again(tmp_path) -> None:
    rig = Rig(tmp_path, {b"chair": {"nudity": 0.01}})
    rendered = rig.rendered("a chair", b"chair")
    rig.publish(rendered)
    assert rig.detector.calls == 1
    out, _ = rig.publish(rendered)  # a replay of a published request: nothing to publish, nothing to scan
    assert out == {} and rig.detector.calls == 1
    cached = rig.rendered("a cached chair", b"chair", cached=True, cache_key="k1")
    out, _ = rig.publish(cached)
    [ready] = rig.decode(out["images.ready"], "ImageReady")
    assert ready["cached"] is True and ready["safety"]["scanned"] is True and rig.detector.calls == 1


def test_with_no_detector_every_image_is_published_marked_unscanned(tmp_path) -> None:
    serde = AvroSerde()
    relay = PublicationRelay(Settings(_env_file=None, topic_prefix=PREFIX, storage_url=str(tmp_path)), serde)
    relay._published = MemoryState()  # type: ignore[assignment]
    relay._consumer = FakeKafka().consumer().mock
    store = LocalObjectStore(tmp_path)
    images = [{"index": 0, "uri": store.put("acme/a.png", b"a"), "sha256": "a" * 64, "seed": 1, "size_bytes": 1}]
    rendered = image_rendered(request=req(home=0), images=images, model_id="tiny", model_version="g1",
                              timings_ms={}, batch_id="b", batch_size=1, worker_id="w",
                              source=("tp.requests.normal", 0, 1), now_ms=1, generation="g1")
    before = count("unscanned")
    message = FakeMessage(f"{PREFIX}.rendered", 0, 1, serde.encode("ImageRendered", rendered))
    records, _ = relay.publish([message])  # type: ignore[list-item]  # a FakeMessage reads like a Message
    [ready] = [serde.decode("ImageReady", r.value) for r in records if r.topic == f"{PREFIX}.images.ready"]
    assert ready["safety"] == {"decision": "PASS", "scanned": False, "top_label": None, "top_score": None}
    assert count("unscanned") == before + 1


def test_hostile_image_lists_fail_their_own_request_and_the_batch_goes_on(tmp_path) -> None:
    rig = Rig(tmp_path, {b"chair": {"nudity": 0.01}})
    clean = rig.rendered("a chair", b"chair")
    empty = {**rig.rendered("nothing", b"chair"), "images": []}
    elsewhere = rig.rendered("elsewhere", b"chair")
    elsewhere["images"] = [{**elsewhere["images"][0], "uri": (tmp_path / "objects").resolve().as_uri() + "/a%00b"}]
    out, offsets = rig.publish(empty, elsewhere, clean)
    [ready] = rig.decode(out["images.ready"], "ImageReady")
    assert ready["request_id"] == clean["request_id"]
    failed = {f["request_id"]: f["reason_code"] for f in rig.decode(out["requests.failed"], "RequestFailed")}
    assert failed == {empty["request_id"]: "unpublishable", elsewhere["request_id"]: "unpublishable"}
    assert offsets == {(f"{PREFIX}.rendered", 1): rig.offset + 1}  # nothing held: no outage


def test_a_fail_closed_block_keeps_the_object_another_request_published(tmp_path) -> None:
    """Objects are keyed by the tenant and the bytes' sha256, so two requests share one: a BLOCK because the
    detector could not judge says nothing of the bytes, and must not pull them from under the first request."""
    rig = Rig(tmp_path, {b"lamp": {"nudity": 0.01}}, on_timeout="block")
    first, again = rig.rendered("a lamp", b"lamp"), rig.rendered("the same lamp", b"lamp")
    out, _ = rig.publish(first)
    assert len(out["images.ready"]) == 1
    rig.detector.down = True  # the detector times out for the second request: fail closed
    out, _ = rig.publish(again)
    [failed] = rig.decode(out["requests.failed"], "RequestFailed")
    assert (failed["request_id"], failed["reason_code"]) == (again["request_id"], "unsafe")
    assert "kept" in failed["reason"]
    assert rig.store.get(f"acme/{b'lamp'.hex()}.png") == b"lamp"  # what the first request published stays
