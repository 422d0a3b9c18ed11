"""Image safety after rendering, as publication runs it: fetch each new image from storage, ask the configured
detector (connectors/image_detectors.py), map its scores to PASS / REVIEW / BLOCK (processors/safety.py), and move
or delete the objects of a blocked request.

A request's verdict is the worst of its images'. With no detector configured every image passes marked unscanned.
What cannot be decided for want of infrastructure (the detector or the storage does not answer) raises
SafetyUnavailable: publication holds the partition at that record and reads it again after a backoff, unless the
detector's policy fails open (REVIEW) or closed (BLOCK) instead.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

from connectors.image_detectors import image_detector, is_image_fault
from connectors.moderation_cloud import ProviderPolicy
from connectors.storage import ObjectNotFound, ObjectStore, UnsafeKey, open_object_store
from processors.safety import (
    UNSCANNED,
    SafetyThresholds,
    SafetyVerdict,
    failure_verdict,
    thresholds_from,
    verdict,
    worst,
)
from schemas.moderation import ImageModerator, ImageVerdict
from streams import metrics
from streams.settings import Settings

log = logging.getLogger(__name__)

OnTimeout = Literal["retry", "review", "block"]
BlockedObjects = Literal["quarantine", "delete"]


class SafetyUnavailable(RuntimeError):
    """The detector or the storage did not answer: not the request's fault; read it again later."""


class ImageMissing(LookupError):
    """A rendered image is neither at its key nor in quarantine: nothing to scan, nothing to publish."""


@dataclass(frozen=True)
class Scanned:
    """The outcome of one request's scan: its verdict, or why there is none yet."""

    verdict: SafetyVerdict | None = None
    unavailable: str | None = None
    error: Exception | None = None  # the record's own fault (an image gone, a key outside the store)

    def result(self) -> SafetyVerdict:
        if self.unavailable is not None:
            raise SafetyUnavailable(self.unavailable)
        if self.error is not None:
            raise self.error
        assert self.verdict is not None
        return self.verdict


class ImageSafety:
    def __init__(self, detector: ImageModerator | None, store: ObjectStore | None,
                 thresholds: SafetyThresholds | None = None, *, on_timeout: OnTimeout = "retry",
                 blocked_objects: BlockedObjects = "quarantine", quarantine_prefix: str = "quarantine",
                 concurrency: int = 4) -> None:
        if detector is not None and store is None:
            raise ValueError("a detector needs the object store the images are in")
        self.detector, self.store = detector, store
        self.thresholds = thresholds or SafetyThresholds()
        self.on_timeout, self.blocked_objects = on_timeout, blocked_objects
        self.quarantine_prefix = quarantine_prefix.strip("/")
        self.concurrency = concurrency
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="image-safety") if detector else None

    @property
    def enabled(self) -> bool:
        return self.detector is not None

    def scan(self, requests: Sequence[dict[str, Any]]) -> list[Scanned]:
        """The verdict of each ImageRendered, its images checked concurrently."""
        if self._pool is None:
            return [Scanned(UNSCANNED) for _ in requests]
        outage = threading.Event()  # once one image finds an outage, the rest of the batch waits with it
        futures = [[self._pool.submit(self._image, image["uri"], rendered["tenant"], outage)
                    for image in rendered["images"]] for rendered in requests]
        out: list[Scanned] = []
        for per_request in futures:
            verdicts: list[SafetyVerdict] = []
            scanned: Scanned | None = None
            if not per_request:  # the schema allows an empty list; there is nothing to publish, and no verdict
                out.append(Scanned(error=ValueError("the ImageRendered lists no image")))
                continue
            for future in per_request:
                try:
                    verdicts.append(future.result())
                except SafetyUnavailable as exc:
                    scanned = scanned or Scanned(unavailable=str(exc))
                except (ImageMissing, UnsafeKey) as exc:
                    scanned = scanned or Scanned(error=exc)
            out.append(scanned or Scanned(worst(verdicts)))
        return out

    def _image(self, uri: str, tenant: str, outage: threading.Event) -> SafetyVerdict:
        try:
            return self._judged(uri, tenant, outage)
        except SafetyUnavailable:
            outage.set()
            raise

    def _judged(self, uri: str, tenant: str, outage: threading.Event) -> SafetyVerdict:
        assert self.detector is not None
        if outage.is_set():
            raise SafetyUnavailable("not asked: the detector or the storage failed on another image")
        data = self._fetch(uri)
        if data is None:  # deleted as unsafe by an earlier attempt that did not commit
            return SafetyVerdict("BLOCK", scanned=False, top_label="removed-before")
        try:
            answer = self.detector.check_image(data, tenant)
        except Exception as exc:  # noqa: BLE001 - a detector that breaks is a detector that does not answer
            log.warning("detector %s raised: %r", type(self.detector).__name__, exc)
            answer = ImageVerdict({}, (), type(self.detector).__name__, failure=type(exc).__name__,
                                  failure_action="review")
        if answer.failure is None:
            return verdict(answer.scores, self.thresholds)
        metrics.ERRORS.labels("image_detector").inc()
        if is_image_fault(answer.failure):  # retrying cannot help; a person decides unless the policy blocks
            return failure_verdict(answer.failure, "BLOCK" if self.on_timeout == "block" else "REVIEW")
        if self.on_timeout == "retry":
            raise SafetyUnavailable(f"image detector {answer.provider}: {answer.failure}")
        return failure_verdict(answer.failure, "BLOCK" if self.on_timeout == "block" else "REVIEW")

    def _fetch(self, uri: str) -> bytes | None:
        """The image's bytes: at its key, or in quarantine when an earlier attempt moved it there (the replay of
        a blocked request judges it again). None when it was deleted as unsafe."""
        assert self.store is not None
        try:
            try:
                return self.store.get(uri)
            except ObjectNotFound:
                if self.blocked_objects == "delete":
                    return None
                try:
                    return self.store.get(self.quarantine_key(uri))
                except ObjectNotFound:
                    raise ImageMissing(f"no image at {uri}, nor in quarantine") from None
        except (ImageMissing, UnsafeKey):
            raise
        except Exception as exc:
            metrics.ERRORS.labels("storage").inc()
            raise SafetyUnavailable(f"storage: {type(exc).__name__}: {exc}") from exc

    def quarantine_key(self, uri: str) -> str:
        assert self.store is not None
        return f"{self.quarantine_prefix}/{self.store.key_of(uri)}"

    def remove(self, rendered: dict[str, Any]) -> str:
        """Moves every image of a blocked request to the quarantine prefix (or deletes it); idempotent, so a
        replay after a crash finds the work done. Returns what was done, for the RequestFailed reason."""
        if self.store is None:
            return "no object removed"
        try:
            for image in rendered["images"]:
                key = self.store.key_of(image["uri"])
                if self.blocked_objects == "delete":
                    self.store.delete(key)
                else:
                    try:
                        self.store.move(key, f"{self.quarantine_prefix}/{key}")
                    except ObjectNotFound:
                        log.warning("blocked image %s is in neither place; nothing to move", key)
        except UnsafeKey:
            raise
        except Exception as exc:
            metrics.ERRORS.labels("storage").inc()
            raise SafetyUnavailable(f"storage: {type(exc).__name__}: {exc}") from exc
        if self.blocked_objects == "delete":
            return "its images were deleted"
        return f"its images were moved under {self.quarantine_prefix}/"

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


def image_safety_from_settings(s: Settings, detector: ImageModerator | None = None,
                               store: ObjectStore | None = None) -> ImageSafety:
    """The check the settings ask for; `detector` and `store` replace the ones the settings would build."""
    policy = ProviderPolicy(on_timeout="block" if s.image_safety_on_timeout == "block" else "review",
                            timeout_s=s.image_safety_timeout_s)
    if detector is None:
        detector = image_detector(s.image_safety, url=s.image_safety_url, policy=policy,
                                  aws_region=s.aws_moderation_region)
    if detector is not None and store is None:
        store = open_object_store(s.storage_url, s.s3_endpoint_url)
    thresholds = thresholds_from(s.image_safety_review_at, s.image_safety_block_at,
                                 s.image_safety_label_thresholds, s.image_safety_ignored_labels)
    return ImageSafety(detector, store, thresholds, on_timeout=s.image_safety_on_timeout,
                       blocked_objects=s.image_safety_blocked_objects,
                       quarantine_prefix=s.image_safety_quarantine_prefix, concurrency=s.image_safety_concurrency)
