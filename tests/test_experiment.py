"""Experiment rounds over real gRPC with real node clients: FedAvg, Scaffold, quorum, resume, refusals."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from experiment_harness import federation, least_squares_sites
from plans_lsq import LinearPlan

from fedcore.aggregators import FedAverage, Scaffold
from fedcore.errors import RoundFailedError
from fedserver.experiment import Experiment
from fedserver.history import HistoryStore

ARGS = {"num_updates": 20, "lr": 0.02, "batch_size": 16, "seed": 7, "shuffle": True}


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=120))


def pooled_optimum(sites) -> np.ndarray:
    X = np.concatenate([np.hstack([x, np.ones((len(x), 1))]) for x, _ in sites])
    y = np.concatenate([t for _, t in sites])
    return np.linalg.lstsq(X, y, rcond=None)[0].ravel()


def test_fedavg_rounds_history_and_checkpoints(tmp_path: Path) -> None:
    sites = least_squares_sites()

    async def main():
        async with federation(tmp_path, sites) as (server, _nodes, _):
            exp = Experiment(LinearPlan, ARGS, aggregator=FedAverage(), rounds=3, dataset_tags=["lsq"],
                             min_nodes=3, round_timeout=30, checkpoint_dir=tmp_path / "ckpt",
                             history_db=tmp_path / "history.db", server=server, progress=False)
            return await exp.run_async(), exp

    reports, exp = run(main())
    assert [r.round for r in reports] == [1, 2, 3]
    assert all(sorted(r.succeeded) == ["site-0", "site-1", "site-2"] for r in reports)
    assert reports[-1].metrics["train_loss"] < reports[0].metrics["train_loss"]
    history = HistoryStore(tmp_path / "history.db")
    rounds = history.rounds(exp.history_id)
    assert [r.status for r in rounds] == ["completed"] * 3
    results = history.node_results(exp.history_id, round=2)
    assert sorted(r.node_id for r in results) == ["site-0", "site-1", "site-2"]
    assert all(r.num_steps == 20 and r.bytes_in > 0 and r.bytes_out > 0 for r in results)
    history.close()
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.name.startswith("round-")) == [
        "round-0001", "round-0002", "round-0003"]


def test_scaffold_and_resume_give_bit_identical_params(tmp_path: Path) -> None:
    """Run 4 Scaffold rounds; separately run 2, stop, resume from the checkpoint for 2 more: same bytes."""
    sites = least_squares_sites()

    async def full():
        async with federation(tmp_path / "a", sites) as (server, _, _):
            exp = Experiment(LinearPlan, ARGS, aggregator=Scaffold(server_lr=1.0), rounds=4,
                             dataset_tags=["lsq"], min_nodes=3, server=server, progress=False,
                             checkpoint_dir=tmp_path / "a" / "ckpt")
            await exp.run_async()
            return exp.params

    async def interrupted():
        async with federation(tmp_path / "b", sites) as (server, _, _):
            exp = Experiment(LinearPlan, ARGS, aggregator=Scaffold(server_lr=1.0), rounds=2,
                             dataset_tags=["lsq"], min_nodes=3, server=server, progress=False,
                             checkpoint_dir=tmp_path / "b" / "ckpt")
            await exp.run_async()
        async with federation(tmp_path / "b", sites) as (server, _, _):
            resumed = Experiment.resume(tmp_path / "b" / "ckpt", server=server, rounds=4, progress=False)
            assert resumed.completed_round == 2
            await resumed.run_async()
            return resumed.params

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = run(full())
    b = run(interrupted())
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype
        assert a[name].tobytes() == b[name].tobytes(), name


def test_unapproved_plan_is_refused_and_quorum_breaks(tmp_path: Path) -> None:
    sites = least_squares_sites()

    async def main():
        async with federation(tmp_path, sites, auto_approve=False) as (server, nodes, _):
            exp = Experiment(LinearPlan, ARGS, rounds=1, dataset_tags=["lsq"], min_nodes=2, server=server,
                             progress=False, checkpoint_dir=tmp_path / "ckpt", history_db=tmp_path / "h.db")
            with pytest.raises(RoundFailedError) as info:
                await exp.run_async()
            return str(info.value), exp, nodes

    message, exp, nodes = run(main())
    assert "quorum is 2" in message and "refused" in message and "fednode plans approve" in message
    assert not (tmp_path / "ckpt" / "latest.json").exists()
    pending = [p.name for node in nodes for p in node.approvals.list(status="pending")]
    assert len(pending) >= 2 and set(pending) == {"LinearPlan"}, "each refusing node keeps the plan for review"
    history = HistoryStore(tmp_path / "h.db")
    assert history.rounds(exp.history_id)[0].status == "failed"
    assert {r.outcome for r in history.node_results(exp.history_id)} == {"refused"}
    history.close()


def test_scaffold_converges_to_the_pooled_optimum(tmp_path: Path) -> None:
    sites = least_squares_sites()
    args = {**ARGS, "num_updates": 30, "lr": 0.01, "batch_size": 80, "shuffle": False}

    async def main(aggregator):
        async with federation(tmp_path / aggregator.name, sites) as (server, _, _):
            exp = Experiment(LinearPlan, args, aggregator=aggregator, rounds=25, dataset_tags=["lsq"],
                             min_nodes=3, server=server, progress=False)
            await exp.run_async()
            return np.concatenate([exp.params["coef"].ravel(), exp.params["intercept"].ravel()])

    for name in ("scaffold", "fedavg"):
        (tmp_path / name).mkdir()
    optimum = pooled_optimum(sites)
    scaffold = run(main(Scaffold(server_lr=1.0)))
    fedavg = run(main(FedAverage()))
    err_s = np.linalg.norm(scaffold - optimum) / np.linalg.norm(optimum)
    err_f = np.linalg.norm(fedavg - optimum) / np.linalg.norm(optimum)
    assert err_s < 0.02, err_s
    assert err_s < err_f / 2, (err_s, err_f)
