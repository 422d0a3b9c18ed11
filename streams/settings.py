"""One settings object, read from ZIMAGE_* environment variables (and a .env file when present).

Every value is parsed, and every rule between values is checked, when the object is built: a process with a bad
setting stops before it loads a model or opens a client. The object is frozen, so what a process checked at
start-up is what it runs with. `zimage config` prints it with secrets masked; the render worker logs the same view.
"""
from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict, SettingsError

from connectors.storage import BUCKET_NAME
from processors.quality import QualityPolicy
from processors.requests import Limits
from processors.scheduler import SchedulerConfig
from streams.setting_values import (
    MASK,
    as_network,
    describe_errors,
    format_pools,
    is_secret_key,
    mask_url_credentials,
    parse_allowlist,
    parse_kafka_extra,
    parse_pools,
    store_url_problem,
    webhook_security,
)
from streams.settings_features import ImageSafetySettings, IngressSettings
from streams.topology import Topology, largest_output_bytes

_TOPIC_PREFIX = re.compile(r"^[A-Za-z0-9._-]{1,200}$")  # Kafka topic names are at most 249 of these characters
_WORKER_ID = re.compile(r"^[\x21-\x7e]{1,200}$")  # part of the transactional id and of every event's lineage
_NONE_WORDS = ("", "none", "null", "auto", "default")


class InvalidSettings(ValueError):
    """A setting, or a rule between settings, that no process can start with. The message is one line."""


def _folder_problem(path: str) -> str | None:
    if not path.strip():
        return "must name a folder"
    return "names a file, not a folder" if Path(path).is_file() else None


def _none_word(value: object) -> object:
    return None if isinstance(value, str) and value.strip().lower() in _NONE_WORDS else value


class Settings(IngressSettings, ImageSafetySettings):
    model_config = SettingsConfigDict(env_prefix="ZIMAGE_", env_file=".env", extra="ignore", frozen=True)

    # --- where things are ---
    bootstrap_servers: str = "127.0.0.1:9092"
    topic_prefix: str = Field("zimage", pattern=_TOPIC_PREFIX.pattern)
    request_partitions: int = Field(6, ge=1)
    output_partitions: int = Field(6, ge=1)
    # Every stage's transactions write zimage.status, and each partition a transaction writes costs the broker a
    # produce request, a partition verification and a commit marker. One status view process reads the topic, so
    # one partition is enough; more let more status views share it.
    status_partitions: int = Field(1, ge=1)
    schema_registry_url: str | None = None
    # Extra librdkafka settings: a JSON object, or key=value,key=value. See parse_kafka_extra.
    kafka_extra: Annotated[dict[str, str | SecretStr], NoDecode] = Field(default_factory=dict)
    redis_url: str = "redis://127.0.0.1:6379/0"
    cache_ttl_s: float = Field(24 * 3600.0, gt=0)  # how long the L1 cache answers a repeat
    publication_window_days: float = Field(30.0, gt=0)  # how long a published (request, generation) is remembered
    idempotency_window_days: float = Field(30.0, gt=0, le=30)  # how long the gate remembers an admitted request
    # where the gate's admitted keys and publication's published requests are kept: rows of a scratch database in
    # state_dir (streams/state_store.py), its page cache bounded by state_cache_mb; or the heap
    state_store: Literal["disk", "memory"] = "disk"
    state_cache_mb: int = Field(8, ge=1, le=65536)

    # --- quality scoring of rendered images (in the worker, where the pixels are) ---
    quality_sharpness_min: float = Field(100.0, ge=0)  # variance of the Laplacian of the luminance
    quality_min_width: int | None = Field(None, ge=1)  # off by default; a catalogue policy may ask for 512
    quality_min_height: int | None = Field(None, ge=1)
    quality_max_rerenders: int = Field(2, ge=0)  # new derived seeds for a request that gave none
    # --- prompt moderation at the gate ---
    # rules and classifier run here; aws, alibaba, google call those vendors (their credentials: the usual chains)
    text_moderators: Annotated[tuple[Literal["rules", "classifier", "aws", "alibaba", "google"], ...], NoDecode] = (
        "rules", "classifier")
    aws_moderation_region: str | None = None

    # --- webhooks (run by `zimage processors` only when a signing secret is set) ---
    webhook_secret: SecretStr | None = None
    webhook_retry_base_s: float = Field(5.0, gt=0)
    webhook_retry_max_delay_s: float = Field(900.0, gt=0)
    webhook_give_up_after_s: float = Field(7200.0, ge=0)  # about 2 hours of retries, then gave_up
    webhook_timeout_s: float = Field(10.0, gt=0)
    webhook_max_in_flight: int = Field(64, ge=1)
    moderation_policy_file: str | None = None  # JSON: per-tenant categories, actions, terms, classifier thresholds
    storage_url: str = "out/objects"  # a folder, file:///abs/path, or s3://bucket/prefix
    s3_endpoint_url: str | None = None
    s3_bucket: str = Field("zimage", pattern=BUCKET_NAME.pattern)


    # --- the model a worker serves ---
    pool: str = "turbo"
    # Routing table of the gate, shared by every process: pool -> the model its workers load. The gate routes
    # each request to the pool of its model, on that pool's render topics.
    pools: Annotated[dict[str, tuple[str, ...]], NoDecode] = Field(
        default_factory=lambda: {"turbo": tuple[str, ...](["z-image-turbo"])})
    model_source: str = Field("tiny", min_length=1)  # 'tiny', a Hugging Face id or a local folder
    model_revision: str | None = None
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    device: str = Field("auto", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$")
    compile: bool = False
    cpu_offload: Literal["none", "model", "sequential"] = "none"
    attention_backend: str = Field("default", pattern=r"^[A-Za-z0-9_]+$")
    tiny_cache_dir: str = ".stack/models/tiny"
    batch_invariant: bool = True  # False: fused batches, faster on a GPU, not byte-identical to single renders

    # --- request limits (bad input is refused, never rendered) ---
    max_prompt_chars: int = Field(4000, ge=1)
    max_width: int = Field(2048, ge=16)
    max_height: int = Field(2048, ge=16)
    max_steps: int = Field(100, ge=1)
    max_images_per_request: int = Field(8, ge=1)
    max_metadata_entries: int = Field(32, ge=0, le=1024)
    max_metadata_bytes: int = Field(16384, ge=0, le=262144)  # keeps outputs far below a topic's message limit
    max_tenant_chars: int = Field(128, ge=1, le=1024)
    max_sku_id_chars: int = Field(256, ge=1, le=1024)
    callback_allowlist: Annotated[tuple[str, ...], NoDecode] = ()

    # --- scheduling and batching ---
    max_batch_size: int = Field(4, ge=1)
    max_wait_ms: int = Field(50, ge=0)
    rendering_note_after_ms: int = Field(50, ge=0)  # a batch rendering this long marks its requests `rendering`
    # Threads that score, encode and store rendered batches. One keeps up with a GPU rendering a 1024x1024 image a
    # second, and every thread more competes with the render thread for the interpreter; more for slow stores.
    post_threads: int = Field(1, ge=1, le=32)
    arrival_window_ms: int = Field(1000, ge=0)  # 0: a batch always waits max_wait_ms to fill (see the scheduler)
    buffer_per_priority: int = Field(256, ge=1)
    min_share_normal: float = Field(0.2, ge=0, lt=1)
    min_share_low: float = Field(0.1, ge=0, lt=1)
    share_patience_s: float = Field(2.0, ge=0)
    fetch_wait_ms: int = Field(500, ge=0)
    # Under load, the longest a render worker's finished requests wait for their transaction (Kafka Streams'
    # default for exactly-once). At light load they commit at once. Each transaction costs the broker a fixed
    # amount of work for every partition it writes, so committing less often under load leaves more CPU for work.
    commit_interval_ms: int = Field(100, ge=1, le=10000)
    aging_s: float | None = Field(60.0, gt=0)

    # --- durability and liveness ---
    replication_factor: int | None = Field(None, ge=1)
    min_insync_replicas: int | None = Field(None, ge=1)
    state_dir: str = ".stack/state"
    device_fault_exit_s: float = Field(300.0, ge=0)
    batch_timeout_factor: float = Field(10.0, gt=1)
    batch_timeout_floor_s: float = Field(120.0, gt=0)

    # --- operations ---
    worker_id: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}",
                           pattern=_WORKER_ID.pattern)
    metrics_port: int = Field(0, ge=0, le=65535, description="0 disables the Prometheus endpoint")
    health_file: str | None = None
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"

    @field_validator("aging_s", mode="before")
    @classmethod
    def _aging_off(cls, v: object) -> object:
        return None if isinstance(v, str) and v.strip().lower() in ("", "none", "off", "0") else v

    @field_validator("schema_registry_url", "s3_endpoint_url", "model_revision", "health_file",
                     "moderation_policy_file", "replication_factor", "min_insync_replicas", "quality_min_width",
                     "quality_min_height", "image_safety_url", "api_key_secret", "api_cdn_base_url", "sku_templates",
                     "webhook_secret", "aws_moderation_region", mode="before")
    @classmethod
    def _unset_words(cls, v: object) -> object:
        return _none_word(v)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, v: object) -> object:
        return v.strip().upper() if isinstance(v, str) else v

    @field_validator("pools", mode="before")
    @classmethod
    def _pools_parse(cls, v: object) -> object:
        return parse_pools(v) if isinstance(v, (str, Mapping)) else v

    @field_validator("kafka_extra", mode="before")
    @classmethod
    def _kafka_extra_parse(cls, v: object) -> object:
        return parse_kafka_extra(v) if isinstance(v, (str, Mapping)) else v

    @field_validator("callback_allowlist", mode="before")
    @classmethod
    def _allowlist_parse(cls, v: object) -> object:
        return parse_allowlist(v) if isinstance(v, (str, tuple, list)) else v

    @field_validator("text_moderators", "image_safety_ignored_labels", mode="before")
    @classmethod
    def _names_parse(cls, v: object) -> object:
        return tuple(n.strip() for n in v.split(",") if n.strip()) if isinstance(v, str) else v

    @field_validator("text_moderators")
    @classmethod
    def _each_moderator_once(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if repeated := sorted({name for name in v if v.count(name) > 1}):
            raise ValueError(f"names {', '.join(repeated)} more than once; give each moderator once")
        return v

    @field_validator("moderation_policy_file")
    @classmethod
    def _policy_file(cls, v: str | None) -> str | None:
        if v is not None:
            from processors.moderation import load_policy  # a bad policy is a bad setting: refused at start-up

            load_policy(v)
        return v

    @field_validator("bootstrap_servers")
    @classmethod
    def _bootstrap(cls, v: str) -> str:
        if not v.strip() or any(not s.strip() or re.search(r"\s", s.strip()) for s in v.split(",")):
            raise ValueError("must be host:port[,host:port] without empty entries or spaces")
        return v

    @field_validator("storage_url")
    @classmethod
    def _storage(cls, v: str) -> str:
        if problem := store_url_problem(v):
            raise ValueError(f"{mask_url_credentials(v)!r} {problem}")
        return v

    @field_validator("schema_registry_url", "s3_endpoint_url", "api_cdn_base_url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is not None and (urlsplit(v).scheme not in ("http", "https") or not urlsplit(v).hostname):
            raise ValueError(f"{mask_url_credentials(v)!r} is not an http(s)://host URL")
        return v

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, v: str) -> str:
        if urlsplit(v).scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"{mask_url_credentials(v)!r} is not a redis://, rediss:// or unix:// URL")
        return v

    @field_validator("state_dir", "tiny_cache_dir")
    @classmethod
    def _folder(cls, v: str) -> str:
        if problem := _folder_problem(v):
            raise ValueError(f"{v!r} {problem}")
        return v

    @model_validator(mode="after")
    def _cross_checks(self) -> Settings:
        problems = []
        shares = self.min_share_normal + self.min_share_low
        if shares >= 1:
            problems.append(f"ZIMAGE_MIN_SHARE_NORMAL + ZIMAGE_MIN_SHARE_LOW = {round(shares, 6):g}, must be < 1")
        if self.pool not in self.pools:
            problems.append(f"ZIMAGE_POOL={self.pool!r} is not a pool of ZIMAGE_POOLS ({', '.join(self.pools)})")
        if self.dtype == "fp16" and self.device == "cpu":
            problems.append("ZIMAGE_DTYPE='fp16' is not supported with ZIMAGE_DEVICE='cpu'; use fp32 or bf16")
        if self.cpu_offload != "none" and self.device in ("cpu", "mps"):
            problems.append(f"ZIMAGE_CPU_OFFLOAD={self.cpu_offload!r} needs a CUDA device, "
                            f"not ZIMAGE_DEVICE={self.device!r}")
        if self.model_revision and self.model_source == "tiny":
            problems.append("ZIMAGE_MODEL_REVISION applies to Hugging Face models, not ZIMAGE_MODEL_SOURCE='tiny'")
        if self.webhook_retry_max_delay_s < self.webhook_retry_base_s:
            problems.append("ZIMAGE_WEBHOOK_RETRY_MAX_DELAY_S must be at least ZIMAGE_WEBHOOK_RETRY_BASE_S")
        if self.webhook_secret is not None:
            try:
                webhook_security(self.kafka_extra)
            except ValueError as exc:
                problems.append(f"ZIMAGE_KAFKA_EXTRA with ZIMAGE_WEBHOOK_SECRET: {exc}")
        problems += self._image_safety_problems()
        rf, isr = self.replication_factor, self.min_insync_replicas
        if rf is not None and isr is not None and isr > rf:
            problems.append(f"ZIMAGE_MIN_INSYNC_REPLICAS={isr} is above ZIMAGE_REPLICATION_FACTOR={rf}: "
                            "no write could succeed")
        largest = largest_output_bytes(self.limits())
        room = Topology(self.topic_prefix).max_bytes(Topology(self.topic_prefix).rendered)
        if largest > room:
            problems.append(f"the request limits (ZIMAGE_MAX_PROMPT_CHARS, ZIMAGE_MAX_METADATA_BYTES, ...) allow "
                            f"outputs of {largest} bytes; the output topics take {room}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _sku_templates_check(self) -> Settings:
        """The whole templates file, against the request limits and the served models: a bad file is a bad
        setting, refused before the connector opens a client."""
        from processors.sku_templates import TemplateError

        if self.sku_templates is not None:
            try:
                templates = self.sku_template_set
                assert templates is not None
                templates.check_against(self.limits(), tuple(m for ms in self.pools.values() for m in ms))
            except TemplateError as exc:
                raise ValueError(f"ZIMAGE_SKU_TEMPLATES: {exc}") from None
        return self

    def scheduler_config(self) -> SchedulerConfig:
        """How a worker forms batches from what it buffered (processors/scheduler.py)."""
        return SchedulerConfig(
            max_batch_size=self.max_batch_size, max_wait_s=self.max_wait_ms / 1000,
            capacity_per_priority=self.buffer_per_priority,
            min_share={"normal": self.min_share_normal, "low": self.min_share_low}, aging_s=self.aging_s,
            share_patience_s=self.share_patience_s, fetch_wait_s=self.fetch_wait_ms / 1000,
            arrival_window_s=self.arrival_window_ms / 1000 if self.arrival_window_ms else None)

    def quality_policy(self) -> QualityPolicy:
        return QualityPolicy(sharpness_min=self.quality_sharpness_min, min_width=self.quality_min_width,
                             min_height=self.quality_min_height)

    def limits(self) -> Limits:
        """What intake accepts: every cap here also bounds the outputs a request can produce."""
        return Limits(max_prompt_chars=self.max_prompt_chars, max_width=self.max_width, max_height=self.max_height,
                      max_steps=self.max_steps, max_images=self.max_images_per_request,
                      max_tenant_chars=self.max_tenant_chars, max_sku_id_chars=self.max_sku_id_chars,
                      max_metadata_entries=self.max_metadata_entries, max_metadata_bytes=self.max_metadata_bytes,
                      callback_allowlist=tuple(self.callback_allowlist))

    @cached_property
    def topology(self) -> Topology:
        return Topology(self.topic_prefix, self.request_partitions, self.output_partitions, tuple(self.pools),
                        self.status_partitions)

    @property
    def pool_table(self) -> dict[str, tuple[str, ...]]:
        return self.pools

    @property
    def pool_models(self) -> tuple[str, ...]:
        return self.pools[self.pool]

    @property
    def callback_allowed_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(n for n in map(as_network, self.callback_allowlist) if n is not None)

    @property
    def callback_allowed_hosts(self) -> frozenset[str]:
        return frozenset(e for e in self.callback_allowlist if as_network(e) is None)

    def kafka_config(self) -> dict[str, str]:
        """A fresh librdkafka configuration: the bootstrap servers plus the extras, secrets revealed."""
        extra = {k: v.get_secret_value() if isinstance(v, SecretStr) else v for k, v in self.kafka_extra.items()}
        return {"bootstrap.servers": self.bootstrap_servers, **extra}

    def masked(self) -> dict[str, object]:
        """The settings as printed at start-up: secrets, secret-named keys and URL credentials masked."""
        out: dict[str, object] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if name == "kafka_extra":
                value = {k: MASK if isinstance(v, SecretStr) else mask_url_credentials(v) for k, v in value.items()}
            elif name == "pools":
                value = format_pools(value)
            elif isinstance(value, SecretStr) or (is_secret_key(name) and value):
                value = MASK
            elif isinstance(value, str):
                value = mask_url_credentials(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[name] = value
        return out

    def __repr_args__(self):  # repr() and logs of the object never show a secret either
        return list(self.masked().items())


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment (and keyword overrides); InvalidSettings with one line naming the variable."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise InvalidSettings(describe_errors(exc)) from None
    except SettingsError as exc:
        raise InvalidSettings(" ".join(str(exc).split())) from None
