"""Runs pipeline processes against the local stack for end-to-end tests: each test gets its own topic prefix."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

from confluent_kafka import Producer

from bench.topology import drop_topics
from connectors.kafka_admin import TopicWanted, apply_topics
from schemas.serde import AvroSerde
from streams.settings import Settings
from streams.submit import build_request
from streams.tail import EventFollower

ROOT = Path(__file__).resolve().parent.parent


def bootstrap() -> str:
    return os.environ.get("ZIMAGE_BOOTSTRAP_SERVERS", "127.0.0.1:9092")


class Pipeline:
    """A private set of topics plus the worker and processor processes that serve them."""

    prefixes: ClassVar[list[str]] = []  # of this test session's pipelines: drop_session_topics deletes their topics

    def __init__(self, tmp: Path, **env: str):
        self.prefix = f"t{uuid.uuid4().hex[:10]}"
        Pipeline.prefixes.append(self.prefix)
        self.tmp = tmp
        self.env = {**os.environ, "ZIMAGE_BOOTSTRAP_SERVERS": bootstrap(), "ZIMAGE_TOPIC_PREFIX": self.prefix,
                    "ZIMAGE_STORAGE_URL": str(tmp / "objects"), "ZIMAGE_REQUEST_PARTITIONS": "3",
                    "ZIMAGE_OUTPUT_PARTITIONS": "3", "ZIMAGE_TINY_CACHE_DIR": str(ROOT / ".stack/models/tiny"),
                    "ZIMAGE_MAX_WAIT_MS": "20", "PYTHONUNBUFFERED": "1", **env}
        overrides: dict[str, Any] = {k[7:].lower(): v for k, v in self.env.items()
                                     if k.startswith("ZIMAGE_") and k[7:].lower() in Settings.model_fields}
        self.settings = Settings(_env_file=None, **overrides)
        self.topology = self.settings.topology
        self.serde = AvroSerde()
        self.procs: dict[str, subprocess.Popen] = {}
        apply_topics({"bootstrap.servers": bootstrap()},
                     [TopicWanted(t.name, t.partitions, t.config) for t in self.topology.topics()])

    def start(self, name: str, command: str, wait_ready: bool = True, **env: str) -> subprocess.Popen:
        log = (self.tmp / f"{name}.log").open("ab")
        ready = self.tmp / f"{name}.ready"
        ready.unlink(missing_ok=True)
        proc = subprocess.Popen([sys.executable, "-m", "streams.cli", *command.split()], cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT,
                                env={**self.env, "ZIMAGE_HEALTH_FILE": str(ready),
                                     "ZIMAGE_WORKER_ID": name, **env})
        self.procs[name] = proc
        if wait_ready and command == "worker":
            deadline = time.monotonic() + 120
            while not ready.exists():
                assert proc.poll() is None, f"{name} exited: {self.log(name)[-3000:]}"
                assert time.monotonic() < deadline, f"{name} not ready: {self.log(name)[-3000:]}"
                time.sleep(0.1)
        return proc

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.returncode is None and proc.poll() is not None and not getattr(proc, "expected_exit", False):
                raise AssertionError(f"{name} exited with {proc.returncode}:\n{self.log(name)[-4000:]}")

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[name]
        proc.expected_exit = True  # type: ignore[attr-defined]  # a mark that the watch above reads back
        proc.send_signal(sig)
        proc.wait(30)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()

    def producer(self, **conf) -> Producer:
        # Keyed as the project's producers key (murmur2): each request lands on its home partition.
        return Producer({"bootstrap.servers": bootstrap(), "enable.idempotence": True,
                         "partitioner": "murmur2_random", **conf})

    def follower(self, from_beginning: bool = True) -> EventFollower:
        return EventFollower({"bootstrap.servers": bootstrap()},
                             {self.topology.images_ready: "ImageReady", self.topology.failed: "RequestFailed"},
                             self.serde, from_beginning=from_beginning)

    def wait_published(self, count: int, timeout_s: float = 60) -> None:
        """Returns once `count` events (ImageReady or RequestFailed) are on the output topics."""
        watch = self.follower(from_beginning=True)
        seen = 0
        try:
            for _event in watch.events(idle_timeout_s=timeout_s):
                seen += 1
                if seen >= count:
                    return
        finally:
            watch.close()
        raise AssertionError(f"only {seen} of {count} events published within {timeout_s}s")

    def collect(self, request_ids: Iterable[str], timeout_s: float = 120, settle_s: float = 0.0,
                follower: EventFollower | None = None) -> dict[str, list[tuple[str, dict]]]:
        """Every ImageReady/RequestFailed of these requests, until each has one (then `settle_s` more, to catch
        duplicates) or `timeout_s` passes."""
        wanted = set(request_ids)
        seen: dict[str, list[tuple[str, dict]]] = {}
        own = follower is None
        follower = follower or self.follower()
        deadline = time.monotonic() + timeout_s
        settle_until: float | None = None

        def done() -> bool:
            now = time.monotonic()
            return now > deadline or (settle_until is not None and now >= settle_until)

        try:
            while not done():
                for name, value, _raw in follower.events(idle_timeout_s=1.0):  # ends after an idle second
                    self.check_alive()
                    if value is not None and value.get("request_id") in wanted:
                        seen.setdefault(value["request_id"], []).append((name, value))
                    if settle_until is None and wanted <= seen.keys():
                        settle_until = time.monotonic() + settle_s
                    if done():
                        break
                self.check_alive()
        finally:
            if own:
                follower.close()
        return seen


def mixed_requests(word: str, start: int, count: int) -> list[dict]:
    """`count` small requests of the three priorities in turn, seeded by their index."""
    return [build_request({"prompt": f"{word} {i}", "priority": ("high", "normal", "low")[i % 3], "seed": i,
                           "width": 32, "height": 32, "steps": 2}) for i in range(start, start + count)]


def assert_each_published_once(p: Pipeline, ids: list[str], events: dict[str, list[tuple[str, dict]]]) -> None:
    """Every request has exactly one event, an ImageReady (with the processes' logs when one is missing)."""
    missing = [i for i in ids if i not in events]
    assert not missing, (f"{len(missing)} lost; worker log:\n{p.log('worker')[-3000:]}\nprocessors log:\n"
                         f"{p.log('processors')[-3000:]}")
    doubled = {i: [n for n, _ in e] for i, e in events.items() if len(e) != 1 or e[0][0] != "ImageReady"}
    assert not doubled, doubled


def drop_session_topics() -> None:
    """Deletes the topics of this session's pipelines: left on a developer's broker, thousands of partitions slow
    every later test and benchmark on it."""
    drop_topics({"bootstrap.servers": bootstrap()}, *Pipeline.prefixes)
    Pipeline.prefixes.clear()
