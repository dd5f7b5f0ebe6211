"""BatchNorm running statistics through real rounds (real gRPC, real node clients): the global model carries
the persistent buffers, round 1's are the sample-weighted mean of what the nodes computed, round 2 starts
from them; Scaffold's corrections leave them out; a checkpoint written before buffers travelled resumes."""

from __future__ import annotations

import asyncio
import logging
import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from experiment_harness import federation
from plans_batchnorm import BatchNormPlan

from fedcore.aggregators import FedAverage, NodeReply, Scaffold
from fedserver.checkpoints import CheckpointStore
from fedserver.experiment import Experiment

ARGS = {"epochs": 1, "lr": 0.01, "batch_size": 16, "seed": 5, "shuffle": False}
SIZES = (40, 72, 100)  # 3, 5 and 7 batches of at most 16 (none of 1 sample: BatchNorm refuses those)
BUFFERS = ["0.running_mean", "0.running_var", "0.num_batches_tracked"]
PARAMETERS = ["0.weight", "0.bias", "1.weight", "1.bias"]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=120))


def batchnorm_sites() -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(1)
    sites = []
    for i, n in enumerate(SIZES):
        X = rng.normal(loc=50.0 + 3 * i, scale=1.0 + i, size=(n, 3))
        y = (X - 50.0) @ np.array([[1.0], [-2.0], [0.5]]) + 0.01 * rng.normal(size=(n, 1))
        sites.append((X, y))
    return sites


class Recording:
    """What each round of an aggregator saw: x at begin_round, every reply, every correction sent."""

    def __init__(self) -> None:
        self.x: dict[int, dict[str, np.ndarray]] = {}
        self.replies: dict[int, list[NodeReply]] = {}
        self.corrections: dict[int, list[list[str]]] = {}
        self.buffers: dict[int, list[str]] = {}

    def begin(self, round_index, global_params, kwargs) -> None:
        self.x[round_index] = {k: np.array(v, copy=True) for k, v in global_params.items()}
        self.buffers[round_index] = sorted(kwargs.get("buffers", ()))
        self.replies[round_index], self.corrections[round_index] = [], []
        self.round = round_index

    def reply(self, reply: NodeReply) -> None:
        params = {k: np.array(v, copy=True) for k, v in reply.params.items()}
        self.replies[self.round].append(NodeReply(reply.node_id, params, reply.num_samples, reply.num_steps))


class RecordingFedAverage(FedAverage):
    def __init__(self) -> None:
        super().__init__()
        self.seen = Recording()

    def begin_round(self, round_index, global_params, participants, known_nodes, **kwargs) -> None:
        self.seen.begin(round_index, global_params, kwargs)
        super().begin_round(round_index, global_params, participants, known_nodes, **kwargs)

    def accumulate(self, reply: NodeReply) -> None:
        self.seen.reply(reply)
        super().accumulate(reply)


class RecordingScaffold(Scaffold):
    def __init__(self, server_lr: float = 1.0) -> None:
        super().__init__(server_lr=server_lr)
        self.seen = Recording()

    def begin_round(self, round_index, global_params, participants, known_nodes, **kwargs) -> None:
        self.seen.begin(round_index, global_params, kwargs)
        super().begin_round(round_index, global_params, participants, known_nodes, **kwargs)

    def node_task_state(self, node_id: str):
        state = super().node_task_state(node_id)
        self.seen.corrections[self.seen.round].append(sorted(state["correction"]))
        return state

    def accumulate(self, reply: NodeReply) -> None:
        self.seen.reply(NodeReply(reply.node_id, reply.params, reply.num_samples, reply.num_steps))
        super().accumulate(reply)


def weighted_mean(replies: list[NodeReply], name: str) -> np.ndarray:
    total = sum(r.num_samples for r in replies)
    return sum(r.num_samples * r.params[name].astype(np.float64) for r in replies) / total


def test_initial_global_params_hold_the_persistent_buffers() -> None:
    exp = Experiment(BatchNormPlan, ARGS, rounds=1, progress=False)
    x0 = exp.initial_params()
    assert sorted(x0) == sorted(PARAMETERS + BUFFERS)
    assert sorted(exp.buffer_names) == sorted(BUFFERS)
    assert x0["0.num_batches_tracked"].dtype == np.int64 and x0["0.num_batches_tracked"].shape == ()
    np.testing.assert_array_equal(x0["0.running_var"], np.ones(3))


def test_fedavg_round_averages_the_running_statistics_and_round_2_starts_from_them(tmp_path: Path) -> None:
    sites = batchnorm_sites()
    agg = RecordingFedAverage()

    async def main():
        async with federation(tmp_path, sites, tags=("bn",)) as (server, _, _):
            exp = Experiment(BatchNormPlan, ARGS, aggregator=agg, rounds=2, dataset_tags=["bn"], min_nodes=3,
                             round_timeout=60, server=server, progress=False, checkpoint_dir=tmp_path / "ckpt")
            await exp.run_async()
            return exp

    exp = run(main())
    seen = agg.seen
    assert seen.buffers == {1: sorted(BUFFERS), 2: sorted(BUFFERS)}
    replies = seen.replies[1]
    assert sorted(r.num_samples for r in replies) == sorted(SIZES)  # one epoch: the weights differ
    assert all(sorted(r.params) == sorted(PARAMETERS + BUFFERS) for r in replies)
    x1 = seen.x[2]  # round 2 started from round 1's average
    for name in ("0.running_mean", "0.running_var", *PARAMETERS):
        np.testing.assert_allclose(x1[name], weighted_mean(replies, name), rtol=1e-14, atol=0, err_msg=name)
    assert not np.allclose(x1["0.running_mean"], 0)  # the nodes' statistics, near 50, not the initial ones
    # num_batches_tracked: each node counted its own batches from 0 ...
    counts = {r.num_samples: int(r.params["0.num_batches_tracked"]) for r in replies}
    assert counts == {n: math.ceil(n / 16) for n in SIZES}
    # ... the global one is their exact sample-weighted mean, rounded half to even: 1180 / 212 = 5.57 -> 6
    assert x1["0.num_batches_tracked"].dtype == np.int64 and int(x1["0.num_batches_tracked"]) == 6
    # round 2: every node started from the global statistics (counts go on from 6)
    counts2 = {r.num_samples: int(r.params["0.num_batches_tracked"]) for r in seen.replies[2]}
    assert counts2 == {n: 6 + math.ceil(n / 16) for n in SIZES}
    # the checkpoint holds them too, so the exported model is complete
    saved = CheckpointStore(tmp_path / "ckpt").load_latest()
    assert sorted(saved.params) == sorted(PARAMETERS + BUFFERS)
    assert saved.experiment_state["buffers"] == BUFFERS
    for name in BUFFERS:
        np.testing.assert_array_equal(saved.params[name], exp.params[name])
    module = BatchNormPlan().init_model()
    module.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in saved.params.items()})  # strict


def test_scaffold_with_batchnorm_corrects_parameters_only(tmp_path: Path) -> None:
    sites = batchnorm_sites()
    agg = RecordingScaffold(server_lr=0.5)

    async def main():
        async with federation(tmp_path, sites, tags=("bn",)) as (server, _, _):
            exp = Experiment(BatchNormPlan, ARGS, aggregator=agg, rounds=2, dataset_tags=["bn"], min_nodes=3,
                             round_timeout=60, server=server, progress=False)
            await exp.run_async()
            return exp

    exp = run(main())
    seen = agg.seen
    assert seen.corrections[1] == [sorted(PARAMETERS)] * 3 and seen.corrections[2] == [sorted(PARAMETERS)] * 3
    state = agg.state()
    assert sorted(state["server_control"]) == sorted(PARAMETERS)
    assert all(sorted(c) == sorted(PARAMETERS) for c in state["node_controls"].values())
    x0, x1, replies = seen.x[1], seen.x[2], seen.replies[1]
    # buffers: the sample-weighted mean (η_g does not apply); parameters: x + η_g · mean(y_i − x)
    np.testing.assert_allclose(x1["0.running_mean"], weighted_mean(replies, "0.running_mean"), rtol=1e-14)
    assert int(x1["0.num_batches_tracked"]) == 6
    for name in PARAMETERS:
        expected = x0[name] + 0.5 * np.mean([r.params[name] - x0[name] for r in replies], axis=0)
        np.testing.assert_allclose(x1[name], expected, rtol=1e-12, atol=1e-15, err_msg=name)
    assert sorted(exp.params) == sorted(PARAMETERS + BUFFERS)


def _old_checkpoint(source: Path, target: Path) -> None:
    """Rewrite the latest checkpoint in ``source`` as one written before buffers travelled: x without
    buffers, no ``buffers`` in experiment.json (the aggregator state held parameters only then too)."""
    latest = CheckpointStore(source).load_latest()
    params = {k: v for k, v in latest.params.items() if k not in BUFFERS}
    state = {k: v for k, v in latest.experiment_state.items() if k != "buffers"}
    CheckpointStore(target).save(latest.round, params, latest.aggregator_name, latest.aggregator_config,
                                 latest.aggregator_state, state)


@pytest.mark.parametrize("aggregator,low_memory", [("fedavg", True), ("scaffold", False)])
def test_a_checkpoint_without_buffers_resumes_from_the_plans_initial_buffers(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, aggregator: str, low_memory: bool) -> None:
    sites = batchnorm_sites()

    async def first():
        async with federation(tmp_path / "a", sites, tags=("bn",)) as (server, _, _):
            exp = Experiment(BatchNormPlan, ARGS, aggregator=Scaffold() if aggregator == "scaffold" else FedAverage(),
                             rounds=1, dataset_tags=["bn"], min_nodes=3, server=server, progress=False,
                             checkpoint_dir=tmp_path / "new")
            await exp.run_async()

    async def resumed():
        async with federation(tmp_path / "a", sites, tags=("bn",)) as (server, _, _):
            exp = Experiment.resume(tmp_path / "old", server=server, rounds=2, progress=False, low_memory=low_memory)
            x1 = dict(exp.params)
            await exp.run_async()
            return x1, exp

    (tmp_path / "a").mkdir()
    run(first())
    _old_checkpoint(tmp_path / "new", tmp_path / "old")
    with caplog.at_level(logging.INFO, logger="fedserver.experiment"):
        x1, exp = run(resumed())
    fresh = {k: v.numpy() for k, v in BatchNormPlan().init_model().state_dict().items()}
    assert sorted(x1) == sorted(PARAMETERS + BUFFERS)
    for name in BUFFERS:  # filled from the plan's freshly built model
        np.testing.assert_array_equal(x1[name], fresh[name])
    message = [r.getMessage() for r in caplog.records if "buffers" in r.getMessage()]
    assert message and "0.running_mean" in message[0] and "initial values" in message[0], message
    assert exp.completed_round == 2 and sorted(exp.params) == sorted(PARAMETERS + BUFFERS)
    latest = CheckpointStore(tmp_path / "old").load_latest()
    assert latest.round == 2 and latest.experiment_state["buffers"] == BUFFERS
    assert int(latest.params["0.num_batches_tracked"]) == 6  # counted from the filled 0, as in round 1
