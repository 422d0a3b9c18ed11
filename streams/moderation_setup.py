"""The gate's prompt moderation, built from the settings (streams/moderators.py picks the moderators by name)."""
from __future__ import annotations

from connectors.moderation_cloud import CloudModerationConfig
from processors.moderation import text_to_moderate
from streams.gate import Moderate
from streams.moderators import moderators_from_config
from streams.settings import Settings


def text_moderation(s: Settings) -> Moderate:
    """(prompt, negative prompt, tenant) -> (action, what decided it). The local moderators come first: a prompt
    the rules block is not sent to the slower or paid moderators after them."""
    cloud = CloudModerationConfig(aws_region=s.aws_moderation_region)
    chain = moderators_from_config(tuple(s.text_moderators), s.moderation_policy_file, cloud).text

    def moderate(prompt: str, negative_prompt: str | None, tenant: str) -> tuple[str, str | None]:
        verdict = chain.check(text_to_moderate(prompt, negative_prompt), tenant)
        why = None if verdict.action == "allow" else f"{verdict.provider}: {verdict.rule or verdict.category}"
        return verdict.action, why

    return moderate
