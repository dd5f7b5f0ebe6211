"""What a round leaves behind: x of a finished round goes when the next x replaces it, and no idle upload
block sits beside the sum and x⁺ when the round finalizes.

The first two were a regression at 10M params × 8 nodes (docs/performance.md, "Rounds vs Flower"): a
round model and its task payloads referred to each other, so x of every round lived until the cyclic
garbage collector's rare full pass (+3 models above idle after 4 rounds), and a timed-out task, kept to
record its late result, held the low-memory round's releaser and through it x. The checks run with the
cyclic collector off, so a reference cycle holding x shows as x still alive, every time, whatever the
collector's thresholds. The third is the upload pool's share of the same peak: an idle reply-sized block
kept through ``finalize``.
"""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from experiment_harness import federation, least_squares_sites
from low_memory_support import ARGS, DATASET, fresh_x
from plans_lsq import LinearPlan
from server_testkit import PolledTask, WireNode, running_server

from fedcore.aggregators import FedAverage
from fedcore.serialization import Serializer
from fedcore.tasks import PlanSource, TrainResult, TrainTask
from fedserver.experiment import Experiment
from fedserver.round_model import RoundModel


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=120))


@contextmanager
def no_cycle_collector() -> Iterator[None]:
    """Only reference counting frees objects inside: whatever a cycle holds stays alive."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def reply_to(polled: PolledTask) -> bytes:
    """A wire node's FedAvg reply: x + 1, 10 samples."""
    params = polled.assemble()["params"]
    return Serializer.dumps(TrainResult(params={k: v + 1 for k, v in params.items()}, num_samples=10, num_steps=1,
                                        lr=0.01).to_payload())


class AliveAtBeginRound(FedAverage):
    """FedAverage that notes, as each round begins, which earlier rounds' x are still alive somewhere."""

    def __init__(self, **config) -> None:
        super().__init__(**config)
        self.earlier: list[tuple[int, weakref.ref]] = []  # (round that started from it, one of its arrays)
        self.alive: dict[int, list[int]] = {}  # round -> rounds whose x is alive as it begins

    def begin_round(self, round_index, global_params, participants, known_nodes, **kwargs) -> None:
        self.alive[round_index] = [r for r, ref in self.earlier if ref() is not None]
        self.earlier.append((round_index, weakref.ref(next(iter(global_params.values())))))
        super().begin_round(round_index, global_params, participants, known_nodes, **kwargs)


class IdleUploadBytesAtFinalize(FedAverage):
    """FedAverage that notes what the server's upload pool holds idle when each round finalizes."""

    def __init__(self, idle_bytes: Callable[[], int], **config) -> None:
        super().__init__(**config)
        self._idle_bytes = idle_bytes
        self.at_finalize: list[int] = []

    def finalize(self) -> dict[str, np.ndarray]:
        self.at_finalize.append(self._idle_bytes())
        return super().finalize()


# -- a round model goes by reference counting ---------------------------------------------------------------
def test_a_round_model_and_its_payloads_are_freed_without_the_cycle_collector() -> None:
    with no_cycle_collector():
        x = fresh_x(big=1000)
        refs = [weakref.ref(v) for v in x.values()]
        task = TrainTask("e", 1, PlanSource.from_class(LinearPlan), {"num_updates": 1}, x)
        model = RoundModel(task, 64 << 10, reload=lambda: fresh_x(big=1000))
        payloads = [model.payload({"aggregator_state": {"n": i}}) for i in range(3)]
        model_ref = weakref.ref(model)
        del x, task, model
        assert model_ref() is not None and all(ref() is not None for ref in refs), "the payloads hold x"
        del payloads
        assert model_ref() is None, "the round model outlived its payloads"
        assert all(ref() is None for ref in refs), "x outlived its round model and payloads"


def test_a_release_still_reaches_every_payload_alive() -> None:
    reloads = []

    def reload() -> dict[str, np.ndarray]:
        reloads.append(1)
        return fresh_x(big=1000)

    task = TrainTask("e", 1, PlanSource.from_class(LinearPlan), {"num_updates": 1}, fresh_x(big=1000))
    model = RoundModel(task, 64 << 10, reload=reload)
    kept = model.payload({"aggregator_state": {"n": 0}})
    model.payload({"aggregator_state": {"n": 1}})  # dropped at once: the model must not keep it
    expected = kept.tobytes()
    assert reloads == []
    model.release()
    assert kept.tobytes() == expected and reloads == [1], "the released payload streams from a reload"


# -- x of a finished round is gone as the next round begins -------------------------------------------------------
@pytest.mark.parametrize("low_memory", [False, True])
def test_x_of_earlier_rounds_is_freed_by_reference_counting(tmp_path: Path, low_memory: bool) -> None:
    agg = AliveAtBeginRound()

    async def experiment():
        async with federation(tmp_path, least_squares_sites()) as (server, _, _):
            exp = Experiment(LinearPlan, ARGS, aggregator=agg, rounds=4, dataset_tags=["lsq"], min_nodes=3,
                             round_timeout=30, server=server, progress=False, keep_round_params=False,
                             low_memory=low_memory, checkpoint_dir=tmp_path / "ckpt")
            exp.params = exp.initial_params()
            with no_cycle_collector():
                await exp.run_async()
            return exp

    exp = run(experiment())
    assert exp.completed_round == 4 and [sorted(r.succeeded) for r in exp.reports][-1] == [f"site-{i}" for i in range(3)]
    # as round r begins only x_(r-1) (its own start) is alive: no round before it left its x behind
    assert agg.alive == {1: [], 2: [], 3: [], 4: []}


def test_a_timed_out_task_does_not_keep_the_low_memory_rounds_x(tmp_path: Path) -> None:
    """wire-2 registers and never polls: its task times out before x could be released, and the experiment
    keeps the handle (to record a late result). x of that round must still go once x⁺ replaces it."""

    async def main():
        async with running_server(tmp_path, chunk_size=64 << 10) as kit:
            nodes = [kit.node(f"wire-{i}") for i in range(3)]
            for i, node in enumerate(nodes):
                await node.register(f"wire-{i}", datasets=(DATASET,))
            exp = Experiment(LinearPlan, ARGS, rounds=1, dataset_tags=["lsq"], min_nodes=2, round_timeout=1.0,
                             server=kit.server, progress=False, low_memory=True, checkpoint_dir=tmp_path / "ckpt")
            exp.params = fresh_x(big=1000)
            refs = [weakref.ref(v) for v in exp.params.values()]
            running = asyncio.create_task(exp.run_async())
            for node in nodes[:2]:
                polled = await node.poll(wait=10)
                await node.upload(polled.descriptor.task_id, reply_to(polled))
            await running
            gc.collect()
            return exp, [ref() is not None for ref in refs]

    exp, alive = run(main())
    outcomes = {o.node_id: o.outcome for o in exp.reports[0].outcomes}
    assert outcomes == {"wire-0": "succeeded", "wire-1": "succeeded", "wire-2": "timeout"}
    assert alive == [False, False], "x of round 1 is still held after the round"


# -- no idle upload block through finalize --------------------------------------------------------------------------
def test_replies_reuse_one_upload_block_and_none_is_kept_idle_through_finalize(tmp_path: Path) -> None:
    """Two 1.2 MB replies (pooled sizes), the second sent once the first was summed and its block returned."""

    async def wait_for(condition: Callable[[], bool]) -> None:
        for _ in range(1000):
            if condition():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("condition never met")

    async def main():
        async with running_server(tmp_path, chunk_size=256 << 10) as kit:
            pool = kit.server.uploads.pool
            agg = IdleUploadBytesAtFinalize(lambda: pool.idle_bytes)
            nodes: list[WireNode] = [kit.node(f"wire-{i}") for i in range(2)]
            for i, node in enumerate(nodes):
                await node.register(f"wire-{i}", datasets=(DATASET,))
            exp = Experiment(LinearPlan, ARGS, aggregator=agg, rounds=1, dataset_tags=["lsq"], min_nodes=2,
                             round_timeout=30, server=kit.server, progress=False)
            exp.params = fresh_x(big=300_000)
            running = asyncio.create_task(exp.run_async())
            polled = [await node.poll(wait=10) for node in nodes]
            await nodes[0].upload(polled[0].descriptor.task_id, reply_to(polled[0]))
            await wait_for(lambda: pool.idle_bytes > 0)  # summed, its buffer back in the pool
            idle_between_replies = pool.idle_bytes
            await nodes[1].upload(polled[1].descriptor.task_id, reply_to(polled[1]))
            await running
            return exp, agg, idle_between_replies, pool.stats()

    exp, agg, idle_between_replies, stats = run(main())
    assert sorted(exp.reports[0].succeeded) == ["wire-0", "wire-1"]
    np.testing.assert_array_equal(exp.params["big"], fresh_x(big=300_000)["big"] + 1)
    assert idle_between_replies >= 1_200_000 and stats.reused == 1, "the second reply reused the first's block"
    assert agg.at_finalize == [0], "an idle upload block was kept beside the sum and x⁺"
    assert stats.idle_bytes == 0
