"""SendBudget: chunk bytes in flight stay within the budget, and the oldest stream is served first."""

from __future__ import annotations

import asyncio

import pytest

from fedserver.send_budget import SendBudget
from tests.server_testkit import async_test


@async_test
async def test_bytes_in_flight_never_exceed_the_budget_and_one_chunk_always_fits() -> None:
    budget = SendBudget(100)
    await budget.acquire(60, priority=0)
    await budget.acquire(40, priority=1)
    waiting = asyncio.ensure_future(budget.acquire(10, priority=2))
    await asyncio.sleep(0.01)
    assert not waiting.done() and budget.in_flight == 100
    budget.release(40)
    await asyncio.wait_for(waiting, 1)
    assert budget.in_flight == 70
    budget.release(60)
    budget.release(10)
    await asyncio.wait_for(budget.acquire(500, priority=3), 1)  # larger than the budget, but alone: fits
    assert budget.in_flight == 500


@async_test
async def test_the_stream_that_started_first_gets_the_budget_first() -> None:
    budget = SendBudget(10)
    await budget.acquire(10, priority=0.0)
    served: list[str] = []

    async def stream(name: str, started: float) -> None:
        await budget.acquire(10, priority=started)
        served.append(name)
        budget.release(10)

    late, early = asyncio.ensure_future(stream("late", 5.0)), asyncio.ensure_future(stream("early", 1.0))
    await asyncio.sleep(0.01)
    budget.release(10)
    await asyncio.wait_for(asyncio.gather(late, early), 1)
    assert served == ["early", "late"], "priority (stream start), not arrival order, decides"


@async_test
async def test_a_cancelled_waiter_is_skipped_and_gives_back_what_it_was_granted() -> None:
    budget = SendBudget(10)
    await budget.acquire(10, priority=0)
    gone = asyncio.ensure_future(budget.acquire(10, priority=1))
    after = asyncio.ensure_future(budget.acquire(10, priority=2))
    await asyncio.sleep(0.01)
    gone.cancel()
    budget.release(10)
    await asyncio.wait_for(after, 1)
    assert budget.in_flight == 10
    granted_then_cancelled = asyncio.ensure_future(budget.acquire(10, priority=3))
    await asyncio.sleep(0.01)
    budget.release(10)  # grants it ...
    granted_then_cancelled.cancel()  # ... but its stream is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await granted_then_cancelled
    assert budget.in_flight == 0

