"""``GlobalParams``: an Experiment's global model x (``params``), the checkpoint known to hold it, and
``low_memory``'s release and reload of x during a round.

``low_memory=True`` (FedAvg; needs ``checkpoint_dir``) keeps the global model x out of memory for most of
a round: x is released once every selected node has downloaded its task, and reloaded from the checkpoint
that holds it — verified bit for bit against the digest of what the nodes were sent — when a node resumes
a download or the round fails (``params`` is x again after a failed round, and ``run()`` reruns it).
The server's peak goes from x + sum + one upload to sum + one upload; a failed round costs a checkpoint
read. A round interrupted after the release (Ctrl-C, a cancelled ``run_async``) does not wait for that
read: ``params`` stays None, the checkpoint holds x, and ``run()`` (which reloads it) or
``Experiment.resume(checkpoint_dir)`` goes on from there. A first round, or ``params`` set by hand, is
checkpointed as round ``completed_round`` (round 0 for a fresh run) before it starts; when that round
already has a checkpoint (``params`` set by hand on a resumed run), the run is refused before anything
starts rather than overwrite that round's own checkpoint: its model is the record of a completed round,
and saving the hand-set x under another name would leave ``resume()`` two candidates for "after round k".

One exception: x resumed from a checkpoint written before buffers were federated is that checkpoint's model
completed with the plan's initial buffers (:mod:`fedserver.experiment_buffers`); it is saved over that round's
checkpoint, which it supersedes (``_buffers_filled_round``).

The invariant: ``_params_saved_as`` is the round of a checkpoint that holds exactly ``params`` (None when
none is known to: x was set by hand, or a round's average is not checkpointed yet). Setting ``params``
clears it; saving a checkpoint of x sets it. While a low-memory round runs, ``params`` is None and the
round's :class:`~fedserver.round_model.RoundModel` holds the only reference to x, reloading it from round
``_params_saved_as``'s checkpoint when it is needed again.

A mixin of :class:`~fedserver.experiment.Experiment`, whose ``checkpoints``, ``aggregator``,
``completed_round``, ``low_memory`` and ``reports`` it uses; kept apart so the round loop reads without the
bookkeeping of where x is.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedcore.errors import ExperimentError, FedstreamError, LowMemoryAggregatorError
from fedserver.experiment_state import experiment_state
from fedserver.round_model import RoundModel

if TYPE_CHECKING:
    from fedcore.aggregators import Aggregator
    from fedserver.checkpoints import CheckpointStore
    from fedserver.rounds import RoundReport

log = logging.getLogger("fedserver.experiment")  # the Experiment's records, under its logger as before the split


def check_low_memory_config(aggregator: Aggregator, checkpoint_dir: str | Path | None,
                            keep_round_params: bool | None) -> None:
    """Refuse a ``low_memory=True`` configuration that cannot keep x out of memory: no ``checkpoint_dir`` to
    reload it from, an aggregator that keeps x itself (Scaffold), or ``keep_round_params=True``."""
    if checkpoint_dir is None:
        raise ExperimentError("low_memory=True reloads the global model from the last checkpoint: "
                              "give checkpoint_dir")
    if aggregator.keeps_global_params:
        raise LowMemoryAggregatorError(
            f"low_memory=True needs an aggregator that does not keep the global model during a round; "
            f"{type(aggregator).__name__} does (FedAverage does not)")
    if keep_round_params:
        raise ExperimentError("keep_round_params=True keeps every round's model in memory; with "
                              "low_memory=True leave it None (False)")


class GlobalParams:
    """Mixin: ``params`` and where x is kept between and during rounds (module docstring)."""

    # provided by Experiment
    checkpoints: CheckpointStore | None
    aggregator: Aggregator
    completed_round: int
    low_memory: bool
    reports: list[RoundReport]
    _params: dict[str, np.ndarray] | None
    _params_saved_as: int | None  # round of the checkpoint known to hold exactly ``params``
    _buffers_filled_round: int | None  # round of a checkpoint without buffers that ``params`` completes

    @property
    def params(self) -> dict[str, np.ndarray] | None:
        """The global model x: after the last completed round, or as set (None during a low-memory round)."""
        return self._params

    @params.setter
    def params(self, value: dict[str, np.ndarray] | None) -> None:
        self._params = value
        self._params_saved_as = None  # no checkpoint is known to hold it
        self._buffers_filled_round = None

    async def _reload_released_params(self) -> None:
        """x back in ``params`` from its checkpoint (in a worker thread) if a low-memory round was interrupted
        after releasing it."""
        if self._params is None and self._params_saved_as is not None:
            assert self.checkpoints is not None
            self._params = await asyncio.to_thread(self.checkpoints.load_params, self._params_saved_as)

    def _check_params_checkpointable(self) -> None:
        """Refuse ``params`` that no checkpoint holds when round ``completed_round`` already has one (module
        docstring: it would be overwritten)."""
        if self._params_saved_as is not None or self._buffers_filled_round == self.completed_round:
            return  # the latter: round k's checkpoint predates buffers; x is it with them added, saved over it
        assert self.checkpoints is not None
        if self.completed_round in self.checkpoints.rounds():
            k = self.completed_round
            raise ExperimentError(
                f"low_memory=True saves the global model before a round to reload it from there, as round {k}; "
                f"params were set by hand, and {self.checkpoints.directory} already holds round {k}'s own "
                f"checkpoint, which this would overwrite: run without setting params (round {k}'s model), or "
                "start a new experiment with another checkpoint_dir")

    def _checkpoint_params(self) -> None:
        """Make sure a checkpoint holds exactly ``params`` (saved as round ``completed_round`` if none does;
        refused if that round has a checkpoint already)."""
        if self._params_saved_as is not None:
            return
        self._check_params_checkpointable()
        assert self.checkpoints is not None and self.params is not None
        self.checkpoints.save(self.completed_round, self.params, self.aggregator.name, self.aggregator.config(),
                              self.aggregator.state(), self._experiment_state())
        self._params_saved_as = self.completed_round
        log.info("global model checkpointed as round %d (low_memory reloads it from there)", self.completed_round)

    def _experiment_state(self) -> dict[str, Any]:
        return experiment_state(self)  # type: ignore[arg-type]  # self is an Experiment

    def _reloader(self) -> Callable[[], dict[str, np.ndarray]] | None:
        """With low_memory, how the round model reloads x: from the checkpoint that holds it."""
        if not self.low_memory:
            return None
        store, saved_as = self.checkpoints, self._params_saved_as
        assert store is not None and saved_as is not None
        return lambda: store.load_params(saved_as)

    def _hand_over_params(self) -> bool | None:
        """With low_memory, let the round model hold the only reference to x.

        Returns None without low_memory, else whether the last report held x (to give it back on failure).
        """
        if not self.low_memory:
            return None
        report_held = bool(self.reports) and self.reports[-1].params is self._params
        if report_held:
            self.reports[-1] = replace(self.reports[-1], params={})
        self._params = None  # not the setter: the checkpoint still holds x
        return report_held

    async def _take_back_params(self, model: RoundModel, report_held: bool, exc: BaseException) -> None:
        """After a failed round: x again in ``params`` (and the last report), reloaded (in a worker thread)
        if it was released."""
        try:
            params = await model.params_async()
        except FedstreamError as reload_error:
            exc.add_note(f"the global model could not be restored after the failed round: {reload_error}")
            log.error("round=%d: cannot restore the global model: %s", model.round, reload_error)
            return
        self._params = params
        if report_held:
            self.reports[-1] = replace(self.reports[-1], params=params)
