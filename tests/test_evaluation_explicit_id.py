"""``Experiment.evaluate_async`` opens its evaluation in the history once (``HistoryStore.start_evaluation``) and
records every node's outcome under that id; ``EvaluationReport.evaluation_id`` is that id (None without a
history). Real FedServer and NodeClients (tests/experiment_harness.py), real SQLite.
"""

from __future__ import annotations

import asyncio
import sqlite3

from experiment_harness import federation, least_squares_sites
from plans_lsq import LinearPlan

from fedserver.experiment import Experiment
from fedserver.history import HistoryStore

ARGS = {"num_updates": 5, "lr": 0.02, "batch_size": 16, "seed": 7, "test_ratio": 0.25}


def test_each_evaluation_has_the_id_it_opened_and_its_rows_carry_it(tmp_path) -> None:
    db = tmp_path / "history.db"

    async def main():
        async with federation(tmp_path, least_squares_sites()) as (server, _nodes, _):
            await server.wait_for_nodes(3, 30)
            exp = Experiment(LinearPlan, ARGS, rounds=1, dataset_tags=["lsq"], min_nodes=3, server=server,
                             progress=False, history_db=db)
            await exp.run_async()
            with HistoryStore(db) as history:  # another writer's evaluation of that model, in between
                other = history.start_evaluation(exp.history_id, 1)
            reports = [await exp.evaluate_async(), await exp.evaluate_async()]
            no_history = Experiment(LinearPlan, ARGS, rounds=1, dataset_tags=["lsq"], min_nodes=3, server=server,
                                    progress=False)
            no_history.params, no_history.completed_round = exp.params, 1
            return exp, other, reports, await no_history.evaluate_async()

    exp, other, reports, unrecorded = asyncio.run(asyncio.wait_for(main(), timeout=120))
    first, second = reports
    assert first.evaluation_id is not None and second.evaluation_id is not None
    assert other < first.evaluation_id < second.evaluation_id
    with HistoryStore(db) as history:
        rows = history.evaluations(exp.history_id, round=1)
    for report in reports:
        assert {(r.node_id, r.task_id) for r in rows if r.evaluation_id == report.evaluation_id} == \
               {(o.node_id, o.task_id) for o in report.outcomes}
    conn = sqlite3.connect(db)
    try:
        runs = conn.execute("SELECT id, experiment_id, round FROM evaluation_runs ORDER BY id").fetchall()
    finally:
        conn.close()
    assert runs == [(other, exp.history_id, 1), (first.evaluation_id, exp.history_id, 1),
                    (second.evaluation_id, exp.history_id, 1)], "one evaluation opened per evaluate_async"
    assert unrecorded.evaluation_id is None and len(unrecorded.succeeded) == 3
