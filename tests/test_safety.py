"""Image safety verdicts from detector scores: pure, no model."""
from __future__ import annotations

import fastavro
import pytest

from processors.events import image_ready
from processors.safety import (
    NUDENET_BENIGN_LABELS,
    SAFETY_LABEL_MAX_CHARS,
    UNSCANNED,
    SafetyThresholds,
    SafetyVerdict,
    parse_label_thresholds,
    scores_of_detections,
    verdict,
    worst,
)
from schemas.serde import load_schema
from tests.test_events import rendered_event


def test_no_detector_passes_marked_unscanned() -> None:
    result = verdict(None, SafetyThresholds())
    assert result == SafetyVerdict("PASS", scanned=False) and result.unscanned
    assert result.as_record() == {"decision": "PASS", "scanned": False, "top_label": None, "top_score": None}


def test_a_scanned_image_with_no_labels_passes_scanned() -> None:
    assert verdict({}, SafetyThresholds()) == SafetyVerdict("PASS", scanned=True)


@pytest.mark.parametrize(("score", "decision"), [(0.0, "PASS"), (0.49, "PASS"), (0.5, "REVIEW"), (0.84, "REVIEW"),
                                                  (0.85, "BLOCK"), (1.0, "BLOCK")])
def test_global_thresholds_are_inclusive(score: float, decision: str) -> None:
    result = verdict({"explicit": score}, SafetyThresholds())
    assert (result.decision, result.top_label, result.top_score) == (decision, "explicit", score)


def test_the_most_severe_label_decides_even_with_a_lower_score() -> None:
    thresholds = SafetyThresholds(per_label={"gore": (0.2, 0.3)})
    result = verdict({"explicit": 0.6, "gore": 0.35, "drawing": 0.99}, thresholds)
    # drawing 0.99 is BLOCK under the global thresholds: it outranks gore's BLOCK by score
    assert (result.decision, result.top_label) == ("BLOCK", "drawing")
    ignoring = SafetyThresholds(per_label={"gore": (0.2, 0.3)}, ignored=frozenset({"drawing"}))
    assert verdict({"explicit": 0.6, "gore": 0.35, "drawing": 0.99}, ignoring) == SafetyVerdict(
        "BLOCK", True, "gore", 0.35)
    assert verdict({"explicit": 0.6, "gore": 0.25}, ignoring) == SafetyVerdict("REVIEW", True, "explicit", 0.6)


def test_everything_ignored_or_low_passes_naming_the_highest_score() -> None:
    assert verdict({"a": 0.1, "b": 0.3}, SafetyThresholds()) == SafetyVerdict("PASS", True, "b", 0.3)
    assert verdict({"face": 0.99}, SafetyThresholds(ignored=frozenset({"face"}))) == SafetyVerdict("PASS", True)


def test_a_score_that_is_not_a_number_goes_to_review() -> None:
    result = verdict({"explicit": float("nan"), "other": 0.1}, SafetyThresholds())
    assert (result.decision, result.top_label, result.top_score) == ("REVIEW", "explicit", None)
    assert verdict({"explicit": float("nan"), "gore": 0.9}, SafetyThresholds()).decision == "BLOCK"


def test_long_labels_are_cut_so_the_event_stays_bounded() -> None:
    result = verdict({"x" * 1000: 0.9}, SafetyThresholds())
    assert result.top_label == "x" * SAFETY_LABEL_MAX_CHARS


def test_thresholds_must_be_ordered() -> None:
    with pytest.raises(ValueError, match="global"):
        SafetyThresholds(review=0.9, block=0.5)
    with pytest.raises(ValueError, match="'gore'"):
        SafetyThresholds(per_label={"gore": (0.5, 0.1)})
    with pytest.raises(ValueError):
        SafetyThresholds(review=-0.1)


def test_label_thresholds_parse_from_settings_text() -> None:
    assert parse_label_thresholds(" violence=0.4:0.8, gore=0.3:0.6 ,") == {"violence": (0.4, 0.8),
                                                                           "gore": (0.3, 0.6)}
    assert parse_label_thresholds("") == {}
    for bad in ("violence=0.4", "=0.1:0.2", "violence"):
        with pytest.raises(ValueError):
            parse_label_thresholds(bad)


def test_a_request_takes_its_worst_image_and_is_scanned_only_if_every_image_was() -> None:
    passed = SafetyVerdict("PASS", True, "a", 0.2)
    review = SafetyVerdict("REVIEW", True, "b", 0.6)
    higher_review = SafetyVerdict("REVIEW", True, "c", 0.7)
    assert worst([passed, review, higher_review]) == higher_review
    assert worst([passed, UNSCANNED]) == SafetyVerdict("PASS", False, "a", 0.2)
    assert worst([UNSCANNED, UNSCANNED]) == UNSCANNED
    with pytest.raises(ValueError):
        worst([])


def test_the_verdict_travels_in_image_ready() -> None:
    rendered = rendered_event()
    result = verdict({"explicit": 0.7}, SafetyThresholds())
    ready = image_ready(rendered, now_ms=rendered["rendered_at"] + 1, safety=result.as_record())
    assert ready["safety"] == {"decision": "REVIEW", "scanned": True, "top_label": "explicit", "top_score": 0.7}
    assert fastavro.validate(ready, fastavro.parse_schema(load_schema("ImageReady")))
    unscanned = image_ready(rendered, now_ms=rendered["rendered_at"] + 1, safety=UNSCANNED.as_record())
    assert unscanned["safety"]["scanned"] is False


def test_detector_boxes_become_the_highest_score_per_label() -> None:
    boxes = [{"class": "FACE_FEMALE", "score": 0.9, "box": [0, 0, 5, 5]},
             {"class": "BUTTOCKS_EXPOSED", "score": 0.55, "box": [1, 1, 2, 2]},
             {"class": "BUTTOCKS_EXPOSED", "score": 0.9, "box": [3, 3, 2, 2]}]
    scores = scores_of_detections(boxes)
    assert scores == {"FACE_FEMALE": 0.9, "BUTTOCKS_EXPOSED": 0.9}
    assert verdict(scores, SafetyThresholds(ignored=NUDENET_BENIGN_LABELS)) == SafetyVerdict(
        "BLOCK", True, "BUTTOCKS_EXPOSED", 0.9)
    assert verdict(scores_of_detections([]), SafetyThresholds()) == SafetyVerdict("PASS", True)
