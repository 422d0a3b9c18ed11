"""Cloud moderation behind the shared interfaces (schemas/moderation.py), each through its vendor's SDK:

- AWS Comprehend DetectToxicContent (text, English) and Rekognition DetectModerationLabels (images), via boto3;
- Alibaba Cloud Content Moderation TextModerationPlus (text, Chinese and English), via
  alibabacloud-green20220302, imported only when the adapter is built;
- Google Cloud Vision SafeSearch (images), via google-cloud-vision, imported only when the adapter is built.

Each adapter takes a ready client (tests pass a stubbed or fake one). A provider that does not answer (timeout,
connection error, throttling, a service error) gives the action of its `on_timeout` policy: "review" fails open
to a person, "block" fails closed. The verdict names the failure, so a review queue shows why it is there.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError, ConnectTimeoutError, ReadTimeoutError

from schemas.moderation import Action, FailureAction, ImageModerator, ImageVerdict, TextModerator, Verdict

PROVIDER_FAILURE = "provider_failure"
COMPREHEND_SEGMENT_BYTES = 1000  # the service's limit is 1 KB of UTF-8 per segment
COMPREHEND_SEGMENTS_PER_CALL = 10
REKOGNITION_MAX_BYTES = 5 * 1024 * 1024  # the limit for image bytes sent inline
GOOGLE_LIKELIHOOD_SCORES = {1: 0.0, 2: 0.25, 3: 0.5, 4: 0.75, 5: 1.0}  # VERY_UNLIKELY .. VERY_LIKELY; 0 = UNKNOWN
GOOGLE_SAFE_SEARCH_FIELDS = ("adult", "spoof", "medical", "violence", "racy")


class ProviderUnavailable(RuntimeError):
    """A provider's SDK is not installed or its client cannot be built."""


@dataclass(frozen=True)
class ProviderPolicy:
    """How one provider's answers become actions. A text score at or above `block_at` blocks, at or above
    `review_at` asks for review; `on_timeout` is the action when the provider gives no answer."""

    on_timeout: FailureAction = "review"
    review_at: float = 0.5
    block_at: float | None = 0.8
    timeout_s: float = 5.0

    def __post_init__(self) -> None:
        if self.on_timeout not in ("review", "block"):
            raise ValueError(f"on_timeout must be 'review' or 'block', not {self.on_timeout!r}")
        if self.block_at is not None and self.block_at < self.review_at:
            raise ValueError(f"block_at ({self.block_at}) is below review_at ({self.review_at})")

    def action_for(self, score: float) -> Action:
        if self.block_at is not None and score >= self.block_at:
            return "block"
        return "review" if score >= self.review_at else "allow"

    def failed_text(self, provider: str, reason: str) -> Verdict:
        return Verdict(self.on_timeout, f"{provider}:unavailable:{reason}", PROVIDER_FAILURE, None, provider)

    def failed_image(self, provider: str, reason: str) -> ImageVerdict:
        return ImageVerdict({}, (), provider, failure=reason, failure_action=self.on_timeout)


def _boto_failure(error: Exception) -> str:
    if isinstance(error, ReadTimeoutError | ConnectTimeoutError):
        return "timeout"
    if isinstance(error, ClientError):
        return str(error.response.get("Error", {}).get("Code", "ClientError"))
    return type(error).__name__


def utf8_segments(text: str, limit: int = COMPREHEND_SEGMENT_BYTES) -> list[str]:
    """The text cut into pieces of at most `limit` UTF-8 bytes, never inside a character."""
    segments: list[str] = []
    current: list[str] = []
    size = 0
    for char in text:
        width = len(char.encode("utf-8"))
        if size + width > limit:
            segments.append("".join(current))
            current = []
            size = 0
        current.append(char)
        size += width
    if current:
        segments.append("".join(current))
    return segments


# ------------------------------------------------------------------------------------------------------ AWS

class ComprehendToxicity:
    """TextModerator by Comprehend DetectToxicContent. The score is the highest of the overall toxicity and the
    label scores over every segment; the rule names the label that scored highest."""

    provider = "aws-comprehend"

    def __init__(self, client: Any, policy: ProviderPolicy | None = None, language: str = "en") -> None:
        self.client, self.policy, self.language = client, policy or ProviderPolicy(), language

    def check(self, text: str, tenant: str) -> Verdict:
        segments = [s for s in utf8_segments(text) if s.strip()]
        if not segments:
            return Verdict("allow", None, None, None, self.provider)
        best_score, best_label = 0.0, "TOXICITY"
        try:
            for start in range(0, len(segments), COMPREHEND_SEGMENTS_PER_CALL):
                response = self.client.detect_toxic_content(
                    TextSegments=[{"Text": s} for s in segments[start:start + COMPREHEND_SEGMENTS_PER_CALL]],
                    LanguageCode=self.language)
                for result in response.get("ResultList", []):
                    candidates = [("TOXICITY", float(result.get("Toxicity", 0.0)))]
                    candidates += [(label["Name"], float(label["Score"])) for label in result.get("Labels", [])]
                    label, score = max(candidates, key=lambda pair: pair[1])
                    if score > best_score:
                        best_score, best_label = score, label
        except (BotoCoreError, ClientError) as error:
            return self.policy.failed_text(self.provider, _boto_failure(error))
        action = self.policy.action_for(best_score)
        if action == "allow":
            return Verdict("allow", None, None, best_score, self.provider)
        return Verdict(action, f"{self.provider}:{best_label}", best_label.lower(), best_score, self.provider)


class RekognitionModeration:
    """ImageModerator by Rekognition DetectModerationLabels: a score in [0, 1] per label and per parent label
    (the highest confidence among its children), labels ordered by confidence."""

    provider = "aws-rekognition"

    def __init__(self, client: Any, policy: ProviderPolicy | None = None, min_confidence: float = 50.0) -> None:
        self.client, self.policy, self.min_confidence = client, policy or ProviderPolicy(), min_confidence

    def check_image(self, data: bytes, tenant: str) -> ImageVerdict:
        if len(data) > REKOGNITION_MAX_BYTES:
            return self.policy.failed_image(self.provider, "image-too-large")
        try:
            response = self.client.detect_moderation_labels(Image={"Bytes": data},
                                                            MinConfidence=self.min_confidence)
        except (BotoCoreError, ClientError) as error:
            return self.policy.failed_image(self.provider, _boto_failure(error))
        scores: dict[str, float] = {}
        for label in response.get("ModerationLabels", []):
            score = float(label.get("Confidence", 0.0)) / 100.0
            for name in (label.get("Name"), label.get("ParentName")):
                if name:
                    scores[name] = max(scores.get(name, 0.0), score)
        version = response.get("ModerationModelVersion")
        return ImageVerdict(scores, _by_score(scores), self.provider,
                            details={"model_version": version} if version else {})


def aws_clients(region: str | None, timeout_s: float) -> tuple[Any, Any]:
    """Comprehend and Rekognition clients with the default credential chain, the given timeouts and no retries
    (a slow provider falls to its on_timeout policy instead of holding the gate)."""
    import boto3
    from botocore.config import Config

    config = Config(connect_timeout=timeout_s, read_timeout=timeout_s, retries={"max_attempts": 1})
    return (boto3.client("comprehend", region_name=region, config=config),
            boto3.client("rekognition", region_name=region, config=config))


def _by_score(scores: Mapping[str, float]) -> tuple[str, ...]:
    return tuple(name for name, _ in sorted(scores.items(), key=lambda pair: (-pair[1], pair[0])))


# -------------------------------------------------------------------------------------------------- Alibaba

class AlibabaTextModeration:
    """TextModerator by Alibaba Cloud TextModerationPlus. The service's risk level maps to the action (`high`
    blocks, `medium` asks for review by default); the score is the highest label confidence, in [0, 1]."""

    provider = "alibaba-green"

    def __init__(self, client: Any, policy: ProviderPolicy | None = None, service: str = "llm_query_moderation",
                 block_levels: Iterable[str] = ("high",), review_levels: Iterable[str] = ("medium",)) -> None:
        self.client, self.policy, self.service = client, policy or ProviderPolicy(), service
        self.block_levels, self.review_levels = frozenset(block_levels), frozenset(review_levels)
        self._models = _alibaba_modules()

    def check(self, text: str, tenant: str) -> Verdict:
        if not text.strip():
            return Verdict("allow", None, None, None, self.provider)
        models, runtime_options = self._models
        request = models.TextModerationPlusRequest(
            service=self.service, service_parameters=json.dumps({"content": text}, ensure_ascii=False))
        timeout_ms = int(self.policy.timeout_s * 1000)
        try:
            response = self.client.text_moderation_plus_with_options(
                request, runtime_options(read_timeout=timeout_ms, connect_timeout=timeout_ms))
        except Exception as error:  # noqa: BLE001 - the SDK wraps transport faults in several unrelated types
            return self.policy.failed_text(self.provider, _alibaba_failure(error))
        body = response.body
        if body is None or body.code != 200 or body.data is None:
            code = getattr(body, "code", None)
            return self.policy.failed_text(self.provider, f"code-{code}")
        results = [(r.label or "unknown", float(r.confidence or 0.0) / 100.0) for r in body.data.result or []]
        label, score = max(results, key=lambda pair: pair[1], default=("none", 0.0))
        level = (body.data.risk_level or "none").lower()
        action: Action = "block" if level in self.block_levels else "review" if level in self.review_levels \
            else "allow"
        if action == "allow":
            return Verdict("allow", None, None, score or None, self.provider)
        return Verdict(action, f"{self.provider}:{level}:{label}", label, score or None, self.provider)


def _alibaba_modules() -> tuple[Any, Any]:
    try:
        from alibabacloud_green20220302 import models
        from darabonba.runtime import RuntimeOptions
    except ImportError as error:
        raise ProviderUnavailable("Alibaba Cloud moderation needs alibabacloud-green20220302 "
                                  "(pip install 'zimage-stream[alibaba]')") from error
    return models, RuntimeOptions


def _alibaba_failure(error: Exception) -> str:
    text = f"{type(error).__name__} {error}".lower()
    return "timeout" if "timeout" in text or "timed out" in text else type(error).__name__


def alibaba_client(region: str, endpoint: str | None = None) -> Any:
    """A Content Moderation client with Alibaba Cloud's default credential chain (ALIBABA_CLOUD_ACCESS_KEY_ID
    and ALIBABA_CLOUD_ACCESS_KEY_SECRET, or a profile, or an instance role)."""
    _alibaba_modules()
    from alibabacloud_credentials.client import Client as CredentialClient
    from alibabacloud_green20220302.client import Client
    from alibabacloud_tea_openapi.utils_models import Config

    return Client(Config(credential=CredentialClient(), region_id=region,
                         endpoint=endpoint or f"green-cip.{region}.aliyuncs.com"))


# --------------------------------------------------------------------------------------------------- Google

class GoogleSafeSearch:
    """ImageModerator by Cloud Vision SafeSearch: each of adult, spoof, medical, violence and racy as a score
    (VERY_UNLIKELY 0, UNLIKELY 0.25, POSSIBLE 0.5, LIKELY 0.75, VERY_LIKELY 1; UNKNOWN left out)."""

    provider = "google-safesearch"

    def __init__(self, client: Any, policy: ProviderPolicy | None = None) -> None:
        self.client, self.policy = client, policy or ProviderPolicy()
        self._errors = _google_errors()

    def check_image(self, data: bytes, tenant: str) -> ImageVerdict:
        try:
            response = self.client.safe_search_detection(image={"content": data}, timeout=self.policy.timeout_s)
        except self._errors as error:
            reason = "timeout" if type(error).__name__ in ("DeadlineExceeded", "RetryError") \
                else type(error).__name__
            return self.policy.failed_image(self.provider, reason)
        if response.error and response.error.message:
            return self.policy.failed_image(self.provider, f"error-{response.error.code}")
        annotation = response.safe_search_annotation
        scores = {name: GOOGLE_LIKELIHOOD_SCORES[int(getattr(annotation, name))]
                  for name in GOOGLE_SAFE_SEARCH_FIELDS if int(getattr(annotation, name)) in GOOGLE_LIKELIHOOD_SCORES}
        return ImageVerdict(scores, tuple(n for n in _by_score(scores) if scores[n] >= 0.5), self.provider)


def _google_errors() -> tuple[type[Exception], ...]:
    try:
        from google.api_core.exceptions import GoogleAPIError
    except ImportError as error:
        raise ProviderUnavailable("Google Cloud Vision SafeSearch needs google-cloud-vision "
                                  "(pip install 'zimage-stream[google]')") from error
    return (GoogleAPIError,)


def google_client() -> Any:
    """An ImageAnnotatorClient with Google's application default credentials."""
    _google_errors()
    from google.cloud import vision

    return vision.ImageAnnotatorClient()


# -------------------------------------------------------------------------------------------------- factory

CLOUD_PROVIDERS = ("aws", "alibaba", "google")


@dataclass(frozen=True)
class CloudModerationConfig:
    aws_region: str | None = None
    alibaba_region: str = "cn-shanghai"
    alibaba_endpoint: str | None = None
    alibaba_service: str = "llm_query_moderation"
    policies: Mapping[str, ProviderPolicy] | None = None  # by provider name; a missing one gets the defaults

    def policy(self, name: str) -> ProviderPolicy:
        return (self.policies or {}).get(name) or ProviderPolicy()


def cloud_moderators(names: Iterable[str], config: CloudModerationConfig | None = None,
                     clients: Mapping[str, Any] | None = None) -> tuple[list[TextModerator], list[ImageModerator]]:
    """The text and image moderators of the named providers ("aws", "alibaba", "google"), in the order named.
    `clients` may hold ready clients by name ("comprehend", "rekognition", "alibaba", "google"); any other is
    built with the vendor's default credentials. Raises ValueError for an unknown name and ProviderUnavailable
    for a provider whose SDK is missing."""
    config = config or CloudModerationConfig()
    clients = dict(clients or {})
    texts: list[TextModerator] = []
    images: list[ImageModerator] = []
    for name in names:
        policy = config.policy(name)
        if name == "aws":
            if "comprehend" not in clients or "rekognition" not in clients:
                clients["comprehend"], clients["rekognition"] = aws_clients(config.aws_region, policy.timeout_s)
            texts.append(ComprehendToxicity(clients["comprehend"], policy))
            images.append(RekognitionModeration(clients["rekognition"], policy))
        elif name == "alibaba":
            client = clients.get("alibaba") or alibaba_client(config.alibaba_region, config.alibaba_endpoint)
            texts.append(AlibabaTextModeration(client, policy, config.alibaba_service))
        elif name == "google":
            images.append(GoogleSafeSearch(clients.get("google") or google_client(), policy))
        else:
            raise ValueError(f"unknown cloud moderation provider {name!r}; known: {CLOUD_PROVIDERS}")
    return texts, images
