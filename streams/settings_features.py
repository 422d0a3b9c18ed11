"""Settings of the optional parts, mixed into the one Settings object (streams/settings.py): image safety, the
HTTP API and the SKU connector. Each block reads ZIMAGE_* variables like the rest and is checked with them."""
from __future__ import annotations

from collections.abc import Mapping
from functools import cached_property
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode

from processors.sku_templates import SkuTemplates
from streams.setting_values import mask_url_credentials


class ImageSafetySettings(BaseSettings):
    # --- image safety after rendering (publication scans each new image; streams/image_safety.py) ---
    # none: every image passes marked unscanned. http: POST the PNG to image_safety_url, a detector service.
    image_safety: Literal["none", "rekognition", "google", "http"] = "none"
    image_safety_url: str | None = None
    image_safety_timeout_s: float = Field(5.0, gt=0, le=120)
    # what a detector that does not answer gives: retry (the partition waits), review (fail open), block (closed)
    image_safety_on_timeout: Literal["retry", "review", "block"] = "retry"
    image_safety_review_at: float = Field(0.5, ge=0, le=1)
    image_safety_block_at: float = Field(0.85, ge=0, le=1)
    image_safety_label_thresholds: str = ""  # label=review:block,... overrides per label
    image_safety_ignored_labels: Annotated[tuple[str, ...], NoDecode] = ()  # a detector's benign classes
    image_safety_blocked_objects: Literal["quarantine", "delete"] = "quarantine"
    image_safety_quarantine_prefix: str = "quarantine"
    image_safety_concurrency: int = Field(4, ge=1, le=64)  # images checked at once

    @field_validator("image_safety_url")
    @classmethod
    def _detector_url(cls, v: str | None) -> str | None:
        if v is not None:
            from connectors.image_detectors import check_detector_url

            try:
                check_detector_url(v)
            except ValueError as exc:
                raise ValueError(f"{mask_url_credentials(v)!r} {exc}") from None
        return v

    @field_validator("image_safety_quarantine_prefix")
    @classmethod
    def _quarantine_prefix(cls, v: str) -> str:
        from connectors.storage import UnsafeKey, check_key

        try:
            return check_key(v.strip("/"))
        except UnsafeKey:
            raise ValueError(f"{v!r} must be a relative object key prefix such as quarantine") from None

    def _image_safety_problems(self) -> list[str]:
        from processors.safety import thresholds_from

        problems = []
        if self.image_safety == "http" and not self.image_safety_url:
            problems.append("ZIMAGE_IMAGE_SAFETY='http' needs ZIMAGE_IMAGE_SAFETY_URL, the detector service's URL")
        try:
            thresholds_from(self.image_safety_review_at, self.image_safety_block_at,
                            self.image_safety_label_thresholds, self.image_safety_ignored_labels)
        except ValueError as exc:
            problems.append(f"ZIMAGE_IMAGE_SAFETY_REVIEW_AT / _BLOCK_AT / _LABEL_THRESHOLDS: {exc}")
        return problems


class IngressSettings(BaseSettings):
    # --- the HTTP API (`zimage api`): keys, limits, sync waits and image URLs ---
    api_host: str = Field("127.0.0.1", min_length=1)
    api_port: int = Field(8080, ge=0, le=65535)
    api_keys_file: str = Field(".stack/api-keys.jsonl", min_length=1)  # JSON lines of keyed hashes, never keys
    api_key_secret: SecretStr | None = None  # the HMAC-SHA256 key of the stored hashes; `zimage api` needs it
    api_rate_per_s: float = Field(5.0, gt=0)  # each tenant's token bucket: refill per second ...
    api_burst: int = Field(20, ge=1)  # ... and capacity
    api_daily_quota: int = Field(50_000, ge=1)  # requests per tenant and UTC day
    # per tenant: {"acme": {"rate_per_s": 50, "burst": 100, "daily_quota": 1000000}}, as JSON
    api_tenant_limits: Annotated[dict[str, dict[str, float]], NoDecode] = Field(default_factory=dict)
    api_sync_timeout_s: float = Field(60.0, gt=0, le=600)  # the longest a sync request waits for its image
    api_cdn_base_url: str | None = None  # image URLs under this base instead of presigned S3 URLs
    api_presign_expiry_s: int = Field(3600, ge=1, le=7 * 24 * 3600)  # S3 caps presigned URLs at 7 days
    api_task_index_size: int = Field(10_000, ge=1)  # requests listed per tenant (the newest)
    api_results_replay_s: float = Field(600.0, ge=0)  # outcomes a starting API reads back, to fill its results

    # --- the SKU connector (`zimage sku-connector`): SkuChanged -> GenerationRequests ---
    sku_templates: str | None = None  # TOML: per-catalogue category -> template (examples/sku-templates.toml)

    @field_validator("api_tenant_limits", mode="before")
    @classmethod
    def _tenant_limits_parse(cls, v: object) -> object:
        import json

        from processors.api_rules import TenantLimits

        table = json.loads(v) if isinstance(v, str) and v.strip() else ({} if isinstance(v, str) else v)
        if not isinstance(table, Mapping):
            raise ValueError('must be a JSON object: {"tenant": {"rate_per_s": ..., "burst": ..., "daily_quota": ...}}')
        for tenant, own in table.items():
            if not isinstance(own, Mapping) or set(own) - {"rate_per_s", "burst", "daily_quota"}:
                raise ValueError(f"{tenant!r}: give an object of rate_per_s, burst and daily_quota")
            TenantLimits(rate_per_s=float(own.get("rate_per_s", 1)), burst=int(own.get("burst", 1)),
                         daily_quota=int(own.get("daily_quota", 1)))
        return table

    @cached_property
    def sku_template_set(self) -> SkuTemplates | None:
        """The templates file read (once) when the settings were checked; None when ZIMAGE_SKU_TEMPLATES is unset."""
        from processors.sku_templates import load_templates

        return None if self.sku_templates is None else load_templates(self.sku_templates)
