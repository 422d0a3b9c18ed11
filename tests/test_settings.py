"""Settings: every bad value refused at construction with one line naming it, secrets never shown, frozen."""
from __future__ import annotations

import ipaddress
import os

import pytest
from pydantic import SecretStr, ValidationError

from streams.setting_values import (
    mask_url_credentials,
    parse_kafka_extra,
    store_url_problem,
)
from streams.settings import InvalidSettings, Settings, load_settings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch, tmp_path):
    """Only the variables a test sets: no ZIMAGE_* from the shell, no .env file."""
    for name in list(os.environ):
        if name.startswith("ZIMAGE_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def settings_from(monkeypatch, **env: str) -> Settings:
    for name, value in env.items():
        monkeypatch.setenv(f"ZIMAGE_{name.upper()}", value)
    return load_settings()


def refusal(monkeypatch, **env: str) -> str:
    with pytest.raises(InvalidSettings) as caught:
        settings_from(monkeypatch, **env)
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("env, words", [
    ({"min_share_normal": "0.6", "min_share_low": "0.5"},
     "ZIMAGE_MIN_SHARE_NORMAL + ZIMAGE_MIN_SHARE_LOW = 1.1, must be < 1"),
    ({"min_share_low": "1"}, "ZIMAGE_MIN_SHARE_LOW='1': input should be less than 1"),
    ({"kafka_extra": "linger.ms"}, "ZIMAGE_KAFKA_EXTRA: entry 1 is not key=value"),
    ({"kafka_extra": '{"linger.ms": 5'}, "ZIMAGE_KAFKA_EXTRA: not a valid JSON object"),
    ({"kafka_extra": "bootstrap.servers=x:9092"}, "set ZIMAGE_BOOTSTRAP_SERVERS instead"),
    ({"kafka_extra": '{"isolation.level": "read_uncommitted"}'}, "'isolation.level' cannot be set here"),
    ({"kafka_extra": '{"linger.ms": [5]}'}, "the value of 'linger.ms' must be a string, a number or a boolean"),
    ({"storage_url": "ftp://host/images"}, "ZIMAGE_STORAGE_URL: 'ftp://host/images' has the unsupported scheme"),
    ({"storage_url": "s3:///images"}, "ZIMAGE_STORAGE_URL: 's3:///images' needs a bucket name"),
    ({"storage_url": "file://nas/images"}, "names a remote host"),
    ({"pools": "turbo=z-image-turbo|z-image"}, "ZIMAGE_POOLS: pool 'turbo' lists 2 models"),
    ({"pools": "turbo=z-image-turbo,base=z-image-turbo"}, "model 'z-image-turbo' is listed in two pools"),
    ({"pools": "turbo"}, "ZIMAGE_POOLS: entry 'turbo' is not pool=model"),
    ({"pool": "base"}, "ZIMAGE_POOL='base' is not a pool of ZIMAGE_POOLS (turbo)"),
    ({"dtype": "fp64"}, "ZIMAGE_DTYPE='fp64': input should be 'auto', 'bf16', 'fp16' or 'fp32'"),
    ({"device": "tpu"}, "ZIMAGE_DEVICE='tpu': must be auto, cpu, cuda, cuda:N or mps"),
    ({"dtype": "fp16", "device": "cpu"}, "ZIMAGE_DTYPE='fp16' is not supported with ZIMAGE_DEVICE='cpu'"),
    ({"cpu_offload": "model", "device": "mps"}, "ZIMAGE_CPU_OFFLOAD='model' needs a CUDA device"),
    ({"cpu_offload": "all"}, "ZIMAGE_CPU_OFFLOAD='all'"),
    ({"log_level": "chatty"}, "ZIMAGE_LOG_LEVEL='CHATTY'"),
    ({"redis_url": "http://cache:6379"}, "ZIMAGE_REDIS_URL"),
    ({"schema_registry_url": "registry:8081"}, "ZIMAGE_SCHEMA_REGISTRY_URL"),
    ({"replication_factor": "1", "min_insync_replicas": "2"},
     "ZIMAGE_MIN_INSYNC_REPLICAS=2 is above ZIMAGE_REPLICATION_FACTOR=1"),
    ({"replication_factor": "0"}, "ZIMAGE_REPLICATION_FACTOR='0'"),
    ({"post_threads": "0"}, "ZIMAGE_POST_THREADS='0'"),
    ({"status_partitions": "0"}, "ZIMAGE_STATUS_PARTITIONS='0'"),
    ({"commit_interval_ms": "0"}, "ZIMAGE_COMMIT_INTERVAL_MS='0'"),
    ({"callback_allowlist": "hooks.internal,not a host!"}, "ZIMAGE_CALLBACK_ALLOWLIST: 'host!' is neither"),
    ({"batch_timeout_factor": "1"}, "ZIMAGE_BATCH_TIMEOUT_FACTOR"),
    ({"device_fault_exit_s": "-1"}, "ZIMAGE_DEVICE_FAULT_EXIT_S"),
    ({"max_metadata_bytes": "10000000"}, "ZIMAGE_MAX_METADATA_BYTES"),
    ({"topic_prefix": "a b"}, "ZIMAGE_TOPIC_PREFIX='a b': must be 1-200 letters"),
    ({"worker_id": "two words"}, "ZIMAGE_WORKER_ID"),
    ({"max_batch_size": "four"}, "ZIMAGE_MAX_BATCH_SIZE='four': input should be a valid integer"),
    ({"bootstrap_servers": "a:9092,,b:9092"}, "ZIMAGE_BOOTSTRAP_SERVERS"),
    ({"text_moderators": "rules,classifier,rules"}, "ZIMAGE_TEXT_MODERATORS: names rules more than once"),
    ({"webhook_secret": "s", "kafka_extra": "security.protocol=SASL_SSL,sasl.mechanism=OAUTHBEARER"},
     "ZIMAGE_KAFKA_EXTRA with ZIMAGE_WEBHOOK_SECRET: the webhooks process speaks SASL PLAIN"),
])
def test_each_bad_setting_is_refused_with_one_line_naming_it(monkeypatch, env, words):
    assert words in refusal(monkeypatch, **env)


def test_a_state_dir_that_is_a_file_is_refused(monkeypatch, tmp_path):
    (tmp_path / "journal").write_text("x")
    assert "ZIMAGE_STATE_DIR: 'journal' names a file" in refusal(monkeypatch, state_dir="journal")


def test_every_problem_between_settings_is_reported_at_once(monkeypatch):
    message = refusal(monkeypatch, min_share_normal="0.5", min_share_low="0.5", pool="base")
    assert "ZIMAGE_MIN_SHARE_NORMAL + ZIMAGE_MIN_SHARE_LOW = 1" in message and "ZIMAGE_POOL='base'" in message


@pytest.mark.parametrize("env, secret", [
    ({"kafka_extra": "sasl.password=hunter2,linger"}, "hunter2"),
    ({"kafka_extra": '{"ssl.key.pem": "-----BEGIN KEY", "isolation.level": "x"}'}, "BEGIN KEY"),
    ({"redis_url": "http://user:hunter2@cache:6379"}, "hunter2"),
    ({"schema_registry_url": "ftp://user:hunter2@registry"}, "hunter2"),
    ({"storage_url": "s3://key:hunter2@bucket/images"}, "hunter2"),
])
def test_refusals_never_show_a_secret(monkeypatch, env, secret):
    assert secret not in refusal(monkeypatch, **env)


def test_masked_view_and_repr_hide_pem_sasl_and_url_credentials(monkeypatch):
    s = settings_from(
        monkeypatch,
        kafka_extra='{"sasl.password": "hunter2", "sasl.username": "svc", "ssl.key.pem": "-----BEGIN KEY", '
                    '"ssl.certificate.pem": "-----BEGIN CERT", "ssl.key.password": "pw2", "linger.ms": 5}',
        redis_url="redis://:redispass@cache:6379/0",
        schema_registry_url="https://reader:regpass@registry:8081/?api_token=tok3",
        storage_url="file:///srv/images",
        bootstrap_servers="SASL_SSL://svc:brokerpass@b1:9093,b2:9093")
    shown = f"{s.masked()} {s!r}"
    for secret in ("hunter2", "'svc'", "BEGIN KEY", "BEGIN CERT", "pw2", "redispass", "regpass", "tok3",
                   "brokerpass"):
        assert secret not in shown, secret
    view = s.masked()
    assert view["kafka_extra"] == {"sasl.password": "****", "sasl.username": "****", "ssl.key.pem": "****",
                                   "ssl.certificate.pem": "****", "ssl.key.password": "****", "linger.ms": "5"}
    assert view["redis_url"] == "redis://****@cache:6379/0"
    assert view["schema_registry_url"] == "https://****@registry:8081/?api_token=****"
    assert view["bootstrap_servers"] == "SASL_SSL://****@b1:9093,b2:9093"
    assert isinstance(s.kafka_extra["sasl.password"], SecretStr)
    # the clients still get the real values
    assert s.kafka_config()["sasl.password"] == "hunter2" and s.kafka_config()["ssl.key.pem"] == "-----BEGIN KEY"


def test_kafka_extras_accept_values_with_commas_in_the_json_form(monkeypatch):
    s = settings_from(monkeypatch, bootstrap_servers="b1:9092",
                      kafka_extra='{"ssl.cipher.suites": "AES128-SHA,AES256-SHA", '
                                  '"sasl.oauthbearer.config": "scope=a,b principal=svc", "enable.ssl.certificate.'
                                  'verification": false, "linger.ms": 20}')
    assert s.kafka_config() == {"bootstrap.servers": "b1:9092", "ssl.cipher.suites": "AES128-SHA,AES256-SHA",
                                "sasl.oauthbearer.config": "scope=a,b principal=svc",
                                "enable.ssl.certificate.verification": "false", "linger.ms": "20"}


def test_kafka_extras_simple_form_and_its_ambiguity():
    assert parse_kafka_extra(" linger.ms = 20 ,client.id=web,") == {"linger.ms": "20", "client.id": "web"}
    with pytest.raises(ValueError, match="needs the JSON form"):
        parse_kafka_extra("ssl.cipher.suites=AES128-SHA,AES256-SHA")
    with pytest.raises(ValueError, match="needs the JSON form"):
        parse_kafka_extra("sasl.oauthbearer.config=scope=a")
    with pytest.raises(ValueError, match="given twice"):
        parse_kafka_extra("linger.ms=1,linger.ms=2")


def test_kafka_config_is_a_fresh_dict_each_time(monkeypatch):
    s = settings_from(monkeypatch, kafka_extra="linger.ms=20")
    s.kafka_config()["linger.ms"] = "0"
    assert s.kafka_config()["linger.ms"] == "20"


def test_settings_are_frozen(monkeypatch):
    s = settings_from(monkeypatch)
    with pytest.raises(ValidationError):
        s.min_share_low = 0.9  # type: ignore[misc]  # what is checked: the assignment is refused
    with pytest.raises(ValidationError):
        s.pool = "other"  # type: ignore[misc]
    assert s.topology is s.topology  # derived values still computed once


def test_pools_are_parsed_once_into_one_model_per_pool(monkeypatch):
    s = settings_from(monkeypatch, pools="turbo=z-image-turbo, base=z-image", pool="base")
    assert s.pools == {"turbo": ("z-image-turbo",), "base": ("z-image",)}
    assert s.pool_table is s.pools and s.pool_models == ("z-image",)
    assert s.masked()["pools"] == "turbo=z-image-turbo,base=z-image"


def test_new_settings_defaults():
    s = load_settings(_env_file=None)
    assert (s.state_dir, s.callback_allowlist, s.max_metadata_entries, s.max_metadata_bytes,
            s.max_tenant_chars, s.max_sku_id_chars) == (".stack/state", (), 32, 16384, 128, 256)
    assert (s.device_fault_exit_s, s.batch_timeout_factor, s.batch_timeout_floor_s, s.share_patience_s,
            s.fetch_wait_ms, s.replication_factor, s.min_insync_replicas) == (300, 10.0, 120.0, 2.0, 500, None, None)
    assert (s.status_partitions, s.commit_interval_ms) == (1, 100)


def test_the_status_topic_has_its_own_partition_count(monkeypatch):
    monkeypatch.setenv("ZIMAGE_OUTPUT_PARTITIONS", "6")
    monkeypatch.setenv("ZIMAGE_STATUS_PARTITIONS", "2")
    topics = {t.name: t.partitions for t in load_settings(_env_file=None).topology.topics()}
    assert topics["zimage.status"] == 2
    assert topics["zimage.images.ready"] == topics["zimage.rendered"] == 6


def test_callback_allowlist_keeps_networks_and_lower_case_names(monkeypatch):
    s = settings_from(monkeypatch, callback_allowlist="Hooks.Internal, 10.20.0.0/16,127.0.0.1 [::1]")
    assert s.callback_allowlist == ("hooks.internal", "10.20.0.0/16", "127.0.0.1/32", "::1/128")
    assert s.callback_allowed_hosts == {"hooks.internal"}
    assert ipaddress.ip_address("10.20.3.4") in s.callback_allowed_networks[0]
    assert settings_from(monkeypatch, callback_allowlist='["1password.com"]').callback_allowed_hosts == {
        "1password.com"}


def test_unset_words_and_case(monkeypatch):
    s = settings_from(monkeypatch, replication_factor="", min_insync_replicas="none", schema_registry_url="",
                      aging_s="off", log_level="debug", webhook_secret="", aws_moderation_region="null")
    assert (s.replication_factor, s.min_insync_replicas, s.schema_registry_url, s.aging_s, s.log_level) == (
        None, None, None, None, "DEBUG")
    assert s.webhook_secret is None and s.aws_moderation_region is None  # unset: no webhooks, no AWS


@pytest.mark.parametrize("url, problem", [
    ("out/objects", None), ("file:///srv/images", None), ("file://localhost/srv", None),
    ("s3://zimage/images", None), ("s3://Bad_Bucket/x", "bucket"), ("gs://bucket/x", "unsupported scheme"),
    ("", "empty"),
])
def test_storage_url_rules_match_open_object_store(url, problem):
    found = store_url_problem(url)
    assert (found is None) if problem is None else (found is not None and problem in found)


def test_url_credentials_masking():
    assert mask_url_credentials("rediss://u:p@h:1/0?password=x&db=1") == "rediss://****@h:1/0?password=****&db=1"
    assert mask_url_credentials("out/objects") == "out/objects"
