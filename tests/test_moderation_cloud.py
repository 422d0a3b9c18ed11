"""Cloud moderation adapters without the network: AWS through botocore's Stubber (which checks each request
against the service model), Alibaba and Google through fake clients that return the SDKs' own response types."""
from __future__ import annotations

from typing import Any

import boto3
import pytest
from botocore.exceptions import ReadTimeoutError
from botocore.stub import Stubber

from connectors.moderation_cloud import (
    AlibabaTextModeration,
    ComprehendToxicity,
    GoogleSafeSearch,
    ProviderPolicy,
    RekognitionModeration,
    cloud_moderators,
    utf8_segments,
)
from schemas.moderation import ImageModerator, TextModerator


def aws(service: str):
    return boto3.client(service, region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key="test")


def toxic_result(toxicity: float, **labels: float) -> dict:
    return {"Toxicity": toxicity, "Labels": [{"Name": name, "Score": score} for name, score in labels.items()]}


# ------------------------------------------------------------------------------------------------ Comprehend

@pytest.mark.parametrize(("result", "action", "rule"), [
    (toxic_result(0.05, PROFANITY=0.02), "allow", None),
    (toxic_result(0.6, INSULT=0.55), "review", "aws-comprehend:TOXICITY"),
    (toxic_result(0.7, SEXUAL=0.93, GRAPHIC=0.1), "block", "aws-comprehend:SEXUAL"),
])
def test_comprehend_maps_the_highest_score_to_an_action(result: dict, action: str, rule: str | None) -> None:
    client = aws("comprehend")
    with Stubber(client) as stub:
        stub.add_response("detect_toxic_content", {"ResultList": [result]},
                          {"TextSegments": [{"Text": "a prompt"}], "LanguageCode": "en"})
        verdict = ComprehendToxicity(client).check("a prompt", "acme")
        stub.assert_no_pending_responses()
    assert (verdict.action, verdict.rule, verdict.provider) == (action, rule, "aws-comprehend")
    assert verdict.score == max([result["Toxicity"]] + [label["Score"] for label in result["Labels"]])


def test_comprehend_sends_long_text_in_segments_of_at_most_one_kilobyte() -> None:
    text = "安全的产品图片" * 300  # 2100 characters, 6300 bytes of UTF-8
    client = aws("comprehend")
    segments = utf8_segments(text)
    assert all(len(s.encode("utf-8")) <= 1000 for s in segments) and "".join(segments) == text
    with Stubber(client) as stub:
        stub.add_response("detect_toxic_content",
                          {"ResultList": [toxic_result(0.1)] * (len(segments) - 1) + [toxic_result(0.9)]},
                          {"TextSegments": [{"Text": s} for s in segments], "LanguageCode": "en"})
        assert ComprehendToxicity(client).check(text, "acme").action == "block"


@pytest.mark.parametrize("on_timeout", ["review", "block"])
def test_a_comprehend_service_error_follows_the_providers_policy(on_timeout: str) -> None:
    client = aws("comprehend")
    with Stubber(client) as stub:
        stub.add_client_error("detect_toxic_content", service_error_code="ThrottlingException", http_status_code=400)
        verdict = ComprehendToxicity(client, ProviderPolicy(on_timeout=on_timeout)).check("a lamp", "acme")  # type: ignore[arg-type]
    assert (verdict.action, verdict.rule, verdict.category) == (
        on_timeout, "aws-comprehend:unavailable:ThrottlingException", "provider_failure")


@pytest.mark.parametrize("on_timeout", ["review", "block"])
def test_a_comprehend_timeout_follows_the_providers_policy(on_timeout: str) -> None:
    client = aws("comprehend")

    def time_out(**_: object) -> None:
        raise ReadTimeoutError(endpoint_url="https://comprehend.us-east-1.amazonaws.com")

    # before-send is the last step before the socket: nothing leaves the process
    client.meta.events.register("before-send.comprehend.DetectToxicContent", time_out)
    verdict = ComprehendToxicity(client, ProviderPolicy(on_timeout=on_timeout)).check("a lamp", "acme")  # type: ignore[arg-type]
    assert (verdict.action, verdict.rule) == (on_timeout, "aws-comprehend:unavailable:timeout")


def test_an_empty_prompt_is_not_sent() -> None:
    client = aws("comprehend")
    with Stubber(client):  # a call would fail: no response is queued
        assert ComprehendToxicity(client).check("   ", "acme").action == "allow"


# ----------------------------------------------------------------------------------------------- Rekognition

def test_rekognition_reports_scores_per_label_and_parent() -> None:
    client = aws("rekognition")
    with Stubber(client) as stub:
        stub.add_response("detect_moderation_labels", {
            "ModerationLabels": [
                {"Confidence": 97.5, "Name": "Graphic Violence", "ParentName": "Violence", "TaxonomyLevel": 2},
                {"Confidence": 62.0, "Name": "Weapons", "ParentName": "Violence", "TaxonomyLevel": 2},
                {"Confidence": 55.0, "Name": "Suggestive", "ParentName": "", "TaxonomyLevel": 1}],
            "ModerationModelVersion": "7.0"},
            {"Image": {"Bytes": b"png-bytes"}, "MinConfidence": 50.0})
        verdict = RekognitionModeration(client).check_image(b"png-bytes", "acme")
    assert verdict.scores == {"Graphic Violence": 0.975, "Violence": 0.975, "Weapons": 0.62, "Suggestive": 0.55}
    assert verdict.labels == ("Graphic Violence", "Violence", "Weapons", "Suggestive")
    assert (verdict.provider, verdict.failure, verdict.details) == ("aws-rekognition", None, {"model_version": "7.0"})


@pytest.mark.parametrize("on_timeout", ["review", "block"])
def test_a_rekognition_failure_carries_the_policy_action_and_no_scores(on_timeout: str) -> None:
    client = aws("rekognition")
    policy = ProviderPolicy(on_timeout=on_timeout)  # type: ignore[arg-type]
    with Stubber(client) as stub:
        stub.add_client_error("detect_moderation_labels", service_error_code="InternalServerError",
                              http_status_code=500)
        failed = RekognitionModeration(client, policy).check_image(b"png", "acme")
    assert (failed.scores, failed.failure, failed.failure_action) == ({}, "InternalServerError", on_timeout)
    too_large = RekognitionModeration(client, policy).check_image(b"x" * (5 * 1024 * 1024 + 1), "acme")
    assert (too_large.failure, too_large.failure_action) == ("image-too-large", on_timeout)


# --------------------------------------------------------------------------------------------------- Alibaba

class FakeAlibaba:
    """Answers as the Content Moderation service would, through the SDK's own response models."""

    def __init__(self, answer: dict | Exception) -> None:
        self.answer = answer
        self.requests: list[tuple[Any, Any]] = []

    def text_moderation_plus_with_options(self, request, runtime):
        self.requests.append((request, runtime))
        if isinstance(self.answer, Exception):
            raise self.answer
        from alibabacloud_green20220302 import models
        return models.TextModerationPlusResponse().from_map({"statusCode": 200, "body": self.answer})


def alibaba_answer(level: str, *results: tuple[str, float]) -> dict:
    return {"Code": 200, "RequestId": "r1", "Data": {
        "RiskLevel": level, "Result": [{"Label": label, "Confidence": conf} for label, conf in results]}}


@pytest.mark.parametrize(("answer", "action", "rule"), [
    (alibaba_answer("none", ("nonLabel", 0.0)), "allow", None),
    (alibaba_answer("medium", ("political_entity", 71.0)), "review", "alibaba-green:medium:political_entity"),
    (alibaba_answer("high", ("pornographic_adult", 99.1), ("sexual_terms", 80.0)), "block",
     "alibaba-green:high:pornographic_adult"),
])
def test_alibaba_maps_the_risk_level(answer: dict, action: str, rule: str | None) -> None:
    pytest.importorskip("alibabacloud_green20220302", reason="the Alibaba Cloud SDK is not installed")
    client = FakeAlibaba(answer)
    verdict = AlibabaTextModeration(client, ProviderPolicy(timeout_s=2.5)).check("色情图片", "acme")
    assert (verdict.action, verdict.rule) == (action, rule)
    request, runtime = client.requests[0]
    assert request.to_map() == {"Service": "llm_query_moderation",
                                "ServiceParameters": '{"content": "色情图片"}'}
    assert (runtime.read_timeout, runtime.connect_timeout) == (2500, 2500)


@pytest.mark.parametrize(("answer", "reason"), [
    (TimeoutError("read timed out"), "timeout"),
    (ConnectionError("refused"), "ConnectionError"),
    ({"Code": 588, "Message": "quota exceeded"}, "code-588"),
])
@pytest.mark.parametrize("on_timeout", ["review", "block"])
def test_alibaba_failures_follow_the_providers_policy(answer: object, reason: str, on_timeout: str) -> None:
    pytest.importorskip("alibabacloud_green20220302", reason="the Alibaba Cloud SDK is not installed")
    policy = ProviderPolicy(on_timeout=on_timeout)  # type: ignore[arg-type]
    verdict = AlibabaTextModeration(FakeAlibaba(answer), policy).check("a lamp", "acme")  # type: ignore[arg-type]
    assert (verdict.action, verdict.rule) == (on_timeout, f"alibaba-green:unavailable:{reason}")


# ---------------------------------------------------------------------------------------------------- Google

class FakeVision:
    def __init__(self, answer: object) -> None:
        self.answer = answer
        self.calls: list[tuple[object, object]] = []

    def safe_search_detection(self, image, *, timeout=None, **_):
        self.calls.append((image, timeout))
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def test_google_safe_search_likelihoods_become_scores() -> None:
    vision = pytest.importorskip("google.cloud.vision", reason="google-cloud-vision is not installed")
    likely = vision.Likelihood
    response = vision.AnnotateImageResponse(safe_search_annotation=vision.SafeSearchAnnotation(
        adult=likely.VERY_LIKELY, spoof=likely.UNLIKELY, medical=likely.VERY_UNLIKELY, violence=likely.POSSIBLE,
        racy=likely.UNKNOWN))
    client = FakeVision(response)
    verdict = GoogleSafeSearch(client, ProviderPolicy(timeout_s=3.0)).check_image(b"png", "acme")
    assert verdict.scores == {"adult": 1.0, "spoof": 0.25, "medical": 0.0, "violence": 0.5}
    assert verdict.labels == ("adult", "violence")
    assert client.calls == [({"content": b"png"}, 3.0)]


@pytest.mark.parametrize("on_timeout", ["review", "block"])
def test_google_timeouts_and_errors_follow_the_providers_policy(on_timeout: str) -> None:
    vision = pytest.importorskip("google.cloud.vision", reason="google-cloud-vision is not installed")
    from google.api_core.exceptions import DeadlineExceeded, PermissionDenied
    from google.rpc import status_pb2

    policy = ProviderPolicy(on_timeout=on_timeout)  # type: ignore[arg-type]
    timed_out = GoogleSafeSearch(FakeVision(DeadlineExceeded("slow")), policy).check_image(b"png", "acme")
    denied = GoogleSafeSearch(FakeVision(PermissionDenied("no")), policy).check_image(b"png", "acme")
    errored = GoogleSafeSearch(FakeVision(vision.AnnotateImageResponse(
        error=status_pb2.Status(code=3, message="bad image"))), policy).check_image(b"png", "acme")
    assert [(v.failure, v.failure_action, dict(v.scores)) for v in (timed_out, denied, errored)] == [
        ("timeout", on_timeout, {}), ("PermissionDenied", on_timeout, {}), ("error-3", on_timeout, {})]


# --------------------------------------------------------------------------------------------------- factory

def test_the_factory_builds_the_named_providers_in_order() -> None:
    pytest.importorskip("alibabacloud_green20220302", reason="the Alibaba Cloud SDK is not installed")
    clients = {"comprehend": aws("comprehend"), "rekognition": aws("rekognition"), "alibaba": FakeAlibaba({}),
               "google": FakeVision(None)}
    texts, images = cloud_moderators(("alibaba", "aws", "google"), clients=clients)
    assert [t.provider for t in texts] == ["alibaba-green", "aws-comprehend"]  # type: ignore[attr-defined]
    assert [i.provider for i in images] == ["aws-rekognition", "google-safesearch"]  # type: ignore[attr-defined]
    assert all(isinstance(t, TextModerator) for t in texts) and all(isinstance(i, ImageModerator) for i in images)
    with pytest.raises(ValueError, match="unknown cloud moderation provider 'azure'"):
        cloud_moderators(("azure",), clients=clients)


def test_a_provider_policy_refuses_an_unknown_failure_action() -> None:
    with pytest.raises(ValueError, match="on_timeout"):
        ProviderPolicy(on_timeout="allow")  # type: ignore[arg-type]


def test_moderators_from_config_puts_local_moderators_first_and_reads_the_policy(tmp_path) -> None:
    from streams.moderators import moderators_from_config

    policy_file = tmp_path / "policy.json"
    policy_file.write_text('{"tenants": {"acme": {"blocked_terms": ["rival"]}}}', encoding="utf-8")
    comprehend = aws("comprehend")
    clients = {"comprehend": comprehend, "rekognition": aws("rekognition")}
    moderators = moderators_from_config(("aws", "rules"), str(policy_file), clients=clients)
    assert [m.provider for m in moderators.text.moderators] == ["rules", "aws-comprehend"]  # type: ignore[attr-defined]
    assert [m.provider for m in moderators.images] == ["aws-rekognition"]  # type: ignore[attr-defined]
    with Stubber(comprehend):  # no response queued: the rules' block must spare the cloud call
        assert moderators.text.check("the rival logo", "acme").rule == "tenant_blocked:rival"
    with pytest.raises(ValueError, match="each must be one of"):
        moderators_from_config(("rules", "rules"))
    with pytest.raises(ValueError, match="each must be one of"):
        moderators_from_config(("azure",))
