"""Webhook deliveries, without sockets: what to POST for an event, how it is signed, its idempotency key, when to
try again, and how an attempt's result becomes a delivery outcome.

A receiver verifies a delivery with `verify_signature`: the `X-Zimage-Signature` header is
`v1=<hex HMAC-SHA256(secret, "<X-Zimage-Timestamp>.<body>")>`, and a timestamp outside the tolerance is refused, so
a captured delivery cannot be replayed later. Every attempt of one delivery carries the same `Idempotency-Key`;
receivers dedupe on it.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

EventType = Literal["image.ready", "request.failed"]
Outcome = Literal["delivered", "failed", "retrying", "refused", "gave_up"]
SIGNATURE_VERSION = "v1"
ERROR_MAX_CHARS = 300
# A receiver that answers 410 Gone has said it never wants this callback: retrying for hours would not change that.
PERMANENT_STATUSES = frozenset({410})


@dataclass(frozen=True)
class Delivery:
    """One event to POST to one callback URL. `body` is fixed when the delivery is made, so every attempt sends
    the same bytes; only the timestamp and the signature change between attempts."""
    delivery_id: str
    request_id: str | None
    tenant: str | None
    event_type: EventType
    url: str
    body: bytes


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter: attempt n (1 = the first retry) waits a random time in
    [base_s * factor**(n-1) * (1 - jitter), base_s * factor**(n-1)], capped at max_delay_s; no attempt is
    scheduled later than give_up_after_s after the first one, and the last one is made at that moment."""
    base_s: float = 5.0
    factor: float = 2.0
    max_delay_s: float = 900.0
    give_up_after_s: float = 7200.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.base_s <= 0 or self.factor < 1 or self.max_delay_s < self.base_s or self.give_up_after_s < 0:
            raise ValueError(f"unusable retry policy: {self}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be within [0, 1], got {self.jitter}")

    def delay_s(self, retry: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait before retry number `retry` (1-based)."""
        if retry < 1:
            raise ValueError(f"retry numbers start at 1, got {retry}")
        ceiling = min(self.max_delay_s, self.base_s * self.factor ** min(retry - 1, 64))
        return ceiling * (1 - self.jitter * rand())

    def next_due_ms(self, attempts_made: int, first_attempt_ms: int, now_ms: int,
                    rand: Callable[[], float] = random.random) -> int | None:
        """When to try again after `attempts_made` failed attempts: never later than give_up_after_s after the
        first attempt, so the last try happens at that moment; None once it has passed."""
        deadline = first_attempt_ms + int(self.give_up_after_s * 1000)
        if now_ms >= deadline:
            return None
        return min(deadline, now_ms + int(self.delay_s(attempts_made, rand) * 1000))


def sign(secret: str | bytes, timestamp: int, body: bytes) -> str:
    """The X-Zimage-Signature header value for `body` sent at `timestamp` (unix seconds)."""
    key = secret.encode() if isinstance(secret, str) else secret
    digest = hmac.new(key, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"{SIGNATURE_VERSION}={digest}"


def verify_signature(secret: str | bytes, timestamp: str | int, body: bytes, header: str, tolerance_s: float,
                     now_s: float) -> bool:
    """What a receiver checks: the signature matches the body and timestamp, and the timestamp is within
    `tolerance_s` of `now_s`. The header may list several comma-separated signatures (one per secret during a
    rotation); one match is enough."""
    try:
        sent_at = int(timestamp)
    except (TypeError, ValueError):
        return False
    if abs(now_s - sent_at) > tolerance_s:
        return False
    expected = sign(secret, sent_at, body)
    return any(hmac.compare_digest(expected, part.strip()) for part in header.split(","))


def signed_headers(secret: str | bytes, delivery: Delivery, now_s: float) -> dict[str, str]:
    """The headers of one attempt of `delivery`."""
    timestamp = int(now_s)
    return {"Content-Type": "application/json", "X-Zimage-Timestamp": str(timestamp),
            "X-Zimage-Signature": sign(secret, timestamp, delivery.body),
            "Idempotency-Key": delivery.delivery_id, "X-Zimage-Event": delivery.event_type}


def idempotency_key(event_type: EventType, event: Mapping[str, Any]) -> str:
    """A key that names the published fact, not the record that carried it: a record read again after a crash,
    or the same event published twice, gets the same key.

    ImageReady: tenant, request_id, generation, version and the images' sha256s. RequestFailed: tenant,
    request_id, reason code and the source record (topic, partition, offset) that failed."""
    if event_type == "image.ready":
        images = event.get("images") or []
        shas = [str(i.get("sha256")) for i in sorted(images, key=lambda i: i.get("index", 0))]
        shas = shas or [str(event.get("sha256"))]
        parts = [event.get("tenant"), event.get("request_id"), event.get("generation", ""),
                 event.get("version", 1), shas]
    else:
        source = event.get("source") or {}
        parts = [event.get("tenant"), event.get("request_id"), event.get("reason_code"),
                 source.get("topic"), source.get("partition"), source.get("offset")]
    canonical = json.dumps([event_type, *parts], separators=(",", ":"), sort_keys=True, default=str)
    return "whd_" + hashlib.sha256(canonical.encode()).hexdigest()[:40]


def delivery_for(event_type: EventType, event: Mapping[str, Any]) -> Delivery | None:
    """The delivery an event asks for, or None when it carries no callback_url."""
    url = event.get("callback_url")
    if not url:
        return None
    body = json.dumps({"type": event_type, "event": dict(event)}, separators=(",", ":"), sort_keys=True,
                      ensure_ascii=False).encode()
    return Delivery(delivery_id=idempotency_key(event_type, event), request_id=event.get("request_id"),
                    tenant=event.get("tenant"), event_type=event_type, url=str(url), body=body)


def url_for_events(url: str) -> str:
    """The URL as outcome events show it: scheme, host, port and path only, so neither credentials nor a token
    in the query string reaches the deliveries topic."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "<unparseable url>"
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{port}" if port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))[:2000]


def short_error(error: BaseException | str) -> str:
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return text[:ERROR_MAX_CHARS]


@dataclass(frozen=True)
class AttemptResult:
    """What one attempt gave: an HTTP status, or an error before any status (refused destination, connection
    failure, timeout)."""
    http_status: int | None = None
    error: str | None = None
    refused: bool = False

    @property
    def succeeded(self) -> bool:
        return self.http_status is not None and 200 <= self.http_status < 300


def decide(result: AttemptResult, policy: RetryPolicy, attempts_made: int, first_attempt_ms: int, now_ms: int,
           rand: Callable[[], float] = random.random) -> tuple[Outcome, int | None]:
    """The outcome of an attempt and, for `retrying`, when the next attempt is due. A refused destination is
    never retried: the guard would refuse it again."""
    if result.succeeded:
        return "delivered", None
    if result.refused:
        return "refused", None
    if result.http_status in PERMANENT_STATUSES:
        return "failed", None
    due = policy.next_due_ms(attempts_made, first_attempt_ms, now_ms, rand)
    return ("gave_up", None) if due is None else ("retrying", due)


def outcome_event(delivery: Delivery, *, attempt: int, outcome: Outcome, result: AttemptResult | None,
                  now_ms: int) -> dict[str, Any]:
    """A WebhookDelivery record."""
    return {"delivery_id": delivery.delivery_id, "request_id": delivery.request_id, "tenant": delivery.tenant,
            "event_type": delivery.event_type, "url": url_for_events(delivery.url), "attempt": attempt,
            "outcome": outcome, "http_status": result.http_status if result else None,
            "error": short_error(result.error) if result and result.error else None, "at": now_ms}
