"""bfloat16 torch models across the wire: get -> float32 -> Serializer -> set, and real rounds.

numpy has no bfloat16, so weights travel as float32 (:func:`fedcore.models.weights_to_numpy`) and
``TorchModel.set_weights`` narrows them back (round to nearest even; exact for values that were bfloat16).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import torch
from experiment_harness import federation, least_squares_sites
from plans_bf16 import BF16LinearPlan

from fedcore.aggregators import FedAverage
from fedcore.models import TorchModel, weights_to_numpy
from fedcore.serialization import Serializer
from fedserver.experiment import Experiment

ARGS = {"num_updates": 10, "lr": 0.02, "batch_size": 16, "seed": 3}


def _bits(tensor: torch.Tensor) -> np.ndarray:
    """The raw element bits (bfloat16 through its int16 view)."""
    tensor = tensor.detach().contiguous()
    return (tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor).numpy().copy()


def test_bfloat16_round_trip_through_the_serializer_is_exact() -> None:
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 2),
                                 torch.nn.BatchNorm1d(2)).to(torch.bfloat16)
    model = TorchModel(module)
    sent = model.get_weights(exclude_buffers=False)
    wire = Serializer.loads(Serializer.dumps(weights_to_numpy(sent)))
    assert {a.dtype for a in wire.values() if a.dtype.kind == "f"} == {np.dtype(np.float32)}

    other = TorchModel(torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 2),
                                           torch.nn.BatchNorm1d(2)).to(torch.bfloat16))
    module(torch.ones(4, 5, dtype=torch.bfloat16))  # a training-mode pass: running stats and the 0-d counter move
    sent = model.get_weights(exclude_buffers=False)
    wire = Serializer.loads(Serializer.dumps(weights_to_numpy(sent)))
    assert wire["3.num_batches_tracked"].shape == () and wire["3.num_batches_tracked"] == 1
    other.set_weights(wire, exclude_buffers=False)
    got = other.get_weights(exclude_buffers=False)
    for name, tensor in sent.items():
        assert got[name].dtype == tensor.dtype, name
        np.testing.assert_array_equal(_bits(got[name]), _bits(tensor), err_msg=name)  # bit for bit


def test_fedavg_rounds_with_a_bfloat16_plan(tmp_path: Path) -> None:
    """Two real nodes (real gRPC, real node handler) train a bfloat16 plan; FedAvg aggregates the float32
    wire form; the next round's set_weights narrows the float32 global model into the bfloat16 module."""
    sites = least_squares_sites(n_sites=2)

    async def main():
        async with federation(tmp_path, sites) as (server, _, _):
            exp = Experiment(BF16LinearPlan, ARGS, aggregator=FedAverage(), rounds=3, dataset_tags=["lsq"],
                             min_nodes=2, round_timeout=30, server=server, progress=False)
            return await exp.run_async(), exp

    reports, exp = asyncio.run(asyncio.wait_for(main(), 120))
    assert [sorted(r.succeeded) for r in reports] == [["site-0", "site-1"]] * 3, [r.outcomes for r in reports]
    assert reports[-1].metrics["train_loss"] < reports[0].metrics["train_loss"]
    final = exp.params
    assert {a.dtype for a in final.values()} == {np.dtype(np.float32)}
    # the replies are bfloat16 widened to float32, but their weighted mean is any float32: the nodes
    # narrow it at the start of the next round, as here
    module = BF16LinearPlan().init_model()
    TorchModel(module).set_weights(final)
    np.testing.assert_array_equal(module.weight.detach().float().numpy(),
                                  torch.from_numpy(final["weight"]).to(torch.bfloat16).float().numpy())
