"""The SKU connector's state, kept in Kafka: the latest version it rendered of each (tenant, SKU).

The connector writes each new latest version to the compacted `sku.changelog` topic, in the same transaction as
the requests it produced for it, on the partition number of the SkuChanged it came from (sku.changes is keyed by
sku_id, so one changelog partition holds every SKU of one input partition). When the connector first decides a
record of a partition, it reads that changelog partition to its end; after an abort or a revocation it forgets
the partition and reads it again. Replaying the changelog rebuilds the state exactly: compaction keeps the last
version written for each key, which is the highest.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable

from connectors.kafka import OutRecord
from streams.gate_state import read_to_end

log = logging.getLogger(__name__)


class LatestVersions:
    """Per partition: SKU state key (processors.sku_requests.sku_state_key) -> the latest version rendered."""

    def __init__(self, base: dict[str, str], topic: str, restore: Callable[[int], dict[str, int]] | None = None):
        self._base = base
        self._topic = topic
        self._partitions: dict[int, dict[str, int]] = {}
        self._restore = restore or self._read_changelog

    def latest(self, partition: int, key: str) -> int | None:
        return self._load(partition).get(key)

    def advance(self, partition: int, key: str, version: int) -> OutRecord:
        """Remembers `version` as the latest of `key` and returns the changelog record to commit with the
        requests."""
        self._load(partition)[key] = version
        return OutRecord(self._topic, json.dumps({"version": version}).encode(), key.encode(), partition=partition)

    def forget(self, partitions: Iterable[int]) -> None:
        for partition in partitions:
            self._partitions.pop(partition, None)

    def _load(self, partition: int) -> dict[str, int]:
        loaded = self._partitions.get(partition)
        if loaded is None:
            loaded = self._partitions[partition] = self._restore(partition)
        return loaded

    def _read_changelog(self, partition: int) -> dict[str, int]:
        started = time.monotonic()
        versions: dict[str, int] = {}

        def apply(key: bytes | None, value: bytes | None) -> None:
            name = (key or b"").decode("utf-8", "replace")
            if value is None:
                versions.pop(name, None)
                return
            try:
                version = int(json.loads(value)["version"])
            except (ValueError, KeyError, TypeError):
                log.warning("ignoring an unreadable entry of %s[%d]", self._topic, partition)
                return
            versions[name] = max(version, versions.get(name, version))

        read_to_end(self._base, self._topic, [partition], apply)
        log.info("restored the latest versions of %d SKUs of partition %d in %.2fs", len(versions), partition,
                 time.monotonic() - started)
        return versions
