"""The `zimage` command as a user meets it: help, start-up errors, topics and drift."""
from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest
from confluent_kafka.admin import AdminClient, NewPartitions

from tests.harness import ROOT, bootstrap


def zimage(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streams.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **env})


@pytest.mark.parametrize("command", ["worker", "processors", "submit", "tail", "demo", "topics", "topology",
                                     "config"])
def test_every_command_has_help(command):
    out = zimage(command, "--help")
    assert out.returncode == 0 and "Usage:" in out.stdout


@pytest.mark.parametrize("env, words", [
    ({"ZIMAGE_DTYPE": "fp64"}, "dtype 'fp64' is unknown"),
    ({"ZIMAGE_DEVICE": "cuda:0"}, "cuda"),
    ({"ZIMAGE_MODEL_SOURCE": "/nonexistent/model/folder"}, "/nonexistent/model/folder"),
    ({"ZIMAGE_POOL": "base"}, "ZIMAGE_POOL"),
    ({"ZIMAGE_POOLS": "turbo"}, "pool"),
])
def test_bad_worker_configuration_fails_at_start_with_a_clear_message(env, words):
    out = zimage("worker", ZIMAGE_BOOTSTRAP_SERVERS="127.0.0.1:1", **env)
    assert out.returncode != 0
    assert words in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr


def test_config_masks_secrets():
    out = zimage("config", ZIMAGE_KAFKA_EXTRA="sasl.password=hunter2,linger.ms=5")
    assert out.returncode == 0
    assert "hunter2" not in out.stdout and "sasl.password=****" in out.stdout and "linger.ms=5" in out.stdout


@pytest.mark.stack
def test_topics_apply_is_idempotent_and_reports_drift(kafka_bootstrap):
    env = {"ZIMAGE_TOPIC_PREFIX": f"t{uuid.uuid4().hex[:10]}", "ZIMAGE_BOOTSTRAP_SERVERS": kafka_bootstrap}
    first = zimage("topics", "apply", **env)
    assert first.returncode == 0 and first.stdout.count("created") == 8, first.stdout + first.stderr
    again = zimage("topics", "apply", "--check", **env)
    assert again.returncode == 0 and "created" not in again.stdout and again.stdout.count("unchanged") == 8
    topic = f"{env['ZIMAGE_TOPIC_PREFIX']}.requests.low"
    admin = AdminClient({"bootstrap.servers": bootstrap()})
    admin.create_partitions([NewPartitions(topic, 9)])[topic].result()
    drift = zimage("topics", "apply", "--check", **env)
    assert drift.returncode == 1 and f"{topic}: has 9 partitions, declared 6" in drift.stdout
