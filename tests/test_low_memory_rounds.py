"""``Experiment(low_memory=True)``: x released once every node has its task, reloaded exactly when needed.

Real gRPC on loopback, real node clients (or raw wire nodes), real checkpoint files. What is pinned: the
same parameters bit for bit as without the option; x really gone from memory at the end of each round
(weak references die); a failed round leaves ``params`` = x exactly and the rerun completes; a download
resumed after the release gets the announced bytes; the option's preconditions are clear errors.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
from experiment_harness import federation, least_squares_sites
from low_memory_support import ARGS, same_bytes
from plans_lsq import LinearPlan
from server_testkit import running_server

from fedcore.aggregators import FedAverage, NodeReply, Scaffold
from fedcore.errors import ExperimentError, RoundFailedError
from fedcore.serialization import Serializer
from fedcore.tasks import PlanSource, TrainResult
from fedcore.wire import DatasetInfo
from fedserver.checkpoints import CheckpointStore
from fedserver.experiment import Experiment
from fedserver.history import HistoryStore

ROOT = Path(__file__).resolve().parents[1]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=120))


class WatchingFedAverage(FedAverage):
    """FedAverage that notes, at each reply, whether the arrays in ``watched`` are still alive somewhere."""

    def __init__(self, **config) -> None:
        super().__init__(**config)
        self.watched: list[weakref.ref] = []
        self.alive_at_reply: list[tuple[int, bool]] = []  # (round, any watched array alive)

    def watch(self, params: dict[str, np.ndarray]) -> None:
        self.watched = [weakref.ref(value) for value in params.values()]

    def _add(self, reply: NodeReply) -> None:
        assert self._round is not None
        self.alive_at_reply.append((self._round.index, any(ref() is not None for ref in self.watched)))
        super()._add(reply)


def alive_at_last_reply(agg: WatchingFedAverage) -> dict[int, bool]:
    return dict(agg.alive_at_reply)  # the last entry of each round wins


# -- preconditions ---------------------------------------------------------------------------------------
def test_low_memory_needs_checkpoints_an_aggregator_without_x_and_no_kept_rounds(tmp_path: Path) -> None:
    with pytest.raises(ExperimentError, match="checkpoint_dir"):
        Experiment(LinearPlan, ARGS, rounds=1, low_memory=True)
    with pytest.raises(ExperimentError, match="Scaffold does"):
        Experiment(LinearPlan, ARGS, rounds=1, low_memory=True, aggregator=Scaffold(), checkpoint_dir=tmp_path)
    with pytest.raises(ExperimentError, match="keep_round_params=True"):
        Experiment(LinearPlan, ARGS, rounds=1, low_memory=True, checkpoint_dir=tmp_path, keep_round_params=True)
    exp = Experiment(LinearPlan, ARGS, rounds=1, low_memory=True, checkpoint_dir=tmp_path)
    assert exp.keep_round_params is False and Experiment(LinearPlan, ARGS, rounds=1).keep_round_params is True
    assert not FedAverage.keeps_global_params and Scaffold.keeps_global_params


# -- same numbers, x gone ----------------------------------------------------------------------------------
@pytest.mark.parametrize("accumulator", ["float64", "param_dtype"])
def test_low_memory_gives_the_same_params_and_drops_x_during_each_round(tmp_path: Path, accumulator: str) -> None:
    sites = least_squares_sites()

    async def experiment(folder: Path, low_memory: bool):
        folder.mkdir()
        agg = WatchingFedAverage(accumulator=accumulator)
        async with federation(folder, sites) as (server, _, _):
            exp = Experiment(LinearPlan, ARGS, aggregator=agg, rounds=3, dataset_tags=["lsq"], min_nodes=3,
                             round_timeout=30, server=server, progress=False, low_memory=low_memory,
                             checkpoint_dir=folder / "ckpt", on_round=lambda report: agg.watch(report.params))
            exp.params = exp.initial_params()
            agg.watch(exp.params)
            reports = await exp.run_async()
        return exp, reports, agg

    normal, _, normal_agg = run(experiment(tmp_path / "normal", False))
    low, low_reports, low_agg = run(experiment(tmp_path / "low", True))
    if accumulator == "float64":  # order-independent sums: bit for bit
        assert same_bytes(normal.params, low.params)
    else:  # float32 sums: the last bits follow the order replies arrived in, in either mode
        for key, value in normal.params.items():
            np.testing.assert_allclose(low.params[key], value, rtol=4 * 2.0**-24, atol=0)
    assert low_reports[-1].params is low.params and [r.params for r in low_reports[:-1]] == [{}, {}]
    assert [sorted(r.succeeded) for r in low_reports] == [["site-0", "site-1", "site-2"]] * 3
    # every node replied, so every node had downloaded x: the low-memory round no longer held it
    assert alive_at_last_reply(normal_agg) == {1: True, 2: True, 3: True}  # the probe sees a held x
    assert alive_at_last_reply(low_agg) == {1: False, 2: False, 3: False}
    store = CheckpointStore(tmp_path / "low" / "ckpt")
    assert store.rounds() == [0, 1, 2, 3]  # x_0 was checkpointed before round 1, to be reloadable
    assert same_bytes(store.load_params(3), low.params)
    assert CheckpointStore(tmp_path / "normal" / "ckpt").rounds() == [1, 2, 3]
    resumed = Experiment.resume(tmp_path / "low" / "ckpt")  # the option is part of the checkpointed state
    assert resumed.low_memory and resumed.completed_round == 3 and same_bytes(resumed.params, low.params)


# -- a failed round after the release ------------------------------------------------------------------------
def test_a_round_failing_after_the_release_restores_x_exactly_and_reruns(tmp_path: Path) -> None:
    """site-2 downloads its task and refuses it (plan not approved): quorum 3 missed after x was released."""
    sites = least_squares_sites()
    plan = PlanSource.from_class(LinearPlan)

    async def experiment(folder: Path, low_memory: bool):
        folder.mkdir()
        async with federation(folder, sites, auto_approve=False) as (server, nodes, _):
            for node in nodes[:2]:
                node.approvals.approve(node.approvals.submit(plan.source, plan.name).sha256)
            exp = Experiment(plan, ARGS, rounds=2, dataset_tags=["lsq"], min_nodes=3, round_timeout=30,
                             server=server, progress=False, low_memory=low_memory, checkpoint_dir=folder / "ckpt",
                             history_db=folder / "history.db")
            x0 = exp.initial_params()
            exp.params = {k: v.copy() for k, v in x0.items()}
            given = exp.params
            with pytest.raises(RoundFailedError, match="site-2 \\(refused"):
                await exp.run_async()
            after_failure = exp.params
            nodes[2].approvals.approve(nodes[2].approvals.list(status="pending")[0].sha256)
            await exp.run_async()
            return exp, x0, given, after_failure

    normal, _, normal_given, normal_after = run(experiment(tmp_path / "normal", False))
    low, x0, low_given, low_after = run(experiment(tmp_path / "low", True))
    assert normal_after is normal_given  # without the option x simply stayed
    assert low_after is not low_given  # released during the round, reloaded from the checkpoint...
    assert same_bytes(low_after, x0)  # ...bit for bit
    assert low.completed_round == 2 and same_bytes(low.params, normal.params)
    history = HistoryStore(tmp_path / "low" / "history.db")
    assert [r.status for r in history.rounds(low.history_id)] == ["completed", "completed"]  # round 1 rerun
    history.close()


def test_a_reload_that_is_not_x_is_refused_and_said_so(tmp_path: Path) -> None:
    """Round 1's checkpoint replaced behind the experiment's back, then round 2 fails: x cannot be restored."""
    sites = least_squares_sites()
    plan = PlanSource.from_class(LinearPlan)

    async def main():
        async with federation(tmp_path, sites, auto_approve=False) as (server, nodes, _):
            for node in nodes:
                node.approvals.approve(node.approvals.submit(plan.source, plan.name).sha256)
            exp = Experiment(plan, ARGS, rounds=1, dataset_tags=["lsq"], min_nodes=3, round_timeout=30,
                             server=server, progress=False, low_memory=True, checkpoint_dir=tmp_path / "ckpt")
            await exp.run_async()
            checkpoint = exp.checkpoints.load(1)
            other = {k: v + np.ones_like(v) for k, v in checkpoint.params.items()}
            exp.checkpoints.save(1, other, checkpoint.aggregator_name, checkpoint.aggregator_config,
                                 checkpoint.aggregator_state, checkpoint.experiment_state)
            nodes[2].approvals.reject(plan.sha256)
            exp.rounds = 2
            with pytest.raises(RoundFailedError) as info:
                await exp.run_async()
            return info.value, exp

    error, exp = run(main())
    notes = getattr(error, "__notes__", [])
    assert any("could not be restored" in n and "not the one this round started from" in n for n in notes), notes
    assert exp.params is None and exp.completed_round == 1


# -- a download resumed after the release ---------------------------------------------------------------------
def test_a_download_resumed_after_the_release_gets_the_announced_bytes(tmp_path: Path) -> None:
    chunk = 64 << 10
    dataset = DatasetInfo(name="d", tags=("lsq",), num_samples=10, shape=(3,), dtype="float32", format="npz")

    async def main():
        async with running_server(tmp_path, chunk_size=chunk) as kit:
            nodes = [kit.node(f"wire-{i}") for i in range(2)]
            for i, node in enumerate(nodes):
                await node.register(f"wire-{i}", datasets=(dataset,))
            exp = Experiment(LinearPlan, ARGS, rounds=1, dataset_tags=["lsq"], min_nodes=2, round_timeout=30,
                             server=kit.server, progress=False, low_memory=True, checkpoint_dir=tmp_path / "ckpt")
            rng = np.random.default_rng(3)
            x = {"coef": rng.standard_normal((3, 1)).astype(np.float32),
                 "big": rng.standard_normal(200_000).astype(np.float32)}
            expected_x = {k: v.copy() for k, v in x.items()}
            refs = [weakref.ref(v) for v in x.values()]
            exp.params = x
            del x
            running = asyncio.create_task(exp.run_async())
            first = [await node.poll(wait=10) for node in nodes]
            assert all(p.descriptor is not None and len(p.chunks) > 4 for p in first)
            for _ in range(500):  # the server notes the last download right after sending its last chunk
                if all(ref() is None for ref in refs):
                    break
                await asyncio.sleep(0.01)
            assert all(ref() is None for ref in refs), "x still held after every node downloaded it"
            task_id = first[0].descriptor.task_id
            resumed = await nodes[0].poll(wait=1, resume_task_id=task_id, resume_offset=2 * chunk)
            again = await nodes[0].poll(wait=1, resume_task_id=task_id, resume_offset=0)
            for polled in first:
                result = polled.assemble()
                reply = TrainResult(params={k: v + 1 for k, v in result["params"].items()}, num_samples=10,
                                    num_steps=1, lr=0.01)
                await nodes[first.index(polled)].upload(polled.descriptor.task_id,
                                                        Serializer.dumps(reply.to_payload()))
            await running
            return first, resumed, again, expected_x, exp

    first, resumed, again, expected_x, exp = run(main())
    assert resumed.descriptor.payload.sha256 == first[0].descriptor.payload.sha256
    assert resumed.chunks == first[0].chunks[2:]
    assert again.chunks == first[0].chunks
    assert same_bytes(again.assemble()["params"], expected_x)
    assert same_bytes(exp.params, {k: v + 1 for k, v in expected_x.items()})


# -- the memory it saves ------------------------------------------------------------------------------------
def test_a_big_model_round_holds_about_two_models_with_low_memory(tmp_path: Path) -> None:
    """50M float32 params (200 MB), 2 node processes, uploads one at a time, param_dtype sum.

    Without the option the peak above idle is x + sum + one upload, all three written in full, plus gRPC
    buffers and heap slack: always above 3 models (3.2-3.6 measured). With it x is gone before the uploads
    are summed: 2.3-2.6 measured at 50M (up to 2.8 at 25M, where the buffers weigh twice as much). The
    bound is the issue's target, which the option must meet and the normal mode cannot.
    """
    params = 50_000_000
    out = tmp_path / "big.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_big_model.py"), "--params", str(params), "--low-memory",
           "--upload-buffer", str(4 * params), "--timeout", "120", "--json", str(out)]
    proc = subprocess.run(cmd, check=False, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["mode"] == "low_memory" and result["aggregated"] == 2  # and the script checked the values
    above_idle = (result["server_peak_rss_gb"] - result["server_idle_rss_gb"]) / result["model_gb"]
    assert above_idle < 3.0, result
