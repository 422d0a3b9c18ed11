"""Restoring a changelog table, without a broker: an entry that cannot be read is skipped, whatever is wrong with it,
so that one bad record never stops the restore (and with it the partition) for good."""
from __future__ import annotations

import json

from streams.changelog_table import ChangelogTable


def table_over(entries: list[tuple[bytes | None, bytes | None]]) -> ChangelogTable[int]:
    def read(_base, _topic, _partitions, apply) -> None:
        for key, value in entries:
            apply(key, value)

    return ChangelogTable({}, "t.changelog", encode=lambda v: json.dumps({"version": v}).encode(),
                          decode=lambda raw: int(json.loads(raw)["version"]),
                          merge=lambda old, new: new if old is None else max(old, new), read=read)


def test_hostile_entries_are_skipped_and_the_rest_is_restored():
    version = lambda n: json.dumps({"version": n}).encode()  # noqa: E731
    hostile = [b'{"version": 1e999}', b'{"version": -1e999}', b"[" * 100_000, b"{not json", b"[1]",
               b'{"version": "x"}', b'{"version": [1]}', b"\xff\xfe", b'{"other": 1}']
    entries: list[tuple[bytes | None, bytes | None]] = [(b"a", version(3))]
    entries += [(b"a", value) for value in hostile] + [(None, value) for value in hostile]
    entries += [(b"b", version(5)), (b"b", None), (b"\xff", version(7)), (b"a", version(4))]
    table = table_over(entries)
    assert table.get(0, "a") == 4 and table.get(0, "b") is None and table.get(0, "\ufffd") == 7
