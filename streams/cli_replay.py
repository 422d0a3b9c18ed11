"""`zimage replay`: its options and its report (the re-driving itself is streams/replay.py)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from processors.replay_plan import Bounds, InvalidReplay, check_label, new_replay_id, parse_sku_file, parse_time
from streams.topology import PRIORITIES


@click.command()
@click.option("--topic", "topics", multiple=True,
              help="Topic to re-drive (repeatable). Default: the three request topics.")
@click.option("--from-offset", type=int, default=None, help="First offset, in every partition.")
@click.option("--to-offset", type=int, default=None, help="Last offset (inclusive), in every partition.")
@click.option("--since", default=None, help="Records from this time on: ISO 8601 (UTC if no zone) or epoch ms.")
@click.option("--until", default=None, help="Records before this time: ISO 8601 or epoch ms.")
@click.option("--skus", "sku_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Only records of the SKU ids in this file (one per line).")
@click.option("--category", default=None, help="Only SKU events of this category (with --topic <prefix>.sku.changes).")
@click.option("--into", "into", type=click.Choice(PRIORITIES), default="low", show_default=True,
              help="Request topic to re-drive requests into (SKU events always go back to sku.changes).")
@click.option("--replay-id", default=None, help="Tag of this replay, on every re-driven record. Default: new.")
@click.option("--generation", default=None,
              help="A backfill: the generation it asks for (a new model or template version, or any new label); "
                   "rendered past the cache and published as new versions.")
@click.option("--rate", type=float, default=None, help="At most this many records a second.")
@click.option("--dry-run", is_flag=True, help="Count and show a sample; re-drive nothing.")
@click.option("--sample", type=int, default=5, show_default=True, help="Records shown in the report.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="A progress bar on stderr.")
def replay(topics: tuple[str, ...], from_offset: int | None, to_offset: int | None, since: str | None,
           until: str | None, sku_file: Path | None, category: str | None, into: str, replay_id: str | None,
           generation: str | None, rate: float | None, dry_run: bool, sample: int, progress: bool) -> None:
    """Re-drive records by offsets, time range or SKU set, at low priority by default; prints a JSON report."""
    from schemas.serde import AvroSerde
    from streams import replay as replaying
    from streams.cli import _settings

    s = _settings()
    topology = s.topology
    chosen = topics or topology.request_topics
    try:
        skus = parse_sku_file(sku_file.read_text(encoding="utf-8").splitlines()) if sku_file else None
        sku_events = [t == topology.sku_changes for t in chosen]
        if any(sku_events) and not all(sku_events):
            raise InvalidReplay("SKU events and requests go to different topics: replay them separately")
        if category is not None and not all(sku_events):
            raise InvalidReplay("--category selects SKU events: use it with --topic " + topology.sku_changes)
        job = replaying.Replay(
            topics=tuple(chosen), into=topology.sku_changes if all(sku_events) else topology.request_topic(into),
            replay_id=check_label("--replay-id", replay_id or new_replay_id()),
            bounds=Bounds(from_offset, to_offset, parse_time(since) if since else None,
                          parse_time(until) if until else None),
            generation=check_label("--generation", generation) if generation else None,
            skus=skus, category=category, dry_run=dry_run, rate=rate, sample=max(0, sample))
    except (InvalidReplay, OSError, UnicodeDecodeError) as exc:
        raise click.UsageError(str(exc)) from None
    bar = _bar(progress, job.replay_id)
    try:
        report = replaying.run(s.kafka_config(), AvroSerde(registry_url=s.schema_registry_url), job,
                               progress=bar.advance if bar else None)
    except InvalidReplay as exc:
        raise click.UsageError(str(exc)) from None
    finally:
        if bar:
            bar.close()
    click.echo(json.dumps({"replay_id": job.replay_id, "dry_run": dry_run, "into": job.into,
                           "generation": job.generation, "planned": report.planned, "scanned": report.scanned,
                           "matched": report.matched, "redriven": report.produced,
                           "seconds": round(report.seconds, 3), "records_per_s": round(report.rate),
                           "sample": report.sample}, indent=2))


class _Bar:
    """tqdm's bar with rate and ETA, fed absolute progress."""

    def __init__(self, label: str):
        from tqdm import tqdm

        self._bar = tqdm(total=0, unit="rec", unit_scale=True, desc=label, file=sys.stderr)
        self._done = 0

    def advance(self, done: int, total: int) -> None:
        if self._bar.total != total:
            self._bar.total = total
        self._bar.update(max(0, done - self._done))
        self._done = max(self._done, done)

    def close(self) -> None:
        self._bar.close()


def _bar(enabled: bool, label: str) -> _Bar | None:
    return _Bar(label) if enabled else None
