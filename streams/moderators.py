"""Which moderators the gate uses on prompts, chosen by name from configuration: "rules" and "classifier" run
locally, "aws" and "alibaba" call the cloud (connectors/moderation_cloud.py). "aws" and "google" also build image
moderators, which no stage uses yet."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from connectors.moderation_cloud import CLOUD_PROVIDERS, CloudModerationConfig, cloud_moderators
from processors.moderation import ModerationPolicy, ModeratorChain, RuleModerator, load_policy
from schemas.moderation import ImageModerator, TextModerator

LOCAL_MODERATORS = ("rules", "classifier")
KNOWN_MODERATORS = LOCAL_MODERATORS + CLOUD_PROVIDERS


@dataclass(frozen=True)
class Moderators:
    text: ModeratorChain  # local moderators first, so that a prompt the rules block costs no cloud call
    images: tuple[ImageModerator, ...]


def moderators_from_config(names: tuple[str, ...], policy_file: str | None = None,
                           cloud: CloudModerationConfig | None = None,
                           clients: Mapping[str, Any] | None = None) -> Moderators:
    """The moderators named, the local ones ahead of the cloud ones. Raises ValueError for an unknown or
    repeated name, processors.moderation.PolicyError for a bad policy file, and
    connectors.moderation_cloud.ProviderUnavailable for a provider whose SDK is missing."""
    unknown = [n for n in names if n not in KNOWN_MODERATORS]
    if unknown or len(set(names)) != len(names):
        raise ValueError(f"moderators {names!r}: each must be one of {KNOWN_MODERATORS}, named once")
    policy = load_policy(policy_file) if policy_file else ModerationPolicy()
    local: list[TextModerator] = []
    if "rules" in names:
        local.append(RuleModerator(policy))
    if "classifier" in names:
        from processors.text_classifier import ClassifierModerator  # loads scikit-learn: only when asked for

        local.append(ClassifierModerator(policy))
    texts, images = cloud_moderators([n for n in names if n in CLOUD_PROVIDERS], cloud, clients)
    return Moderators(ModeratorChain(local + texts), tuple(images))
