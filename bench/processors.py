"""Each stream processor alone on the local stack: its capacity, and its resident memory.

    python -m bench.processors [--records 20000] [--only gate,publication,status,sku-connector]
                                                                          (part of `make bench`)

For each processor, on private topics (a random prefix): its input is filled with `--records` records first, then
the processor is started as `zimage` starts it (`processors --only NAME --no-restart`, `sku-connector
--no-restart`), alone, in its default configuration, and the bench follows its progress every 50 ms:
- gate: GenerationRequests (distinct, valid) on the normal request topic, and a pool announcement already on the
  pools topic so it routes them all (prompt moderation, cache lookups and the changelog as configured);
- publication: ImageRendered events (distinct requests) on the rendered topic; they publish as ImageReady;
- status view: RequestStatus records on the status topic; they go to Redis;
- SKU connector (ZIMAGE_SKU_TEMPLATES=examples/sku-templates.toml): SkuChanged of distinct chairs, three
  GenerationRequests each.
Progress is what the processor has committed: its group's committed offsets on its input (the gate, publication
and the SKU connector commit them with their outputs, in one transaction). The status view commits its offsets
in the background every few seconds, so its progress is read from its outputs instead: it writes each record's
entry to Redis in partition order, so the entries present on a partition are a prefix of it (found by bisection).
records/s = the records done between the first progress seen and the last record done, divided by the time
between: start-up (imports, joining the group, restoring state, the first batch) is left out and printed apart.
RSS: the process and its children, sampled once the last record is done. Goal: <= 200 MB for each; none of
them loads a diffusion model (the gate's prompt classifier is a small scikit-learn model, part of the figure).

Prints a table (name, value, unit, goal, ok or MISSED) and writes bench/results/processors.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition

from bench.topology import drop_topics, rss_mb
from connectors.kafka_admin import TopicWanted, apply_topics
from connectors.storage import ObjectUris
from processors.admission import PoolInfo
from processors.events import image_rendered
from processors.status import request_status, status_key
from schemas.serde import AvroSerde
from streams.settings import Settings
from streams.status_view import status_entry_key
from streams.submit import build_request

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "processors.json"
SKU_TEMPLATES = ROOT / "examples" / "sku-templates.toml"
GOAL_RSS_MB = 200.0
TENANT = "bench"
POLL_S = 0.05
Record = tuple[str, bytes, dict[str, Any]]  # (Avro record name, key, value)


@dataclass
class Case:
    """One processor: how to start it, what to feed it, and which group commits its progress."""

    name: str
    command: list[str]
    input_topic: Callable[[Settings], str]
    records: Callable[[Settings, int, str], Iterator[Record]]
    group: str | None  # None: progress is read from Redis (the status view)
    outputs: Callable[[Settings], list[str]]  # the topics its results go to ([]: Redis)
    per_record: int = 1  # outputs on those topics per input record
    env: dict[str, str] = field(default_factory=dict)


def requests(settings: Settings, n: int, tag: str) -> Iterator[dict[str, Any]]:
    for i in range(n):
        yield build_request({"prompt": f"a product photo of item {i} ({tag}), studio light, white background",
                             "seed": i, "width": 512, "height": 512, "steps": 8, "tenant": TENANT,
                             "priority": "normal", "request_id": f"{tag}-{i}"})


def gate_records(settings: Settings, n: int, tag: str) -> Iterator[Record]:
    for request in requests(settings, n, tag):
        yield "GenerationRequest", request["request_id"].encode(), request


def rendered_records(settings: Settings, n: int, tag: str) -> Iterator[Record]:
    now_ms = int(time.time() * 1000)
    source = settings.topology.request_topic("normal")
    base = ObjectUris.of(settings.storage_url).base  # publication announces only images of the configured store
    for i, request in enumerate(requests(settings, n, tag)):
        digest = f"{i:064x}"
        image = {"index": 0, "uri": f"{base}{TENANT}/{digest}.png", "sha256": digest, "seed": i, "size_bytes": 40_000}
        event = image_rendered(request=request, images=[image], model_id="simulated", model_version="sim-1",
                               timings_ms={"render": 1.0, "store": 0.5}, batch_id=f"{tag}-b{i // 16}", batch_size=16,
                               worker_id="bench", source=(source, 0, i), now_ms=now_ms, generation="sim-1",
                               cache_key=f"{i:064x}")
        yield "ImageRendered", request["request_id"].encode(), event


def status_records(settings: Settings, n: int, tag: str) -> Iterator[Record]:
    now_ms = int(time.time() * 1000)
    for request in requests(settings, n, tag):
        status = request_status(request=request, status="admitted", stage="gate", now_ms=now_ms,
                                generation="sim-1", detail="routed to turbo")
        yield "RequestStatus", status_key(TENANT, request["request_id"]), status


def sku_records(settings: Settings, n: int, tag: str) -> Iterator[Record]:
    now_ms = int(time.time() * 1000)
    for i in range(n):
        sku = f"{tag}-SKU-{i}"
        event = {"sku_id": sku, "tenant": TENANT, "version": 1, "title": f"Lounge chair {i}",
                 "attributes": {"color": "green", "material": "velvet"}, "template": None, "priority": None,
                 "changed_at": now_ms, "change_kind": "attribute_edit", "category": "chairs"}
        yield "SkuChanged", sku.encode(), event


PROCESSORS = "processors --only {} --no-restart"
CASES = {
    "gate": Case("gate", PROCESSORS.format("gate").split(), lambda s: s.topology.request_topic("normal"),
                 gate_records, "gate", lambda s: list(s.topology.render_input_topics(s.pool).values())),
    "publication": Case("publication", PROCESSORS.format("publication").split(), lambda s: s.topology.rendered,
                        rendered_records, "publication", lambda s: [s.topology.images_ready]),
    "status": Case("status", PROCESSORS.format("status").split(), lambda s: s.topology.status, status_records,
                   None, lambda s: []),
    "sku-connector": Case("sku-connector", ["sku-connector", "--no-restart"], lambda s: s.topology.sku_changes,
                          sku_records, "sku-connector", lambda s: list(s.topology.request_topics), per_record=3,
                          env={"ZIMAGE_SKU_TEMPLATES": str(SKU_TEMPLATES)}),
}


def count_committed(settings: Settings, topics: list[str]) -> int:
    """Committed records (transaction markers and aborted records left out) now on these topics."""
    consumer = Consumer({**settings.kafka_config(), "group.id": f"bench-count-{uuid.uuid4().hex[:8]}",
                         "enable.auto.commit": False, "isolation.level": "read_committed",
                         "enable.partition.eof": True})
    try:
        meta = consumer.list_topics(timeout=10)
        parts = [TopicPartition(t, p, OFFSET_BEGINNING) for t in topics for p in meta.topics[t].partitions]
        consumer.assign(parts)
        todo, count = {(tp.topic, tp.partition) for tp in parts}, 0
        while todo:
            for msg in consumer.consume(10_000, timeout=1.0):
                err = msg.error()
                if err is None:
                    count += 1
                elif err.code() == KafkaError._PARTITION_EOF:
                    todo.discard((msg.topic(), msg.partition()))
        return count
    finally:
        consumer.close()


def fill(settings: Settings, case: Case, n: int, tag: str) -> dict[int, list[bytes]]:
    """Produces the case's records; returns the keys on each partition, in order (the status view's progress)."""
    topic = case.input_topic(settings)
    serde = AvroSerde()
    producer = Producer({**settings.kafka_config(), "linger.ms": 20, "compression.type": "lz4",
                         "enable.idempotence": True, "queue.buffering.max.messages": 1_000_000,
                         "partitioner": "murmur2_random"})  # each request on its home partition
    placed: dict[int, list[bytes]] = {}

    def delivered(err: Any, msg: Any) -> None:
        if err is not None:
            raise RuntimeError(f"not delivered: {err}")
        placed.setdefault(msg.partition(), []).append(msg.key())

    if case.name == "gate":  # the pool announces its model before any request: the gate routes them all
        info = PoolInfo(settings.pool, settings.pool_models[0], "simulated", "sim-1", 4096, 16)
        pools = settings.topology.pool_announcements
        producer.produce(pools, serde.encode("PoolAnnouncement", info.announcement("bench", int(time.time() * 1000)),
                                             topic=pools), settings.pool.encode())
    for name, key, value in case.records(settings, n, tag):
        producer.produce(topic, serde.encode(name, value, topic=topic), key, on_delivery=delivered)
        producer.poll(0)
    if producer.flush(120):
        raise RuntimeError("the input was not all delivered")
    return placed


class Progress:
    """Records done so far: committed offsets of the group, or the status view's entries in Redis."""

    def __init__(self, settings: Settings, case: Case, placed: dict[int, list[bytes]]):
        self._topic = case.input_topic(settings)
        self._placed = placed
        self._group = f"{settings.topic_prefix}-{case.group}" if case.group else None
        self._consumer = Consumer({**settings.kafka_config(), "group.id": self._group or "unused",
                                   "enable.auto.commit": False})
        self._redis = redis.Redis.from_url(settings.redis_url)
        self._prefix = settings.topic_prefix
        self._found: dict[int, int] = {p: 0 for p in placed}

    def done(self) -> int:
        if self._group is not None:
            tps = [TopicPartition(self._topic, p) for p in self._placed]
            return sum(max(0, tp.offset) for tp in self._consumer.committed(tps, timeout=10))
        for partition, keys in self._placed.items():  # the entries present are a prefix of the partition
            low, high = self._found[partition], len(keys)
            while low < high:
                mid = (low + high + 1) // 2
                tenant, _, request_id = keys[mid - 1].decode().partition("/")
                if self._redis.exists(status_entry_key(self._prefix, tenant, request_id)):
                    low = mid
                else:
                    high = mid - 1
            self._found[partition] = low
        return sum(self._found.values())

    def close(self) -> None:
        self._consumer.close()
        self._redis.close()


@dataclass
class Measured:
    name: str
    records: int
    rate: float
    startup_s: float
    rss_mb: float


def measure(case: Case, n: int, tmp: Path, timeout_s: float) -> Measured:
    prefix = f"bp{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "ZIMAGE_TOPIC_PREFIX": prefix, "ZIMAGE_STATE_DIR": str(tmp / prefix),
           "ZIMAGE_METRICS_PORT": "0", "ZIMAGE_LOG_LEVEL": "WARNING", "PYTHONUNBUFFERED": "1", **case.env}
    settings = Settings(_env_file=None, topic_prefix=prefix, state_dir=str(tmp / prefix),
                        bootstrap_servers=os.environ.get("ZIMAGE_BOOTSTRAP_SERVERS", "127.0.0.1:9092"))
    apply_topics(settings.kafka_config(),
                 [TopicWanted(t.name, t.partitions, t.config) for t in settings.topology.topics()])
    placed = fill(settings, case, n, uuid.uuid4().hex[:6])
    progress = Progress(settings, case, placed)
    log = (tmp / f"{case.name}.log").open("wb")
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "streams.cli", *case.command], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        first: tuple[float, int] | None = None
        while (done := progress.done()) < n:
            now = time.monotonic()
            if proc.poll() is not None:
                raise RuntimeError(f"{case.name} exited with {proc.returncode}; see {log.name}")
            if now - started > timeout_s:
                raise TimeoutError(f"{case.name}: {done} of {n} records in {timeout_s:.0f}s; see {log.name}")
            if first is None and done > 0:
                first = (now, done)
            time.sleep(POLL_S)
        finished = time.monotonic()
        rss = rss_mb(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()
        progress.close()
    produced = count_committed(settings, case.outputs(settings))
    drop_topics(settings.kafka_config(), prefix)
    if produced != n * case.per_record and case.outputs(settings):
        raise RuntimeError(f"{case.name}: {produced} outputs for {n} records, expected {n * case.per_record} (some "
                           f"failed?); see {log.name}")
    if first is None:  # everything within one poll: the rate is beyond what 50 ms polling resolves
        first = (finished - POLL_S, 0)
    return Measured(case.name, n, (n - first[1]) / (finished - first[0]), first[0] - started, rss)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=20_000)
    ap.add_argument("--only", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds each processor may take")
    args = ap.parse_args()
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        ap.error(f"unknown processor {', '.join(unknown)}; choose from {', '.join(CASES)}")
    figures: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            m = measure(CASES[name], args.records, Path(tmp), args.timeout)
            ok = m.rss_mb <= GOAL_RSS_MB
            print(f"  {name + '_rate':34} {m.rate:10.0f} {'records/s':10} goal {'-':10}   "
                  f"({m.records} records; {m.startup_s:.1f}s to the first progress, left out)", flush=True)
            print(f"  {name + '_rss':34} {m.rss_mb:10.1f} {'MB':10} goal {'<= ' + str(int(GOAL_RSS_MB)):10} "
                  f"{'ok' if ok else 'MISSED'}", flush=True)
            figures += [{"name": f"{name}_rate", "value": round(m.rate), "unit": "records/s", "goal": "-",
                         "ok": None, "startup_s": round(m.startup_s, 2)},
                        {"name": f"{name}_rss", "value": round(m.rss_mb, 1), "unit": "MB",
                         "goal": f"<= {int(GOAL_RSS_MB)}", "ok": ok}]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                   "cpu_count": os.cpu_count(), "records": args.records, "figures": figures},
                                  indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
