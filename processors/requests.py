"""What a valid GenerationRequest is, and the derived values every stage must agree on (seed, priority)."""
from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

from processors.address_guard import UnsafeCallbackUrl, check_url_at_intake
from processors.partitioning import FORWARDED_FROM_HEADER
from processors.render_settings import RenderSettings

PRIORITY_NAMES = {"HIGH": "high", "NORMAL": "normal", "LOW": "low"}
MAX_SEED = 2**63 - 1
# The last millisecond of the year 9999: the schemas' timestamps are Avro `timestamp-millis`, which readers turn
# into dates (fastavro's default reader, Java's Instant in the year ranges Python can hold); a later one, though a
# valid long, would make the events that copy it unreadable for every such subscriber.
MAX_TIMESTAMP_MS = 253_402_300_799_999


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
    # Every field below is copied into ImageRendered, ImageReady or RequestFailed: their caps bound the size of
    # the outputs (streams.topology.largest_output_bytes; the settings refuse caps whose outputs would not fit).
    max_tenant_chars: int = 128
    max_sku_id_chars: int = 256
    max_metadata_entries: int = 32
    max_metadata_bytes: int = 16384  # UTF-8 bytes of every key and value together
    max_callback_url_chars: int = 2048
    max_model_chars: int = 256
    callback_allowlist: tuple[str, ...] = ()  # host names, addresses or CIDR blocks admitted as callback hosts
    # A request's record headers travel with it (onto its routed record, or its forward to its home partition): a
    # record that filled its topic with headers would make those too large to write, and stall its partition.
    max_header_bytes: int = 16384


HEADER_OVERHEAD_BYTES = 8  # counted for each header, so that many empty ones add up too
FORWARDED_FROM_MAX_BYTES = 512  # longer than any `topic/partition/offset`


def check_headers(headers: Sequence[tuple[str, bytes | str | None]], limits: Limits) -> None:
    """Raises InvalidRequest when the record's headers hold more than `limits.max_header_bytes`. One short
    forwarded-from header is not counted (only one: many would add up): the gate adds it to a request it forwards,
    which is checked again at home."""
    sizes = [HEADER_OVERHEAD_BYTES + len(key.encode("utf-8", "surrogatepass")) + len(value or b"")
             for key, value in headers]
    excused = next((n for n, (key, value) in zip(sizes, headers, strict=True)
                    if key == FORWARDED_FROM_HEADER and len(value or b"") <= FORWARDED_FROM_MAX_BYTES), 0)
    size = sum(sizes) - excused
    if size > limits.max_header_bytes:
        raise _invalid(f"the record's {len(headers)} headers hold {size} bytes; at most {limits.max_header_bytes}")


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
    """Raises InvalidRequest for the first thing wrong, whatever the request holds; returns None for a request
    that may render."""
    try:
        _check(request, limits, models)
    except InvalidRequest:
        raise
    except Exception as exc:  # a value of a type no rule foresaw: still the request's fault, never the process's
        raise InvalidRequest("invalid_request", f"malformed request: {type(exc).__name__}: {str(exc)[:200]}") from exc


def _invalid(reason: str) -> InvalidRequest:
    return InvalidRequest("invalid_request", reason)


def _check(request: Mapping[str, Any], limits: Limits, models: tuple[str, ...] | None) -> None:
    if not isinstance(request, Mapping):
        raise _invalid(f"a request is a record, got {type(request).__name__}")
    _check_request_id(request.get("request_id"), limits)
    _check_tenant(request.get("tenant"), limits)
    sku_id = request.get("sku_id")
    if sku_id is not None:
        _check_text("sku_id", sku_id, limits.max_sku_id_chars)
        if _has_control(sku_id):
            raise _invalid("sku_id contains control characters")
    _check_prompts(request, limits)
    _check_numbers(request, limits)
    _check_metadata(request.get("metadata"), limits)
    url = request.get("callback_url")
    if url is not None:
        _check_callback_url(url, limits)
    model = _check_text("model", request.get("model"), limits.max_model_chars)
    if models is not None and model not in models:
        raise InvalidRequest("unknown_model", f"model {model[:100]!r} is not served; known: {', '.join(models)}")


def identity_of(request: Any, limits: Limits) -> dict[str, str | None]:
    """request_id, tenant and callback_url of a request that may have failed validation, each kept only when it
    passes its own rule (None otherwise): what a RequestFailed may carry without breaking its schema, its
    topic's size limit, or calling a refused callback URL."""
    get = request.get if isinstance(request, Mapping) else (lambda field: None)
    checks = (("request_id", _check_request_id), ("tenant", _check_tenant), ("callback_url", _check_callback_url))
    identity: dict[str, str | None] = {}
    for field, check in checks:
        try:
            value = get(field)
            check(value, limits)
        except Exception:  # noqa: BLE001 - the field's own rule, or a value no rule foresaw
            value = None
        identity[field] = value
    return identity


def _check_tenant(tenant: Any, limits: Limits) -> None:
    _check_text("tenant", tenant, limits.max_tenant_chars)
    if not tenant.strip() or not tenant.isprintable():
        raise _invalid("tenant is empty or holds control characters")


def _check_callback_url(url: Any, limits: Limits) -> None:
    _check_text("callback_url", url, limits.max_callback_url_chars)
    try:
        check_url_at_intake(url, limits.callback_allowlist)
    except UnsafeCallbackUrl as exc:
        raise _invalid(str(exc)) from None


def _check_text(field: str, value: object, most: int) -> str:
    """`value`, when it is a string of at most `most` characters with no lone surrogate; else InvalidRequest."""
    if not isinstance(value, str):
        raise _invalid(f"{field} must be a string, got {type(value).__name__}")
    if len(value) > most:
        raise _invalid(f"{field} is {len(value)} characters; at most {most}")
    if not _encodable(value):
        raise _invalid(f"{field} is not valid Unicode text (it holds a lone surrogate)")
    return value


def _encodable(text: str) -> bool:
    """False for a string that no output could carry: Avro strings are UTF-8, and a lone surrogate has none."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_CONTROLS = "".join(chr(c) for c in [*range(0x20), *range(0x7F, 0xA0)])
_CONTROL_PATTERNS: dict[str, re.Pattern[str]] = {}  # by the controls allowed; a regex scans in C, not per char


def _has_control(text: str, allowed: str = "") -> bool:
    """C0 controls, DEL and C1 controls, except those in `allowed`."""
    pattern = _CONTROL_PATTERNS.get(allowed)
    if pattern is None:
        refused = "".join(c for c in _CONTROLS if c not in allowed)
        pattern = _CONTROL_PATTERNS[allowed] = re.compile(f"[{re.escape(refused)}]")
    return pattern.search(text) is not None


_PRINTABLE_ASCII = re.compile(r"[!-~]+")
_PROMPT_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")  # C0 controls but tab, line feed, carriage return


def _check_request_id(rid: Any, limits: Limits) -> None:
    _check_text("request_id", rid, limits.max_request_id_chars)
    if not rid:
        raise _invalid("request_id is empty")
    if not _PRINTABLE_ASCII.fullmatch(rid):
        raise _invalid(f"request_id {rid[:60]!r} must be printable ASCII without whitespace or control characters")


def _check_prompts(request: Mapping[str, Any], limits: Limits) -> None:
    for field in ("prompt", "negative_prompt"):
        text = request.get(field)
        if text is None and field == "negative_prompt":
            continue
        text = _check_text(field, text, limits.max_prompt_chars)
        if "\x00" in text:
            raise _invalid(f"{field} contains a NUL character")
        if _PROMPT_CONTROL.search(text):
            raise _invalid(f"{field} contains a control character (only tab, line feed and carriage return pass)")
    if not request["prompt"].strip():
        raise _invalid("prompt is empty")


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_numbers(request: Mapping[str, Any], limits: Limits) -> None:
    for field, top in (("width", limits.max_width), ("height", limits.max_height)):
        v = request.get(field)
        if not _is_int(v) or not (limits.size_multiple <= v <= top):
            raise _invalid(f"{field}={v!r:.40}: must be between {limits.size_multiple} and {top}")
        if v % limits.size_multiple:
            raise _invalid(f"{field}={v}: must be a multiple of {limits.size_multiple}")
    steps = request.get("steps")
    if not _is_int(steps) or not (1 <= steps <= limits.max_steps):
        raise _invalid(f"steps={steps!r:.40}: must be between 1 and {limits.max_steps}")
    guidance = request.get("guidance")
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance) \
            or not (0.0 <= guidance <= limits.max_guidance):
        raise _invalid(f"guidance={guidance!r:.40}: must be between 0 and {limits.max_guidance}")
    n = request.get("num_images")
    if not _is_int(n) or not (1 <= n <= limits.max_images):
        raise _invalid(f"num_images={n!r:.40}: must be between 1 and {limits.max_images}")
    seed = request.get("seed")
    if seed is not None and (not _is_int(seed) or not (0 <= seed <= MAX_SEED)):
        raise _invalid(f"seed={seed!r:.40}: must be between 0 and {MAX_SEED}")
    priority = request.get("priority", "NORMAL")
    if not isinstance(priority, str) or priority not in PRIORITY_NAMES:
        raise _invalid(f"priority {request.get('priority')!r:.40}: must be one of {', '.join(PRIORITY_NAMES)}")
    if not _is_int(request.get("submitted_at")) or not 0 <= request["submitted_at"] <= MAX_TIMESTAMP_MS:
        raise _invalid("submitted_at must be an int (milliseconds since the epoch, before the year 10000)")
    deadline = request.get("deadline")
    if deadline is not None and (not _is_int(deadline) or not 0 <= deadline <= MAX_TIMESTAMP_MS):
        raise _invalid("deadline must be an int (milliseconds since the epoch, before the year 10000) or absent")


def _check_metadata(metadata: Any, limits: Limits) -> None:
    if metadata is None:
        return
    if not isinstance(metadata, Mapping):
        raise _invalid(f"metadata must be a map of strings, got {type(metadata).__name__}")
    if len(metadata) > limits.max_metadata_entries:
        raise _invalid(f"metadata has {len(metadata)} entries; at most {limits.max_metadata_entries}")
    size = 0
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str) or not _encodable(key) or not _encodable(value):
            raise _invalid(f"metadata {str(key)[:40]!r}: keys and values must be valid Unicode strings")
        if _has_control(key):
            raise _invalid(f"metadata key {key[:40]!r} contains control characters")
        size += len(key.encode("utf-8")) + len(value.encode("utf-8"))
    if size > limits.max_metadata_bytes:
        raise _invalid(f"metadata holds {size} bytes; at most {limits.max_metadata_bytes}")
