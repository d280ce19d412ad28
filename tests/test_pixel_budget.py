"""The front end's decoding budget (disco/serve/admission.py): pixels held while decoding never pass the total,
waiting requests are served as pixels are released, and the line of waiters is bounded (503 beyond it)."""
from __future__ import annotations

import asyncio

import pytest

from disco.serve.admission import PixelBudget
from disco.serve.batching import Refused


def test_held_pixels_never_pass_the_total_and_every_request_is_decoded():
    budget, held, most = PixelBudget(total=100, max_waiting=64), [0], [0]

    async def decode(pixels: int):
        async with budget.hold(pixels):
            held[0] += pixels
            most[0] = max(most[0], held[0])
            await asyncio.sleep(0.01)
            held[0] -= pixels
        return pixels

    async def crowd():
        return await asyncio.gather(*(decode(pixels) for pixels in [60, 60, 30, 100, 10, 45, 55] * 4))

    assert sorted(asyncio.run(crowd())) == sorted([60, 60, 30, 100, 10, 45, 55] * 4)
    assert most[0] == 100 and budget.free == 100 and budget.waiting == 0


def test_the_line_of_waiters_is_bounded():
    budget = PixelBudget(total=10, max_waiting=2)
    outcomes: list[str] = []

    async def decode():
        try:
            async with budget.hold(10):
                await asyncio.sleep(0.05)
            outcomes.append("decoded")
        except Refused as refusal:
            outcomes.append(f"{refusal.status} {refusal.kind} {refusal.retry_after}")

    async def crowd():
        await asyncio.gather(*(decode() for _ in range(5)))

    asyncio.run(crowd())  # one decodes, two wait and then decode, two are refused
    assert sorted(outcomes) == ["503 busy 1"] * 2 + ["decoded"] * 3
    assert budget.free == 10


def test_a_cancelled_waiter_leaves_the_budget_whole():
    budget = PixelBudget(total=10, max_waiting=4)

    async def scenario():
        async with budget.hold(10):
            waiter = asyncio.create_task(_hold(budget, 5))
            await asyncio.sleep(0.01)
            assert budget.waiting == 1
            waiter.cancel()  # the client went away while its image waited
            with pytest.raises(asyncio.CancelledError):
                await waiter
        assert (budget.free, budget.waiting) == (10, 0)

    asyncio.run(scenario())


async def _hold(budget: PixelBudget, pixels: int):
    async with budget.hold(pixels):
        await asyncio.sleep(1)
