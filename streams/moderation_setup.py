"""The gate's prompt moderation, built from the settings (streams/moderators.py picks the moderators by name)."""
from __future__ import annotations

from connectors.moderation_cloud import CloudModerationConfig
from processors.moderation import text_to_moderate
from schemas.moderation import Verdict, combine
from streams.gate import Moderate
from streams.moderators import moderators_from_config
from streams.settings import Settings


def text_moderation(s: Settings) -> Moderate:
    """[(prompt, negative prompt, tenant)] -> [(action, what decided it)]. Each moderator sees the whole batch
    in one call where it can (a classifier scores many texts for about the cost of one), in order; a prompt one
    of them blocks is not sent to the slower or paid moderators after it."""
    cloud = CloudModerationConfig(aws_region=s.aws_moderation_region)
    moderators = moderators_from_config(tuple(s.text_moderators), s.moderation_policy_file, cloud).text.moderators

    def moderate(items: list[tuple[str, str | None, str]]) -> list[tuple[str, str | None]]:
        texts = [(text_to_moderate(prompt, negative), tenant) for prompt, negative, tenant in items]
        verdicts: list[list[Verdict]] = [[] for _ in items]
        for moderator in moderators:
            todo = [i for i, found in enumerate(verdicts) if all(v.action != "block" for v in found)]
            if not todo:
                break
            check_many = getattr(moderator, "check_many", None)
            results = (check_many([texts[i] for i in todo]) if check_many is not None
                       else [moderator.check(*texts[i]) for i in todo])
            for i, verdict in zip(todo, results, strict=True):
                verdicts[i].append(verdict)
        return [_described(combine(found)) for found in verdicts]

    return moderate


def _described(verdict: Verdict) -> tuple[str, str | None]:
    if verdict.action == "allow":
        return "allow", None
    return verdict.action, f"{verdict.provider}: {verdict.rule or verdict.category}"
