"""The API ledger's batching of calls, without Redis: one call per turn of the event loop, answers in order, and
no caller left waiting whatever the call does."""
from __future__ import annotations

import asyncio

import pytest

from connectors.api_ledger import Coalesced


def test_the_items_of_one_turn_go_in_one_call_and_each_gets_its_answer() -> None:
    calls: list[list[int]] = []

    async def send(items: list[int]) -> list[int]:
        calls.append(items)
        return [i * 10 for i in items]

    async def scenario() -> list[int]:
        double = Coalesced(send)
        first = await asyncio.gather(*(double(i) for i in range(5)))
        return [*first, await double(7)]

    assert asyncio.run(scenario()) == [0, 10, 20, 30, 40, 70]
    assert calls == [[0, 1, 2, 3, 4], [7]]


def test_a_failed_call_is_every_callers_and_a_short_answer_leaves_nobody_waiting() -> None:
    async def broken(items: list[int]) -> list[int]:
        raise ConnectionError("redis went away")

    async def short(items: list[int]) -> list[int]:
        return items[:1]

    async def scenario() -> tuple[list[int | BaseException], list[int | BaseException]]:
        failing, truncating = Coalesced(broken), Coalesced(short)
        failed = await asyncio.gather(*(failing(i) for i in range(3)), return_exceptions=True)
        cut = await asyncio.wait_for(asyncio.gather(*(truncating(i) for i in range(3)), return_exceptions=True), 1)
        return failed, cut

    failed, cut = asyncio.run(scenario())
    assert all(isinstance(f, ConnectionError) for f in failed)
    assert cut[0] == 0 and all(isinstance(c, Exception) for c in cut[1:])


def test_a_full_batch_goes_without_waiting_for_the_turn_to_end() -> None:
    sizes: list[int] = []

    async def send(items: list[int]) -> list[int]:
        sizes.append(len(items))
        return items

    async def scenario() -> None:
        capped = Coalesced(send, max_items=4)
        await asyncio.gather(*(capped(i) for i in range(10)))

    asyncio.run(scenario())
    assert sizes == [4, 4, 2]


@pytest.mark.parametrize("n", [1, 300])
def test_every_caller_gets_its_own_answer(n: int) -> None:
    async def send(items: list[int]) -> list[int]:
        return [-i for i in items]

    async def scenario() -> list[int]:
        negate = Coalesced(send)
        return list(await asyncio.gather(*(negate(i) for i in range(n))))

    assert asyncio.run(scenario()) == [-i for i in range(n)]
