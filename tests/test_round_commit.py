"""A round's average, checkpoint and report are one step: a cancellation (Ctrl-C, a cancelled ``run_async``)
that arrives while the average or the checkpoint is being computed waits for the whole step, so the round
is either not applied at all or applied everywhere — the aggregator's state (Scaffold's control variates),
``params``, ``completed_round``, the checkpoint, ``reports`` and ``on_round`` — and the next run goes on
exactly as an uninterrupted one. Real gRPC on loopback; the nodes answer with hand-made results."""

from __future__ import annotations

import asyncio
import gc
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from low_memory_support import ARGS, DATASET, fresh_x
from plans_lsq import LinearPlan
from server_testkit import WireNode, running_server

from fedcore.aggregators import Scaffold
from fedcore.errors import CheckpointError
from fedcore.serialization import Serializer
from fedcore.strategies import ByIds
from fedcore.tasks import TrainResult
from fedserver.checkpoints import CheckpointStore
from fedserver.experiment import Experiment
from fedserver.history import HistoryStore
from fedserver.round_model import RoundModel


class GatedScaffold(Scaffold):
    """Scaffold whose average waits for ``gate`` (set by the test) once it has started."""

    def __init__(self) -> None:
        super().__init__()
        self.started, self.gate = threading.Event(), threading.Event()

    def _result(self) -> Any:
        self.started.set()
        self.gate.wait(10)
        return super()._result()


class GatedStore(CheckpointStore):
    """A checkpoint store whose first save waits for ``gate`` once it has started."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.started, self.gate = threading.Event(), threading.Event()

    def save(self, *args: Any, **kwargs: Any) -> Any:
        self.started.set()
        self.gate.wait(10)
        return super().save(*args, **kwargs)


async def serve(node: WireNode, step: float = 1.0) -> None:
    """Answer one task with x + ``step``."""
    polled = await node.poll(wait=10)
    params = polled.assemble()["params"]
    reply = TrainResult(params={k: v + step for k, v in params.items()}, num_samples=10, num_steps=1, lr=0.01)
    await node.upload(polled.descriptor.task_id, Serializer.dumps(reply.to_payload()))


def experiment(kit: Any, name: str, folder: Path, **kwargs: Any) -> Experiment:
    exp = Experiment(LinearPlan, ARGS, rounds=2, dataset_tags=["lsq"], min_nodes=1, selection=ByIds(["wire-0"]),
                     round_timeout=30, node_wait_timeout=10, server=kit.server, progress=False,
                     checkpoint_dir=folder, name=name, **kwargs)
    exp.params = fresh_x()
    return exp


async def interrupt_when(started: threading.Event, gate: threading.Event, run: asyncio.Task[Any]) -> None:
    """Cancel ``run`` once ``started`` is set, then let the gated work go on; ``run`` must end cancelled."""
    assert await asyncio.to_thread(started.wait, 10)
    run.cancel()
    await asyncio.sleep(0.05)
    assert not run.done(), "the cancellation was delivered in the middle of the round's last step"
    gate.set()
    try:
        await run
    except asyncio.CancelledError:
        return
    raise AssertionError("run_async was cancelled but returned normally")


def test_a_cancellation_during_the_average_completes_the_round_and_the_next_run_matches(tmp_path: Path) -> None:
    async def main() -> tuple[Any, ...]:
        async with running_server(tmp_path) as kit:
            node = kit.node("wire-0")
            await node.register("wire-0", datasets=(DATASET,))
            plain = experiment(kit, "plain", tmp_path / "a", aggregator=Scaffold())
            run = asyncio.create_task(plain.run_async())
            for _ in range(2):
                await serve(node)
            await asyncio.wait_for(run, 30)

            aggregator, seen = GatedScaffold(), []
            gated = experiment(kit, "gated", tmp_path / "b", aggregator=aggregator, on_round=seen.append)
            run = asyncio.create_task(gated.run_async())
            await serve(node)
            await interrupt_when(aggregator.started, aggregator.gate, run)
            after_cancel = (gated.completed_round, [r.round for r in gated.reports], [r.round for r in seen],
                            gated.checkpoints.rounds())
            run = asyncio.create_task(gated.run_async())  # goes on with round 2
            await serve(node)
            await asyncio.wait_for(run, 30)
            return after_cancel, plain, gated, seen

    after_cancel, plain, gated, seen = asyncio.run(asyncio.wait_for(main(), 90))
    completed, reported, called_back, checkpointed = after_cancel
    assert completed == 1 and reported == [1] and called_back == [1]
    assert 1 in checkpointed
    assert [r.round for r in gated.reports] == [1, 2] and [r.round for r in seen] == [1, 2]
    a, b = plain.aggregator.state(), gated.aggregator.state()
    for key in a["server_control"]:  # c after round 2: as in the uninterrupted run
        np.testing.assert_array_equal(b["server_control"][key], a["server_control"][key])
    for key in plain.params:
        np.testing.assert_array_equal(gated.params[key], plain.params[key])


def test_a_cancellation_during_the_checkpoint_still_reports_the_round(tmp_path: Path) -> None:
    async def main() -> tuple[list[int], list[int], int]:
        async with running_server(tmp_path) as kit:
            node = kit.node("wire-0")
            await node.register("wire-0", datasets=(DATASET,))
            seen: list[Any] = []
            exp = experiment(kit, "saving", tmp_path / "c", on_round=seen.append)
            store = exp.checkpoints = GatedStore(tmp_path / "c")
            run = asyncio.create_task(exp.run_async())
            await serve(node)
            await interrupt_when(store.started, store.gate, run)
            assert exp.completed_round == 1 and 1 in store.rounds()
            assert [r.round for r in exp.reports] == [1] and [r.round for r in seen] == [1]
            again = asyncio.create_task(exp.run_async())
            await serve(node)
            reports = await asyncio.wait_for(again, 30)
            return [r.round for r in reports], [r.round for r in seen], exp.completed_round

    rounds, seen, completed = asyncio.run(asyncio.wait_for(main(), 60))
    assert rounds == [1, 2] and seen == [1, 2] and completed == 2


class FailingOnceStore(CheckpointStore):
    """A checkpoint store whose first save fails as a full disk would."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.failed = False

    def save(self, *args: Any, **kwargs: Any) -> Any:
        if not self.failed:
            self.failed = True
            raise CheckpointError("disk full (test)")
        return super().save(*args, **kwargs)


def test_a_checkpoint_that_cannot_be_written_stops_the_run_after_recording_the_round(tmp_path: Path) -> None:
    async def main() -> tuple[Any, ...]:
        async with running_server(tmp_path) as kit:
            node = kit.node("wire-0")
            await node.register("wire-0", datasets=(DATASET,))
            seen: list[Any] = []
            exp = experiment(kit, "unsaved", tmp_path / "c", on_round=seen.append, history_db=tmp_path / "h.db")
            store = exp.checkpoints = FailingOnceStore(tmp_path / "c")
            run = asyncio.create_task(exp.run_async())
            await serve(node)
            with pytest.raises(CheckpointError, match="disk full"):
                await asyncio.wait_for(run, 30)
            first = (exp.completed_round, [r.round for r in exp.reports], [r.round for r in seen], store.rounds())
            run = asyncio.create_task(exp.run_async())  # goes on with round 2 from x_1, held in memory
            await serve(node)
            await asyncio.wait_for(run, 30)
            with HistoryStore(tmp_path / "h.db") as history:
                rounds = [(r.round, r.status, r.error) for r in history.rounds(exp.history_id)]
            return first, [r.round for r in exp.reports], store.rounds(), rounds

    first, reported, checkpointed, rounds = asyncio.run(asyncio.wait_for(main(), 60))
    assert first == (1, [1], [1], [])  # recorded and reported everywhere but in a checkpoint
    assert reported == [1, 2] and 2 in checkpointed
    assert [(r, status) for r, status, _ in rounds] == [(1, "completed"), (2, "completed")]
    assert "checkpoint not written: disk full" in (rounds[0][2] or "")


class ModelProbingStore(CheckpointStore):
    """Records the bytes of x still held by live RoundModels whenever a round's checkpoint is written."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.held: list[int] = []

    def save(self, round: int, *args: Any, **kwargs: Any) -> Any:
        if round >= 1:
            gc.collect()
            models = [o for o in gc.get_objects() if type(o) is RoundModel]  # type(): no attribute lookup on odd objects
            self.held.append(sum(v.nbytes for m in models if not m.released for v in m.params().values()))
        return super().save(round, *args, **kwargs)


def test_low_memory_frees_the_round_model_before_the_checkpoint(tmp_path: Path) -> None:
    """A round that never released x (a selected node never downloaded its task) drops it once averaged: the
    checkpoint of x⁺ is written with x gone (one model less at the save's peak)."""
    async def main() -> list[int]:
        async with running_server(tmp_path) as kit:
            node = kit.node("wire-0")
            await node.register("wire-0", datasets=(DATASET,))
            await kit.node("wire-1").register("wire-1", datasets=(DATASET,))  # selected, never polls
            exp = Experiment(LinearPlan, ARGS, rounds=1, dataset_tags=["lsq"], min_nodes=1,
                             selection=ByIds(["wire-0", "wire-1"]), round_timeout=2, node_wait_timeout=10,
                             server=kit.server, progress=False, checkpoint_dir=tmp_path / "c", low_memory=True)
            exp.params = fresh_x()
            store = exp.checkpoints = ModelProbingStore(tmp_path / "c")
            run = asyncio.create_task(exp.run_async())
            await serve(node)
            await asyncio.wait_for(run, 30)
            return store.held

    assert asyncio.run(asyncio.wait_for(main(), 60)) == [0]
