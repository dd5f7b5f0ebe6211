"""A released round model reloads x in a worker thread: the event loop keeps serving meanwhile, and
concurrent requests for x share one reload.

The reload here is held at a gate (a ``threading.Event`` the test opens): it stands for a slow read of a
big checkpoint, and lets the test prove, without timing assumptions, that a Heartbeat over real gRPC
completes while the reload is still running. Reloading on the event loop would block that Heartbeat until
the gate's own 20 s timeout (far past the call's 5 s deadline).
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
from plans_lsq import LinearPlan
from server_testkit import async_test, running_server

from fedcore.tasks import PlanSource, TrainTask
from fedcore.wire import TaskKind
from fedserver.round_model import RoundModel
from fedserver.tasks import PreparedPayload

X = {"coef": np.arange(12, dtype=np.float32).reshape(3, 4), "big": np.linspace(0, 1, 300_000, dtype=np.float32)}


class GatedReload:
    """Returns a fresh copy of x once ``gate`` is open; ``started`` is set when a reload begins."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.gate = threading.Event()

    def __call__(self) -> dict[str, np.ndarray]:
        self.started.set()
        self.gate.wait(20)
        return {k: v.copy() for k, v in X.items()}


def round_model(reload: GatedReload, chunk_size: int = 64 << 10) -> RoundModel:
    task = TrainTask("e", 1, PlanSource.from_class(LinearPlan), {"num_updates": 1}, {k: v.copy() for k, v in X.items()})
    return RoundModel(task, chunk_size, reload=reload)


@async_test
async def test_a_reload_for_a_download_leaves_the_loop_serving_other_nodes(tmp_path: Path) -> None:
    async with running_server(tmp_path, chunk_size=64 << 10) as kit:
        downloader, other = await kit.registered_node("down"), await kit.registered_node("other")
        reload = GatedReload()
        model = round_model(reload)
        payload = model.payload({"aggregator_state": {}})
        expected = payload.tobytes()
        assert isinstance(payload, PreparedPayload)
        handle = kit.server.dispatch("down", TaskKind.TRAIN, payload, experiment_id="e", round=1,
                                     inactivity_timeout=60)
        model.release()
        poll = asyncio.create_task(downloader.poll(wait=10))
        assert await asyncio.to_thread(reload.started.wait, 10), "the download never asked for a reload"
        # the reload is running (held at its gate): the server still answers another node, at once
        await asyncio.wait_for(other.heartbeat(), 5)
        params = asyncio.create_task(model.params_async())  # a second user of x joins the same reload
        await asyncio.sleep(0)
        assert not poll.done() and not params.done()
        reload.gate.set()
        got = await asyncio.wait_for(poll, 10)
        assert got.descriptor.task_id == handle.task_id
        assert b"".join(d for _, d in got.chunks) == expected
        x = await asyncio.wait_for(params, 10)
        assert all(np.array_equal(x[k], X[k]) for k in X)


@async_test
async def test_concurrent_requests_share_one_reload() -> None:
    reload = GatedReload()
    model = round_model(reload)
    payloads = [model.payload({"aggregator_state": {"n": i}}) for i in range(2)]
    expected = [p.tobytes() for p in payloads]
    model.release()
    waiting = [asyncio.create_task(model.params_async()) for _ in range(3)]
    streams = [asyncio.create_task(p.open_chunks()) for p in payloads]
    assert await asyncio.to_thread(reload.started.wait, 10)
    reload.gate.set()
    x = await asyncio.gather(*waiting)
    chunks = await asyncio.gather(*streams)
    # one reload: every caller got the very same arrays (a second reload would return new copies)
    assert x[0] is x[1] is x[2] and all(np.array_equal(x[0][k], X[k]) for k in X)
    assert model._reloaded is not None and model._reloaded[0] is x[0]
    assert [b"".join(d for _, d in c) for c in chunks] == expected
    for c in chunks:
        c.close()
    assert model._reloaded is None  # the last stream ended: the reloaded x goes again
