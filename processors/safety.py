"""Image safety: a detector's scores per label mapped to PASS, REVIEW or BLOCK by configurable thresholds.

The detector itself lives outside this module (it may load a model or call a cloud service); this is the pure
rule every detector's output goes through. No detector configured is a verdict too: PASS, marked unscanned, so
the events and the metrics show it instead of passing the image silently."""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Decision = Literal["PASS", "REVIEW", "BLOCK"]
SEVERITY: dict[Decision, int] = {"PASS": 0, "REVIEW": 1, "BLOCK": 2}
# Labels come from a detector or a cloud service: bounded so an ImageReady stays within its topic's size bound.
SAFETY_LABEL_MAX_CHARS = 128


@dataclass(frozen=True)
class SafetyThresholds:
    """A score at or above `review` sends the image to review; at or above `block`, it is blocked.

    `per_label` overrides both for one label, as (review, block); labels in `ignored` never count (a detector's
    benign classes, such as a covered body part or a face)."""

    review: float = 0.5
    block: float = 0.85
    per_label: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    ignored: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        for label, (review, block) in {"": (self.review, self.block), **self.per_label}.items():
            if not (0.0 <= review <= block) or math.isnan(block):
                name = f"label {label!r}" if label else "the global thresholds"
                raise ValueError(f"{name}: expected 0 <= review <= block, got review={review}, block={block}")

    def for_label(self, label: str) -> tuple[float, float]:
        return self.per_label.get(label, (self.review, self.block))


def parse_label_thresholds(text: str) -> dict[str, tuple[float, float]]:
    """`"violence=0.4:0.8, gore=0.3:0.6"` -> {"violence": (0.4, 0.8), "gore": (0.3, 0.6)}: the settings' form."""
    parsed: dict[str, tuple[float, float]] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        label, sep, pair = item.partition("=")
        review, colon, block = pair.partition(":")
        if not sep or not colon or not label.strip():
            raise ValueError(f"expected label=review:block, got {item!r}")
        parsed[label.strip()] = (float(review), float(block))
    return parsed


@dataclass(frozen=True)
class SafetyVerdict:
    decision: Decision
    scanned: bool
    top_label: str | None = None
    top_score: float | None = None

    @property
    def unscanned(self) -> bool:
        return not self.scanned

    def as_record(self) -> dict[str, Any]:
        """The ImageReady `safety` record."""
        return {"decision": self.decision, "scanned": self.scanned, "top_label": self.top_label,
                "top_score": self.top_score}


UNSCANNED = SafetyVerdict("PASS", scanned=False)


# Classes of NudeNet's detector (nudenet, an opt-in extra) that are not unsafe on their own: the thresholds of
# a deployment that uses it ignore them.
NUDENET_BENIGN_LABELS = frozenset({
    "FACE_FEMALE", "FACE_MALE", "FEET_EXPOSED", "FEET_COVERED", "BELLY_COVERED", "BELLY_EXPOSED", "ARMPITS_COVERED",
    "ARMPITS_EXPOSED", "MALE_BREAST_EXPOSED", "FEMALE_BREAST_COVERED", "BUTTOCKS_COVERED", "ANUS_COVERED",
    "FEMALE_GENITALIA_COVERED",
})


def scores_of_detections(detections: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Per-label scores from an object detector's boxes (`{"class": label, "score": s, ...}`, as NudeNet gives
    them): the highest score of each label."""
    scores: dict[str, float] = {}
    for detection in detections:
        label, score = str(detection["class"]), float(detection["score"])
        scores[label] = max(score, scores.get(label, score))
    return scores


def verdict(scores: Mapping[str, float] | None, thresholds: SafetyThresholds) -> SafetyVerdict:
    """The decision for one image. `scores` is None when no detector is configured: PASS, unscanned.

    The top label is the one that drove the decision (the highest score among the labels of the most severe
    outcome), or the highest-scoring label when everything passes. A score that is not a number is treated as
    a detector fault on that label: REVIEW, never a silent PASS."""
    if scores is None:
        return UNSCANNED
    ranked: list[tuple[int, float, str]] = []
    for label, raw in scores.items():
        if label in thresholds.ignored:
            continue
        score = float(raw)
        review, block = thresholds.for_label(label)
        if math.isnan(score):
            ranked.append((SEVERITY["REVIEW"], math.inf, label))
            continue
        severity = SEVERITY["BLOCK"] if score >= block else SEVERITY["REVIEW"] if score >= review else 0
        ranked.append((severity, score, label))
    if not ranked:
        return SafetyVerdict("PASS", scanned=True)
    severity, score, label = max(ranked, key=lambda item: (item[0], item[1], item[2]))
    decision = next(name for name, level in SEVERITY.items() if level == severity)
    return SafetyVerdict(decision, scanned=True, top_label=label[:SAFETY_LABEL_MAX_CHARS],
                         top_score=None if math.isinf(score) else score)


def worst(verdicts: Iterable[SafetyVerdict]) -> SafetyVerdict:
    """The verdict of a request from those of its images: the most severe one (then the highest score). The
    request counts as scanned only when every image was."""
    listed = list(verdicts)
    if not listed:
        raise ValueError("a request has at least one image verdict")
    chosen = max(listed, key=lambda v: (SEVERITY[v.decision], -1.0 if v.top_score is None else v.top_score))
    scanned = all(v.scanned for v in listed)
    return chosen if chosen.scanned == scanned else SafetyVerdict(chosen.decision, scanned, chosen.top_label,
                                                                  chosen.top_score)


# ------------------------------------------------------------------- detector failures and how verdicts are shown

FailureDecision = Literal["REVIEW", "BLOCK"]


def failure_verdict(reason: str, decision: FailureDecision) -> SafetyVerdict:
    """The verdict of an image its detector could not judge (a timeout under a fail-open or fail-closed policy,
    or an image the detector refuses): REVIEW or BLOCK, never PASS, and unscanned; the label names the failure."""
    if decision not in ("REVIEW", "BLOCK"):
        raise ValueError(f"a detector failure gives REVIEW or BLOCK, not {decision!r}")
    return SafetyVerdict(decision, scanned=False, top_label=f"unavailable:{reason}"[:SAFETY_LABEL_MAX_CHARS])


def metric_label(v: SafetyVerdict) -> str:
    """The `verdict` label of zimage_safety_total: pass, review or block, and unscanned for an image that passed
    because no detector looked at it."""
    return "unscanned" if v.decision == "PASS" and not v.scanned else v.decision.lower()


def describe(v: SafetyVerdict) -> str:
    """One line for a status detail or a RequestFailed reason: `image safety BLOCK: nudity 0.930`."""
    if v.decision == "PASS" and not v.scanned:
        return "image safety: unscanned (no detector)"
    shown = v.top_label or "no label"
    if v.top_score is not None:
        shown += f" {v.top_score:.3f}"
    return f"image safety {v.decision}: {shown}"


def thresholds_from(review: float, block: float, per_label: str = "", ignored: Iterable[str] = ()) -> SafetyThresholds:
    """SafetyThresholds from the settings' forms; ValueError naming what is wrong."""
    return SafetyThresholds(review=review, block=block, per_label=parse_label_thresholds(per_label),
                            ignored=frozenset(label.strip() for label in ignored if label.strip()))
