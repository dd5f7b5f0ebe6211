"""fedcore.event_wait: waits that never swallow a cancellation (asyncio.wait_for on 3.11 does, gh-86296)."""

from __future__ import annotations

import asyncio

import pytest

from fedcore.event_wait import wait_event, within
from fedserver.registry import NodeRegistry


def test_wait_event_answers_set_or_timed_out() -> None:
    async def main() -> tuple[bool, bool, bool]:
        event = asyncio.Event()
        timed_out = await wait_event(event, 0.01)
        asyncio.get_running_loop().call_later(0.01, event.set)
        fired = await wait_event(event, 5.0)
        already = await wait_event(event, 0)
        return timed_out, fired, already

    assert asyncio.run(main()) == (False, True, True)


def test_a_cancel_landing_as_the_event_fires_is_not_swallowed() -> None:
    """The waiter is cancelled in the same loop iteration as the event is set: it must end cancelled."""

    async def main() -> None:
        event = asyncio.Event()
        waiter = asyncio.create_task(wait_event(event, 60.0))
        await asyncio.sleep(0)  # the waiter now waits on the event
        event.set()
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter

    asyncio.run(main())


def test_within_times_out_and_lets_a_cancel_through() -> None:
    async def main() -> None:
        with pytest.raises(TimeoutError):
            await within(asyncio.sleep(10), 0.01)
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        waiter = asyncio.create_task(within(asyncio.shield(future), 60.0))
        await asyncio.sleep(0)
        future.set_result(1)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert future.result() == 1  # shielded: the awaited future itself is untouched

    asyncio.run(main())


def test_waiting_for_nodes_is_cancelled_even_as_a_node_registers() -> None:
    """fedserver run's wait for nodes ends at Ctrl-C even when a node registers in that instant (it used to
    wait out the whole --node-wait)."""
    from fedcore.wire import NodeRegistration

    async def main() -> None:
        registry = NodeRegistry(liveness_timeout=60.0)
        waiter = asyncio.create_task(registry.wait_for_nodes(2, 60.0))
        await asyncio.sleep(0)
        registry.register("node-a", NodeRegistration(node_name="a", datasets=()))
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter

    asyncio.run(main())
