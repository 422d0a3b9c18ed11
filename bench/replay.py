"""Replay re-drive rate on the local stack: `zimage replay`'s loop over a topic of real requests.

    python -m bench.replay [--records 200000]     (part of `make bench`)

The source topic is filled with encoded GenerationRequests (a few hundred bytes each, as the request topics hold),
then re-driven with a replay id and a backfill generation in headers into another topic, bytes unchanged: the
rate is records re-driven and acknowledged per second, from the first read to the last acknowledgement. Goal:
>= 20,000 a second. Figures go to bench/results/replay.json.
"""
from __future__ import annotations

import argparse
import json
import os
import time
import uuid
from pathlib import Path

from confluent_kafka import Producer

from bench.topology import drop_topics
from connectors.kafka_admin import TopicWanted, apply_topics
from processors.replay_plan import Bounds
from schemas.serde import AvroSerde
from streams.replay import Replay, run
from streams.submit import build_request

RESULTS = Path(__file__).resolve().parent / "results" / "replay.json"
GOAL_RPS = 20_000


def fill(conf: dict[str, str], topic: str, records: int, serde: AvroSerde) -> None:
    producer = Producer({**conf, "linger.ms": 20, "compression.type": "lz4", "enable.idempotence": True,
                         "queue.buffering.max.messages": 1_000_000, "partitioner": "murmur2_random"})
    for i in range(records):
        request = build_request({"prompt": f"a product photo of item {i}, studio light, white background",
                                 "seed": i, "tenant": "bench", "sku_id": f"SKU-{i % 5000}"})
        while True:
            try:
                producer.produce(topic, serde.encode("GenerationRequest", request, topic=topic),
                                 request["request_id"].encode())
                break
            except BufferError:
                producer.poll(0.05)
        if i % 10_000 == 0:
            producer.poll(0)
    producer.flush(120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--records", type=int, default=200_000)
    args = ap.parse_args()
    conf = {"bootstrap.servers": os.environ.get("ZIMAGE_BOOTSTRAP_SERVERS", "127.0.0.1:9092")}
    prefix = f"br{uuid.uuid4().hex[:8]}"
    source, target = f"{prefix}.requests.normal", f"{prefix}.requests.low"
    apply_topics(conf, [TopicWanted(source, 6, {}), TopicWanted(target, 6, {})])
    serde = AvroSerde()
    started = time.monotonic()
    fill(conf, source, args.records, serde)
    print(f"filled {source} with {args.records} requests in {time.monotonic() - started:.1f}s", flush=True)
    report = run(conf, serde, Replay(topics=(source,), into=target, replay_id="bench-replay",
                                     bounds=Bounds(), generation="bench-generation"))
    drop_topics(conf, prefix)
    rate = report.produced / report.seconds
    ok = rate >= GOAL_RPS and report.produced == args.records
    print(f"  {'replay_redrive_rate':32} {rate:12.0f} {'records/s':10} goal {'>= ' + str(GOAL_RPS):14} "
          f"{'ok' if ok else 'MISSED'}  ({report.produced} in {report.seconds:.2f}s)", flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                   "cpu_count": os.cpu_count(), "records": args.records,
                                   "figures": [{"name": "replay_redrive_rate", "value": round(rate),
                                                "goal": f">= {GOAL_RPS}", "unit": "records/s", "ok": ok}]},
                                  indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
