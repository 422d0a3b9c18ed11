"""A moderation policy: the categories of rules with the action each takes, classifier thresholds, and each
tenant's departures from them. processors/moderation.py reads one from a JSON file and applies it."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from processors.moderation_rules import DEFAULT_CATEGORIES, SEVERITIES
from schemas.moderation import ACTIONS, Action


class PolicyError(ValueError):
    """A moderation policy that cannot be used; the message says where and why."""


@dataclass(frozen=True)
class Category:
    name: str
    severity: str
    action: Action
    terms: tuple[str, ...] = ()
    patterns: tuple[str, ...] = ()
    locked: bool = False  # no policy may take it below block


@dataclass(frozen=True)
class ClassifierThresholds:
    """A classifier score at or above `block_at` blocks, at or above `review_at` asks for review.

    By default the classifier only asks for review: the shipped model scores offensive language, which is not
    the same as an unsafe image ("hell yeah t-shirt" scores about 0.88), so blocking on it is a tenant's choice.
    """

    review_at: float = 0.9
    block_at: float | None = None

    def __post_init__(self) -> None:
        for name, value in (("review_at", self.review_at), ("block_at", self.block_at)):
            if value is not None and not 0.0 <= value <= 1.0:
                raise PolicyError(f"classifier {name} must be within [0, 1], not {value!r}")
        if self.block_at is not None and self.block_at < self.review_at:
            raise PolicyError(f"classifier block_at ({self.block_at}) is below review_at ({self.review_at})")

    def action_for(self, score: float) -> Action:
        if self.block_at is not None and score >= self.block_at:
            return "block"
        return "review" if score >= self.review_at else "allow"


@dataclass(frozen=True)
class TenantPolicy:
    """One tenant's departures from the defaults: category actions ("allow" turns a category off), its own
    blocked and review terms, and its own classifier thresholds."""

    actions: Mapping[str, Action] = field(default_factory=dict)
    blocked_terms: tuple[str, ...] = ()
    review_terms: tuple[str, ...] = ()
    classifier: ClassifierThresholds | None = None


# What a tenant without a policy of its own gets: built once, since it is asked for per category per prompt.
NO_TENANT_POLICY = TenantPolicy(actions=MappingProxyType({}))


def default_categories() -> tuple[Category, ...]:
    return tuple(Category(name, spec["severity"], spec["action"], tuple(spec.get("terms", ())),
                          tuple(spec.get("patterns", ())), bool(spec.get("locked", False)))
                 for name, spec in DEFAULT_CATEGORIES.items())


@dataclass(frozen=True)
class ModerationPolicy:
    categories: tuple[Category, ...] = field(default_factory=default_categories)
    classifier: ClassifierThresholds = field(default_factory=ClassifierThresholds)
    tenants: Mapping[str, TenantPolicy] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [c.name for c in self.categories]
        if len(set(names)) != len(names):
            raise PolicyError("category names repeat")
        by_name = {c.name: c for c in self.categories}
        for category in self.categories:
            _check_action(category.action, f"category {category.name!r}")
            if category.severity not in SEVERITIES:
                raise PolicyError(f"category {category.name!r}: severity must be one of {SEVERITIES}, "
                                  f"not {category.severity!r}")
            if category.locked and category.action != "block":
                raise PolicyError(f"category {category.name!r} is locked to block")
        for tenant, tenant_policy in self.tenants.items():
            for name, action in tenant_policy.actions.items():
                _check_action(action, f"tenant {tenant!r}, category {name!r}")
                if name not in by_name:
                    raise PolicyError(f"tenant {tenant!r} sets an action for unknown category {name!r}; "
                                      f"known: {sorted(by_name)}")
                if by_name[name].locked and action != "block":
                    raise PolicyError(f"tenant {tenant!r} may not set locked category {name!r} to {action!r}")

    def tenant(self, tenant: str | None) -> TenantPolicy:
        """The tenant's own policy; None, or a tenant the policy does not name, has none of its own."""
        return (self.tenants.get(tenant) if tenant is not None else None) or NO_TENANT_POLICY

    def action_for(self, category: str, tenant: str | None) -> Action:
        default = next(c.action for c in self.categories if c.name == category)
        return self.tenant(tenant).actions.get(category, default)

    def classifier_for(self, tenant: str) -> ClassifierThresholds:
        return self.tenant(tenant).classifier or self.classifier


def _check_action(action: object, where: str) -> None:
    if action not in ACTIONS:
        raise PolicyError(f"{where}: action must be one of {ACTIONS}, not {action!r}")
