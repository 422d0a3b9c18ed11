"""One settings object, read from ZIMAGE_* environment variables (and a .env file when present).

`zimage config` prints it with secrets masked; the render worker logs the same view at start-up.
"""
from __future__ import annotations

import os
import socket
from functools import cached_property

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from streams.topology import Topology

_SECRET_WORDS = ("password", "secret", "token", "sasl")


def parse_pools(text: str) -> dict[str, tuple[str, ...]]:
    table: dict[str, tuple[str, ...]] = {}
    for entry in filter(None, (e.strip() for e in text.split(","))):
        pool, sep, models = entry.partition("=")
        names = tuple(m.strip() for m in models.split("|") if m.strip())
        if not sep or not pool.strip() or not names:
            raise ValueError(f"pool entry {entry!r} is not 'pool=model|model'")
        table[pool.strip()] = names
    if not table:
        raise ValueError("at least one pool is needed")
    seen = [m for ms in table.values() for m in ms]
    if len(seen) != len(set(seen)):
        raise ValueError(f"a model is listed in two pools: {text!r}")
    return table


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ZIMAGE_", env_file=".env", extra="ignore")

    # --- where things are ---
    bootstrap_servers: str = "127.0.0.1:9092"
    topic_prefix: str = "zimage"
    request_partitions: int = Field(6, ge=1)
    output_partitions: int = Field(6, ge=1)
    schema_registry_url: str | None = None
    kafka_extra: str = Field("", description="extra librdkafka settings, 'key=value,key=value'")
    redis_url: str = "redis://127.0.0.1:6379/0"
    storage_url: str = "out/objects"  # a folder, file:///abs/path, or s3://bucket/prefix
    s3_endpoint_url: str | None = None
    s3_bucket: str = "zimage"

    # --- the model a worker serves ---
    pool: str = "turbo"
    # Routing table shared by every worker: pool -> the models it renders. The first pool also reports requests
    # that no pool can take (undecodable, invalid, unknown model), so each gets exactly one RequestFailed.
    pools: str = Field("turbo=z-image-turbo", description="'pool=model|model,pool=model'")
    model_source: str = "tiny"  # 'tiny', a Hugging Face id (Tongyi-MAI/Z-Image-Turbo) or a local folder
    model_revision: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    compile: bool = False
    cpu_offload: str = "none"
    attention_backend: str = "default"
    tiny_cache_dir: str = ".stack/models/tiny"
    batch_invariant: bool = True  # False: fused batches, faster on a GPU, not byte-identical to single renders

    # --- request limits (bad input is refused, never rendered) ---
    max_prompt_chars: int = Field(4000, ge=1)
    max_width: int = Field(2048, ge=16)
    max_height: int = Field(2048, ge=16)
    max_steps: int = Field(100, ge=1)
    max_images_per_request: int = Field(8, ge=1)

    # --- scheduling and batching ---
    max_batch_size: int = Field(4, ge=1)
    max_wait_ms: int = Field(50, ge=0)
    buffer_per_priority: int = Field(256, ge=1)
    min_share_normal: float = Field(0.2, ge=0, le=1)
    min_share_low: float = Field(0.1, ge=0, le=1)
    aging_s: float | None = 60.0

    # --- operations ---
    worker_id: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    metrics_port: int = Field(0, ge=0, description="0 disables the Prometheus endpoint")
    health_file: str | None = None
    output_dir: str = "out"
    log_level: str = "INFO"

    @field_validator("aging_s", mode="before")
    @classmethod
    def _aging_off(cls, v: object) -> object:
        return None if isinstance(v, str) and v.strip().lower() in ("", "none", "off", "0") else v

    @field_validator("pools")
    @classmethod
    def _pools_parse(cls, v: str) -> str:
        parse_pools(v)
        return v

    @model_validator(mode="after")
    def _pool_is_known(self) -> "Settings":
        table = parse_pools(self.pools)
        if self.pool not in table:
            raise ValueError(f"ZIMAGE_POOL={self.pool!r} is not in ZIMAGE_POOLS ({', '.join(table)})")
        return self

    @cached_property
    def topology(self) -> Topology:
        return Topology(self.topic_prefix, self.request_partitions, self.output_partitions)

    @property
    def pool_table(self) -> dict[str, tuple[str, ...]]:
        return parse_pools(self.pools)

    @property
    def pool_models(self) -> tuple[str, ...]:
        return self.pool_table[self.pool]

    @property
    def reports_unroutable(self) -> bool:
        return next(iter(self.pool_table)) == self.pool

    def kafka_config(self) -> dict[str, str]:
        conf = {"bootstrap.servers": self.bootstrap_servers}
        for pair in filter(None, (p.strip() for p in self.kafka_extra.split(","))):
            key, sep, value = pair.partition("=")
            if not sep:
                raise ValueError(f"ZIMAGE_KAFKA_EXTRA: {pair!r} is not key=value")
            conf[key.strip()] = value.strip()
        return conf

    def masked(self) -> dict[str, object]:
        """The settings as printed at start-up: anything that looks secret is masked."""
        out: dict[str, object] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if any(w in name for w in _SECRET_WORDS) and value:
                value = "****"
            elif name == "kafka_extra" and value:
                value = ",".join(
                    f"{k}=****" if any(w in k.lower() for w in _SECRET_WORDS) else f"{k}={v}"
                    for k, _, v in (p.partition("=") for p in str(value).split(","))
                )
            out[name] = value
        return out
