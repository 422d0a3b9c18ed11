"""Image safety on the real stack, with a detector service faked on loopback (ZIMAGE_IMAGE_SAFETY=http): one
request's images are blocked (RequestFailed `unsafe`, the object moved under quarantine/), another's go to review,
a clean one is published scanned. The detector's first answer is a 503: publication waits and asks again."""
from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from schemas.serde import AvroSerde
from streams.review import ReviewDesk
from streams.submit import Submitter, build_request

pytestmark = [pytest.mark.stack, pytest.mark.slow]

SMALL = {"width": 32, "height": 32, "steps": 2}
# The detector sees the image and the tenant (X-Zimage-Tenant): each test request has its own tenant.
SCORES = {"acme-unsafe": {"nudity": 0.97}, "acme-beach": {"nudity": 0.6}, "acme": {"nudity": 0.01}}


class FakeDetector(ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.calls: list[tuple[str, int]] = []
        self.failures_left = 1  # the first call answers 503: a detector outage

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1/check"


class _Handler(BaseHTTPRequestHandler):
    server: FakeDetector

    def do_POST(self) -> None:  # the name http.server calls
        body = self.rfile.read(int(self.headers["Content-Length"]))
        tenant = self.headers["X-Zimage-Tenant"]
        self.server.calls.append((tenant, len(body)))
        if self.server.failures_left > 0 or not body.startswith(b"\x89PNG"):
            self.server.failures_left -= 1
            self.send_response(503)
            self.end_headers()
            return
        answer = json.dumps({"labels": SCORES[tenant]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: object) -> None:
        return None


@pytest.fixture
def detector() -> Iterator[FakeDetector]:
    server = FakeDetector()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_blocked_images_are_quarantined_flagged_ones_reviewed_clean_ones_published(fresh_pipeline, detector):
    p = fresh_pipeline
    p.start("processors", "processors", wait_ready=False, ZIMAGE_IMAGE_SAFETY="http",
            ZIMAGE_IMAGE_SAFETY_URL=detector.url, ZIMAGE_IMAGE_SAFETY_TIMEOUT_S="5")
    p.start("worker", "worker", ZIMAGE_QUALITY_SHARPNESS_MIN="0")
    clean = build_request({"prompt": "a wooden chair", "seed": 1, "tenant": "acme", **SMALL})
    unsafe = build_request({"prompt": "something unsafe", "seed": 2, "tenant": "acme-unsafe", **SMALL})
    flagged = build_request({"prompt": "a beach", "seed": 3, "tenant": "acme-beach", **SMALL})
    sub = Submitter(p.settings.kafka_config(), p.topology, p.serde)
    sub.submit([clean, unsafe, flagged])
    sub.flush()

    events = p.collect([clean["request_id"], unsafe["request_id"]], timeout_s=120)
    [(kind, ready)] = events[clean["request_id"]]
    assert kind == "ImageReady"
    assert ready["safety"] == {"decision": "PASS", "scanned": True, "top_label": "nudity", "top_score": 0.01}
    [(kind, failed)] = events[unsafe["request_id"]]
    assert (kind, failed["reason_code"]) == ("RequestFailed", "unsafe") and "nudity 0.970" in failed["reason"]
    objects = p.tmp / "objects"
    [moved] = [path.relative_to(objects / "quarantine") for path in (objects / "quarantine").rglob("*.png")]
    assert moved.parts[1].startswith("acme-unsafe-")  # quarantine/<its original key>
    assert not (objects / moved).exists()  # and gone from its old key
    assert (objects / ready["image_uri"].removeprefix(objects.resolve().as_uri() + "/")).is_file()  # still there
    assert "image detector http: http-503" in p.log("processors")  # the partition waited, then read again

    desk = ReviewDesk(p.settings, AvroSerde())
    deadline = time.monotonic() + 60
    while not any(i.rendered["request_id"] == flagged["request_id"] for i in desk.waiting()):
        assert time.monotonic() < deadline, "the flagged image never reached zimage.review"
        time.sleep(0.5)
    assert flagged["request_id"] not in p.collect([flagged["request_id"]], timeout_s=2)  # held, not published
    desk.decide("acme-beach", flagged["request_id"], "approve", "ana", "a swimsuit")
    [(kind, approved)] = p.collect([flagged["request_id"]], timeout_s=60)[flagged["request_id"]]
    assert kind == "ImageReady" and approved["safety"]["decision"] == "REVIEW"
    # every image was scanned, and the one that met the outage was asked again, not dead-lettered
    assert detector.failures_left == 0 and len(detector.calls) >= 4
    assert {tenant for tenant, _ in detector.calls} == {"acme", "acme-unsafe", "acme-beach"}
