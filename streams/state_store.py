"""Large state on local disk instead of the heap: the gate's admitted keys and publication's published requests.

At 100,000 requests a day and the 30-day windows, each is three million entries: about 1.5 GB of Python objects
in the heap (bench/state.py), against rows of an SQLite database (the standard library's) whose page cache in the
process is bounded (`ZIMAGE_STATE_CACHE_MB`); the rest, about 110 bytes a request, stays on disk and in the
kernel's page cache.

The database is scratch space, never a source of truth: the state lives in Kafka and is restored from its topics
whenever a partition is taken on, exactly as the in-memory tables are. So the file is created in
`ZIMAGE_STATE_DIR` and unlinked at once (a process that dies leaves nothing behind), has no journal and is never
synced, and a partition's rows are dropped whenever its state is forgotten or restored again.

Writes go in SQLite transactions of up to WRITES_PER_COMMIT rows, since a commit per row costs several times more;
the transaction left open between commits hides nothing from anyone, as this process is the database's only user.
"""
from __future__ import annotations

import os
import sqlite3
import struct
import tempfile
from collections.abc import Callable, Iterator, MutableMapping
from typing import Generic, TypeVar

from processors.publication_state import Published
from streams.changelog_table import RestoreFailed
from streams.settings import Settings

V = TypeVar("V")
E = TypeVar("E")

WRITES_PER_COMMIT = 5000
EVICT_EVERY_S = 600.0  # how often a running gate or publication forgets what its windows no longer hold
_LATEST = struct.Struct("<q")  # the latest version, then a _VERSION per content published
_VERSION = struct.Struct("<16sqq")  # (content digest, version, supersedes or NONE)
NONE = -(2 ** 63)  # supersedes None: no 64-bit value a record can carry is lower


class StateUnavailable(RestoreFailed):
    """The local database failed (a full disk, an I/O error): an infrastructure fault, never a request's. Like a
    restore that failed, it is met by forgetting the partition's state and reading it again from Kafka."""


def state_store(settings: Settings) -> StateStore | None:
    """The store that settings ask for: None keeps the state in the heap."""
    if settings.state_store == "memory":
        return None
    return StateStore(settings.state_dir, settings.state_cache_mb)


class StateStore:
    """One SQLite database per process, holding every table of its state. A table's rows are keyed by (partition,
    key) and carry the time (`at`, ms) that windows evict by."""

    def __init__(self, directory: str | None = None, cache_mb: int = 8) -> None:
        if directory is not None:
            os.makedirs(directory, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix="zimage-state-", suffix=".sqlite", dir=directory)
        os.close(fd)
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        finally:
            os.unlink(path)  # open, it stays readable; closed or killed, the space is returned
        # No journal, and first: SQLite refuses to write a file it finds unlinked while it keeps a journal
        # (SQLITE_READONLY_DBMOVED), and a rollback is never needed (what an abort leaves is dropped, not undone).
        for pragma in ("journal_mode=OFF", "synchronous=OFF", f"cache_size={-1024 * cache_mb}",
                       "temp_store=FILE"):
            self._db.execute(f"PRAGMA {pragma}")
        self._tables: dict[str, DiskTable] = {}
        self._pending = 0
        self._db.execute("BEGIN")

    def table(self, name: str) -> DiskTable:
        table = self._tables.get(name)
        if table is None:
            if not name.isidentifier():
                raise ValueError(f"{name!r} is no table name")
            self._db.execute(f"CREATE TABLE {name} (part INTEGER, key BLOB, at INTEGER, value BLOB,"
                             " PRIMARY KEY (part, key)) WITHOUT ROWID")
            self._db.execute(f"CREATE INDEX {name}_by_time ON {name} (part, at)")
            table = self._tables[name] = DiskTable(self, name)
        return table

    def close(self) -> None:
        self._db.close()

    def size_bytes(self) -> int:
        """The database's size on disk (its file has no name to look it up by)."""
        return int(self._db.execute("PRAGMA page_count").fetchone()[0]) * int(
            self._db.execute("PRAGMA page_size").fetchone()[0])

    def _execute(self, sql: str, args: tuple) -> sqlite3.Cursor:
        try:
            return self._db.execute(sql, args)
        except sqlite3.Error as exc:
            raise StateUnavailable(f"the state's database: {exc}") from exc

    def _executemany(self, sql: str, rows: list[tuple]) -> None:
        try:
            self._db.executemany(sql, rows)
        except sqlite3.Error as exc:
            raise StateUnavailable(f"the state's database: {exc}") from exc

    def _wrote(self, rows: int) -> None:
        self._pending += rows
        if self._pending >= WRITES_PER_COMMIT:
            self._pending = 0
            self._execute("COMMIT", ())
            self._execute("BEGIN", ())


class DiskTable:
    """One table of a StateStore; its statements are written out once."""

    def __init__(self, store: StateStore, name: str) -> None:
        self._store = store
        self._get = f"SELECT at, value FROM {name} WHERE part=? AND key=?"
        self._put = f"INSERT OR REPLACE INTO {name} VALUES (?, ?, ?, ?)"
        self._delete = f"DELETE FROM {name} WHERE part=? AND key=?"
        self._drop = f"DELETE FROM {name} WHERE part=?"
        self._count = f"SELECT count(*) FROM {name} WHERE part=?"
        self._keys = f"SELECT key FROM {name} WHERE part=?"
        self._evict = f"DELETE FROM {name} WHERE part=? AND at < ?"

    def get(self, part: int, key: bytes) -> tuple[int, bytes] | None:
        row = self._store._execute(self._get, (part, key)).fetchone()
        return None if row is None else (row[0], row[1])

    def put(self, part: int, key: bytes, at: int, value: bytes) -> None:
        self._store._execute(self._put, (part, key, at, value))
        self._store._wrote(1)

    def put_many(self, rows: list[tuple[int, bytes, int, bytes]]) -> None:
        """(part, key, at, value) rows in one statement: about half the cost of a put each."""
        self._store._executemany(self._put, rows)
        self._store._wrote(len(rows))

    def delete(self, part: int, key: bytes) -> bool:
        deleted = self._store._execute(self._delete, (part, key)).rowcount
        self._store._wrote(deleted)
        return deleted > 0

    def drop(self, part: int) -> None:
        self._store._wrote(self._store._execute(self._drop, (part,)).rowcount)

    def count(self, part: int) -> int:
        return int(self._store._execute(self._count, (part,)).fetchone()[0])

    def keys(self, part: int) -> list[bytes]:
        return [row[0] for row in self._store._execute(self._keys, (part,))]

    def evict_before(self, part: int, cutoff_ms: int) -> int:
        evicted = int(self._store._execute(self._evict, (part, cutoff_ms)).rowcount)
        self._store._wrote(evicted)
        return evicted


class PartitionRows(Generic[E]):
    """One partition's rows of a DiskTable, as entries of type E: `row_of` gives an entry's (at, value), `entry_of`
    the entry back. Created empty: the rows a previous restore of the partition left (one that failed part-way)
    are dropped first.

    The entries of the last thousand lookups and writes are kept at hand: a request's key is looked up two or three
    times within its batch (the gate: before moderation, then to admit it; publication: to choose the batch's scans,
    to decide, to apply), and a repeat in the same batch finds it there. Writes wait there too, and go to the
    database a few hundred at a time, before anything reads the database itself: every entry waiting to be written
    is also at hand, and whatever clears what is at hand writes first."""

    def __init__(self, table: DiskTable, partition: int, row_of: Callable[[E], tuple[int, bytes]],
                 entry_of: Callable[[int, bytes], E], recent: int = 1024, write_every: int = 256) -> None:
        self._table, self._part = table, partition
        self._row_of, self._entry_of = row_of, entry_of
        self._recent_max, self._write_every = recent, write_every
        self._recent: dict[bytes, E | None] = {}  # None: not in the table
        self._unwritten: dict[bytes, E] = {}
        table.drop(partition)

    def get(self, key: bytes) -> E | None:
        try:
            return self._recent[key]
        except KeyError:
            pass
        row = self._table.get(self._part, key)
        entry = None if row is None else self._entry_of(*row)
        self._remember(key, entry)
        return entry

    def put(self, key: bytes, entry: E) -> None:
        self._unwritten[key] = entry
        self._remember(key, entry)
        if len(self._unwritten) >= self._write_every:
            self._write()

    def delete(self, key: bytes) -> bool:
        self._write()
        self._recent.pop(key, None)
        return self._table.delete(self._part, key)

    def stored_keys(self) -> list[bytes]:
        self._write()
        return self._table.keys(self._part)

    def count(self) -> int:
        self._write()
        return self._table.count(self._part)

    def clear(self) -> None:
        self._unwritten.clear()
        self._recent.clear()
        self._table.drop(self._part)

    def evict_before(self, cutoff_ms: int) -> int:
        self._write()
        self._recent.clear()
        return self._table.evict_before(self._part, cutoff_ms)

    def _remember(self, key: bytes, entry: E | None) -> None:
        if len(self._recent) >= self._recent_max:
            self._write()  # what is forgotten here must be found in the database
            self._recent.clear()  # cheaper than keeping an order: what is looked up again comes back at once
        self._recent[key] = entry

    def _write(self) -> None:
        if self._unwritten:
            self._table.put_many([(self._part, key, *self._row_of(entry)) for key, entry in self._unwritten.items()])
            self._unwritten.clear()


class DiskRequests:
    """publication_state.RequestTable on disk: one partition's publications (PartitionRows)."""

    def __init__(self, store: StateStore, partition: int, tab: str = "published", **at_hand: int) -> None:
        self._rows = PartitionRows(store.table(tab), partition, lambda entry: (entry.latest_at, _packed(entry)),
                                   _unpacked, **at_hand)

    def __len__(self) -> int:
        return self._rows.count()

    def get(self, request_key: bytes) -> Published | None:
        return self._rows.get(request_key)

    def put(self, request_key: bytes, entry: Published) -> None:
        self._rows.put(request_key, entry)

    def evict_before(self, cutoff_ms: int) -> int:
        return self._rows.evict_before(cutoff_ms)

    def clear(self) -> None:
        self._rows.clear()


def _packed(entry: Published) -> bytes:
    return _LATEST.pack(entry.latest_version) + b"".join(
        _VERSION.pack(content_key, version, NONE if supersedes is None else supersedes)
        for content_key, version, supersedes in entry.versions)


def _unpacked(latest_at: int, packed: bytes) -> Published:
    versions = tuple((content_key, version, None if supersedes == NONE else supersedes)
                     for content_key, version, supersedes in _VERSION.iter_unpack(memoryview(packed)[_LATEST.size:]))
    return Published(versions, _LATEST.unpack_from(packed)[0], latest_at)


class DiskMapping(MutableMapping[str, V], Generic[V]):
    """A changelog table's partition (streams/changelog_table.py) on disk (PartitionRows), for values that are a
    time in ms (the gate's admitted keys): `at_of` gives a value's time, `of_at` the value back."""

    def __init__(self, store: StateStore, tab: str, partition: int, at_of: Callable[[V], int],
                 of_at: Callable[[int], V], **at_hand: int) -> None:
        self._rows = PartitionRows(store.table(tab), partition, lambda value: (at_of(value), b""),
                                   lambda at, _value: of_at(at), **at_hand)

    def __getitem__(self, key: str) -> V:
        value = self._rows.get(_encoded(key))
        if value is None:
            raise KeyError(key)
        return value

    def __setitem__(self, key: str, value: V) -> None:
        self._rows.put(_encoded(key), value)

    def __delitem__(self, key: str) -> None:
        if not self._rows.delete(_encoded(key)):
            raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter([key.decode("utf-8", "surrogatepass") for key in self._rows.stored_keys()])

    def __len__(self) -> int:
        return self._rows.count()

    def clear(self) -> None:
        self._rows.clear()

    def evict_before(self, cutoff_ms: int) -> int:
        return self._rows.evict_before(cutoff_ms)


def _encoded(key: str) -> bytes:
    return key.encode("utf-8", "surrogatepass")
