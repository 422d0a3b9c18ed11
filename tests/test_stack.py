"""The local stack (`ops/stack`): each part answers, and is the program the stack says it started.

Tests marked `stack` expect `ops/stack up` to have run (addresses from the ZIMAGE_* variables, else the
stack's defaults; the `kafka_bootstrap` fixture fails them at once, saying so, when nothing answers).
The others start nothing: they run `ops/stack` against a scratch state directory.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STACK = ROOT / "ops" / "stack"
STATE = Path(os.environ.get("ZIMAGE_STACK_DIR") or ROOT / ".stack")
REDIS_URL = os.environ.get("ZIMAGE_REDIS_URL", "redis://127.0.0.1:6379/0")
S3_ENDPOINT = os.environ.get("ZIMAGE_S3_ENDPOINT_URL", "http://127.0.0.1:9000")
BUCKET = os.environ.get("ZIMAGE_S3_BUCKET", "zimage")
PORT_VARIABLES = ("ZIMAGE_KAFKA_PORT", "ZIMAGE_KAFKA_CONTROLLER_PORT", "ZIMAGE_REDIS_PORT", "ZIMAGE_S3_PORT")


def run_stack(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(STACK), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().rstrip("\0").split("\0")


def stack_pid(name: str) -> int:
    pid_file = STATE / "pids" / f"{name}.pid"
    assert pid_file.is_file(), f"{pid_file} is missing: was the stack started with `ops/stack up`?"
    return int(pid_file.read_text())


def listening_socket_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            fields = row.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == "0A":  # 0A: LISTEN
                inodes.add(fields[9])
    return inodes


def process_socket_inodes(pid: int) -> set[str]:
    links = (os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir())
    return {link[len("socket:["):-1] for link in links if link.startswith("socket:[")}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scratch_env(state_dir: Path) -> dict[str, str]:
    """A stack configuration that points at nothing running: its own state directory and unused ports."""
    return {"ZIMAGE_STACK_DIR": str(state_dir), **{name: str(free_port()) for name in PORT_VARIABLES}}


# ---------------------------------------------------------------- against the running stack

@pytest.mark.stack
def test_kafka_answers_metadata_and_is_the_stacks_java_broker(kafka_bootstrap: str) -> None:
    from confluent_kafka.admin import AdminClient

    metadata = AdminClient({"bootstrap.servers": kafka_bootstrap}).list_topics(timeout=10)
    port = int(kafka_bootstrap.split(",")[0].rsplit(":", 1)[1])
    assert [broker.port for broker in metadata.brokers.values()] == [port]

    pid = stack_pid("kafka")
    argv = cmdline(pid)
    assert Path(argv[0]).name == "java" and "kafka.Kafka" in argv
    assert listening_socket_inodes(port) & process_socket_inodes(pid), f"pid {pid} does not listen on {port}"


@pytest.mark.stack
@pytest.mark.usefixtures("kafka_bootstrap")
def test_redis_answers_ping_from_the_stacks_redis_server() -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
    assert client.ping() is True
    server_pid = client.info("server")["process_id"]
    assert server_pid == stack_pid("redis")
    assert "redis-server" in " ".join(cmdline(server_pid))


@pytest.mark.stack
@pytest.mark.usefixtures("kafka_bootstrap")
def test_s3_endpoint_lists_the_bucket_and_keeps_an_object() -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=S3_ENDPOINT, region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
                      aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID", "test"),
                      aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY", "test"))
    assert BUCKET in [bucket["Name"] for bucket in s3.list_buckets()["Buckets"]]

    key, body = f"stack-check/{uuid.uuid4().hex}", uuid.uuid4().bytes
    s3.put_object(Bucket=BUCKET, Key=key, Body=body)
    try:
        assert s3.get_object(Bucket=BUCKET, Key=key)["Body"].read() == body
    finally:
        s3.delete_object(Bucket=BUCKET, Key=key)
    assert "moto.server" in cmdline(stack_pid("s3"))


@pytest.mark.stack
@pytest.mark.usefixtures("kafka_bootstrap")
def test_status_reports_each_running_part_with_its_pid() -> None:
    done = run_stack("status")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = {line.split()[0]: line.split() for line in done.stdout.splitlines()}
    for name in ("kafka", "redis", "s3"):
        assert lines[name][1] == "running"
        assert str(stack_pid(name)) in lines[name]


# ---------------------------------------------------------------- the script itself, nothing running

@pytest.mark.parametrize("ports, expected", [
    ({}, ["127.0.0.1:9092", "redis://127.0.0.1:6379/0", "http://127.0.0.1:9000"]),
    ({"ZIMAGE_KAFKA_PORT": "19092", "ZIMAGE_REDIS_PORT": "16379", "ZIMAGE_S3_PORT": "19000"},
     ["127.0.0.1:19092", "redis://127.0.0.1:16379/0", "http://127.0.0.1:19000"]),
])
def test_env_is_eval_able_by_bash_and_follows_the_ports(ports: dict[str, str], expected: list[str]) -> None:
    env = {key: value for key, value in os.environ.items() if key not in PORT_VARIABLES} | ports
    script = ('eval "$(ops/stack env)" && printf "%s\\n" "$ZIMAGE_BOOTSTRAP_SERVERS" "$ZIMAGE_REDIS_URL" '
              '"$ZIMAGE_S3_ENDPOINT_URL" "$ZIMAGE_S3_BUCKET" "$AWS_ACCESS_KEY_ID" "$AWS_DEFAULT_REGION"')
    done = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [*expected, "zimage", "test", "us-east-1"]


def test_a_bad_port_is_refused_with_one_line() -> None:
    done = run_stack("env", env={"ZIMAGE_KAFKA_PORT": "ninety"})
    assert done.returncode != 0
    assert "ZIMAGE_KAFKA_PORT" in done.stderr and "Traceback" not in done.stderr


def test_status_of_a_stack_that_is_not_running(tmp_path: Path) -> None:
    done = run_stack("status", env=scratch_env(tmp_path))
    assert done.returncode == 3
    assert [line.split()[:2] for line in done.stdout.splitlines()] == [
        ["kafka", "stopped"], ["redis", "stopped"], ["s3", "stopped"]]


def sleeper(cwd: Path) -> subprocess.Popen[bytes]:
    """A process whose command line looks like the stack's broker."""
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "kafka.Kafka"], cwd=cwd)


def test_down_stops_only_processes_started_from_its_state_directory(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "pids").mkdir(parents=True)
    stranger, ours = sleeper(tmp_path / "elsewhere"), sleeper(state / "kafka")
    try:
        (state / "pids" / "kafka.pid").write_text(f"{stranger.pid}\n")
        run_stack("down", env=scratch_env(state))
        assert stranger.poll() is None, "a process outside the stack's state directory was signalled"
        assert not (state / "pids" / "kafka.pid").exists(), "the stale pid file was kept"

        (state / "pids" / "kafka.pid").write_text(f"{ours.pid}\n")
        done = run_stack("down", env=scratch_env(state))
        assert ours.wait(timeout=10) == -15, done.stdout  # SIGTERM
        assert not (state / "pids" / "kafka.pid").exists()
    finally:
        for process in (stranger, ours):
            process.kill()
            process.wait()
