"""The `zimage` command as a user meets it: help, start-up errors, topics and drift."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewPartitions,
    ResourceType,
)

from streams.settings import Settings
from tests.harness import ROOT, bootstrap


def zimage(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streams.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **env})


@pytest.mark.parametrize("command", ["worker", "processors", "submit", "tail", "demo", "topics", "topology",
                                     "config"])
def test_every_command_has_help(command):
    out = zimage(command, "--help")
    assert out.returncode == 0 and "Usage:" in out.stdout


def start_worker(tmp_path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, float, Path]:
    """`zimage worker` with a fresh, empty tiny-model folder: loading the tiny model would build it there."""
    models = tmp_path / "tiny-model"
    models.mkdir()
    started = time.monotonic()
    out = zimage("worker", *args, **{"ZIMAGE_BOOTSTRAP_SERVERS": "127.0.0.1:1", "ZIMAGE_TINY_CACHE_DIR": str(models),
                                     "ZIMAGE_STORAGE_URL": str(tmp_path / "objects"), **env})
    return out, time.monotonic() - started, models


@pytest.mark.parametrize("env, line", [
    ({"ZIMAGE_MIN_SHARE_NORMAL": "0.6", "ZIMAGE_MIN_SHARE_LOW": "0.5"},
     "ZIMAGE_MIN_SHARE_NORMAL + ZIMAGE_MIN_SHARE_LOW = 1.1, must be < 1"),
    ({"ZIMAGE_KAFKA_EXTRA": "sasl.password=hunter2,sasl.mechanism"}, "ZIMAGE_KAFKA_EXTRA: entry 2 is not key=value"),
    ({"ZIMAGE_STORAGE_URL": "ftp://user:hunter2@files/images"}, "ZIMAGE_STORAGE_URL: 'ftp://****@files/images'"),
    ({"ZIMAGE_POOLS": "turbo=z-image-turbo|z-image"}, "ZIMAGE_POOLS: pool 'turbo' lists 2 models"),
    ({"ZIMAGE_DTYPE": "fp64"}, "ZIMAGE_DTYPE='fp64': input should be 'auto', 'bf16', 'fp16' or 'fp32'"),
    ({"ZIMAGE_POOL": "base"}, "ZIMAGE_POOL='base' is not a pool of ZIMAGE_POOLS"),
])
@pytest.mark.parametrize("restart", ["--restart", "--no-restart"])
def test_bad_setting_stops_the_worker_with_one_line_and_exit_78_before_any_load(tmp_path, env, line, restart):
    out, elapsed, models = start_worker(tmp_path, restart, **env)
    assert out.returncode == 78, out.stderr[-2000:]
    assert out.stderr.startswith(f"zimage: invalid configuration: {line}")
    assert out.stderr.count("\n") == 1 and out.stdout == ""  # one line, so no traceback and no restart
    assert "hunter2" not in out.stderr
    # no model was loaded: the tiny model's folder stays empty, and the command ends long before torch imports
    assert list(models.iterdir()) == [] and elapsed < 8, elapsed


@pytest.mark.parametrize("env, words", [
    ({"ZIMAGE_MODEL_SOURCE": "/nonexistent/model/folder"}, "/nonexistent/model/folder"),
    ({"ZIMAGE_DEVICE": "cuda:99"}, "cuda:99"),
])
def test_bad_model_option_exits_78_without_restart_or_load(tmp_path, env, words):
    out, _elapsed, models = start_worker(tmp_path, **env)  # the default --restart supervisor runs the child
    assert out.returncode == 78, out.stderr[-2000:]
    (line,) = [text for text in out.stderr.splitlines() if text.startswith("zimage:")]
    assert line.startswith("zimage: invalid model options:") and words in line
    assert "Traceback" not in out.stderr and "restarting" not in out.stderr
    assert list(models.iterdir()) == []


@pytest.mark.parametrize("command", [["config"], ["topology"], ["topics", "apply"], ["submit", "a cat"],
                                     ["tail", "--timeout", "1"], ["processors"]])
def test_every_command_refuses_bad_settings_with_exit_78(command):
    out = zimage(*command, ZIMAGE_MIN_SHARE_NORMAL="0.6", ZIMAGE_MIN_SHARE_LOW="0.5",
                 ZIMAGE_BOOTSTRAP_SERVERS="127.0.0.1:1")
    assert out.returncode == 78
    assert out.stderr == ("zimage: invalid configuration: ZIMAGE_MIN_SHARE_NORMAL + ZIMAGE_MIN_SHARE_LOW = 1.1, "
                          "must be < 1\n")


def test_config_masks_secrets():
    out = zimage("config", ZIMAGE_KAFKA_EXTRA='{"sasl.password": "hunter2", "ssl.key.pem": "-----BEGIN",'
                                              ' "linger.ms": 5}',
                 ZIMAGE_REDIS_URL="redis://:redispass@cache:6379/0")
    assert out.returncode == 0
    assert "hunter2" not in out.stdout and "BEGIN" not in out.stdout and "redispass" not in out.stdout
    assert 'kafka_extra = {"sasl.password": "****", "ssl.key.pem": "****", "linger.ms": "5"}' in out.stdout
    assert "redis_url = redis://****@cache:6379/0" in out.stdout


@pytest.mark.stack
def test_topics_apply_is_idempotent_and_reports_drift(kafka_bootstrap):
    env = {"ZIMAGE_TOPIC_PREFIX": f"t{uuid.uuid4().hex[:10]}", "ZIMAGE_BOOTSTRAP_SERVERS": kafka_bootstrap}
    declared = len(Settings(_env_file=None, topic_prefix=env["ZIMAGE_TOPIC_PREFIX"]).topology.topics())
    first = zimage("topics", "apply", **env)
    assert first.returncode == 0 and first.stdout.count("created") == declared, first.stdout + first.stderr
    again = zimage("topics", "apply", "--check", **env)
    assert again.returncode == 0 and "created" not in again.stdout and again.stdout.count("unchanged") == declared
    topic = f"{env['ZIMAGE_TOPIC_PREFIX']}.requests.low"
    admin = AdminClient({"bootstrap.servers": bootstrap()})
    admin.create_partitions([NewPartitions(topic, 9)])[topic].result()
    drift = zimage("topics", "apply", "--check", **env)
    assert drift.returncode == 1 and f"{topic}: has 9 partitions, declared 6" in drift.stdout


@pytest.mark.stack
def test_topics_apply_refuses_more_replicas_than_brokers(kafka_bootstrap):
    env = {"ZIMAGE_TOPIC_PREFIX": f"t{uuid.uuid4().hex[:10]}", "ZIMAGE_BOOTSTRAP_SERVERS": kafka_bootstrap}
    out = zimage("topics", "apply", "--replication-factor", "3", **env)
    assert out.returncode == 78 and out.stdout == ""
    assert out.stderr == ("zimage: replication factor 3 needs at least 3 brokers, but the cluster has 1 live "
                          "broker\n")
    bad = zimage("topics", "apply", "--min-insync-replicas", "2", **env)  # a 1-broker cluster: 1 replica
    assert bad.returncode == 78 and "min.insync.replicas 2 must be between 1 and the replication factor 1" in bad.stderr


@pytest.mark.stack
def test_drift_check_names_replication(kafka_bootstrap):
    env = {"ZIMAGE_TOPIC_PREFIX": f"t{uuid.uuid4().hex[:10]}", "ZIMAGE_BOOTSTRAP_SERVERS": kafka_bootstrap}
    assert zimage("topics", "apply", **env).returncode == 0
    topic = f"{env['ZIMAGE_TOPIC_PREFIX']}.rendered"
    entry = ConfigEntry("min.insync.replicas", "2", incremental_operation=AlterConfigOpType.SET)
    admin = AdminClient({"bootstrap.servers": bootstrap()})
    for future in admin.incremental_alter_configs(
            [ConfigResource(ResourceType.TOPIC, topic, incremental_configs=[entry])]).values():
        future.result()
    deadline = time.monotonic() + 15
    while True:  # the broker applies a config change a moment after the controller accepted it
        drift = zimage("topics", "apply", "--check", **env)
        if drift.returncode == 1 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert drift.returncode == 1 and f"drift     {topic}: min.insync.replicas=2 -> 1" in drift.stdout
    fixed = zimage("topics", "apply", **env)
    assert f"updated   {topic}: min.insync.replicas=2 -> 1" in fixed.stdout


@pytest.mark.parametrize("line, words", [('["x"]', "a request is a JSON object"),
                                         ('{"prompt": "p", "metadata": [1]}', "metadata must be an object"),
                                         ('{"prompt": "p", "width": "wide"}', "width")])
def test_submit_checks_every_line_before_sending_any(tmp_path, line, words):
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"prompt": "a good one"}\n' + line + "\n")
    out = zimage("submit", "--file", str(requests), ZIMAGE_BOOTSTRAP_SERVERS="127.0.0.1:9")  # never reached
    assert out.returncode == 78 and "Traceback" not in out.stderr
    assert "request 2: " in out.stderr and words in out.stderr and out.stdout == ""
