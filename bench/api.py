"""The HTTP API (`zimage api`, as that command runs it: one uvicorn process) on the local stack.

    python -m bench.api [--requests 20000] [--concurrency 32] [--sync 200]     (part of `make bench`)

Figures, each measured in this one run:
- submit capacity in async mode: `--concurrency` clients (one httpx.AsyncClient, a pool of keep-alive connections,
  in this process) POST /v1/images/generations with mode async, `--requests` distinct requests in all; the rate
  is the 202 answers per second from the first POST to the last answer, and the latency of each POST (sent to
  answered, at the client) gives p50 and p99. Nothing renders meanwhile: the API's topics have no gate. The load
  generator runs on the same CPU cores as the API, Kafka and Redis, so it takes part of the capacity measured.
- the latency sync mode adds over the pipeline: with the gate and publication running as processes and a worker
  with a renderer that costs nothing (as bench/topology.py runs them, warmed up the same way), sync requests are
  sent one at a time; for each, added = (wall clock when its 200 answer arrived at the client) -
  ImageReady.published_at (the publication process's wall clock when it began deciding the batch that holds the
  event, before its transaction committed).
  That covers publication's decision and the commit of its transaction, the API's outcome consumer reading it
  (read committed), waking the waiting request, building the answer and the HTTP response; both clocks are this
  machine's, in milliseconds.
- the API process's CPU time per accepted POST during the async load (all its threads: the event loop, the
  Kafka client's, the outcome feed), and its resident memory after it.

Prints a table (name, value, unit, goal, ok or MISSED) and writes bench/results/api.json.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.topology import Topology, drop_topics, percentile, rss_mb
from connectors.kafka_admin import TopicWanted, apply_topics
from streams.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "api.json"
TENANT = "bench"
GOAL_SUBMIT_RPS = 1500.0
GOAL_SUBMIT_P99_MS = 50.0
GOAL_SYNC_ADDED_P99_MS = 20.0


@dataclass
class Figure:
    name: str
    value: float
    unit: str
    goal: str = "-"
    ok: bool | None = None  # None: a figure without a goal

    def line(self) -> str:
        verdict = "" if self.ok is None else ("ok" if self.ok else "MISSED")
        return f"  {self.name:34} {self.value:10.2f} {self.unit:10} goal {self.goal:10} {verdict}"


def cpu_seconds(pid: int) -> float:
    """User and system CPU time a process has used so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ApiProcess:
    """`zimage api --no-restart` on loopback for one topic prefix, with a key of the bench tenant."""

    def __init__(self, prefix: str, tmp: Path):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        limits = {TENANT: {"rate_per_s": 1e9, "burst": 1_000_000_000, "daily_quota": 1_000_000_000}}
        self.env = {**os.environ, "ZIMAGE_TOPIC_PREFIX": prefix, "ZIMAGE_API_KEY_SECRET": secrets.token_hex(32),
                    "ZIMAGE_API_KEYS_FILE": str(tmp / "keys.jsonl"), "ZIMAGE_API_PORT": str(self.port),
                    "ZIMAGE_API_TENANT_LIMITS": json.dumps(limits), "ZIMAGE_METRICS_PORT": "0",
                    "ZIMAGE_LOG_LEVEL": "WARNING", "PYTHONUNBUFFERED": "1"}
        created = subprocess.run([sys.executable, "-m", "streams.cli", "api-key", "create", "--tenant", TENANT],
                                 cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=60, check=True)
        self.key = created.stdout.strip()
        self.log = (tmp / f"api-{prefix}.log").open("wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "streams.cli", "api", "--no-restart"], cwd=ROOT,
                                     env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"zimage api exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(f"{self.base}/healthz", timeout=2).json()["ok"]:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"zimage api not ready in 120 s; see {self.log.name}")
            time.sleep(0.2)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


def body(tag: str, i: int, mode: str) -> dict[str, Any]:
    return {"prompt": f"bench {tag} request {i}, a teapot on a table", "seed": abs(i), "width": 256, "height": 256,
            "steps": 2, "mode": mode}


class RawClient:
    """One keep-alive HTTP/1.1 connection written by hand on asyncio streams: a POST costs this process a few
    tens of microseconds (httpx costs about 5 ms of CPU here), so the load generator takes little of the cores
    it shares with the API. It reads answers with a Content-Length, as uvicorn gives them."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, key: str):
        self._reader, self._writer = reader, writer
        self._head = (f"POST /v1/images/generations HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
                      "Content-Type: application/json\r\n").encode()

    @classmethod
    async def open(cls, api: ApiProcess) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", api.port)
        return cls(reader, writer, f"127.0.0.1:{api.port}", api.key)

    async def post(self, payload: dict[str, Any]) -> tuple[int, bytes]:
        data = json.dumps(payload).encode()
        self._writer.write(self._head + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        head = await self._reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length = next(int(line.split(":", 1)[1]) for line in lines[1:] if line.lower().startswith("content-length:"))
        return status, await self._reader.readexactly(length)

    async def close(self) -> None:
        self._writer.close()
        await self._writer.wait_closed()


async def hammer(api: ApiProcess, total: int, concurrency: int, tag: str) -> tuple[list[float], Counter[int], float]:
    """`total` async POSTs from `concurrency` clients, each on its own keep-alive connection: (latencies in ms,
    answers by status, seconds from the first POST to the last answer)."""
    clients = [await RawClient.open(api) for _ in range(concurrency)]
    latencies: list[float] = []
    answers: Counter[int] = Counter()
    numbers = itertools.count()

    async def one_client(client: RawClient) -> None:
        while (i := next(numbers)) < total:
            sent = time.perf_counter()
            status, _answer = await client.post(body(tag, i, "async"))
            latencies.append((time.perf_counter() - sent) * 1000)
            answers[status] += 1

    started = time.perf_counter()
    await asyncio.gather(*(one_client(c) for c in clients))
    seconds = time.perf_counter() - started
    for client in clients:
        await client.close()
    return latencies, answers, seconds


def submit_capacity(requests: int, concurrency: int, tmp: Path) -> list[Figure]:
    settings = Settings(_env_file=None, topic_prefix=f"ba{uuid.uuid4().hex[:8]}",
                        bootstrap_servers=os.environ.get("ZIMAGE_BOOTSTRAP_SERVERS", "127.0.0.1:9092"))
    apply_topics(settings.kafka_config(),
                 [TopicWanted(t.name, t.partitions, t.config) for t in settings.topology.topics()])
    api = ApiProcess(settings.topic_prefix, tmp)
    try:
        tag = uuid.uuid4().hex[:6]
        asyncio.run(hammer(api, min(1000, requests), concurrency, f"warm-{tag}"))  # connections, caches, JIT-free
        api_cpu, own_cpu = cpu_seconds(api.proc.pid), time.process_time()
        latencies, answers, seconds = asyncio.run(hammer(api, requests, concurrency, tag))
        api_cpu, own_cpu = cpu_seconds(api.proc.pid) - api_cpu, time.process_time() - own_cpu
        rss = rss_mb(api.proc.pid)
    finally:
        api.close()
        drop_topics(settings.kafka_config(), settings.topic_prefix)
    accepted = answers.get(202, 0)
    if accepted != requests:
        print(f"  not every POST was accepted: {dict(answers)}", flush=True)
    rate, p99 = accepted / seconds, percentile(latencies, 0.99)
    print(f"  async submit: {requests} POSTs from {concurrency} concurrent clients in {seconds:.1f}s; the load "
          f"generator (this process) shares the machine's {os.cpu_count()} cores with the API, Kafka and Redis",
          flush=True)
    print(f"  CPU per POST: {api_cpu / requests * 1000:.2f} ms in the API process, {own_cpu / requests * 1000:.2f} ms "
          f"in the load generator", flush=True)
    return [Figure("api_submit_rate", rate, "requests/s", f">= {GOAL_SUBMIT_RPS:.0f}", rate >= GOAL_SUBMIT_RPS),
            Figure("api_submit_latency_p50", statistics.median(latencies), "ms"),
            Figure("api_submit_latency_p99", p99, "ms", f"<= {GOAL_SUBMIT_P99_MS:.0f}", p99 <= GOAL_SUBMIT_P99_MS),
            Figure("api_cpu_per_request", api_cpu / requests * 1000, "ms"),
            Figure("api_rss", rss, "MB")]


def sync_added_latency(count: int, tmp: Path) -> list[Figure]:
    state = tmp / "state"
    state.mkdir()
    topo = Topology(state)
    api = ApiProcess(topo.settings.topic_prefix, tmp)
    try:
        topo.warm_up(3000)  # unmeasured, as bench/topology.py does: a broker that started lately is slower
        tag = uuid.uuid4().hex[:6]
        with httpx.Client(base_url=api.base, headers={"Authorization": f"Bearer {api.key}"}, timeout=120) as client:
            answered_at: dict[str, float] = {}
            for i in range(-3, count):  # the first three warm the path (pool announced, every process up)
                answer = client.post("/v1/images/generations", json=body(f"sync-{tag}", i, "sync"))
                arrived = time.time() * 1000
                if answer.status_code != 200 or answer.json()["state"] != "completed":
                    raise RuntimeError(f"sync request {i}: {answer.status_code} {answer.text[:300]}")
                if i >= 0:
                    answered_at[answer.json()["id"]] = arrived
                time.sleep(0.02)  # light load: one request at a time, a pause between them
        ready = topo.wait_for(set(answered_at), timeout_s=60)
    finally:
        api.close()
        topo.close()
    added = [answered_at[rid] - event["published_at"] for rid, event in ready.items()]
    p99 = percentile(added, 0.99)
    print(f"  sync added latency = (200 answer arrived at the client) - ImageReady.published_at, {count} requests "
          f"one at a time (millisecond clocks)", flush=True)
    return [Figure("api_sync_added_latency_p50", statistics.median(added), "ms"),
            Figure("api_sync_added_latency_p99", p99, "ms", f"<= {GOAL_SYNC_ADDED_P99_MS:.0f}",
                   p99 <= GOAL_SYNC_ADDED_P99_MS)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=20_000, help="async POSTs measured")
    ap.add_argument("--concurrency", type=int, default=32, help="concurrent clients of the async load")
    ap.add_argument("--sync", type=int, default=200, help="sync requests, one at a time")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        figures = submit_capacity(args.requests, args.concurrency, Path(tmp))
        figures += sync_added_latency(args.sync, Path(tmp))
    for figure in figures:
        print(figure.line(), flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpu_count": os.cpu_count(),
        "requests": args.requests, "concurrency": args.concurrency, "sync_requests": args.sync,
        "load_generator": "in process, on the same cores as the API",
        "figures": [{"name": f.name, "value": round(f.value, 2), "unit": f.unit, "goal": f.goal, "ok": f.ok}
                    for f in figures]}, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
