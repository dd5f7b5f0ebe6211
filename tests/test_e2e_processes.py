"""End to end with real processes: a TLS FedServer + Experiment here, ``python -m fednode start`` nodes.

Nodes that must be busy mid-round run ``tests/plans_gated.py`` with a gate directory (their k-th task
waits for the file ``gate/k`` or ``gate/all``), so "killed mid-round", "joined late" and "replied late"
happen at a known point rather than after a guessed sleep.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import numpy as np
import pytest
from e2e_support import Federation, least_squares_sites, run_cli
from plans_gated import GatedLinearPlan
from plans_lsq import LinearPlan

from fedcore.aggregators import FedAverage
from fedcore.errors import CheckpointError, RoundFailedError
from fedserver.checkpoints import CheckpointStore
from fedserver.experiment import Experiment
from fedserver.history import HistoryStore
from fedserver.tasks import TaskState

ARGS = {"num_updates": 20, "lr": 0.02, "batch_size": 16, "seed": 7, "shuffle": True}
SITES = least_squares_sites()
TEST_TIMEOUT = 40.0


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=TEST_TIMEOUT))


def outcomes(report) -> dict[str, str]:
    return {o.node_id: o.outcome for o in report.outcomes}


def history_outcomes(db: Path, experiment_id: int) -> dict[int, dict[str, list[str]]]:
    """{round: {node: [outcome, ...]}} from the SQLite history, rows in arrival order ('late' included)."""
    table: dict[int, dict[str, list[str]]] = {}
    with HistoryStore(db) as history:
        for r in history.node_results(experiment_id):
            table.setdefault(r.round, {}).setdefault(r.node_id, []).append(r.outcome)
    return table


def test_node_killed_mid_round_while_quorum_holds(tmp_path: Path) -> None:
    async def scenario():
        async with Federation(tmp_path, SITES) as fed:
            fed.prepare(range(3))
            for i in range(3):
                fed.start_node(i, gate=fed.gate_dir)
            await fed.wait_registered(["site-0", "site-1", "site-2"])
            exp = Experiment(GatedLinearPlan, ARGS, aggregator=FedAverage(), rounds=3, dataset_tags=["lsq"],
                             min_nodes=2, round_timeout=2.0, node_wait_timeout=10, server=fed.server,
                             checkpoint_dir=tmp_path / "ckpt", history_db=tmp_path / "h.db", progress=False)
            running = asyncio.create_task(exp.run_async())
            try:
                for node_id in ("site-0", "site-1", "site-2"):
                    await fed.wait_task(node_id, TaskState.RUNNING, round=1)
                fed.nodes["site-2"].kill()  # busy in round 1's training step, it dies without a word
                fed.open_gate("all")
                reports = await asyncio.wait_for(running, 25)
            finally:
                running.cancel()
            return exp, reports

    exp, reports = run(scenario())
    assert [r.round for r in reports] == [1, 2, 3]
    first = outcomes(reports[0])
    assert first == {"site-0": "succeeded", "site-1": "succeeded", "site-2": "timeout"}
    dead = next(o for o in reports[0].outcomes if o.node_id == "site-2")
    assert "without activity" in dead.error
    for report in reports[1:]:
        assert report.succeeded == ["site-0", "site-1"], outcomes(report)
    table = history_outcomes(tmp_path / "h.db", exp.history_id)
    assert table[1] == {"site-0": ["succeeded"], "site-1": ["succeeded"], "site-2": ["timeout"]}
    assert all(table[k]["site-0"] == table[k]["site-1"] == ["succeeded"] for k in (2, 3))
    with HistoryStore(tmp_path / "h.db") as history:
        assert [r.status for r in history.rounds(exp.history_id)] == ["completed"] * 3
        assert history.experiment(exp.history_id).status == "completed"
    assert CheckpointStore(tmp_path / "ckpt").latest_round() == 3


def test_quorum_breaks_mid_round_then_resume_once_nodes_are_back(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"

    async def scenario():
        async with Federation(tmp_path, SITES) as fed:
            fed.prepare(range(3))
            fed.open_gate(1)  # every node's first task (round 1) trains freely; the victims' second waits
            fed.start_node(0)
            fed.start_node(1, gate=fed.gate_dir)
            fed.start_node(2, gate=fed.gate_dir)
            await fed.wait_registered(["site-0", "site-1", "site-2"])
            exp = Experiment(GatedLinearPlan, ARGS, aggregator=FedAverage(), rounds=3, dataset_tags=["lsq"],
                             min_nodes=2, round_timeout=2.0, node_wait_timeout=10, server=fed.server,
                             checkpoint_dir=ckpt, history_db=tmp_path / "h.db", progress=False)
            running = asyncio.create_task(exp.run_async())
            try:
                for node_id in ("site-1", "site-2"):
                    await fed.wait_task(node_id, TaskState.RUNNING, round=2)
                round1 = {p.name: p.read_bytes() for p in (ckpt / "round-0001").iterdir()}
                fed.nodes["site-1"].kill()
                fed.nodes["site-2"].kill()
                with pytest.raises(RoundFailedError) as failure:
                    await asyncio.wait_for(running, 20)
            finally:
                running.cancel()
            after = {p.name: p.read_bytes() for p in (ckpt / "round-0001").iterdir()}
            latest = CheckpointStore(ckpt).load_latest()  # verifies sizes and digests
            folders = sorted(p.name for p in ckpt.iterdir())

            restarted_at = time.monotonic()
            fed.start_node(1)
            fed.start_node(2)
            await fed.wait_registered(["site-1", "site-2"], newer_than=restarted_at)
            resumed = Experiment.resume(ckpt, server=fed.server, progress=False)
            reports = await asyncio.wait_for(resumed.run_async(), 20)
            return exp, str(failure.value), round1, after, latest, folders, resumed, reports

    exp, message, round1, after, latest, folders, resumed, reports = run(scenario())
    assert "round 2 failed" in message and "quorum is 2" in message
    assert "site-1 (timeout" in message and "site-2 (timeout" in message and "site-0" not in message
    assert after == round1, "the failed round must not touch the last checkpoint"
    assert latest.round == 1 and folders == ["latest.json", "round-0001"]
    assert resumed.history_id == exp.history_id
    assert [r.round for r in reports] == [2, 3]
    assert all(r.succeeded == ["site-0", "site-1", "site-2"] for r in reports)
    assert CheckpointStore(ckpt).latest_round() == 3
    with HistoryStore(tmp_path / "h.db") as history:
        assert [r.status for r in history.rounds(exp.history_id)] == ["completed"] * 3
        assert history.experiment(exp.history_id).status == "completed"


def test_node_that_joins_late_takes_part_in_later_rounds(tmp_path: Path) -> None:
    async def scenario():
        async with Federation(tmp_path, SITES) as fed:
            fed.prepare(range(3))
            fed.start_node(0, gate=fed.gate_dir)
            fed.start_node(1, gate=fed.gate_dir)
            await fed.wait_registered(["site-0", "site-1"])
            exp = Experiment(GatedLinearPlan, ARGS, aggregator=FedAverage(), rounds=3, dataset_tags=["lsq"],
                             min_nodes=2, round_timeout=5.0, node_wait_timeout=10, server=fed.server,
                             history_db=tmp_path / "h.db", progress=False)
            running = asyncio.create_task(exp.run_async())
            try:
                for node_id in ("site-0", "site-1"):
                    await fed.wait_task(node_id, TaskState.RUNNING, round=1)
                fed.start_node(2)  # round 1 is under way: the newcomer can only join from round 2 on
                await fed.wait_registered(["site-2"])
                fed.open_gate("all")
                reports = await asyncio.wait_for(running, 20)
            finally:
                running.cancel()
            return exp, reports

    exp, reports = run(scenario())
    assert [r.selected for r in reports] == [["site-0", "site-1"]] + [["site-0", "site-1", "site-2"]] * 2
    assert [r.succeeded for r in reports] == [["site-0", "site-1"]] + [["site-0", "site-1", "site-2"]] * 2
    table = history_outcomes(tmp_path / "h.db", exp.history_id)
    assert [sorted(table[k]) for k in (1, 2, 3)] == [["site-0", "site-1"]] + [["site-0", "site-1", "site-2"]] * 2
    assert table[2]["site-2"] == table[3]["site-2"] == ["succeeded"]


def test_a_node_held_past_its_round_drops_its_reply_which_is_never_applied(tmp_path: Path) -> None:
    """site-2 is held (silent: heartbeats every 10 s) past the 1.5 s round timeout; round 1 ends without
    it; only then is it let go. Its first Report after that (at the latest the final flush of its progress)
    is refused for the closed task, so the node drops its round-1 reply without uploading it (docs/protocol.md
    §8 "Closed tasks"; a node that uploaded anyway would be refused and recorded 'late': test_server_transport)
    and serves round 2."""
    from fedcore.tasks import PlanSource, TrainTask
    from fednode.datasets import DatasetRegistry
    from fednode.training import run_training

    async def scenario():
        async with Federation(tmp_path, SITES, heartbeat_interval=10.0) as fed:
            fed.prepare(range(3))
            fed.start_node(0)
            fed.start_node(1)
            fed.start_node(2, gate=fed.gate_dir)
            await fed.wait_registered(["site-0", "site-1", "site-2"])

            def release_after_round_1(report) -> None:
                if report.round == 1:
                    fed.open_gate("all")

            exp = Experiment(GatedLinearPlan, ARGS, aggregator=FedAverage(), rounds=2, dataset_tags=["lsq"],
                             min_nodes=2, round_timeout=1.5, node_wait_timeout=10, server=fed.server,
                             checkpoint_dir=tmp_path / "ckpt", history_db=tmp_path / "h.db",
                             on_round=release_after_round_1, progress=False)
            reports = await asyncio.wait_for(exp.run_async(), 25)
            return exp, reports, fed.nodes["site-2"].log()

    exp, reports, log2 = run(scenario())
    assert outcomes(reports[0]) == {"site-0": "succeeded", "site-1": "succeeded", "site-2": "timeout"}
    assert reports[1].succeeded == ["site-0", "site-1", "site-2"], "the late node serves the next round"
    assert "is over on the server (Report refused for the task: " in log2 and "no longer accepted" in log2, log2[-2000:]
    assert "nothing uploaded" in log2, log2[-2000:]
    table = history_outcomes(tmp_path / "h.db", exp.history_id)
    assert table[1] == {"site-0": ["succeeded"], "site-1": ["succeeded"], "site-2": ["timeout"]}  # no late upload
    assert table[2] == {n: ["succeeded"] for n in ("site-0", "site-1", "site-2")}

    # never applied: round 1's model is the sample-weighted mean of site-0's and site-1's replies only
    x0 = exp.initial_params()
    replies = []
    for i in range(3):
        dataset = DatasetRegistry(tmp_path / f"site-{i}" / "node.db").load(f"data-{i}")
        task = TrainTask("recompute", 1, PlanSource.from_class(GatedLinearPlan), ARGS, x0, "fedavg", {}, ["lsq"])
        replies.append(run_training(task, dataset))
    round1 = CheckpointStore(tmp_path / "ckpt").load(1).params

    def fedavg(chosen):
        total = sum(r.num_samples for r in chosen)
        return {k: sum(r.num_samples * r.params[k].astype(np.float64) for r in chosen) / total for k in x0}

    two, three = fedavg(replies[:2]), fedavg(replies)
    for name in x0:
        np.testing.assert_allclose(round1[name], two[name], rtol=1e-6, atol=1e-7)
        assert not np.allclose(round1[name], three[name], rtol=1e-3, atol=1e-4), name


def test_unapproved_plan_refused_then_approved_with_the_cli(tmp_path: Path) -> None:
    def fednode(*argv: str) -> str:
        return run_cli("fednode", *argv).stdout

    async def scenario():
        async with Federation(tmp_path, SITES) as fed:
            fed.prepare(range(2))
            for i in range(2):
                fed.start_node(i, auto_approve=False)
            await fed.wait_registered(["site-0", "site-1"])
            first = Experiment(LinearPlan, ARGS, rounds=1, dataset_tags=["lsq"], min_nodes=2, round_timeout=5,
                               node_wait_timeout=10, server=fed.server, history_db=tmp_path / "h.db",
                               checkpoint_dir=tmp_path / "ckpt-refused", progress=False)
            with pytest.raises(RoundFailedError) as refused:
                await first.run_async()
            listings, approvals = [], []
            for i in range(2):
                home = str(tmp_path / f"site-{i}")
                listings.append(await asyncio.to_thread(fednode, "plans", "list", "--status", "pending", "--home", home))
                pending = json.loads(await asyncio.to_thread(
                    fednode, "plans", "list", "--status", "pending", "--json", "--home", home))
                assert [p["name"] for p in pending] == ["LinearPlan"]
                approvals.append(await asyncio.to_thread(
                    fednode, "plans", "approve", pending[0]["sha256"][:12], "--note", "e2e test", "--home", home))
            second = Experiment(LinearPlan, ARGS, rounds=2, dataset_tags=["lsq"], min_nodes=2, round_timeout=5,
                                node_wait_timeout=10, server=fed.server, history_db=tmp_path / "h.db",
                                progress=False)
            reports = await asyncio.wait_for(second.run_async(), 20)
            return str(refused.value), first, listings, approvals, reports

    message, first, listings, approvals, reports = run(scenario())
    assert "refused" in message and "fednode plans approve" in message and "quorum is 2" in message
    assert not (tmp_path / "ckpt-refused" / "latest.json").exists()
    table = history_outcomes(tmp_path / "h.db", first.history_id)
    assert table == {1: {"site-0": ["refused"], "site-1": ["refused"]}}
    for listing in listings:
        assert "LinearPlan" in listing and "pending" in listing
    assert all("is now approved" in a for a in approvals)
    assert [r.succeeded for r in reports] == [["site-0", "site-1"]] * 2


def test_corrupted_checkpoint_is_refused_naming_the_file(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"

    async def scenario():
        async with Federation(tmp_path, SITES) as fed:
            fed.prepare(range(2))
            for i in range(2):
                fed.start_node(i)
            await fed.wait_registered(["site-0", "site-1"])
            exp = Experiment(LinearPlan, ARGS, rounds=2, dataset_tags=["lsq"], min_nodes=2, round_timeout=5,
                             node_wait_timeout=10, server=fed.server, checkpoint_dir=ckpt, progress=False)
            return await asyncio.wait_for(exp.run_async(), 20)

    reports = run(scenario())
    assert [r.round for r in reports] == [1, 2]
    Experiment.resume(ckpt, progress=False)  # intact: loads
    target = ckpt / "round-0002" / "params.msgpack"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as info:
        Experiment.resume(ckpt, progress=False)
    message = str(info.value)
    assert str(target) in message and "does not match the manifest" in message, message
