"""The API keys file: JSON lines of {"hash", "tenant", "created_at", "label"}, one per key, only keyed hashes.

Appends take an exclusive lock, so two `zimage api-key create` at once both land. Readers reload the file when its
modification time or size changes (checked at most once a second, and on any unknown key), so a new key works at
once, without a restart.
"""
from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

RELOAD_EVERY_S = 1.0


class KeyFileError(ValueError):
    """A keys file that cannot be read as JSON lines of keys."""


def append_key(path: Path, key_hash: str, tenant: str, label: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"hash": key_hash, "tenant": tenant, "created_at": int(time.time()), "label": label})
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)  # hashes only, yet nobody else's business
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, (line + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def read_keys(path: Path) -> dict[str, str]:
    """hash -> tenant; an absent file has no keys."""
    keys: dict[str, str] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return keys
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            keys[str(entry["hash"])] = str(entry["tenant"])
        except (ValueError, KeyError, TypeError) as exc:
            raise KeyFileError(f"{path}:{n}: not a key entry ({exc})") from None
    return keys


class KeyRing:
    """Answers which tenant a key hash belongs to, from the keys file as it is now (within a second)."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.monotonic):
        self._path = path
        self._clock = clock
        self._lock = threading.Lock()
        self._keys = read_keys(path)
        self._seen = self._stamp()
        self._checked = clock()

    def tenant_of(self, key_hash: str) -> str | None:
        self._maybe_reload()
        tenant = self._keys.get(key_hash)
        if tenant is None:  # perhaps a key created a moment ago: one stat() tells, and a reload only if changed
            self._maybe_reload(force=True)
            tenant = self._keys.get(key_hash)
        return tenant

    def __len__(self) -> int:
        return len(self._keys)

    def _stamp(self) -> tuple[int, int] | None:
        try:
            st = self._path.stat()
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_size

    def _maybe_reload(self, force: bool = False) -> None:
        now = self._clock()
        if not force and now - self._checked < RELOAD_EVERY_S:
            return
        with self._lock:
            self._checked = now
            stamp = self._stamp()
            if stamp != self._seen:
                try:
                    self._keys = read_keys(self._path)
                except KeyFileError:  # a half-edited file: keep the keys we had until it reads again
                    return
                self._seen = stamp
