"""Object stores: a local directory, and S3 over real HTTP (moto server, or ZIMAGE_S3_ENDPOINT_URL)."""
from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

import boto3
import pytest

from connectors.storage import (
    LocalObjectStore,
    ObjectNotFound,
    S3ObjectStore,
    UnsafeKey,
    open_object_store,
)

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4

# ---- local directory -----------------------------------------------------------------------------


def test_local_round_trip(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "objects")
    uri = store.put("renders/2026/req-1/0.png", PNG, "image/png")
    assert uri.startswith("file:///") and uri.endswith("/objects/renders/2026/req-1/0.png")
    assert (tmp_path / "objects" / "renders" / "2026" / "req-1" / "0.png").read_bytes() == PNG
    assert store.get(uri) == PNG
    assert store.get("renders/2026/req-1/0.png") == PNG
    assert store.exists("renders/2026/req-1/0.png") and not store.exists("renders/2026/req-1/1.png")


def test_local_put_overwrites_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path)
    first = store.put("a/b.png", b"first", "image/png")
    assert store.put("a/b.png", b"second", "image/png") == first
    assert store.get(first) == b"second"
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b.png"]


def test_local_uri_with_odd_characters_round_trips(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path)
    uri = store.put("tenant a/100%/é.png", PNG, "image/png")
    assert " " not in uri
    assert store.get(uri) == PNG


def test_local_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalObjectStore(tmp_path)
    store.put("x.png", b"old", "image/png")
    seen_at_rename: list[tuple[bytes, bytes]] = []
    real_replace = os.replace

    def observing_replace(src: Any, dst: Any) -> None:
        seen_at_rename.append((Path(src).read_bytes(), Path(dst).read_bytes()))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", observing_replace)
    store.put("x.png", PNG, "image/png")
    # Complete new bytes were written elsewhere first; the target still held the old object until the rename.
    assert seen_at_rename == [(PNG, b"old")]

    def failing_replace(src: Any, dst: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        store.put("x.png", b"new", "image/png")
    assert store.get("x.png") == PNG
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]


@pytest.mark.parametrize("key", ["../escape.png", "a/../../escape.png", "/etc/passwd", "", "a//b.png", "a/./b",
                                 "a\\..\\b", "a/", "nul\x00.png"])
def test_local_refuses_keys_that_escape_or_are_malformed(tmp_path: Path, key: str) -> None:
    store = LocalObjectStore(tmp_path / "root")
    with pytest.raises(UnsafeKey):
        store.put(key, b"x", "image/png")
    assert list(tmp_path.rglob("escape.png")) == []


def test_local_refuses_symlinks_and_uris_leading_outside(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    store = LocalObjectStore(tmp_path / "root")
    (tmp_path / "root" / "link").symlink_to(outside)
    with pytest.raises(UnsafeKey):
        store.put("link/x.png", b"x", "image/png")
    with pytest.raises(UnsafeKey):
        store.get("link/secret")
    with pytest.raises(UnsafeKey):
        store.get((outside / "secret").as_uri())
    assert not (outside / "x.png").exists()


def test_local_refuses_uris_no_file_system_takes_as_the_names_fault(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "root")
    root = (tmp_path / "root").resolve().as_uri()
    for uri in (f"{root}/a%00b.png", f"{root}/{'n' * 300}.png", f"{root}/images/{'d' * 256}/x.png"):
        with pytest.raises(UnsafeKey):
            store.get(uri)  # not an OSError or ValueError, which read as an outage of the store
        with pytest.raises(UnsafeKey):
            store.key_of(uri)


def test_local_missing_object(tmp_path: Path) -> None:
    with pytest.raises(ObjectNotFound):
        LocalObjectStore(tmp_path).get("nope.png")


def test_open_object_store_local_forms(tmp_path: Path) -> None:
    by_uri = open_object_store((tmp_path / "a").as_uri())
    by_path = open_object_store(str(tmp_path / "b"))
    assert isinstance(by_uri, LocalObjectStore) and by_uri.root == (tmp_path / "a").resolve()
    assert isinstance(by_path, LocalObjectStore) and by_path.root == (tmp_path / "b").resolve()
    with pytest.raises(ValueError):
        open_object_store("ftp://host/x")
    with pytest.raises(ValueError):
        open_object_store("file://otherhost/x")


def test_open_object_store_s3_form() -> None:
    store = open_object_store("s3://bucket/some/prefix/", "http://127.0.0.1:1", region="us-east-1")
    assert isinstance(store, S3ObjectStore)
    assert (store.bucket, store.prefix) == ("bucket", "some/prefix")


# ---- S3 over HTTP -----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_answering(port: int, server: subprocess.Popen[bytes], log: IO[bytes], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"moto server exited: {log.read().decode(errors='replace')[-2000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/")
            conn.getresponse().read()
            conn.close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"moto server did not answer on port {port} within {timeout_s} s")


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[tuple[str, str]]:
    """(endpoint_url, bucket): the configured S3 endpoint, or a moto server started for this module."""
    with pytest.MonkeyPatch.context() as env:
        for name, value in [("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test"),
                            ("AWS_DEFAULT_REGION", "us-east-1")]:
            env.setenv(name, os.environ.get(name, value))
        configured = os.environ.get("ZIMAGE_S3_ENDPOINT_URL")
        if configured:
            yield configured, os.environ.get("ZIMAGE_S3_BUCKET", "zimage")
            return
        port = _free_port()
        # Not a pipe: moto logs every request and would block on a full one. Closed in the `finally` below,
        # once the server writing to it has ended.
        log = tempfile.TemporaryFile()  # noqa: SIM115
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                  stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_until_answering(port, server, log)
            endpoint = f"http://127.0.0.1:{port}"
            boto3.session.Session().client("s3", endpoint_url=endpoint).create_bucket(Bucket="zimage-test")
            yield endpoint, "zimage-test"
        finally:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
            log.close()


@pytest.fixture
def s3_store(s3_endpoint: tuple[str, str]) -> S3ObjectStore:
    endpoint, bucket = s3_endpoint
    # A fresh prefix per test: a shared stack's bucket may hold anything already.
    return S3ObjectStore(bucket, prefix=f"tests/{uuid.uuid4().hex}", endpoint_url=endpoint, region="us-east-1")


def test_s3_round_trip(s3_store: S3ObjectStore, s3_endpoint: tuple[str, str]) -> None:
    key = "renders/req-1/0.png"
    assert not s3_store.exists(key)
    uri = s3_store.put(key, PNG, "image/png")
    assert uri == f"s3://{s3_store.bucket}/{s3_store.prefix}/{key}"
    assert s3_store.exists(key)
    assert s3_store.get(uri) == PNG and s3_store.get(key) == PNG
    head = boto3.session.Session().client("s3", endpoint_url=s3_endpoint[0]).head_object(
        Bucket=s3_store.bucket, Key=f"{s3_store.prefix}/{key}")
    assert head["ContentType"] == "image/png" and head["ContentLength"] == len(PNG)


def test_s3_put_overwrites(s3_store: S3ObjectStore) -> None:
    first = s3_store.put("k.png", b"first", "image/png")
    assert s3_store.put("k.png", b"second", "image/png") == first
    assert s3_store.get(first) == b"second"


def test_s3_missing_object_and_bad_keys(s3_store: S3ObjectStore) -> None:
    with pytest.raises(ObjectNotFound):
        s3_store.get("nope.png")
    with pytest.raises(ObjectNotFound):
        s3_store.get(f"s3://{s3_store.bucket}/{s3_store.prefix}/nope.png")
    with pytest.raises(UnsafeKey):
        s3_store.put("../x.png", b"x", "image/png")


def test_s3_reads_nothing_outside_its_bucket_and_prefix(s3_store: S3ObjectStore) -> None:
    s3_store.put("mine.png", PNG, "image/png")
    outside = [f"s3://another-bucket/{s3_store.prefix}/mine.png", f"s3://{s3_store.bucket}/mine.png",
               f"s3://{s3_store.bucket}/{s3_store.prefix}-other/mine.png", "s3://", f"s3://{s3_store.bucket}/"]
    for uri in outside:
        with pytest.raises(UnsafeKey):
            s3_store.get(uri)
        with pytest.raises(UnsafeKey):
            s3_store.exists(uri)
    assert s3_store.get(f"s3://{s3_store.bucket}/{s3_store.prefix}/mine.png") == PNG


def test_s3_store_from_a_thread_pool(s3_store: S3ObjectStore) -> None:
    payloads = {f"batch/{i}.png": PNG + bytes([i]) for i in range(24)}
    with ThreadPoolExecutor(max_workers=8) as pool:
        stored = pool.map(lambda kv: s3_store.put(kv[0], kv[1], "image/png"), payloads.items())
        uris = dict(zip(payloads, stored, strict=True))
    with ThreadPoolExecutor(max_workers=8) as pool:
        fetched = list(pool.map(s3_store.get, uris.values()))
    assert fetched == list(payloads.values())


def test_open_object_store_s3_round_trip(s3_endpoint: tuple[str, str]) -> None:
    endpoint, bucket = s3_endpoint
    store = open_object_store(f"s3://{bucket}/tests/{uuid.uuid4().hex}", endpoint)
    uri = store.put("a.png", PNG, "image/png")
    assert uri.startswith(f"s3://{bucket}/tests/") and store.get(uri) == PNG


def test_object_uris_hold_only_objects_where_the_store_puts_them(tmp_path):
    from connectors.storage import LocalObjectStore, ObjectUris

    s3 = ObjectUris.of("s3://bkt/images")
    assert s3.holds("s3://bkt/images/acme/ab.png")
    for uri in ("s3://bkt/other/ab.png", "s3://bkt2/images/ab.png", "s3://bkt/images/../x", "file:///etc/passwd",
                "s3://bkt/images/", "https://bkt/images/a.png", "s3://bkt/imagesevil/a.png", 7):
        assert not s3.holds(uri), uri  # 7: whatever a hostile record holds
    local = ObjectUris.of(str(tmp_path / "objects"))
    put = LocalObjectStore(tmp_path / "objects").put("acme/a b.png", b"x")  # percent-encoded in its URI
    assert local.holds(put) and local.holds(put.replace("file:///", "file://localhost/"))
    for uri in ("file:///etc/passwd", f"file://{tmp_path}/objects/../x", f"file://{tmp_path}/objects/acme/%2E%2E/x",
                f"file://{tmp_path}/objects", f"file://remote{tmp_path}/objects/a.png",
                f"file://{tmp_path}/objects-evil/a.png"):
        assert not local.holds(uri), uri
