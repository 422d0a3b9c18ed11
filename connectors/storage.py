"""Object storage for rendered images: a local directory, or an S3 bucket (AWS, MinIO, moto, ...).

Keys are relative, '/'-separated paths without empty, '.' or '..' segments; the same key always maps to
the same object, so a retried put overwrites rather than duplicates. Both stores are safe to call from a
thread pool: the local one writes through unique temporary files, and boto3 clients are thread-safe.
"""
from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlparse

LOCAL_FILE_MODE = 0o644


NAME_MAX_BYTES = 255  # the longest file name of common file systems (ext4, xfs, tmpfs)


class ObjectNotFound(LookupError):
    """No object under that key or URI."""


class UnsafeKey(ValueError):
    """A key (or URI) that is malformed or points outside the store."""


class ObjectStore(Protocol):
    def put(self, key: str, data: bytes, content_type: str) -> str:
        """Store `data` under `key` (replacing any previous object) and return its URI."""
        ...

    def get(self, uri_or_key: str) -> bytes:
        """The bytes of an object, by the URI `put` returned or by key; raises ObjectNotFound."""
        ...

    def exists(self, key: str) -> bool:
        ...

    def key_of(self, uri_or_key: str) -> str:
        """The store's key of an object named by the URI `put` returned (or by key); raises UnsafeKey for a URI
        outside this store."""
        ...

    def copy(self, src: str, dst: str) -> str:
        """Copy the object at key `src` to key `dst` (replacing it) and return the copy's URI; ObjectNotFound."""
        ...

    def delete(self, key: str) -> None:
        """Remove the object at `key`; removing what is not there is no error (a replay removes it again)."""
        ...

    def move(self, src: str, dst: str) -> bool:
        """Move the object at key `src` to key `dst`. True if it moved now, False if it had moved before (`src`
        gone, `dst` there: a replay after a crash); ObjectNotFound if it is at neither."""
        ...


def check_key(key: str) -> str:
    """Return `key` if it is a clean relative object key, else raise UnsafeKey."""
    if not isinstance(key, str) or not key:
        raise UnsafeKey(f"object key must be a non-empty string, got {key!r}")
    if key.startswith("/") or "\\" in key or "\x00" in key:
        raise UnsafeKey(f"object key {key!r} must be relative and use '/' separators")
    if any(segment in ("", ".", "..") for segment in key.split("/")):
        raise UnsafeKey(f"object key {key!r} has an empty, '.' or '..' segment")
    return key


class LocalObjectStore:
    """Objects as files under `root`, written atomically (temporary file, fsync, rename); `file://` URIs."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> str:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # A reader sees the old object or the new one, never a partial file; the rename is atomic.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(tmp, LOCAL_FILE_MODE)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)  # the rename itself must survive a crash before offsets are committed
        return path.as_uri()

    def get(self, uri_or_key: str) -> bytes:
        path = self._locate(uri_or_key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(f"no object at {path.as_uri()}") from None

    def exists(self, key: str) -> bool:
        return self._locate(key).is_file()

    def key_of(self, uri_or_key: str) -> str:
        return self._locate(uri_or_key).relative_to(self.root).as_posix()

    def copy(self, src: str, dst: str) -> str:
        return self.put(dst, self.get(src))

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        if path.parent.is_dir():
            _fsync_dir(path.parent)

    def move(self, src: str, dst: str) -> bool:
        source, target = self._path(src), self._path(dst)
        if not source.is_file():
            if target.is_file():
                return False
            raise ObjectNotFound(f"no object at {source.as_uri()} nor at {target.as_uri()}")
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)  # atomic within the store's file system: the object is in one place only
        _fsync_dir(target.parent)
        _fsync_dir(source.parent)
        return True

    def _locate(self, uri_or_key: str) -> Path:
        if uri_or_key.startswith("file:"):
            return self._inside(Path(unquote(urlparse(uri_or_key).path)), uri_or_key)
        return self._path(uri_or_key)

    def _path(self, key: str) -> Path:
        return self._inside(self.root / check_key(key), key)

    def _inside(self, path: Path, asked: str) -> Path:
        # A NUL or a name longer than the file system takes would fail as an OSError or ValueError, which reads as
        # an outage of the store; it is the name's fault.
        if "\x00" in str(path) or any(len(os.fsencode(part)) > NAME_MAX_BYTES for part in path.parts):
            raise UnsafeKey(f"{asked[:200]!r} is no usable file name")
        resolved = path.resolve()  # follows symlinks, so a link cannot lead outside either
        if resolved == self.root or not resolved.is_relative_to(self.root):
            raise UnsafeKey(f"{asked!r} is outside the object store root {self.root}")
        return resolved


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class S3ObjectStore:
    """Objects in an S3 bucket under an optional prefix; `s3://bucket/key` URIs.

    `endpoint_url` points at an S3-compatible server (MinIO, moto); credentials come from boto3's usual
    chain (environment, profile, instance role)."""

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None, region: str | None = None,
                 client: Any = None) -> None:
        if not bucket:
            raise ValueError("S3ObjectStore needs a bucket name")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if self.prefix:
            check_key(self.prefix)
        self._client = client if client is not None else _s3_client(endpoint_url, region)

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> str:
        full_key = self._key(key)
        self._client.put_object(Bucket=self.bucket, Key=full_key, Body=data, ContentType=content_type)
        return f"s3://{self.bucket}/{full_key}"

    def get(self, uri_or_key: str) -> bytes:
        bucket, key = self._locate(uri_or_key)
        try:
            response = self._client.get_object(Bucket=bucket, Key=key)
        except Exception as exc:
            if _is_not_found(exc):
                raise ObjectNotFound(f"no object at s3://{bucket}/{key}") from None
            raise
        return response["Body"].read()

    def exists(self, key: str) -> bool:
        bucket, full_key = self._locate(key)
        try:
            self._client.head_object(Bucket=bucket, Key=full_key)
        except Exception as exc:
            if _is_not_found(exc):
                return False
            raise
        return True

    def key_of(self, uri_or_key: str) -> str:
        if not uri_or_key.startswith("s3://"):
            return check_key(uri_or_key)
        parsed = urlparse(uri_or_key)
        bucket, full_key = parsed.netloc, parsed.path.lstrip("/")
        if not bucket or not full_key:
            raise UnsafeKey(f"{uri_or_key!r} is not an s3://bucket/key URI")
        inside = full_key.removeprefix(f"{self.prefix}/") if self.prefix else full_key
        if bucket != self.bucket or (self.prefix and inside == full_key):
            raise UnsafeKey(f"{uri_or_key!r} is outside s3://{self.bucket}/{self.prefix}")
        return check_key(inside)

    def copy(self, src: str, dst: str) -> str:
        source, target = self._key(src), self._key(dst)
        try:
            self._client.copy_object(Bucket=self.bucket, Key=target, CopySource={"Bucket": self.bucket,
                                                                                  "Key": source})
        except Exception as exc:
            if _is_not_found(exc):
                raise ObjectNotFound(f"no object at s3://{self.bucket}/{source}") from None
            raise
        return f"s3://{self.bucket}/{target}"

    def delete(self, key: str) -> None:
        self._client.delete_object(Bucket=self.bucket, Key=self._key(key))  # S3 answers 204 for a missing key

    def move(self, src: str, dst: str) -> bool:
        # S3 has no rename: copy, then delete. A crash between the two leaves both; the replay copies again.
        try:
            self.copy(src, dst)
        except ObjectNotFound:
            if self.exists(dst):
                return False
            raise
        self.delete(src)
        return True

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _locate(self, uri_or_key: str) -> tuple[str, str]:
        """The bucket and full key of an object of this store. A URI naming another bucket, or a key outside the
        prefix, is refused (UnsafeKey): an event read from a topic must not make the store read elsewhere."""
        return self.bucket, self._key(self.key_of(uri_or_key))


def _s3_client(endpoint_url: str | None, region: str | None) -> Any:
    import boto3
    from botocore.config import Config

    options: dict[str, Any] = {
        "max_pool_connections": 32,  # the store is called from a thread pool
        "retries": {"max_attempts": 5, "mode": "standard"},
    }
    if endpoint_url:
        options["s3"] = {"addressing_style": "path"}  # MinIO and moto serve buckets as paths
    # A session per store: boto3's default session is not safe to create clients from in parallel.
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, region_name=region,
                                          config=Config(**options))


def _is_not_found(exc: Exception) -> bool:
    error = getattr(exc, "response", {}).get("Error", {})
    return str(error.get("Code")) in {"404", "NoSuchKey", "NotFound"}


BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


@dataclass(frozen=True)
class StoreLocation:
    """Where a store URL points, parsed without opening anything (the settings check it at start-up)."""

    bucket: str | None  # set for S3
    prefix: str = ""
    folder: Path | None = None  # set for a local store


def parse_store_url(url: str) -> StoreLocation:
    """`s3://bucket/prefix`, `file:///abs/path` or a plain directory path; raises ValueError saying what is wrong."""
    if not url.strip():
        raise ValueError("is empty; give a folder, file:///absolute/path or s3://bucket/prefix")
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        if "@" in parsed.netloc:
            raise ValueError(
                "must not carry credentials; boto3 reads them from its usual chain (AWS_ACCESS_KEY_ID, ...)")
        if not BUCKET_NAME.match(parsed.netloc):
            raise ValueError("needs a bucket name of 3-63 lower-case letters, digits, '.' or '-' (s3://bucket/prefix)")
        return StoreLocation(parsed.netloc, parsed.path)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ValueError("names a remote host; use file:///absolute/path")
        return StoreLocation(None, folder=Path(unquote(parsed.path)))
    if parsed.scheme == "":
        return StoreLocation(None, folder=Path(url))
    raise ValueError(f"has the unsupported scheme {parsed.scheme!r}; use s3://bucket/prefix, file:///path or a folder")


@dataclass(frozen=True)
class ObjectUris:
    """The URIs a store gives its objects: `base` then a clean key (`s3://bucket/prefix/`, `file:///abs/root/`).
    Worked out once (a local root is resolved, as the store resolves it), then checked per URI without opening
    anything: a process that only reads events (publication) tells an image where the workers store from one in
    another bucket or at `file:///etc/passwd`."""

    base: str

    @classmethod
    def of(cls, url: str) -> ObjectUris:
        location = parse_store_url(url)
        if location.bucket is not None:
            prefix = location.prefix.strip("/")
            return cls(f"s3://{location.bucket}/{prefix + '/' if prefix else ''}")
        assert location.folder is not None
        return cls(location.folder.expanduser().resolve().as_uri().rstrip("/") + "/")

    def holds(self, uri: object) -> bool:
        """Whether `uri` names an object of this store (a `file:` URI's key percent-decoded, as the store reads it)."""
        if not isinstance(uri, str):
            return False
        if uri.startswith("file://localhost/"):
            uri = "file:///" + uri.removeprefix("file://localhost/")
        if not uri.startswith(self.base):
            return False
        key = uri[len(self.base):]
        if self.base.startswith("file:"):
            key = unquote(key)
        try:
            check_key(key)
        except UnsafeKey:
            return False
        return True


def open_object_store(url: str, endpoint_url: str | None = None, region: str | None = None) -> ObjectStore:
    """A store from a URL: `s3://bucket/prefix`, `file:///abs/path`, or a plain directory path."""
    try:
        location = parse_store_url(url)
    except ValueError as exc:
        raise ValueError(f"object store URL {url!r} {exc}") from None
    if location.bucket is not None:
        return S3ObjectStore(location.bucket, location.prefix, endpoint_url=endpoint_url, region=region)
    assert location.folder is not None
    return LocalObjectStore(location.folder)
