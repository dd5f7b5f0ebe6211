"""ServerApp: Flower's own FedAvg for ``num-rounds`` rounds over ``num-nodes`` nodes, timed per round.

A round is timed from one ``configure_train`` to the next (the last one to the strategy's end), so it
holds sending, the nodes' work, receiving and aggregating, like fedstream's rounds. Federated
evaluation is off (``fraction_evaluate=0``): fedstream's benchmark rounds do not evaluate either.
The per-round seconds go to ``out-file`` as JSON.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fsbench import layout


class TimedFedAvg(FedAvg):
    """FedAvg that notes when each round starts."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.round_starts: list[float] = []

    def configure_train(self, server_round, arrays, config, grid):
        self.round_starts.append(time.perf_counter())
        return super().configure_train(server_round, arrays, config, grid)


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    num_params, nodes, rounds = int(cfg["num-params"]), int(cfg["num-nodes"]), int(cfg["num-rounds"])
    arrays = ArrayRecord([np.full(n, 0.01, dtype=np.float32) for n in layout(num_params)])
    strategy = TimedFedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=nodes,
                           min_available_nodes=nodes)
    strategy.start(grid=grid, initial_arrays=arrays, num_rounds=rounds)
    marks = [*strategy.round_starts, time.perf_counter()]
    out = {"round_seconds": [b - a for a, b in itertools.pairwise(marks)]}
    Path(str(cfg["out-file"])).write_text(json.dumps(out))
