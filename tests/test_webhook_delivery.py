"""Webhook deliveries without a network: signatures as a receiver checks them, idempotency keys, the retry
schedule and the outcome of each attempt."""
from __future__ import annotations

import hashlib
import hmac
import json

import pytest

from processors.webhook_delivery import (
    AttemptResult,
    Delivery,
    RetryPolicy,
    decide,
    delivery_for,
    idempotency_key,
    outcome_event,
    sign,
    signed_headers,
    url_for_events,
    verify_signature,
)
from schemas.serde import AvroSerde

SECRET = "s3cret-for-tests"
NOW = 1_750_000_000


def delivery_of(event_type, event) -> Delivery:
    delivery = delivery_for(event_type, event)
    assert delivery is not None
    return delivery


def ready(**overrides) -> dict:
    event = {"request_id": "r-1", "tenant": "acme", "sha256": "aa", "generation": "m@1", "version": 1,
             "images": [{"index": 1, "uri": "s3://b/2", "sha256": "bb", "seed": 2},
                        {"index": 0, "uri": "s3://b/1", "sha256": "aa", "seed": 1}],
             "callback_url": "https://hooks.example.com/zimage?token=abc",
             "lineage": {"source_topic": "zimage.requests.normal", "source_partition": 0, "source_offset": 7}}
    return {**event, **overrides}


def failed(**overrides) -> dict:
    event = {"request_id": "r-1", "tenant": "acme", "reason_code": "blocked", "reason": "rule nsfw",
             "source": {"topic": "zimage.requests.normal", "partition": 2, "offset": 40},
             "callback_url": "https://hooks.example.com/zimage"}
    return {**event, **overrides}


# --- signing ---

def test_signature_is_hmac_sha256_over_timestamp_dot_body():
    body = b'{"type":"image.ready"}'
    expected = hmac.new(SECRET.encode(), f"{NOW}.".encode() + body, hashlib.sha256).hexdigest()
    assert sign(SECRET, NOW, body) == f"v1={expected}"


def test_receiver_accepts_a_genuine_delivery():
    delivery = delivery_of("image.ready", ready())
    headers = signed_headers(SECRET, delivery, NOW + 0.7)
    assert headers["X-Zimage-Timestamp"] == str(NOW)
    assert verify_signature(SECRET, headers["X-Zimage-Timestamp"], delivery.body, headers["X-Zimage-Signature"],
                            tolerance_s=300, now_s=NOW + 10)


@pytest.mark.parametrize("change", ["body", "timestamp", "secret", "header"])
def test_receiver_refuses_anything_altered(change):
    body, header = b'{"a":1}', sign(SECRET, NOW, b'{"a":1}')
    timestamp, secret = str(NOW), SECRET
    if change == "body":
        body = b'{"a":2}'
    elif change == "timestamp":
        timestamp = str(NOW + 1)
    elif change == "secret":
        secret = "other"
    else:
        header = header[:-1] + ("0" if header[-1] != "0" else "1")
    assert not verify_signature(secret, timestamp, body, header, tolerance_s=300, now_s=NOW)


def test_receiver_refuses_a_stale_or_future_timestamp_and_garbage():
    body = b"{}"
    header = sign(SECRET, NOW, body)
    assert verify_signature(SECRET, NOW, body, header, tolerance_s=300, now_s=NOW + 300)
    assert not verify_signature(SECRET, NOW, body, header, tolerance_s=300, now_s=NOW + 301)
    assert not verify_signature(SECRET, NOW, body, header, tolerance_s=300, now_s=NOW - 301)
    assert not verify_signature(SECRET, "not-a-number", body, header, tolerance_s=300, now_s=NOW)


def test_receiver_accepts_any_of_several_signatures_during_a_rotation():
    body = b"{}"
    header = f"{sign('old', NOW, body)}, {sign(SECRET, NOW, body)}"
    assert verify_signature(SECRET, NOW, body, header, tolerance_s=60, now_s=NOW)
    assert not verify_signature("third", NOW, body, header, tolerance_s=60, now_s=NOW)


# --- what to deliver, and its key ---

def test_event_without_callback_gets_no_delivery():
    assert delivery_for("image.ready", ready(callback_url=None)) is None
    assert delivery_for("request.failed", failed(callback_url="")) is None


def test_body_is_the_typed_event_as_json():
    delivery = delivery_for("request.failed", failed())
    assert json.loads(delivery.body) == {"type": "request.failed", "event": failed()}
    assert (delivery.request_id, delivery.tenant, delivery.url) == ("r-1", "acme", failed()["callback_url"])


def test_key_is_the_same_for_the_same_fact_read_again():
    # another offset (a duplicate, or the record read again) or another image order is the same fact
    moved = ready(lineage={"source_topic": "x", "source_partition": 3, "source_offset": 99},
                  images=list(reversed(ready()["images"])))
    assert idempotency_key("image.ready", ready()) == idempotency_key("image.ready", moved)
    assert delivery_for("image.ready", ready()).delivery_id == idempotency_key("image.ready", ready())


@pytest.mark.parametrize("change", [{"version": 2}, {"generation": "m@2"}, {"tenant": "other"},
                                    {"request_id": "r-2"},
                                    {"images": [{"index": 0, "uri": "u", "sha256": "cc", "seed": 1}]}])
def test_key_differs_for_another_publication(change):
    assert idempotency_key("image.ready", ready()) != idempotency_key("image.ready", ready(**change))


def test_failure_keys_name_the_failed_record_and_event_type():
    assert idempotency_key("request.failed", failed()) == idempotency_key("request.failed", failed(reason="x"))
    other_record = failed(source={"topic": "zimage.requests.normal", "partition": 2, "offset": 41})
    assert idempotency_key("request.failed", failed()) != idempotency_key("request.failed", other_record)
    assert idempotency_key("request.failed", failed()) != idempotency_key("image.ready", failed())


def test_events_show_no_credentials_or_query():
    assert url_for_events("https://user:pw@Hooks.example.com:8443/a/b?token=t#f") == "https://hooks.example.com:8443/a/b"
    assert url_for_events("http://[::1]:9000/x") == "http://[::1]:9000/x"


# --- retry schedule ---

def test_delays_double_with_jitter_inside_their_bounds():
    policy = RetryPolicy(base_s=5, factor=2, max_delay_s=900, jitter=0.5)
    for retry, ceiling in [(1, 5), (2, 10), (3, 20), (8, 640), (9, 900), (40, 900)]:
        assert policy.delay_s(retry, rand=lambda: 0.0) == ceiling
        assert policy.delay_s(retry, rand=lambda: 0.999999) == pytest.approx(ceiling * 0.5, rel=1e-5)
        for _ in range(50):
            assert ceiling * 0.5 <= policy.delay_s(retry) <= ceiling


def test_retries_stop_after_about_two_hours():
    policy = RetryPolicy()
    first = now = 0
    attempts = 1
    while (due := policy.next_due_ms(attempts, first, now, rand=lambda: 0.0)) is not None:
        now, attempts = due, attempts + 1
    assert now == 7200_000  # the last attempt is made two hours after the first, and none after it
    assert 12 <= attempts <= 25


def test_a_bad_policy_is_refused():
    with pytest.raises(ValueError):
        RetryPolicy(base_s=0)
    with pytest.raises(ValueError):
        RetryPolicy(jitter=1.5)


# --- outcome of an attempt ---

@pytest.mark.parametrize("result, outcome", [
    (AttemptResult(http_status=200), "delivered"),
    (AttemptResult(http_status=204), "delivered"),
    (AttemptResult(error="refused: loopback", refused=True), "refused"),
    (AttemptResult(http_status=410), "failed"),
    (AttemptResult(http_status=500), "retrying"),
    (AttemptResult(http_status=302), "retrying"),
    (AttemptResult(http_status=429), "retrying"),
    (AttemptResult(error="ConnectionRefusedError"), "retrying"),
])
def test_attempt_outcomes(result, outcome):
    decided, due = decide(result, RetryPolicy(base_s=1), attempts_made=1, first_attempt_ms=0, now_ms=0,
                          rand=lambda: 0.0)
    assert decided == outcome
    assert (due == 1000) if outcome == "retrying" else due is None


def test_a_failure_at_the_end_of_the_window_gives_up():
    policy = RetryPolicy(base_s=10, give_up_after_s=60)
    # a retry that would fall past the window is made at its end instead
    assert decide(AttemptResult(http_status=503), policy, 5, first_attempt_ms=0, now_ms=55_000,
                  rand=lambda: 0.0) == ("retrying", 60_000)
    assert decide(AttemptResult(http_status=503), policy, 6, first_attempt_ms=0, now_ms=60_000,
                  rand=lambda: 0.0) == ("gave_up", None)


def test_outcome_event_encodes_and_hides_the_query():
    delivery = delivery_of("image.ready", ready())
    record = outcome_event(delivery, attempt=3, outcome="retrying", now_ms=NOW * 1000,
                           result=AttemptResult(error="x" * 5000))
    serde = AvroSerde()
    decoded = serde.decode("WebhookDelivery", serde.encode("WebhookDelivery", record))
    assert decoded["url"] == "https://hooks.example.com/zimage"
    assert len(decoded["error"]) <= 300 and decoded["attempt"] == 3 and decoded["http_status"] is None
