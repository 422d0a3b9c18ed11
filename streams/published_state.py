"""The publication relay's state, kept in Kafka and restored from it: what each partition published (from
images.ready) and the latest image of each SKU and view (from images.by-sku).

images.ready is keyed by request id and has as many partitions as zimage.rendered, so the state of rendered
partition p is read from images.ready partition p when p is first used, and forgotten when p is revoked or a
transaction aborts (then read again). The SKU view is kept the same way: images.by-sku is keyed by (tenant, SKU,
view), as its repartition topic is, and the latest images of partition q are read from images.by-sku q.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from processors.publication_state import DAY_MS, PublicationState, SkuLatest
from schemas.serde import AvroSerde, RegistryUnavailable
from streams.changelog_table import ReadTopic, read_to_end
from streams.state_store import EVICT_EVERY_S, DiskRequests, StateStore
from streams.topology import Topology

log = logging.getLogger(__name__)


class PublishedState:
    def __init__(self, base: dict[str, str], topology: Topology, serde: AvroSerde, window_days: float,
                 read: ReadTopic = read_to_end, store: StateStore | None = None):
        self._base = base
        self._store = store  # None: each partition's publications stay in the heap
        self._read = read  # how a topic's committed records are read (tests pass their own)
        self._topology = topology
        self._serde = serde
        self._window_ms = int(window_days * DAY_MS)
        self._partitions: dict[int, PublicationState] = {}
        self._sku: dict[int, SkuLatest] = {}
        self._next_eviction = time.monotonic() + EVICT_EVERY_S

    def of_partition(self, partition: int) -> PublicationState:
        state = self._partitions.get(partition)
        if state is None:
            started = time.monotonic()
            # Kept only once read whole: a restore that fails part-way (a broker restarting) would otherwise leave
            # a partial state in use, and what it missed would be published again.
            state = PublicationState(self._window_ms,
                                     None if self._store is None else DiskRequests(self._store, partition))

            def restore(_key: bytes | None, value: bytes | None) -> None:
                self._restored(self._topology.images_ready, value, state.apply)

            try:
                self._read(self._base, self._topology.images_ready, [partition], restore)
            except BaseException:
                state.clear()  # its rows on disk: the restore is tried again whole, later
                raise
            state.evict(int(time.time() * 1000))
            self._partitions[partition] = state
            log.info("restored the publications of partition %d (%d requests) in %.2fs", partition, len(state),
                     time.monotonic() - started)
        return state

    def sku_latest(self, partition: int) -> SkuLatest:
        """The latest image of each SKU and view of by-SKU partition `partition`."""
        sku = self._sku.get(partition)
        if sku is None:
            sku = SkuLatest()

            def restore(_key: bytes | None, value: bytes | None) -> None:
                self._restored(self._topology.images_by_sku, value, sku.offer)

            self._read(self._base, self._topology.images_by_sku, [partition], restore)  # kept only once read whole
            self._sku[partition] = sku
        return sku

    def evict_when_due(self) -> None:
        """Forgets, every EVICT_EVERY_S, the requests last published before the window: a running relay's state stays
        bounded by the window, not only a restored one's."""
        if time.monotonic() < self._next_eviction:
            return
        self._next_eviction = time.monotonic() + EVICT_EVERY_S
        now_ms = int(time.time() * 1000)
        if evicted := sum(state.evict(now_ms) for state in self._partitions.values()):
            log.info("forgot %d published requests past the publication window", evicted)

    def close(self) -> None:
        self._partitions.clear()  # rows are not deleted one by one: closing the database returns its space
        self._sku.clear()
        if self._store is not None:
            self._store.close()

    def forget(self, partitions: Iterable[int] | None = None) -> None:
        """Drops the state of these partitions (all of it when None): it is read again from the topics. A member
        owns partition p of every topic it reads (the range assignor), so p's publications and SKUs go together."""
        if partitions is None:
            partitions = set(self._partitions) | set(self._sku)
        for partition in partitions:
            state = self._partitions.pop(partition, None)
            if state is not None:
                state.clear()  # its rows on disk, which would otherwise stay until the partition comes back
            self._sku.pop(partition, None)

    def _restored(self, topic: str, value: bytes | None, apply: Callable[[dict], object]) -> None:
        """Applies one record of `topic` to the state. A record that is no ImageReady (a producer's mistake, a
        hostile write) is skipped: stopping on it would stop the restore, and every record after it, for good.
        A Schema Registry outage is no record's fault: it raises, and the restore is tried again."""
        if value is None:
            return
        try:
            apply(self._serde.decode("ImageReady", value, topic=topic))
        except RegistryUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - see above
            log.warning("ignoring an unreadable record of %s: %s", topic, f"{type(exc).__name__}: {exc}"[:300])
