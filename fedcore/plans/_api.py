"""``TrainingPlan``: the researcher's training code, and the one local training loop every plan runs.

A researcher subclasses :class:`~fedcore.plans.NumpyTrainingPlan` or :class:`~fedcore.plans.TorchTrainingPlan`
and writes hooks: ``init_model`` (required), ``training_step`` (required for torch), and optionally
``init_optimizer``, ``training_data`` and ``testing_step``. A node then runs::

    plan.post_init(training_args)        # seeds, builds model and optimizer
    plan.set_dataset(train, validation)  # builds the training data loader
    plan.set_model_params(global_params)  # parameters and persistent buffers (BatchNorm statistics)
    result = plan.train(progress=report, correction=delta_i, should_stop=task_closed)
    reply = plan.after_training_params()  # the same names: parameters and buffers

The loop in :meth:`TrainingPlan.train` is the accountant-driven loop of the num_updates design, once for
every framework; each step, with learning rate η, gradient g of the batch loss and weights w:

- FedProx (``fedprox_mu`` = μ > 0): the objective is loss + μ/2 · ‖w − w_global‖², so g gains μ (w − w_global);
  w_global is ``global_params`` if given, else the weights when ``train()`` starts.
- Scaffold (``correction`` = δ_i = c_i − c): g ← g − δ_i[name] for every named parameter, before the
  optimizer step; with plain SGD, w ← w − η (g − c_i + c).
- the optimizer then steps (plain SGD: w ← w − η g).
"""

from __future__ import annotations

import contextlib
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedcore.accountant import MiniBatchTrainingIterationsAccountant
from fedcore.errors import DatasetError, PlanError, TrainingStoppedError
from fedcore.models._api import Model
from fedcore.plans.data import ArrayDataset
from fedcore.training_args import TrainingArgs

__all__ = ["TrainingPlan", "TrainingProgress", "TrainingResult"]


@dataclass(frozen=True)
class TrainingProgress:
    """One progress report of :meth:`TrainingPlan.train` (see the accountant for the counting rules).

    ``epoch`` is None with ``num_updates`` (one long loop); iterations and samples count over the run
    then, and within the current epoch with ``epochs``.
    """

    epoch: int | None
    iteration: int
    total_iterations: int
    num_samples: int
    num_samples_max: int
    loss: float


@dataclass(frozen=True)
class TrainingResult:
    """What a local training run did: K = ``num_steps`` optimizer steps at learning rate η_l = ``lr``.

    ``losses`` holds the batch loss of every step (without the FedProx term); ``duration_s`` is wall time.
    """

    num_steps: int
    num_samples: int
    lr: float
    losses: list[float] = field(default_factory=list)
    duration_s: float = 0.0


class TrainingPlan(ABC):
    """Base of every training plan: user hooks, parameter access and the accountant-driven loop."""

    def __init__(self) -> None:
        self._training_args: TrainingArgs | None = None
        self._model: Model | None = None
        self._optimizer: Any = None
        self._train_set: ArrayDataset | None = None
        self._validation_set: ArrayDataset | None = None
        self._loader: Any = None

    # ------------------------------------------------------------------ user hooks
    @abstractmethod
    def init_model(self) -> Any:
        """Build the model (framework-native or a fedcore ``Model``); called by :meth:`post_init`."""

    @abstractmethod
    def training_step(self, data: Any, target: Any) -> Any:
        """The loss of one batch (framework-specific return type, see the subclasses)."""

    @abstractmethod
    def init_optimizer(self) -> Any:
        """Build the optimizer; the subclasses default to SGD(lr, momentum, weight_decay) from the args."""

    @abstractmethod
    def training_data(self, dataset: ArrayDataset) -> Any:
        """A loader of ``(data, target)`` batches over ``dataset`` with ``len()`` = batches per epoch."""

    @abstractmethod
    def testing_step(self, data: Any, target: Any) -> dict[str, float]:
        """Metrics of one validation batch; :meth:`evaluate` averages them weighted by batch size."""

    # ------------------------------------------------------------------ framework hooks
    @abstractmethod
    def _seed(self, seed: int | None) -> None:
        """Seed the framework's generators before the model is built."""

    @abstractmethod
    def _wrap_model(self, native: Any) -> Model:
        """Check what ``init_model`` returned and wrap it in the fedcore ``Model``."""

    @abstractmethod
    def _check_optimizer(self, optimizer: Any) -> Any:
        """Check what ``init_optimizer`` returned."""

    @abstractmethod
    def _learning_rate(self) -> float:
        """η_l, the learning rate the optimizer uses."""

    def refresh_local_statistics(self) -> bool:
        """Recompute the model's running statistics (BatchNorm's running mean and variance) from this node's
        training set, replacing the federated ones; True if the model has any. Not part of a task: the global
        model carries its averaged statistics and fednode evaluates it with them; this is for a node-adapted
        variant (statistics of the local data, as FedBN keeps them). Plans without such buffers (numpy
        plans) have nothing to do."""
        return False

    def _check_plain_sgd(self) -> None:
        """PlanError unless the optimizer takes plain SGD steps y ← y − η_l g at one learning rate: Scaffold's
        control variates (c_i⁺ = c_i − c + (x − y_i) / (K η_l)) describe only that. The default optimizers
        of numpy and torch plans do, given momentum and weight_decay 0 (fednode checks the arguments)."""

    @abstractmethod
    def _testing_batches(self, dataset: ArrayDataset) -> Iterable[tuple[Any, Any]]:
        """Unshuffled ``(data, target)`` batches of ``dataset`` for :meth:`evaluate`."""

    @abstractmethod
    def _as_named_arrays(self, what: str, values: Mapping[str, Any]) -> dict[str, Any]:
        """Correction / anchor values in the framework's array type, dtype and device, one entry per parameter
        (torch: a tensor tied under several names keeps its first name, so it is corrected / anchored once)."""

    @abstractmethod
    def _batch_loss(self, data: Any, target: Any, anchor: Mapping[str, Any] | None) -> tuple[float, float, Any]:
        """Run ``training_step``: (batch loss, objective incl. FedProx, handle for :meth:`_batch_update`)."""

    @abstractmethod
    def _batch_update(self, handle: Any, correction: Mapping[str, Any] | None) -> None:
        """Gradients of the objective, minus the Scaffold correction, then one optimizer step."""

    def _evaluation_mode(self) -> contextlib.AbstractContextManager[None]:
        """Context in which :meth:`evaluate` runs (torch: eval mode, no autograd)."""
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ lifecycle
    def post_init(self, training_args: TrainingArgs | Mapping[str, Any]) -> None:
        """Validate the args, seed from ``seed``, build the model then the optimizer; forget the datasets.

        Raises:
            TrainingArgsError: invalid training arguments.
            PlanError: ``init_model`` / ``init_optimizer`` returned something unusable.
        """
        args = training_args if isinstance(training_args, TrainingArgs) else TrainingArgs.from_dict(training_args)
        self._training_args = args
        self._seed(args["seed"])
        self._model = self._wrap_model(self.init_model())
        self._optimizer = self._check_optimizer(self.init_optimizer())
        self._train_set = self._validation_set = self._loader = None

    def set_dataset(self, train: ArrayDataset, validation: ArrayDataset | None = None) -> None:
        """Set the training data (and validation data) and build the training data loader.

        Without ``validation`` and with ``test_ratio`` > 0, ``train`` is split with ``seed``.

        Raises:
            PlanError: called before :meth:`post_init`, or ``training_data`` returned None.
            DatasetError: not ArrayDatasets, or an empty training set.
        """
        args = self.training_args
        for name, value in (("train", train), ("validation", validation)):
            if value is not None and not isinstance(value, ArrayDataset):
                raise DatasetError(f"set_dataset: {name} must be an ArrayDataset, got {type(value).__name__}")
        if validation is None and args["test_ratio"] > 0:
            train, validation = train.split(args["test_ratio"], args["seed"])
        if len(train) == 0:
            raise DatasetError("set_dataset: the training set is empty")
        loader = self.training_data(train)
        if loader is None:
            raise PlanError(f"{type(self).__name__}.training_data returned None instead of a data loader")
        self._train_set, self._validation_set, self._loader = train, validation, loader

    # ------------------------------------------------------------------ accessors
    @property
    def training_args(self) -> TrainingArgs:
        if self._training_args is None:
            raise PlanError(f"{type(self).__name__}: call post_init(training_args) first")
        return self._training_args

    @property
    def model(self) -> Model:
        """The fedcore ``Model`` wrapping what ``init_model`` built."""
        if self._model is None:
            raise PlanError(f"{type(self).__name__}: call post_init(training_args) first (no model yet)")
        return self._model

    @property
    def optimizer(self) -> Any:
        if self._optimizer is None:
            raise PlanError(f"{type(self).__name__}: call post_init(training_args) first (no optimizer yet)")
        return self._optimizer

    @property
    def training_data_loader(self) -> Any:
        """The loader built by :meth:`set_dataset` (None before)."""
        return self._loader

    @property
    def validation_dataset(self) -> ArrayDataset | None:
        return self._validation_set

    # ------------------------------------------------------------------ parameters
    def get_model_params(self, only_trainable: bool = False, exclude_buffers: bool = False) -> dict[str, Any]:
        """Interfaces ``model.get_weights``; by default the model's federated state: every parameter and every
        persistent buffer (BatchNorm's running statistics, ``model.buffer_names()``), as the global model and
        each node's result hold it. Non-persistent buffers are never included."""
        return self.model.get_weights(only_trainable=only_trainable, exclude_buffers=exclude_buffers)

    def set_model_params(
        self, params: Mapping[str, Any], *, only_trainable: bool = False, exclude_buffers: bool = False
    ) -> None:
        """Interfaces ``model.set_weights`` (strict: by default exactly the names of ``get_model_params()``,
        buffers included; raises WeightsMismatchError)."""
        self.model.set_weights(params, only_trainable=only_trainable, exclude_buffers=exclude_buffers)

    def after_training_params(self) -> dict[str, Any]:
        """What a node sends back after training (parameters and persistent buffers); ``get_model_params()``
        unless extended."""
        return self.get_model_params()

    def export_model(self, path: str | Path) -> None:
        """Interfaces ``model.export``: an UNSAFE native file, for local use only."""
        self.model.export(path)

    def import_model(self, path: str | Path) -> None:
        """Interfaces ``model.reload`` (UNSAFE), then rebuilds the optimizer over the reloaded model."""
        self.model.reload(path)
        self._optimizer = self._check_optimizer(self.init_optimizer())

    # ------------------------------------------------------------------ training
    def train(
        self,
        progress: Callable[[TrainingProgress], None] | None = None,
        correction: Mapping[str, Any] | None = None,
        global_params: Mapping[str, Any] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> TrainingResult:
        """Run the local training loop of the module docstring; return what was done.

        Args:
            progress: called with a :class:`TrainingProgress` whenever the accountant says to log.
            correction: Scaffold's δ_i = c_i − c, by trainable parameter name (a subset is allowed);
                entries of frozen parameters (the server sends δ for every parameter) are ignored:
                a frozen parameter takes no step, so y_i = x there whatever δ_i says.
            global_params: FedProx anchor w_global (every trainable parameter); default: the weights now.
            should_stop: asked before each batch (from this thread: keep it cheap and thread-safe); True
                ends the run there, e.g. when the server closed the task and the result would be refused.

        Raises:
            PlanError: not set up, a bad correction / anchor, a non-scalar or non-finite loss (the
                update of that step is not applied), or a loader shorter than its ``len()``.
            TrainingStoppedError: ``should_stop()`` returned True; names the steps done (the model keeps
                their updates).
        """
        args = self.training_args
        if self._loader is None:
            raise PlanError(f"{type(self).__name__}: call set_dataset(train) before train()")
        needs_params = correction is not None or args["fedprox_mu"] > 0
        trainable = self.model.get_weights(only_trainable=True) if needs_params else {}
        shapes = {name: tuple(value.shape) for name, value in trainable.items()}
        corr = None
        if correction is not None:
            self._check_plain_sgd()
            correction = self._without_frozen(correction, shapes)
            _check_named("correction", correction, shapes, require_all=False)
            corr = self._as_named_arrays("correction", correction)
        anchor = None
        if args["fedprox_mu"] > 0:
            if global_params is None:
                anchor = self._as_named_arrays("global_params", trainable)
            else:
                _check_named("global_params", global_params, shapes, require_all=True, allow_extra=True)
                anchor = self._as_named_arrays("global_params", {n: global_params[n] for n in shapes})
        accountant = MiniBatchTrainingIterationsAccountant(self)
        losses: list[float] = []
        start = time.perf_counter()
        for epoch in accountant.iterate_epochs():
            batches = iter(self._loader)
            for batch in accountant.iterate_batches():
                if should_stop is not None and should_stop():
                    done = accountant.num_steps_done - 1  # counted as it was yielded: this batch is not done
                    raise TrainingStoppedError(
                        f"training stopped after {done} of {accountant.num_iterations_total} steps, before batch "
                        f"{batch} of epoch {epoch}: should_stop() returned True", done)
                try:
                    data, target = next(batches)
                except StopIteration:
                    raise PlanError(
                        f"training_data_loader ran out after {batch - 1} batches in epoch {epoch}, "
                        f"but its len() is {len(self._loader)}"
                    ) from None
                accountant.increment_sample_counters(_batch_size(data))
                loss, objective, handle = self._batch_loss(data, target, anchor)
                if not (math.isfinite(loss) and math.isfinite(objective)):
                    raise PlanError(
                        f"non-finite loss {objective} at step {accountant.num_steps_done} (epoch {epoch}, "
                        f"batch {batch}); that step's update was not applied"
                    )
                self._batch_update(handle, corr)
                losses.append(loss)
                if progress is not None and accountant.should_log_this_batch():
                    num_samples, num_samples_max = accountant.reporting_on_num_samples()
                    iteration, total_iterations = accountant.reporting_on_num_iter()
                    progress(TrainingProgress(
                        epoch=accountant.reporting_on_epoch(),
                        iteration=iteration,
                        total_iterations=total_iterations,
                        num_samples=num_samples,
                        num_samples_max=num_samples_max,
                        loss=loss,
                    ))
        return TrainingResult(
            num_steps=accountant.num_steps_done,
            num_samples=accountant.num_samples_observed,
            lr=float(self._learning_rate()),
            losses=losses,
            duration_s=time.perf_counter() - start,
        )

    def _without_frozen(self, correction: Any, trainable: Mapping[str, Any]) -> Any:
        """``correction`` without the entries of frozen parameters (unknown names stay, to be refused)."""
        if not isinstance(correction, Mapping) or all(name in trainable for name in correction):
            return correction
        parameters = self.model.get_weights(only_trainable=False)
        return {name: value for name, value in correction.items() if name in trainable or name not in parameters}

    def evaluate(
        self, dataset: ArrayDataset | None = None, should_stop: Callable[[], bool] | None = None
    ) -> dict[str, float]:
        """Run ``testing_step`` over ``dataset`` (default: the validation set); batch-size-weighted means.

        ``should_stop`` is asked before each batch, as in :meth:`train` (the node: "has the server closed this
        evaluation task?"); True ends the evaluation there, without metrics.

        Raises:
            PlanError: no validation data, an empty dataset, or ``testing_step`` returning bad metrics.
            TrainingStoppedError: ``should_stop()`` returned True; names the batches and samples done.
        """
        if self._model is None:
            raise PlanError(f"{type(self).__name__}: call post_init(training_args) before evaluate()")
        dataset = self._validation_set if dataset is None else dataset
        if dataset is None:
            raise PlanError(
                "evaluate: no validation data; pass a dataset, give set_dataset a validation set, "
                "or set test_ratio > 0"
            )
        if not isinstance(dataset, ArrayDataset):
            raise DatasetError(f"evaluate: expected an ArrayDataset, got {type(dataset).__name__}")
        if len(dataset) == 0:
            raise PlanError("evaluate: the validation dataset is empty")
        totals: dict[str, float] = {}
        seen = 0
        with self._evaluation_mode():
            for batch, (data, target) in enumerate(self._testing_batches(dataset)):
                if should_stop is not None and should_stop():
                    raise TrainingStoppedError(
                        f"evaluation stopped after {batch} batches ({seen} of {len(dataset)} samples): "
                        "should_stop() returned True")
                metrics = self.testing_step(data, target)
                size = _batch_size(data)
                if not isinstance(metrics, Mapping) or not metrics:
                    raise PlanError(f"testing_step must return a non-empty dict of metrics, got {metrics!r}")
                if seen and set(metrics) != set(totals):
                    raise PlanError(
                        f"testing_step returned metrics {sorted(metrics)} after {sorted(totals)}: keep them the same"
                    )
                for name, value in metrics.items():
                    try:
                        value = float(value)
                    except (TypeError, ValueError):
                        raise PlanError(
                            f"testing_step metric {name!r} is not a number: {type(value).__name__}"
                        ) from None
                    totals[name] = totals.get(name, 0.0) + value * size
                seen += size
        return {name: total / seen for name, total in totals.items()}


def _batch_size(data: Any) -> int:
    """Samples in a batch: first dimension of an array / tensor, or of the first entry of a dict / tuple."""
    while isinstance(data, (Mapping, list, tuple)):
        if not data:
            raise PlanError("a training batch is an empty container: cannot count its samples")
        data = next(iter(data.values())) if isinstance(data, Mapping) else data[0]
    shape = getattr(data, "shape", None)
    if shape is not None and len(shape) > 0:
        return int(shape[0])
    try:
        return len(data)
    except TypeError:
        raise PlanError(f"cannot count the samples of a {type(data).__name__} batch") from None


def _check_named(
    what: str,
    values: Any,
    shapes: Mapping[str, tuple[int, ...]],
    *,
    require_all: bool,
    allow_extra: bool = False,
) -> None:
    """Check names and shapes of a correction / anchor against the trainable parameters."""
    if not isinstance(values, Mapping):
        raise PlanError(f"{what} must be a mapping of parameter name -> array, got {type(values).__name__}")
    problems = []
    if not allow_extra:
        unknown = [name for name in values if name not in shapes]
        if unknown:
            problems.append(f"unknown names {unknown} (trainable parameters: {list(shapes)})")
    if require_all:
        missing = [name for name in shapes if name not in values]
        if missing:
            problems.append(f"missing names {missing}")
    for name, shape in shapes.items():
        if name in values:
            got = getattr(values[name], "shape", None)
            if got is None or tuple(got) != shape:
                problems.append(f"{name!r}: expected shape {shape}, got {None if got is None else tuple(got)}")
    if problems:
        raise PlanError(f"{what} does not match the model: " + "; ".join(problems))
