"""``Experiment(low_memory=True)`` interrupted, and hand-set params on a resumed run.

A run cancelled after x was released does not reload x (seconds at scale, in a task being cancelled):
``params`` stays None, the checkpoint holds x, and both ``run()`` again and ``Experiment.resume`` go on
from exactly that x. Params set by hand after round k whose checkpoint exists are refused before
anything starts, and round k's checkpoint is left as it was.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from low_memory_support import ARGS, CHUNK, DATASET, fresh_x, same_bytes
from plans_lsq import LinearPlan
from server_testkit import WireNode, running_server

from fedcore.errors import ExperimentError
from fedcore.serialization import Serializer
from fedcore.tasks import TrainResult
from fedserver.checkpoints import CheckpointStore
from fedserver.experiment import Experiment


async def serve_one_round(nodes: list[WireNode]) -> list[dict[str, np.ndarray]]:
    """Each node downloads its task and replies x + 1; returns the x each one was sent."""
    sent = []
    for node in nodes:
        polled = await node.poll(wait=10)
        params = polled.assemble()["params"]
        sent.append(params)
        reply = TrainResult(params={k: v + 1 for k, v in params.items()}, num_samples=10, num_steps=1, lr=0.01)
        await node.upload(polled.descriptor.task_id, Serializer.dumps(reply.to_payload()))
    return sent


async def two_nodes_and_a_low_memory_run(kit: Any, checkpoints: Path) -> tuple[list[WireNode], Experiment]:
    """Two registered wire nodes and a one-round low-memory experiment that needs both."""
    nodes = [kit.node(f"wire-{i}") for i in range(2)]
    for i, node in enumerate(nodes):
        await node.register(f"wire-{i}", datasets=(DATASET,))
    exp = Experiment(LinearPlan, ARGS, rounds=1, dataset_tags=["lsq"], min_nodes=2, round_timeout=30,
                     node_wait_timeout=10, server=kit.server, progress=False, low_memory=True,
                     checkpoint_dir=checkpoints)
    return nodes, exp


def test_a_run_cancelled_after_the_release_leaves_params_none_and_goes_on_from_the_checkpoint(tmp_path: Path) -> None:
    async def main():
        async with running_server(tmp_path, chunk_size=CHUNK) as kit:
            nodes, exp = await two_nodes_and_a_low_memory_run(kit, tmp_path / "ckpt")
            exp.params = fresh_x()
            refs = [weakref.ref(v) for v in exp.params.values()]
            running = asyncio.create_task(exp.run_async())
            for node in nodes:
                await node.poll(wait=10)
            for _ in range(500):
                if all(ref() is None for ref in refs):
                    break
                await asyncio.sleep(0.01)
            assert all(ref() is None for ref in refs), "x was not released"
            running.cancel()
            with pytest.raises(asyncio.CancelledError):
                await running
            after_cancel = exp.params
            resumed = Experiment.resume(tmp_path / "ckpt", server=kit.server, progress=False)
            again = asyncio.create_task(exp.run_async())
            sent = await serve_one_round(nodes)
            await asyncio.wait_for(again, 30)
            return after_cancel, resumed, sent, exp

    after_cancel, resumed, sent, exp = asyncio.run(asyncio.wait_for(main(), 90))
    assert after_cancel is None  # not reloaded by the cancelled task
    assert resumed.completed_round == 0 and same_bytes(resumed.params, fresh_x())  # the checkpoint holds x
    assert all(same_bytes(x, fresh_x()) for x in sent)  # run() again went on from that x, not from x_0 of the plan
    assert exp.completed_round == 1 and same_bytes(exp.params, {k: v + 1 for k, v in fresh_x().items()})


def test_params_set_by_hand_on_a_resumed_run_do_not_overwrite_that_rounds_checkpoint(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    first = Experiment(LinearPlan, ARGS, rounds=2, checkpoint_dir=ckpt, progress=False, low_memory=True)
    first.params = fresh_x()
    first._checkpoint_params()  # x_0 as round 0, as a low-memory run does before round 1
    round_0 = first.checkpoints.load(0)
    first.checkpoints.save(1, fresh_x(shift=1.0), round_0.aggregator_name, round_0.aggregator_config,
                           round_0.aggregator_state, {**round_0.experiment_state, "completed_round": 1})

    async def main():
        async with running_server(tmp_path) as kit:
            exp = Experiment.resume(ckpt, server=kit.server, node_wait_timeout=0.5)
            exp.params = fresh_x(shift=7.0)
            with pytest.raises(ExperimentError) as refused:
                await exp.run_async()
            return refused.value

    refused = asyncio.run(asyncio.wait_for(main(), 60))
    assert "params were set by hand" in str(refused) and "round 1's own checkpoint" in str(refused), refused
    assert same_bytes(CheckpointStore(ckpt).load_params(1), fresh_x(shift=1.0))  # round 1's model, untouched


class GatedStore(CheckpointStore):
    """Holds each save of a round >= 1 at a gate the test opens: a slow write of a big model."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.saving = threading.Event()
        self.gate = threading.Event()

    def save(self, round: int, *args: Any) -> Path:
        if round >= 1:
            self.saving.set()
            self.gate.wait(20)
        return super().save(round, *args)


def test_a_run_cancelled_while_its_checkpoint_is_written_counts_that_round_as_saved(tmp_path: Path) -> None:
    """The save runs in a worker thread; a cancellation meanwhile is delivered once it is written, and the
    round is then complete: run() again goes on from it instead of refusing "params set by hand"."""
    async def main():
        async with running_server(tmp_path, chunk_size=CHUNK) as kit:
            nodes, exp = await two_nodes_and_a_low_memory_run(kit, tmp_path / "ckpt")
            store = exp.checkpoints = GatedStore(tmp_path / "ckpt")
            exp.params = fresh_x()
            running = asyncio.create_task(exp.run_async())
            await serve_one_round(nodes)
            assert await asyncio.to_thread(store.saving.wait, 20), "round 1's checkpoint was never written"
            running.cancel()
            await asyncio.sleep(0.05)
            assert not running.done(), "the cancellation was delivered while the checkpoint was being written"
            store.gate.set()
            with pytest.raises(asyncio.CancelledError):
                await running
            saved_as, completed = exp._params_saved_as, exp.completed_round
            exp.rounds = 2
            again = asyncio.create_task(exp.run_async())
            sent = await serve_one_round(nodes)
            await asyncio.wait_for(again, 30)
            return saved_as, completed, sent, exp

    saved_as, completed, sent, exp = asyncio.run(asyncio.wait_for(main(), 90))
    assert (saved_as, completed) == (1, 1)
    assert all(same_bytes(x, {k: v + 1 for k, v in fresh_x().items()}) for x in sent)  # round 2 started from x_1
    assert exp.completed_round == 2
