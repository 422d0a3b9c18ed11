"""Stable names for model weights: what goes into model_version, so that batches never mix model versions and every
event names the exact weights and numerics."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

# Files up to this size are fingerprinted whole; larger weight shards by size, first and last MiB.
FULL_HASH_LIMIT = 64 * 1024 * 1024
PARTIAL_HASH_CHUNK = 1024 * 1024
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def folder_fingerprint(folder: Path) -> str:
    """sha256 over a model folder's files: small ones whole, large shards by size plus first and last MiB."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        if any(part.startswith(".") for part in Path(relative).parts):  # build markers, download caches
            continue
        size = path.stat().st_size
        digest.update(f"{relative}\0{size}\0".encode())
        with path.open("rb") as handle:
            if size <= FULL_HASH_LIMIT:
                digest.update(handle.read())
            else:
                digest.update(handle.read(PARTIAL_HASH_CHUNK))
                handle.seek(size - PARTIAL_HASH_CHUNK)
                digest.update(handle.read(PARTIAL_HASH_CHUNK))
    return digest.hexdigest()


def hub_commit(repo_id: str, revision: str | None) -> str | None:
    if revision and _COMMIT.match(revision):
        return revision
    from huggingface_hub import try_to_load_from_cache  # reads the local cache only

    cached = try_to_load_from_cache(repo_id, "model_index.json", revision=revision)
    parts = Path(cached).parts if isinstance(cached, str) else ()  # .../snapshots/<commit>/model_index.json
    commit = parts[parts.index("snapshots") + 1] if "snapshots" in parts[:-1] else ""
    return commit if _COMMIT.match(commit) else None


def config_fingerprint(pipe: Any) -> str:
    configs = {"pipeline": dict(pipe.config)}
    for name, component in pipe.components.items():
        config = getattr(component, "config", None)
        if config is not None:
            configs[name] = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return hashlib.sha256(json.dumps(configs, sort_keys=True, default=str).encode()).hexdigest()
