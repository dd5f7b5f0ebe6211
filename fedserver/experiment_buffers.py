"""The persistent buffers of an Experiment's global model: which entries of x are buffers, and x completed
with them when a checkpoint (or ``params`` set by hand) predates their federation.

The global model x is the plan's whole federated state, ``TrainingPlan.get_model_params()``: its parameters and
its persistent buffers (BatchNorm's ``running_mean``, ``running_var``, ``num_batches_tracked``). The aggregator
must know which entries are buffers (they are averaged by samples, and Scaffold keeps no control variate
for them): the Experiment learns their names from the plan's freshly built model with x_0, keeps them in
every checkpoint (``experiment.json``: ``"buffers"``) and hands them to each round.

A checkpoint written before buffers travelled has no ``"buffers"`` and an x without them. Resuming it builds
the plan's model once (as a fresh run does for x_0) and fills the missing buffers with its initial values,
saying so in the log: exactly what every node started each round from then, so the run goes on as it would
have, and its next checkpoint holds the buffers. A plan without buffers (numpy plans) changes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedcore.errors import CheckpointError
from fedcore.models import weights_to_numpy
from fedcore.plans.loader import load_plan_class
from fedcore.tasks import PlanSource
from fedcore.training_args import TrainingArgs
from fedserver.checkpoints import EXPERIMENT, Checkpoint

__all__ = ["ModelState", "checkpoint_model_state", "checkpointed_buffer_names", "complete_with_buffers",
           "initial_state"]

log = logging.getLogger("fedserver.experiment")  # the Experiment's records, under its logger

#: The key of ``experiment.json`` that names the buffers.
BUFFERS_KEY = "buffers"


@dataclass(frozen=True)
class ModelState:
    """x (numpy arrays, parameters and buffers), the names of its buffers, and the buffers filled in (if any)."""

    params: dict[str, np.ndarray]
    buffer_names: list[str]
    filled: list[str]


def initial_state(plan: PlanSource, training_args: TrainingArgs, model_args: Mapping[str, Any]) -> ModelState:
    """x_0, the plan's freshly initialised model (seeded by ``training_args['seed']``), and its buffer names."""
    built = load_plan_class(plan)()
    built.model_args = dict(model_args)
    built.post_init(training_args)
    return ModelState(weights_to_numpy(built.get_model_params()), built.model.buffer_names(), [])


def complete_with_buffers(params: Mapping[str, np.ndarray], plan: PlanSource, training_args: TrainingArgs,
                          model_args: Mapping[str, Any], source: str) -> ModelState:
    """``params`` with every persistent buffer of the plan's model, those it lacks taken from a freshly built
    model (logged, naming ``source``: where ``params`` came from). Its other entries are left as they are (a
    mismatch is the nodes' to report, as for any x)."""
    fresh = initial_state(plan, training_args, model_args)
    missing = [name for name in fresh.buffer_names if name not in params]
    if not missing:
        return ModelState(dict(params), fresh.buffer_names, [])
    log.info("%s holds no values for the plan's buffers %s (a model from before buffers were federated): they "
             "start from the plan's initial values, as every round's training did then", source, missing)
    completed = {name: params[name] if name in params else fresh.params[name] for name in fresh.params}
    completed.update({name: value for name, value in params.items() if name not in completed})
    return ModelState(completed, fresh.buffer_names, missing)


def checkpointed_buffer_names(state: Mapping[str, Any], params: Mapping[str, np.ndarray], path: Path) -> list[str] | None:
    """The buffer names a checkpoint's experiment state (read from ``path``) holds; None when it predates them.

    Raises:
        CheckpointError: ``"buffers"`` is not a list of names, or names an entry the checkpoint's x lacks.
    """
    names = state.get(BUFFERS_KEY)
    if names is None:
        return None
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise CheckpointError(f"{path}: {BUFFERS_KEY!r} must be a list of buffer names, got {names!r}"[:300])
    absent = [name for name in names if name not in params]
    if absent:
        raise CheckpointError(f"{path}: {BUFFERS_KEY!r} names {absent}, which the checkpoint's params do not hold")
    return list(names)


def checkpoint_model_state(checkpoint: Checkpoint, plan: PlanSource, training_args: TrainingArgs,
                           model_args: Mapping[str, Any]) -> ModelState:
    """The checkpoint's x and buffer names; for a checkpoint from before buffers travelled, x completed with the
    plan's initial buffers (``filled`` names them: x is then no longer what the checkpoint holds)."""
    names = checkpointed_buffer_names(checkpoint.experiment_state, checkpoint.params, checkpoint.folder / EXPERIMENT)
    if names is not None:
        return ModelState(checkpoint.params, names, [])
    return complete_with_buffers(checkpoint.params, plan, training_args, model_args, f"checkpoint {checkpoint.folder}")
