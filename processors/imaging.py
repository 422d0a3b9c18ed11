"""Rendered pixels to stored bytes: deterministic PNG encoding, content hashes and object keys."""

from __future__ import annotations

import hashlib
import io
import re

import numpy as np
from PIL import Image

# Fixed encoder settings: the bytes must depend on the pixels only (no timestamps, no text chunks, no
# adaptive "optimize" pass), so the same image always hashes to the same sha256.
PNG_COMPRESS_LEVEL = 6
MAX_ID_CHARS = 64
KEY_DIGEST_CHARS = 16
_UNSAFE_ID_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of an HxWx3 uint8 RGB array; identical pixels give identical bytes."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", None)
        dtype = getattr(image, "dtype", type(image).__name__)
        raise ValueError(f"encode_png needs an HxWx3 uint8 array, got shape {shape} dtype {dtype}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"encode_png needs a non-empty image, got shape {image.shape}")
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image), mode="RGB").save(
        buffer, format="PNG", optimize=False, compress_level=PNG_COMPRESS_LEVEL
    )
    return buffer.getvalue()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sanitize_id(request_id: str) -> str:
    """A readable, path-safe rendering of a request id: [A-Za-z0-9._-] only, never '.', '..' or empty."""
    cleaned = _UNSAFE_ID_CHARS.sub("_", request_id)[:MAX_ID_CHARS]
    # Leading dots would allow "." and ".." segments (and hidden files); a digest elsewhere keeps keys unique.
    cleaned = cleaned.lstrip(".")
    return cleaned or "_"


def object_key(request_id: str, index: int, model_version: str) -> str:
    """Deterministic storage key of one image: images/<digest>/<sanitized id>/<index>.png.

    The digest covers the raw request id and the model version, so ids that sanitize alike, or the same request
    rendered by another model version, never share a key. Nothing from the id can add a path segment.
    """
    if not isinstance(request_id, str):
        raise TypeError(f"request_id must be a str, got {type(request_id).__name__}")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"index must be a non-negative int, got {index!r}")
    digest = hashlib.sha256(f"{request_id}\x00{model_version}".encode("utf-8", "surrogatepass")).hexdigest()
    return f"images/{digest[:KEY_DIGEST_CHARS]}/{sanitize_id(request_id)}/{index}.png"
