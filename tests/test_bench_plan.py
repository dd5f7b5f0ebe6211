"""benchmarks/rounds_plan.py: the round benchmark's plan returns the received weights + 1e-3, without copies."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from fedcore.plans import ArrayDataset
from fedcore.serialization import Serializer
from fedcore.tasks import PlanSource, TrainTask
from fednode.training import run_training

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from rounds_plan import BenchPlan, layout

ARGS = {"num_updates": 1, "batch_size": 1, "lr": 1e-3, "shuffle": False}


def test_layout_splits_exactly_num_params_over_four_arrays() -> None:
    assert layout(1_000_003) == {"layer0": 250_003, "layer1": 250_000, "layer2": 250_000, "layer3": 250_000}
    assert sum(layout(50_000_000).values()) == 50_000_000


def test_one_step_adds_1e_3_to_the_received_arrays_in_place() -> None:
    params = {name: np.full(n, 0.5, dtype=np.float32) for name, n in layout(1001).items()}
    task = TrainTask("exp", 1, PlanSource.from_class(BenchPlan), ARGS, params, model_args={"num_params": 1001})
    # as a node gets it: decoded zero-copy from its (writable) download buffer
    received = TrainTask.from_payload(Serializer.loads(bytearray(Serializer.dumps(task.to_payload()))))
    result = run_training(received, ArrayDataset(np.zeros((2, 1), np.float32), np.zeros(2, np.float32)))
    assert result.num_steps == 1 and result.num_samples == 1
    for name, value in result.params.items():
        assert value is received.params[name]  # the reply is the download buffer's own arrays: no copy
        expected = params[name].copy()
        expected[0] += np.float32(1e-3)
        np.testing.assert_array_equal(value, expected)
