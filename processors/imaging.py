"""Rendered pixels to stored bytes: deterministic PNG encoding, content hashes and object keys."""

from __future__ import annotations

import hashlib
import re

import imagecodecs
import numpy as np

# Fixed encoder settings: the bytes must depend on the pixels only (libpng writes no timestamps or text chunks),
# so the same image always hashes to the same sha256.
PNG_COMPRESS_LEVEL = 6
MAX_ID_CHARS = 64
KEY_DIGEST_CHARS = 16
_UNSAFE_ID_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of an HxWx3 uint8 RGB array; identical pixels give identical bytes."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", None)
        dtype = getattr(image, "dtype", type(image).__name__)
        raise ValueError(f"encode_png needs an HxWx3 uint8 array, got shape {shape} dtype {dtype}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"encode_png needs a non-empty image, got shape {image.shape}")
    return bytes(imagecodecs.png_encode(np.ascontiguousarray(image), level=PNG_COMPRESS_LEVEL))


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sanitize_id(text: str) -> str:
    """A readable, path-safe rendering of an id: [A-Za-z0-9._-] only, never '.', '..' or empty."""
    cleaned = _UNSAFE_ID_CHARS.sub("_", text)[:MAX_ID_CHARS]
    # Leading dots would allow "." and ".." segments (and hidden files); a digest beside it keeps keys unique.
    cleaned = cleaned.lstrip(".")
    return cleaned or "_"


def object_key(tenant: str, sha256: str) -> str:
    """Storage key of one image: images/<tenant>-<tenant digest>/<sha256[:2]>/<sha256>.png.

    Content-addressed per tenant, so an object never changes once written: the same bytes always land on the
    same key, and nothing a producer chooses (a request id, another tenant's name) can overwrite another
    tenant's image. The tenant digest keeps tenants that sanitize alike apart; nothing can add a path segment.
    """
    if not isinstance(tenant, str) or not tenant:
        raise ValueError(f"tenant must be a non-empty str, got {tenant!r}")
    if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
        raise ValueError(f"sha256 must be 64 lowercase hex digits, got {sha256!r}")
    digest = hashlib.sha256(tenant.encode("utf-8", "surrogatepass")).hexdigest()[:KEY_DIGEST_CHARS]
    return f"images/{sanitize_id(tenant)}-{digest}/{sha256[:2]}/{sha256}.png"
