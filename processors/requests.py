"""What a valid GenerationRequest is, and the derived values every stage must agree on (seed, priority)."""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Mapping
from urllib.parse import urlsplit

from processors.render_settings import RenderSettings

PRIORITY_NAMES = {"HIGH": "high", "NORMAL": "normal", "LOW": "low"}
MAX_SEED = 2**63 - 1


class InvalidRequest(ValueError):
    """A request that will never render; `code` is the RequestFailed reason_code."""

    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class Limits:
    max_prompt_chars: int = 4000
    max_width: int = 2048
    max_height: int = 2048
    max_steps: int = 100
    max_images: int = 8
    max_guidance: float = 30.0
    size_multiple: int = 16  # the VAE downsamples by 8 and the transformer patches by 2
    max_request_id_chars: int = 256


def derived_seed(request_id: str) -> int:
    """The seed of a request that gave none: stable across replays and workers."""
    return int.from_bytes(hashlib.sha256(request_id.encode()).digest()[:8], "big") & MAX_SEED


def base_seed(request: Mapping[str, Any]) -> int:
    seed = request.get("seed")
    return derived_seed(request["request_id"]) if seed is None else int(seed)


def image_seeds(request: Mapping[str, Any]) -> list[int]:
    """One seed per image of the request: image i of a request with seed s uses s + i."""
    s = base_seed(request)
    return [(s + i) & MAX_SEED for i in range(int(request.get("num_images", 1)))]


def settings_of(request: Mapping[str, Any]) -> RenderSettings:
    """What a batch must share with this request (besides the model)."""
    return RenderSettings(width=request["width"], height=request["height"], steps=request["steps"],
                          guidance=float(request["guidance"]))


def priority_of(request: Mapping[str, Any]) -> str:
    return PRIORITY_NAMES.get(str(request.get("priority", "NORMAL")), "normal")


def validate(request: Mapping[str, Any], limits: Limits, models: tuple[str, ...] | None = None) -> None:
    """Raises InvalidRequest for the first thing wrong; returns None for a request that may render."""
    rid = request.get("request_id") or ""
    if not rid.strip():
        raise InvalidRequest("invalid_request", "request_id is empty")
    if len(rid) > limits.max_request_id_chars:
        raise InvalidRequest("invalid_request", f"request_id is {len(rid)} characters; at most "
                                                f"{limits.max_request_id_chars}")
    if not str(request.get("tenant") or "").strip():
        raise InvalidRequest("invalid_request", "tenant is empty")
    prompt = request.get("prompt") or ""
    if not prompt.strip():
        raise InvalidRequest("invalid_request", "prompt is empty")
    for field in ("prompt", "negative_prompt"):
        text = request.get(field) or ""
        if len(text) > limits.max_prompt_chars:
            raise InvalidRequest("invalid_request", f"{field} is {len(text)} characters; at most "
                                                    f"{limits.max_prompt_chars}")
        if "\x00" in text:
            raise InvalidRequest("invalid_request", f"{field} contains a NUL character")
    for field, top in (("width", limits.max_width), ("height", limits.max_height)):
        v = request.get(field)
        if not isinstance(v, int) or not (limits.size_multiple <= v <= top):
            raise InvalidRequest("invalid_request", f"{field}={v!r}: must be between {limits.size_multiple} and {top}")
        if v % limits.size_multiple:
            raise InvalidRequest("invalid_request", f"{field}={v}: must be a multiple of {limits.size_multiple}")
    steps = request.get("steps")
    if not isinstance(steps, int) or not (1 <= steps <= limits.max_steps):
        raise InvalidRequest("invalid_request", f"steps={steps!r}: must be between 1 and {limits.max_steps}")
    guidance = request.get("guidance")
    if not isinstance(guidance, (int, float)) or not math.isfinite(guidance) \
            or not (0.0 <= guidance <= limits.max_guidance):
        raise InvalidRequest("invalid_request", f"guidance={guidance!r}: must be between 0 and {limits.max_guidance}")
    n = request.get("num_images")
    if not isinstance(n, int) or not (1 <= n <= limits.max_images):
        raise InvalidRequest("invalid_request", f"num_images={n!r}: must be between 1 and {limits.max_images}")
    seed = request.get("seed")
    if seed is not None and not (0 <= seed <= MAX_SEED):
        raise InvalidRequest("invalid_request", f"seed={seed}: must be between 0 and {MAX_SEED}")
    url = request.get("callback_url")
    if url is not None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise InvalidRequest("invalid_request", f"callback_url {url[:200]!r}: must be an http(s) URL")
    if models is not None and request.get("model") not in models:
        raise InvalidRequest("unknown_model", f"model {request.get('model')!r} is not served; known: "
                                              f"{', '.join(models)}")
