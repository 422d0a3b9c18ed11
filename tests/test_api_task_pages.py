"""Paging through a tenant's tasks on a real Redis: every task once, newest first, however many share a millisecond."""
from __future__ import annotations

import asyncio
import os
import uuid

import pytest
import redis

from connectors.api_store import ApiStore

pytestmark = pytest.mark.stack

URL = os.environ.get("ZIMAGE_REDIS_URL", "redis://127.0.0.1:6379/0")


def pages(key: str, limit: int, with_ids: bool) -> list[list[str]]:
    async def walk() -> list[list[str]]:
        store = ApiStore(URL)
        out: list[list[str]] = []
        before: float | None = None
        before_id: str | None = None
        try:
            while True:
                page = await store.index_page(key, before, limit, before_id if with_ids else None)
                out.append([member for member, _ in page])
                if len(page) < limit:
                    return out
                before, before_id = page[-1][1], page[-1][0]
        finally:
            await store.close()

    return asyncio.run(walk())


def test_pages_with_the_cursors_id_list_every_task_once_even_when_many_share_a_millisecond() -> None:
    key = f"zimage-test:{uuid.uuid4().hex[:8]}:tasks"
    scores = {f"req-{i:02d}": 1_000 + i // 7 for i in range(40)}  # seven tasks accepted in each millisecond
    client = redis.Redis.from_url(URL)
    client.zadd(key, scores)
    client.expire(key, 60)
    newest_first = sorted(scores, key=lambda m: (scores[m], m), reverse=True)
    walked = pages(key, limit=5, with_ids=True)
    assert [m for page in walked for m in page] == newest_first
    assert all(len(page) == 5 for page in walked[:-1])
    # the score alone as the cursor skips the rest of each page's last millisecond
    assert len([m for page in pages(key, limit=5, with_ids=False) for m in page]) < len(scores)
