"""Avro Object Container Files, read with limits: header, codec and first data block, parsed without fastavro.

A container file carries its own writer schema, so a record can bring any schema with it. fastavro parses that
schema as soon as it opens the file, and a hostile one crashes or stalls the reader (a schema nested thousands
deep, a count of 2**62 zero-byte items). Here the header is read by hand under size limits, the schema's JSON is
bounded in bytes and nesting before it is loaded, and a deflate block is inflated with a cap on its output; the
caller then decodes the record only with a schema it already knows, found by fingerprint.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

from schemas.errors import UndecodableRecord

CONTAINER_MAGIC = b"Obj\x01"
SYNC_SIZE = 16
MAX_HEADER_SCHEMA_BYTES = 64 * 1024  # ours are under 2 KiB
MAX_HEADER_ENTRIES = 64
MAX_DECODED_BLOCK_BYTES = 4 * 1024 * 1024  # above the largest record a topic holds (see streams.topology)
CODECS = ("null", "deflate")
_MAX_VARINT_BYTES = 10


@dataclass(frozen=True)
class ContainerHeader:
    schema_json: str  # checked: at most MAX_HEADER_SCHEMA_BYTES, nested at most as deep as asked
    codec: str
    sync: bytes
    end: int  # offset of the first data block


class _Cursor:
    def __init__(self, data: bytes, position: int, framing: str) -> None:
        self.data, self.position, self.framing = data, position, framing

    @property
    def remaining(self) -> int:
        return len(self.data) - self.position

    def long(self) -> int:
        """A zig-zag varint, as Avro writes int and long."""
        value = shift = 0
        for _ in range(_MAX_VARINT_BYTES):
            byte = self.take(1)[0]
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return (value >> 1) ^ -(value & 1)
            shift += 7
        raise UndecodableRecord(f"{self.framing}: a varint runs over {_MAX_VARINT_BYTES} bytes")

    def take(self, size: int) -> bytes:
        if size < 0 or size > self.remaining:
            raise UndecodableRecord(f"{self.framing}: truncated (wants {size} bytes, {self.remaining} left)")
        chunk = self.data[self.position:self.position + size]
        self.position += size
        return chunk

    def count(self, what: str, limit: int) -> int:
        """A block count of a map or of records; a negative count is followed by the block's byte size."""
        count = self.long()
        if count < 0:
            count = -count
            self.long()
        if count > min(limit, self.remaining):
            raise UndecodableRecord(f"{self.framing}: {what} count {count} exceeds its limit or the bytes left")
        return count


def read_header(data: bytes, max_nesting: int, framing: str) -> ContainerHeader:
    """The header of a container file; raises UndecodableRecord for anything malformed, oversized or too deep."""
    if data[:4] != CONTAINER_MAGIC:
        raise UndecodableRecord(f"{framing}: no container-file magic")
    cursor = _Cursor(data, len(CONTAINER_MAGIC), framing)
    entries: dict[str, bytes] = {}
    while count := cursor.count("header entry", MAX_HEADER_ENTRIES - len(entries)):
        for _ in range(count):
            key = cursor.take(cursor.long())
            size = cursor.long()
            if size > MAX_HEADER_SCHEMA_BYTES:
                raise UndecodableRecord(f"{framing}: header entry {key[:40]!r} holds {size} bytes; at most "
                                        f"{MAX_HEADER_SCHEMA_BYTES}")
            entries[key.decode("utf-8", "replace")] = cursor.take(size)
    sync = cursor.take(SYNC_SIZE)
    try:
        schema_json = entries["avro.schema"].decode("utf-8")
        codec = entries.get("avro.codec", b"null").decode("ascii")
    except KeyError:
        raise UndecodableRecord(f"{framing}: header has no avro.schema") from None
    except UnicodeDecodeError as exc:
        raise UndecodableRecord(f"{framing}: header is not text: {exc}") from None
    if codec not in CODECS:
        raise UndecodableRecord(f"{framing}: codec {codec[:40]!r} is not accepted; accepted: {', '.join(CODECS)}")
    depth = json_nesting_depth(schema_json, max_nesting)
    if depth > max_nesting:
        raise UndecodableRecord(f"{framing}: header schema nests deeper than {max_nesting} levels")
    return ContainerHeader(schema_json, codec, sync, cursor.position)


def first_block(data: bytes, header: ContainerHeader, framing: str,
                max_bytes: int = MAX_DECODED_BLOCK_BYTES) -> bytes:
    """The decoded bytes of the first block holding records; empty blocks are skipped."""
    cursor = _Cursor(data, header.end, framing)
    while cursor.remaining:
        records = cursor.long()
        size = cursor.long()
        if records < 0 or size < 0:
            raise UndecodableRecord(f"{framing}: negative block count or size")
        block = cursor.take(size)
        if cursor.take(SYNC_SIZE) != header.sync:
            raise UndecodableRecord(f"{framing}: block sync marker does not match the header's")
        if records:
            return block if header.codec == "null" else _inflate(block, max_bytes, framing)
    raise UndecodableRecord(f"{framing}: holds no record")


def _inflate(block: bytes, max_bytes: int, framing: str) -> bytes:
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)  # Avro's deflate is raw RFC 1951, no zlib header
    try:
        decoded = inflater.decompress(block, max_bytes)
    except zlib.error as exc:
        raise UndecodableRecord(f"{framing}: deflate block does not inflate: {exc}") from None
    if not inflater.eof:
        if len(decoded) >= max_bytes:
            raise UndecodableRecord(f"{framing}: deflate block inflates beyond {max_bytes} bytes")
        raise UndecodableRecord(f"{framing}: deflate block is truncated")
    return decoded


def json_nesting_depth(text: str, limit: int) -> int:
    """How deeply objects and arrays nest in a JSON text, read without parsing it; stops past `limit`."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    return deepest
        elif char in "]}":
            depth -= 1
    return deepest
