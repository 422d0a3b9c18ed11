"""The HTTP API's decisions, without sockets: request ids from Idempotency-Key headers, body fingerprints, API key
hashes, token-bucket parameters and the state of a task as the API reports it."""
from __future__ import annotations

import hashlib
import hmac
import json
import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

KEY_PREFIX = "zk_"
MAX_IDEMPOTENCY_KEY_CHARS = 1024  # longer headers are refused, not hashed: nobody needs more
HASHED_ID_PREFIX = "idem-"

# The API's task states, from the status the pipeline wrote (RequestStatus.status) and what the API saw.
QUEUED, IN_PROGRESS, COMPLETED, FAILED, CANCELLED = "queued", "in_progress", "completed", "failed", "cancelled"
_STATE_OF_STATUS = {
    "queued": QUEUED, "admitted": QUEUED,
    "cached": IN_PROGRESS, "rendering": IN_PROGRESS, "rendered": IN_PROGRESS, "in_review": IN_PROGRESS,
    "published": COMPLETED, "failed": FAILED,
    # a repeat of an admitted request: the first outcome stands, and it is what the API reports once it has it
    "duplicate": IN_PROGRESS,
}


class BadIdempotencyKey(ValueError):
    """An Idempotency-Key header no request id can come from."""


def request_id_for(idempotency_key: str | None, max_id_chars: int = 256) -> str:
    """The request id of a submission: the key itself where it is a valid request id (printable ASCII without
    whitespace, within the limit), else a digest of it, so any key maps to the same id every time. No key: a new
    random id."""
    if idempotency_key is None:
        return secrets.token_hex(16)
    if not idempotency_key or len(idempotency_key) > MAX_IDEMPOTENCY_KEY_CHARS:
        raise BadIdempotencyKey(f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} characters")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in idempotency_key):
        raise BadIdempotencyKey("Idempotency-Key holds control characters")
    if len(idempotency_key) <= max_id_chars and all("!" <= c <= "~" for c in idempotency_key) \
            and not idempotency_key.startswith(HASHED_ID_PREFIX):
        return idempotency_key
    # the prefix keeps a hashed id from ever equalling a key given as is
    return HASHED_ID_PREFIX + hashlib.sha256(idempotency_key.encode("utf-8", "surrogatepass")).hexdigest()


def body_fingerprint(fields: Mapping[str, Any]) -> str:
    """A digest of what a submission asks for (canonical JSON: key order and spacing do not matter)."""
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def new_api_key() -> str:
    """A fresh key: 32 random bytes, URL-safe; shown once to its owner, never stored."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(secret: bytes, key: str) -> str:
    """What the keys file stores for a key: HMAC-SHA256 under the server's secret. A stolen keys file alone
    gives no key, and checking one costs a single HMAC and a dict lookup."""
    return hmac.new(secret, key.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class TenantLimits:
    """A tenant's token bucket (`rate_per_s` refill, `burst` capacity) and its requests per UTC day."""

    rate_per_s: float
    burst: int
    daily_quota: int

    def __post_init__(self) -> None:
        if not (self.rate_per_s > 0 and math.isfinite(self.rate_per_s)):
            raise ValueError("rate_per_s must be a positive number")
        if self.burst < 1 or self.daily_quota < 1:
            raise ValueError("burst and daily_quota must be at least 1")


def limits_for(tenant: str, default: TenantLimits, overrides: Mapping[str, Mapping[str, float]]) -> TenantLimits:
    """The default limits with what `overrides[tenant]` changes."""
    own = overrides.get(tenant)
    if not own:
        return default
    return TenantLimits(rate_per_s=float(own.get("rate_per_s", default.rate_per_s)),
                        burst=int(own.get("burst", default.burst)),
                        daily_quota=int(own.get("daily_quota", default.daily_quota)))


def retry_after_s(wait_ms: int) -> int:
    """The Retry-After header for a wait: whole seconds, rounded up, at least 1."""
    return max(1, math.ceil(wait_ms / 1000))


def task_state(status: Mapping[str, Any] | None, result: Mapping[str, Any] | None, accepted: bool,
               claim: bytes | None = None) -> str | None:
    """The API's state of a task: from the outcome the API saw (`result`: an ImageReady or RequestFailed digest),
    else the status view's entry, else queued when the API accepted it; None when nothing knows the task.
    `claim` is the request's cancellation key (streams/cancellation.py): `rendering` once a worker took it."""
    if result is not None:
        if result.get("kind") == "ready":
            return COMPLETED
        return CANCELLED if result.get("reason_code") == "cancelled" else FAILED
    if status is not None:
        name = status.get("status")
        if name == "failed":
            return CANCELLED if str(status.get("detail") or "").startswith("cancelled") else FAILED
        state = _STATE_OF_STATUS.get(str(name), IN_PROGRESS)
        return IN_PROGRESS if state == QUEUED and claim == b"rendering" else state
    if not accepted:
        return None
    return IN_PROGRESS if claim == b"rendering" else QUEUED


def cancellable(state: str | None) -> bool:
    """Only a request that nothing has started rendering can still be cancelled."""
    return state == QUEUED
