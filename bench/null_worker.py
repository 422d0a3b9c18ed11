"""A render worker with a simulated renderer and an in-memory store, in a process of its own, as a real worker
runs: `python -m bench.null_worker [--a S] [--b S]`, configured by the same ZIMAGE_* settings as the processors.

The whole-topology benchmark (bench/topology.py) runs it beside the gate and publication processes, so that the
benchmark's own producer and reader do not share the worker's interpreter (and its GIL).
"""
from __future__ import annotations

import argparse
import logging
import signal

from bench.simulated import MemoryStore, SimulatedRenderer
from schemas.serde import AvroSerde
from streams.settings import Settings
from streams.worker import RenderWorker


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--a", type=float, default=0.0, help="simulated seconds per batch")
    ap.add_argument("--b", type=float, default=0.0, help="simulated seconds per image")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    settings = Settings()
    worker = RenderWorker(settings, SimulatedRenderer(args.a, args.b), MemoryStore(settings.storage_url), AvroSerde())
    signal.signal(signal.SIGTERM, lambda *_: worker.stop())
    signal.signal(signal.SIGINT, lambda *_: worker.stop())
    worker.run()


if __name__ == "__main__":
    main()
