"""Image detectors for the safety check after rendering, each behind `check_image(data, tenant) -> ImageVerdict`
(schemas/moderation.py), chosen by name:

- "http": a detector service of one's own (a model server in the same cluster). The PNG is POSTed to a configured
  URL; the answer is JSON `{"labels": {"<label>": <score in [0, 1]>, ...}}`. Through httpx, with a bounded answer.
- "rekognition" and "google": the cloud adapters of connectors/moderation_cloud.py.

A detector that gives no answer reports the failure in its ImageVerdict (never raises); whether that is waited
out, sent to a person or blocked is the caller's policy. `is_image_fault` tells failures that the image causes
(too large, refused) from outages: retrying the first kind cannot help.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx

from connectors.moderation_cloud import (
    GoogleSafeSearch,
    ProviderPolicy,
    RekognitionModeration,
    aws_clients,
    google_client,
)
from schemas.moderation import ImageModerator, ImageVerdict

DetectorName = Literal["none", "rekognition", "google", "http"]
DETECTORS: tuple[DetectorName, ...] = ("none", "rekognition", "google", "http")
ANSWER_MAX_BYTES = 64 * 1024  # a few hundred labels with scores; anything longer is not an answer
MAX_LABELS = 256
LABEL_MAX_CHARS = 128

# Failures that come from the image, not from the detector's health: the same image fails the same way again.
_IMAGE_FAULTS = frozenset({"image-too-large", "InvalidImageFormatException", "ImageTooLargeException",
                           "InvalidParameterException", "error-3"})  # error-3: Google's INVALID_ARGUMENT


def is_image_fault(failure: str) -> bool:
    return failure in _IMAGE_FAULTS or failure.startswith("refused-")


def check_detector_url(url: str) -> str:
    """The URL if it is an http(s)://host URL, else ValueError (the settings check it at start-up)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("is not an http(s)://host/path URL")
    if parts.username or parts.password:
        raise ValueError("must not carry credentials; put the detector behind the network's own access control")
    return url


class HttpImageDetector:
    """ImageModerator by a detector service: POST the image, read `{"labels": {label: score}}`.

    Redirects are not followed and proxy variables are ignored: the image goes to the configured address only.
    An answer is read up to ANSWER_MAX_BYTES; a longer one, a malformed one or a score outside [0, 1] is a
    failure of the detector, as are a timeout, a refused connection and a 5xx or 429. Another 4xx says the
    detector refuses this image (`refused-<status>`)."""

    provider = "http"

    def __init__(self, url: str, policy: ProviderPolicy | None = None, client: httpx.Client | None = None,
                 max_answer_bytes: int = ANSWER_MAX_BYTES) -> None:
        self.url = check_detector_url(url)
        self.policy = policy or ProviderPolicy()
        self.max_answer_bytes = max_answer_bytes
        self._client = client or httpx.Client(timeout=self.policy.timeout_s, follow_redirects=False,
                                              trust_env=False)

    def check_image(self, data: bytes, tenant: str) -> ImageVerdict:
        try:
            with self._client.stream("POST", self.url, content=data,
                                     headers={"Content-Type": "image/png", "X-Zimage-Tenant": tenant}) as response:
                body = self._read(response)
                status = response.status_code
        except httpx.TimeoutException:
            return self.policy.failed_image(self.provider, "timeout")
        except _AnswerTooLarge:
            return self.policy.failed_image(self.provider, "answer-too-large")
        except httpx.HTTPError as error:
            return self.policy.failed_image(self.provider, type(error).__name__)
        if status >= 500 or status == 429:
            return self.policy.failed_image(self.provider, f"http-{status}")
        if status != 200:
            return self.policy.failed_image(self.provider, f"refused-{status}")
        try:
            scores = parse_answer(body)
        except ValueError:
            return self.policy.failed_image(self.provider, "bad-answer")
        return ImageVerdict(scores, tuple(sorted(scores, key=lambda label: (-scores[label], label))),
                            self.provider)

    def _read(self, response: httpx.Response) -> bytes:
        chunks: list[bytes] = []
        size = 0
        for chunk in response.iter_bytes():
            size += len(chunk)
            if size > self.max_answer_bytes:
                raise _AnswerTooLarge
            chunks.append(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        self._client.close()


class _AnswerTooLarge(Exception):
    pass


def parse_answer(body: bytes) -> dict[str, float]:
    """`{"labels": {"<label>": score, ...}}` -> {label: score}; ValueError for anything else (a label that is
    not a short printable string, a score that is not a number in [0, 1], too many labels)."""
    answer = json.loads(body)
    labels = answer.get("labels") if isinstance(answer, dict) else None
    if not isinstance(labels, dict) or len(labels) > MAX_LABELS:
        raise ValueError("expected {\"labels\": {label: score}} with at most %d labels" % MAX_LABELS)
    scores: dict[str, float] = {}
    for label, score in labels.items():
        if not label or len(label) > LABEL_MAX_CHARS or not label.isprintable():
            raise ValueError(f"bad label {label[:40]!r}")
        if isinstance(score, bool) or not isinstance(score, int | float) or not (0.0 <= score <= 1.0) \
                or math.isnan(score):
            raise ValueError(f"label {label!r}: score {score!r} is not a number in [0, 1]")
        scores[label] = float(score)
    return scores


def image_detector(name: str, *, url: str | None = None, policy: ProviderPolicy | None = None,
                   aws_region: str | None = None, clients: Mapping[str, Any] | None = None) -> ImageModerator | None:
    """The detector of that name (None for "none"). `clients` may hold a ready "rekognition" or "google" client
    or an httpx "http" client; any other is built with the vendor's default credentials. Raises ValueError for an
    unknown name or a missing URL, and connectors.moderation_cloud.ProviderUnavailable for a missing SDK."""
    clients = clients or {}
    policy = policy or ProviderPolicy()
    if name == "none":
        return None
    if name == "http":
        if not url:
            raise ValueError("the http detector needs a URL (ZIMAGE_IMAGE_SAFETY_URL)")
        return HttpImageDetector(url, policy, clients.get("http"))
    if name == "rekognition":
        client = clients.get("rekognition") or aws_clients(aws_region, policy.timeout_s)[1]
        return RekognitionModeration(client, policy)
    if name == "google":
        return GoogleSafeSearch(clients.get("google") or google_client(), policy)
    raise ValueError(f"unknown image detector {name!r}; known: {', '.join(DETECTORS)}")
