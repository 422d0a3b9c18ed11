"""The webhooks process: the destination check at call time (resolution stubbed), the pinned connection (to a
receiver on loopback), and end to end against the local stack: a receiver that fails twice gets exactly one signed
delivery, and a record from an aborted transaction triggers no call."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from confluent_kafka import Consumer, Producer

from connectors.http import PinnedResolver, post_pinned
from processors.address_guard import UnsafeCallbackUrl
from processors.webhook_delivery import verify_signature
from streams import webhooks
from streams.webhooks import checked_addresses
from tests.harness import ROOT, Pipeline, bootstrap

SECRET = "receiver-shares-this"


class Receiver:
    """An HTTP server on 127.0.0.1 that answers each POST with the next status of `statuses` (the last one
    repeats) and records what it got."""

    def __init__(self, statuses: list[int], location: str | None = None):
        self.statuses = list(statuses)
        self.calls: list[dict] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                status = receiver.statuses.pop(0) if len(receiver.statuses) > 1 else receiver.statuses[0]
                receiver.calls.append({"headers": dict(self.headers), "body": body, "status": status,
                                       "path": self.path, "at": time.time()})
                self.send_response(status)
                if location:
                    self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver_factory() -> Iterator:
    made: list[Receiver] = []

    def make(statuses: list[int], location: str | None = None) -> Receiver:
        made.append(Receiver(statuses, location))
        return made[-1]

    yield make
    for receiver in made:
        receiver.close()


# --- the destination check at call time (no traffic: resolution stubbed) ---

def stub_resolution(monkeypatch, answers: dict[str, list[str]]) -> list[str]:
    asked: list[str] = []

    async def resolve(host: str, port: int) -> list[str]:
        asked.append(host)
        return answers[host]

    monkeypatch.setattr(webhooks, "resolve_addresses", resolve)
    return asked


def test_a_name_rebound_to_a_private_address_is_refused_at_call_time(monkeypatch):
    stub_resolution(monkeypatch, {"hooks.example.com": ["93.184.216.34", "10.0.0.7"]})
    with pytest.raises(UnsafeCallbackUrl, match=r"10\.0\.0\.7"):
        asyncio.run(checked_addresses("https://hooks.example.com/x", ()))


def test_a_public_name_gives_the_addresses_to_connect_to(monkeypatch):
    stub_resolution(monkeypatch, {"hooks.example.com": ["93.184.216.34"]})
    assert asyncio.run(checked_addresses("https://hooks.example.com/x", ())) == ("93.184.216.34",)


def test_a_local_name_is_refused_before_any_lookup(monkeypatch):
    asked = stub_resolution(monkeypatch, {})
    with pytest.raises(UnsafeCallbackUrl):
        asyncio.run(checked_addresses("http://metadata.internal/latest", ()))
    with pytest.raises(UnsafeCallbackUrl):
        asyncio.run(checked_addresses("http://169.254.169.254/latest", ()))
    assert asked == []


def test_the_allow_list_admits_a_loopback_receiver(monkeypatch):
    asked = stub_resolution(monkeypatch, {})
    with pytest.raises(UnsafeCallbackUrl):
        asyncio.run(checked_addresses("http://127.0.0.1:9/hook", ()))
    assert asyncio.run(checked_addresses("http://127.0.0.1:9/hook", ("127.0.0.1",))) == ("127.0.0.1",)
    assert asked == []  # a literal address needs no lookup


# --- the pinned connection (loopback only) ---

def test_the_connection_goes_to_the_checked_address_and_keeps_the_host_name(receiver_factory):
    receiver = receiver_factory([204])
    # hooks.example.com is never looked up: the connection is pinned to the receiver's address
    status = asyncio.run(post_pinned(f"http://hooks.example.com:{receiver.port}/hook", ["127.0.0.1"], b"{}",
                                     {"X-Test": "1"}, timeout_s=5))
    assert status == 204
    assert receiver.calls[0]["headers"]["Host"] == f"hooks.example.com:{receiver.port}"


def test_redirects_are_not_followed(receiver_factory):
    elsewhere = receiver_factory([200])
    receiver = receiver_factory([302], location=f"http://127.0.0.1:{elsewhere.port}/other")
    status = asyncio.run(post_pinned(f"http://127.0.0.1:{receiver.port}/hook", ["127.0.0.1"], b"{}", {},
                                     timeout_s=5))
    assert status == 302 and elsewhere.calls == []


def test_the_pinned_resolver_answers_for_its_host_only():
    resolver = PinnedResolver("hooks.example.com", ["127.0.0.1"])
    answer = asyncio.run(resolver.resolve("hooks.example.com", 80))
    assert [a["host"] for a in answer] == ["127.0.0.1"]
    with pytest.raises(OSError):
        asyncio.run(resolver.resolve("other.example.com", 80))


# --- end to end, against the local stack ---

def image_ready(request_id: str, callback_url: str) -> dict:
    return {"request_id": request_id, "tenant": "acme", "sku_id": None, "image_uri": "s3://b/k.png",
            "sha256": "ab" * 32, "seed": 7, "width": 64, "height": 64,
            "images": [{"index": 0, "uri": "s3://b/k.png", "sha256": "ab" * 32, "seed": 7}],
            "model_id": "tiny", "model_version": "tiny@1", "timings": {"render": 1.0},
            "lineage": {"source_topic": "t.requests.normal", "source_partition": 0, "source_offset": 1,
                        "batch_id": "b-1", "worker_id": "w-1"},
            "submitted_at": 1_750_000_000_000, "published_at": 1_750_000_001_000, "metadata": {},
            "callback_url": callback_url}


def start_webhooks(pipeline: Pipeline) -> subprocess.Popen:
    code = (
        "import logging, sys\n"
        "from processors.webhook_delivery import RetryPolicy\n"
        "from streams.settings import Settings\n"
        "from streams.webhooks import run_webhooks\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "run_webhooks(Settings(_env_file=None), secret=sys.argv[1], allowlist=('127.0.0.1',),\n"
        "             policy=RetryPolicy(base_s=0.5, max_delay_s=2, give_up_after_s=120), tick_s=0.2)\n"
    )
    log = (pipeline.tmp / "webhooks.log").open("ab")
    proc = subprocess.Popen([sys.executable, "-c", code, SECRET], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**pipeline.env, "ZIMAGE_STATE_DIR": str(pipeline.tmp / "state")})
    pipeline.procs["webhooks"] = proc
    return proc


def read_outcomes(pipeline: Pipeline, wanted: int, timeout_s: float) -> list[dict]:
    """The first `wanted` WebhookDelivery events, read from the start of the topic."""
    consumer = Consumer({"bootstrap.servers": bootstrap(), "group.id": f"{pipeline.prefix}-check-{time.time_ns()}",
                         "auto.offset.reset": "earliest", "isolation.level": "read_committed"})
    consumer.subscribe([pipeline.topology.webhook_deliveries])
    outcomes: list[dict] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(outcomes) < wanted and time.monotonic() < deadline:
            pipeline.check_alive()
            message = consumer.poll(0.5)
            if message is not None and not message.error():
                outcomes.append(pipeline.serde.decode("WebhookDelivery", message.value()))
    finally:
        consumer.close()
    return outcomes


def test_only_pending_entries_of_the_dispatchers_own_shape_are_sent():
    due = {"request_id": "r1", "tenant": "acme", "event_type": "image.ready", "url": "https://example.com/h",
           "body": "{}", "partition": 0, "attempts": 0, "first_ms": None, "due_ms": 5}
    assert webhooks.usable_entry(due) and webhooks.usable_entry({**due, "attempts": 2, "first_ms": 3})
    assert webhooks.usable_entry({"partition": 1, "done_ms": 9, "outcome": "delivered"})
    hostile: list[object] = [1, None, "x", [], {}, {"partition": 0, "due_ms": 0}, {**due, "partition": "0"},
               {**due, "partition": True}, {**due, "url": None}, {**due, "body": b"{}"}, {**due, "due_ms": 1.5},
               {**due, "first_ms": "now"}, {"partition": 0, "done_ms": "yesterday"}]
    assert not any(webhooks.usable_entry(entry) for entry in hostile)


@pytest.mark.stack
@pytest.mark.slow
def test_one_signed_delivery_after_two_failures_and_none_for_an_aborted_record(kafka_bootstrap, tmp_path,
                                                                               receiver_factory):
    pipeline = Pipeline(tmp_path)
    receiver = receiver_factory([500, 500, 200])
    topic = pipeline.topology.images_ready
    try:
        start_webhooks(pipeline)
        # a record written in a transaction that aborts: read_committed never hands it to the agent
        transactional = Producer({"bootstrap.servers": bootstrap(), "transactional.id": f"{pipeline.prefix}-tx"})
        transactional.init_transactions(30)
        transactional.begin_transaction()
        aborted = image_ready("r-aborted", f"http://127.0.0.1:{receiver.port}/hook?aborted")
        transactional.produce(topic, key=b"r-aborted", value=pipeline.serde.encode("ImageReady", aborted),
                              partition=0)
        transactional.flush(10)
        transactional.abort_transaction(30)
        producer = pipeline.producer()
        # a record that does not decode is skipped, and the agent goes on
        producer.produce(topic, key=b"junk", value=b"\xc3\x01 not avro", partition=0)
        # a loopback address the allow-list does not name: refused at call time, never retried
        not_allowed = image_ready("r-refused", f"http://127.0.0.2:{receiver.port}/hook?refused")
        producer.produce(topic, key=b"r-refused", value=pipeline.serde.encode("ImageReady", not_allowed), partition=0)
        committed = image_ready("r-1", f"http://127.0.0.1:{receiver.port}/hook")
        producer.produce(topic, key=b"r-1", value=pipeline.serde.encode("ImageReady", committed), partition=0)
        assert producer.flush(10) == 0

        outcomes = read_outcomes(pipeline, wanted=4, timeout_s=90)
        time.sleep(2)  # any extra attempt or a call for the aborted record would show up by now
        pipeline.check_alive()
    finally:
        pipeline.stop_all()
    log = (tmp_path / "webhooks.log").read_text(errors="replace")

    assert [c["status"] for c in receiver.calls] == [500, 500, 200], log[-4000:]
    assert all(c["path"] == "/hook" for c in receiver.calls)  # nothing for the aborted or the refused record
    keys = {c["headers"]["Idempotency-Key"] for c in receiver.calls}
    assert len(keys) == 1
    delivered = receiver.calls[-1]
    headers = delivered["headers"]
    assert verify_signature(SECRET, headers["X-Zimage-Timestamp"], delivered["body"], headers["X-Zimage-Signature"],
                            tolerance_s=300, now_s=time.time())
    body = json.loads(delivered["body"])
    assert body["type"] == "image.ready" and body["event"]["request_id"] == "r-1"
    refused = [o for o in outcomes if o["request_id"] == "r-refused"]
    assert [(o["attempt"], o["outcome"]) for o in refused] == [(1, "refused")]
    assert "loopback" in refused[0]["error"] and refused[0]["url"] == f"http://127.0.0.2:{receiver.port}/hook"
    delivered_outcomes = [o for o in outcomes if o["request_id"] == "r-1"]
    assert [(o["attempt"], o["outcome"], o["http_status"]) for o in delivered_outcomes] == [
        (1, "retrying", 500), (2, "retrying", 500), (3, "delivered", 200)]
    assert {o["delivery_id"] for o in delivered_outcomes} == keys
    assert delivered_outcomes[-1]["url"] == f"http://127.0.0.1:{receiver.port}/hook"



@pytest.mark.stack
@pytest.mark.slow
def test_pending_retries_survive_a_sigkill(kafka_bootstrap, tmp_path, receiver_factory):
    pipeline = Pipeline(tmp_path)
    receiver = receiver_factory([503])
    try:
        start_webhooks(pipeline)
        producer = pipeline.producer()
        event = image_ready("r-kill", f"http://127.0.0.1:{receiver.port}/hook")
        producer.produce(pipeline.topology.images_ready, key=b"r-kill",
                         value=pipeline.serde.encode("ImageReady", event), partition=1)
        assert producer.flush(10) == 0
        assert read_outcomes(pipeline, wanted=1, timeout_s=60)[0]["outcome"] == "retrying"
        time.sleep(4)  # past faust's offset commit interval: after the restart only the table knows the delivery
        pipeline.kill("webhooks")
        receiver.statuses = [200]
        start_webhooks(pipeline)
        deadline = time.monotonic() + 90
        while not any(c["status"] == 200 for c in receiver.calls):
            pipeline.check_alive()
            assert time.monotonic() < deadline, pipeline.log("webhooks")[-4000:]
            time.sleep(0.2)
        time.sleep(3)  # a second success (the source record read again and delivered anew) would show by now
    finally:
        pipeline.stop_all()
    assert len({c["headers"]["Idempotency-Key"] for c in receiver.calls}) == 1
    assert [c["status"] for c in receiver.calls][-1] == 200 and sum(c["status"] == 200 for c in receiver.calls) == 1
    outcomes = read_outcomes(pipeline, wanted=len(receiver.calls), timeout_s=30)
    # the attempt count carried on from the restored table; a fresh read of the record would start again at 1
    assert [o["attempt"] for o in outcomes] == list(range(1, len(receiver.calls) + 1))
    assert outcomes[-1]["outcome"] == "delivered"


def test_the_kafka_security_settings_reach_the_webhooks_app_too():
    import faust

    from streams.setting_values import webhook_security

    def credentials(**extra: str):
        return webhooks.broker_credentials(webhook_security({k.replace("_", "."): v for k, v in extra.items()}))

    assert credentials() is None and credentials(security_protocol="plaintext") is None
    sasl = credentials(security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512", sasl_username="u",
                       sasl_password="p")
    assert isinstance(sasl, faust.SASLCredentials) and sasl.ssl_context is not None
    assert (sasl.username, sasl.password, sasl.mechanism.value) == ("u", "p", "SCRAM-SHA-512")
    plain = credentials(security_protocol="SASL_PLAINTEXT", sasl_mechanisms="PLAIN", sasl_username="u",
                        sasl_password="p")
    assert isinstance(plain, faust.SASLCredentials) and plain.ssl_context is None
    assert isinstance(credentials(security_protocol="SSL"), faust.SSLCredentials)
    for refused in ({"security.protocol": "SASL_SSL", "sasl.mechanism": "OAUTHBEARER"},
                    {"security.protocol": "SASL_SSL"}, {"security.protocol": "KERBEROS"}):
        with pytest.raises(ValueError):
            webhook_security(refused)


def test_a_registry_outage_is_waited_out_and_never_loses_a_delivery():
    from schemas.serde import RegistryUnavailable

    calls: list[str] = []

    def schedule(failures: list[Exception]):
        def run() -> None:
            calls.append("try")
            if failures:
                raise failures.pop(0)
        return run

    outage: list[Exception] = [RegistryUnavailable("down"), RegistryUnavailable("down")]
    asyncio.run(webhooks.scheduled(schedule(outage), "t[0]@1", first_delay_s=0.001))
    assert calls == ["try"] * 3 and not outage  # tried until the registry answered
    calls.clear()
    asyncio.run(webhooks.scheduled(schedule([ValueError("a bad record")]), "t[0]@2", first_delay_s=0.001))
    assert calls == ["try"]  # the record's own fault: logged, and the agent goes on
