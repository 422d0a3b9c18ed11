"""Builds each stream processor of `zimage processors` from the settings: one place that knows them all."""
from __future__ import annotations

from typing import Protocol

from connectors.redis_store import RedisStore
from schemas.serde import AvroSerde
from streams.settings import Settings


class Runner(Protocol):
    def run(self) -> None: ...

    def stop(self) -> None: ...


def build_processor(name: str, s: Settings) -> Runner:
    serde = AvroSerde(registry_url=s.schema_registry_url)
    if name == "gate":
        from streams.gate import Gate
        from streams.moderation_setup import text_moderation

        return Gate(s, serde, moderate=text_moderation(s), cache=RedisStore(s.redis_url))
    if name == "publication":
        from streams.publication import PublicationRelay

        return PublicationRelay(s, serde, cache=RedisStore(s.redis_url))
    if name == "webhooks":
        return _Webhooks(s)
    if name == "status":
        from streams.status_view import StatusView

        return StatusView(s, serde, RedisStore(s.redis_url))
    raise ValueError(f"unknown processor {name!r}")


class _Webhooks:
    """The faust app of the webhooks: faust's worker handles the signals itself."""

    def __init__(self, s: Settings):
        if s.webhook_secret is None:
            raise ValueError("ZIMAGE_WEBHOOK_SECRET is not set: webhooks are signed with it")
        self._s = s

    def run(self) -> None:
        from processors.webhook_delivery import RetryPolicy
        from streams.webhooks import run_webhooks

        s = self._s
        assert s.webhook_secret is not None
        run_webhooks(s, secret=s.webhook_secret.get_secret_value(), allowlist=tuple(s.callback_allowlist),
                     policy=RetryPolicy(base_s=s.webhook_retry_base_s, max_delay_s=s.webhook_retry_max_delay_s,
                                        give_up_after_s=s.webhook_give_up_after_s),
                     timeout_s=s.webhook_timeout_s, max_in_flight=s.webhook_max_in_flight)

    def stop(self) -> None:
        raise SystemExit(0)
