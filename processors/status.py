"""The shape of RequestStatus events: the latest state of a request, keyed by (tenant, request_id)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

STATUSES = ("queued", "admitted", "cached", "duplicate", "rendering", "rendered", "in_review", "published",
            "failed")


def request_status(*, request: Mapping[str, Any], status: str, stage: str, now_ms: int, generation: str | None = None,
                   final: bool = False, detail: str | None = None) -> dict[str, Any]:
    if status not in STATUSES:
        raise ValueError(f"unknown status {status!r}; expected one of {STATUSES}")
    return {"tenant": request["tenant"], "request_id": request["request_id"], "status": status, "final": final,
            "detail": None if detail is None else detail[:500], "generation": generation, "stage": stage,
            "at": now_ms}


def status_key(tenant: str, request_id: str) -> bytes:
    """The compacted topic's key: one latest status per request of a tenant."""
    return f"{tenant}/{request_id}".encode("utf-8", "surrogatepass")
