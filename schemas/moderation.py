"""The shapes every moderator shares: a text verdict, an image verdict, the two moderator interfaces, and how
several text verdicts combine.

They live here, not in processors/ or connectors/, because both the pure rules and the cloud adapters produce
them, and neither of those packages may import the other.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

Action = Literal["allow", "review", "block"]
FailureAction = Literal["review", "block"]
ACTIONS: tuple[Action, ...] = ("allow", "review", "block")
_RANK: dict[str, int] = {action: rank for rank, action in enumerate(ACTIONS)}


@dataclass(frozen=True)
class Verdict:
    """What one moderator decided about one text. `rule` names what matched (a rule, a label, or a provider
    failure), `category` the category it belongs to, `score` the provider's or classifier's score in [0, 1]
    where there is one."""

    action: Action
    rule: str | None
    category: str | None
    score: float | None
    provider: str


ALLOW_NOTHING_CHECKED = Verdict("allow", None, None, None, "none")


@dataclass(frozen=True)
class ImageVerdict:
    """What one detector reported about one image: a score in [0, 1] per label it knows, and the labels it
    found. A detector that could not answer (timeout, error) reports no scores, names the failure, and carries
    the action its failure policy asks for."""

    scores: Mapping[str, float]
    labels: tuple[str, ...]
    provider: str
    failure: str | None = None
    failure_action: FailureAction | None = None
    details: Mapping[str, str] = field(default_factory=dict)


@runtime_checkable
class TextModerator(Protocol):
    def check(self, text: str, tenant: str) -> Verdict: ...


@runtime_checkable
class ImageModerator(Protocol):
    def check_image(self, data: bytes, tenant: str) -> ImageVerdict: ...


def strictness(action: str) -> int:
    """allow < review < block."""
    return _RANK[action]


def combine(verdicts: Iterable[Verdict]) -> Verdict:
    """The strictest verdict; among equally strict ones, the first. No verdict at all allows."""
    strictest: Verdict | None = None
    for verdict in verdicts:
        if strictest is None or _RANK[verdict.action] > _RANK[strictest.action]:
            strictest = verdict
    return strictest if strictest is not None else ALLOW_NOTHING_CHECKED
