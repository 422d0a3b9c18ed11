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
from collections.abc import Callable

from connectors.kafka import OutRecord
from streams.changelog_table import ChangelogTable


class LatestVersions(ChangelogTable[int]):
    """Per partition: SKU state key (processors.sku_requests.sku_state_key) -> the latest version rendered."""

    def __init__(self, base: dict[str, str], topic: str, restore: Callable[[int], dict[str, int]] | None = None):
        super().__init__(base, topic, encode=lambda version: json.dumps({"version": version}).encode(),
                         decode=lambda raw: int(json.loads(raw)["version"]),
                         merge=lambda old, new: new if old is None else max(old, new), restore=restore,
                         what="latest SKU versions")

    def latest(self, partition: int, key: str) -> int | None:
        return self.get(partition, key)

    def advance(self, partition: int, key: str, version: int) -> OutRecord:
        """Remembers `version` as the latest of `key` and returns the changelog record to commit with the
        requests."""
        return self.put(partition, key, version)
