"""TextModerator by a local text classifier whose model ships inside its package, so nothing is downloaded.

The model is alt-profanity-check's (MIT licence): a scikit-learn linear classifier over character and word
n-grams, trained on English offensive language. It scores insults, slurs and profanity, not every kind of unsafe
request, and it knows no Chinese: the rules and the cloud adapters cover the rest. Its score is the
probability of offensive language, in [0, 1]; the policy's thresholds (per tenant) turn it into an action.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from processors.moderation_policy import ModerationPolicy
from schemas.moderation import Verdict

Predict = Callable[[Sequence[str]], Sequence[float]]

CATEGORY = "offensive_language"
PACKAGE = "alt-profanity-check"


class ClassifierUnavailable(RuntimeError):
    """The classifier's package is not installed."""


def load_profanity_model() -> Predict:
    """alt-profanity-check's model. Loading it reads the model files from the package (about 1 MB) and imports
    scikit-learn, which takes a second or two: do it once, at start."""
    try:
        from profanity_check import profanity_check
    except ImportError as error:
        raise ClassifierUnavailable(
            f"the text classifier needs the {PACKAGE} package (pip install '{PACKAGE}==1.9.1')") from error
    direct = linear_scorer(profanity_check.vectorizer, profanity_check.model)
    if direct is not None:
        return direct

    def predict(texts: Sequence[str]) -> list[float]:  # a model of another shape: the package's own call
        return [float(score) for score in profanity_check.predict_prob(list(texts))]

    return predict


def linear_scorer(vectorizer: Any, model: Any) -> Predict | None:
    """The model's probabilities computed straight from its weights, or None when the model is not the shape this
    knows (a sigmoid-calibrated ensemble of binary linear classifiers).

    Why: scikit-learn's transform and predict_proba check their inputs again and again (in each of the ensemble's
    five members), which costs about 4 ms per call against a few microseconds for the arithmetic; the gate calls
    it once per batch, and at light load a batch is one request. The result is the same: each member's decision
    function w·x + c, its sigmoid calibration 1 / (1 + exp(a·d + b)), averaged over the members."""
    members = getattr(model, "calibrated_classifiers_", None)
    if getattr(model, "method", None) != "sigmoid" or not members or list(getattr(model, "classes_", [])) != [0, 1]:
        return None
    weights, intercepts, slopes, offsets = [], [], [], []
    for member in members:
        estimator: Any = getattr(member, "estimator", None)
        calibrators = getattr(member, "calibrators", [])
        coef = getattr(estimator, "coef_", None)
        if coef is None or getattr(coef, "shape", (0,))[0] != 1 or len(calibrators) != 1:
            return None
        weights.append(np.asarray(coef, dtype=np.float64)[0])
        intercepts.append(float(np.asarray(estimator.intercept_).reshape(-1)[0]))
        slopes.append(float(calibrators[0].a_))
        offsets.append(float(calibrators[0].b_))
    matrix = np.stack(weights, axis=1)  # features x members
    intercept, slope, offset = np.array(intercepts), np.array(slopes), np.array(offsets)
    features = _tfidf_features(vectorizer)

    def decisions_of(texts: list[str]) -> Any:  # texts x members
        if features is None:
            return vectorizer.transform(texts) @ matrix + intercept
        rows, columns, values = features(texts)
        decisions = np.zeros((len(texts), matrix.shape[1]))
        np.add.at(decisions, rows, values[:, None] * matrix[columns])  # each (text, feature) pair into its text
        return decisions + intercept

    def predict(texts: Sequence[str]) -> list[float]:
        probabilities = 1.0 / (1.0 + np.exp(slope * decisions_of(list(texts)) + offset))
        return [float(p) for p in probabilities.mean(axis=1)]

    return predict


def _tfidf_features(vectorizer: Any) -> Callable[[list[str]], tuple[Any, Any, Any]] | None:
    """The l2-normalised tf-idf features of a batch of texts as (rows, columns, values), one entry per feature a
    text has, with the vectorizer's own tokens and weights; or None for a vectorizer configured otherwise. Why: a
    prompt has a few dozen tokens, scikit-learn's transform spends most of its time checking and building a sparse
    matrix for them, and the arithmetic of a whole batch costs about as many numpy calls as that of one text."""
    params = vectorizer.get_params() if hasattr(vectorizer, "get_params") else {}
    wanted = {"norm": "l2", "use_idf": True, "sublinear_tf": False, "binary": False}
    if any(params.get(name) != value for name, value in wanted.items()) or not hasattr(vectorizer, "idf_"):
        return None
    analyse, vocabulary, idf = vectorizer.build_analyzer(), vectorizer.vocabulary_, vectorizer.idf_

    def features(texts: list[str]) -> tuple[Any, Any, Any]:
        rows: list[int] = []
        columns: list[int] = []
        counts: list[int] = []
        for row, text in enumerate(texts):
            found = Counter(column for token in analyse(text) if (column := vocabulary.get(token)) is not None)
            rows += [row] * len(found)
            columns += found.keys()
            counts += found.values()
        row_of = np.array(rows, dtype=np.intp)
        column_of = np.array(columns, dtype=np.intp)
        values = np.array(counts, dtype=np.float64) * idf[column_of]
        norms = np.sqrt(np.bincount(row_of, weights=values * values, minlength=len(texts)))
        return row_of, column_of, values / np.where(norms > 0, norms, 1.0)[row_of]

    return features


class ClassifierModerator:
    """Scores texts with the classifier and maps each score by the tenant's thresholds. `check_many` scores a
    batch in one call, which costs about as much as one text."""

    provider = f"classifier:{PACKAGE}"

    def __init__(self, policy: ModerationPolicy | None = None, predict: Predict | None = None) -> None:
        self.policy = policy or ModerationPolicy()
        self._predict = predict or load_profanity_model()

    def check(self, text: str, tenant: str) -> Verdict:
        return self.check_many([(text, tenant)])[0]

    def check_many(self, items: Sequence[tuple[str, str]]) -> list[Verdict]:
        """One verdict per (text, tenant), in order."""
        scored = [i for i, (text, _) in enumerate(items) if text.strip()]
        scores = dict(zip(scored, self._predict([items[i][0] for i in scored]), strict=True)) if scored else {}
        verdicts = []
        for index, (_, tenant) in enumerate(items):
            score = scores.get(index)
            if score is None:  # nothing to score: an empty text offends no one
                verdicts.append(Verdict("allow", None, None, None, self.provider))
                continue
            action = self.policy.classifier_for(tenant).action_for(score)
            rule = f"classifier:{CATEGORY}>={self._threshold(action, tenant)}" if action != "allow" else None
            verdicts.append(Verdict(action, rule, CATEGORY if rule else None, score, self.provider))
        return verdicts

    def _threshold(self, action: str, tenant: str) -> float | None:
        thresholds = self.policy.classifier_for(tenant)
        return thresholds.block_at if action == "block" else thresholds.review_at
