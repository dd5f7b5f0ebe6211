"""A round's model-sized work happens in a worker thread: building its payloads (encoding and SHA-256 of
x, of a node's own entries); the final average and checkpoint go through ``run_off_loop``. The server keeps
answering nodes over real gRPC meanwhile.

No timing threshold: a Heartbeat that completes while ``RoundModel.create`` / ``payload_async`` has not
returned yet proves the loop was free. Done on the event loop, the build would run in one step of its
task and no Heartbeat could complete before it returned.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from plans_lsq import LinearPlan
from server_testkit import WireNode, async_test, running_server

from fedcore.errors import ExperimentError
from fedcore.tasks import PlanSource, TrainTask
from fedserver.off_loop import run_off_loop
from fedserver.round_model import RoundModel

BIG = 32 << 20  # float32 elements: 128 MB, ~70 ms of SHA-256 here, against ~1 ms per Heartbeat


def task(params: dict[str, np.ndarray]) -> TrainTask:
    return TrainTask("e", 1, PlanSource.from_class(LinearPlan), {"num_updates": 1}, params)


async def heartbeats_during(work: Awaitable[Any], node: WireNode) -> tuple[Any, int]:
    """``work``'s result and how many Heartbeats completed over gRPC before it returned."""
    running = asyncio.ensure_future(work)
    done = 0
    while not running.done():
        await node.heartbeat()
        if not running.done():
            done += 1
    return await running, done


@async_test
async def test_the_global_model_is_encoded_and_hashed_off_the_loop(tmp_path: Path) -> None:
    x = {"w": np.ones(BIG, dtype=np.float32), "b": np.zeros(3, dtype=np.float32)}
    async with running_server(tmp_path) as kit:
        node = await kit.registered_node("n1")
        model, served = await heartbeats_during(RoundModel.create(task(x), 1 << 20), node)
        assert served >= 1, "no Heartbeat was answered while x was hashed: the build blocked the event loop"
        # the same payload as the synchronous constructor builds
        expected = RoundModel(task(x), 1 << 20).payload({"aggregator_state": {}})
        built = model.payload({"aggregator_state": {}})
        assert (built.total_size, built.sha256) == (expected.total_size, expected.sha256)


@async_test
async def test_a_model_sized_node_entry_is_hashed_off_the_loop(tmp_path: Path) -> None:
    """Scaffold sends each node a model-sized correction among its own entries."""
    model = RoundModel(task({"w": np.ones(8, dtype=np.float32)}), 1 << 20)
    own = {"aggregator_state": {"correction": {"w": np.full(BIG, 0.5, dtype=np.float32)}}}
    async with running_server(tmp_path) as kit:
        node = await kit.registered_node("n1")
        payload, served = await heartbeats_during(model.payload_async(own), node)
        assert served >= 1, "no Heartbeat was answered while the node's entries were hashed"
        expected = model.payload(own)
        assert (payload.total_size, payload.sha256) == (expected.total_size, expected.sha256)
        assert payload.tobytes() == expected.tobytes()


@async_test
async def test_payload_async_after_release_is_refused() -> None:
    model = RoundModel(task({"w": np.ones(8, dtype=np.float32)}), 1 << 20, reload=dict)
    model.release()
    with pytest.raises(ExperimentError, match="released"):
        await model.payload_async({"aggregator_state": {}})


@async_test
async def test_a_cancelled_caller_gets_its_cancellation_after_the_work_ended() -> None:
    """The aggregator is reset on cancellation: never while a thread still adds into it."""
    started, release = threading.Event(), threading.Event()
    ended: list[bool] = []

    def work() -> int:
        started.set()
        release.wait(10)
        ended.append(True)
        return 1

    caller = asyncio.ensure_future(run_off_loop(work))
    assert await asyncio.to_thread(started.wait, 10)
    caller.cancel()
    await asyncio.sleep(0.05)
    assert not caller.done(), "the cancellation was delivered while the work was still running"
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert ended == [True]


@async_test
async def test_repeated_cancellations_still_wait_for_the_work() -> None:
    started, release = threading.Event(), threading.Event()

    def work() -> int:
        started.set()
        release.wait(10)
        raise ValueError("failed after the cancellation")

    caller = asyncio.ensure_future(run_off_loop(work))
    assert await asyncio.to_thread(started.wait, 10)
    for _ in range(3):
        caller.cancel()
        await asyncio.sleep(0.02)
        assert not caller.done(), "a second cancellation cut the wait short"
    release.set()
    with pytest.raises(asyncio.CancelledError):  # the cancellation wins; the work's error is logged
        await caller


@async_test
async def test_the_works_error_reaches_the_caller() -> None:
    def work() -> int:
        raise ValueError("no")

    with pytest.raises(ValueError, match="no"):
        await run_off_loop(work)
