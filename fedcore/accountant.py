"""How many local iterations to run, in epochs and batches, and what to report while running them.

A training plan always writes its loop as epochs of batches; this accountant turns the researcher's
``num_updates`` / ``epochs`` / ``batch_maxnum`` / ``dry_run`` into that shape, counts what was actually
done (aggregators such as Scaffold need K, the local steps actually taken) and prepares progress reports::

    acc = MiniBatchTrainingIterationsAccountant(plan)
    for epoch in acc.iterate_epochs():
        it = iter(plan.training_data_loader)
        for batch in acc.iterate_batches():
            data, target = next(it)
            acc.increment_sample_counters(len(data))
            ...  # one optimizer step
            if acc.should_log_this_batch():
                report(acc.reporting_on_num_samples(), acc.reporting_on_num_iter(), acc.reporting_on_epoch())

The shape, with L = ``len(training_data_loader)`` batches per full pass. There is always one extra,
possibly empty, epoch at the end, which holds the remainder of ``num_updates``:

=================================  ==============================  ===================  ===================
given (first match wins)           num_epochs (incl. the extra)    batches per epoch    batches, last epoch
=================================  ==============================  ===================  ===================
``dry_run=True``                   1 // L + 1                      L                    1 % L
``num_updates=N``                  N // L + 1                      L                    N % L
``epochs=E, batch_maxnum=B``       E + 1                           min(B, L)            0
``epochs=E``                       E + 1                           L                    0
=================================  ==============================  ===================  ===================

so the total is N (or 1 for a dry run), or E * min(B, L). With L = 4: ``{'epochs': 1}`` → 2, 4, 0;
``{'epochs': 1, 'batch_maxnum': 2}`` → 2, 2, 0; ``{'num_updates': 7}`` → 2, 4, 3; ``{'num_updates': 3}`` → 1, 4, 3.

Reporting follows the mode. With ``num_updates`` (or a dry run) training is one long loop: samples and
iterations are counted over the whole run and no epoch is reported. With ``epochs`` it is two nested loops:
samples and iterations are counted within the current epoch, and the epoch is reported. The maximum number
of samples is predicted as batch size × batches; at the last iteration (of the run, or of the epoch) the
real count replaces the prediction, since a last partial batch or a sampler can make it differ.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

from fedcore.errors import PlanError, TrainingArgsError, TrainingArgsWarning
from fedcore.training_args import TrainingArgs

__all__ = ["MiniBatchTrainingIterationsAccountant"]


def _training_args_of(plan: Any) -> TrainingArgs:
    """The plan's ``training_args`` (attribute, or method returning them) as a validated ``TrainingArgs``."""
    if not hasattr(plan, "training_args"):
        raise PlanError(f"{type(plan).__name__} has no 'training_args': the accountant needs them")
    args = plan.training_args
    if callable(args) and not isinstance(args, Mapping):
        args = args()
    if isinstance(args, TrainingArgs):
        return args
    if not isinstance(args, Mapping):
        raise TrainingArgsError(
            f"{type(plan).__name__}.training_args must be a TrainingArgs or a mapping, got {type(args).__name__}"
        )
    return TrainingArgs(args)


def _num_batches_of(plan: Any) -> tuple[int, Any]:
    """``len(plan.training_data_loader)`` and the loader itself; errors if missing, unsized or empty."""
    loader = getattr(plan, "training_data_loader", None)
    if loader is None:
        raise PlanError(f"{type(plan).__name__} has no 'training_data_loader' (missing or None)")
    try:
        num_batches = len(loader)
    except TypeError:
        raise PlanError(
            f"training_data_loader of type {type(loader).__name__} has no len(): "
            "the accountant needs the number of batches in one full pass"
        ) from None
    if num_batches == 0:
        raise TrainingArgsError(
            "training_data_loader is empty (len 0 batches): no iteration can be run; "
            "check the dataset and 'batch_size'"
        )
    return num_batches, loader


class MiniBatchTrainingIterationsAccountant:
    """Epoch/batch iterators and counters for one local training run (see the module docstring).

    Args:
        training_plan: any object with ``training_data_loader`` (``len()`` = batches in one full pass)
            and ``training_args`` (a ``TrainingArgs`` or a mapping, or a method returning one). Both are
            read once, here.

    Raises:
        TrainingArgsError: neither ``num_updates`` nor ``epochs`` set (and no ``dry_run``), invalid
            arguments, or an empty loader.
        PlanError: the plan has no ``training_data_loader`` / ``training_args``, or the loader has no len.

    Warns:
        TrainingArgsWarning: ``batch_maxnum`` larger than the loader (capped to its length); the
            precedence warnings of ``TrainingArgs`` when the plan's args are a plain mapping.
    """

    def __init__(self, training_plan: Any) -> None:
        self._args = _training_args_of(training_plan)
        loader_len, loader = _num_batches_of(training_plan)
        self._batch_size = self._batch_size_of(loader, self._args)
        self._whole_run_mode = self._args["dry_run"] or self._args["num_updates"] is not None
        self._num_epochs, self._per_epoch, self._in_last_epoch = self._shape(self._args, loader_len)
        # running state, reset by iterate_epochs()
        self._epoch = 0
        self._batch = 0
        self._steps_done = 0
        self._samples_in_epoch = 0
        self._samples_total = 0

    @staticmethod
    def _batch_size_of(loader: Any, args: TrainingArgs) -> int:
        """The loader's own ``batch_size`` when it has a positive int one, else ``args['batch_size']``."""
        size = getattr(loader, "batch_size", None)
        if isinstance(size, numbers.Integral) and not isinstance(size, bool) and size >= 1:
            return int(size)
        return int(args["batch_size"])

    @staticmethod
    def _shape(args: TrainingArgs, loader_len: int) -> tuple[int, int, int]:
        """(epochs including the extra one, batches per epoch, batches in the last epoch)."""
        if args["dry_run"] or args["num_updates"] is not None:
            total = 1 if args["dry_run"] else args["num_updates"]
            return total // loader_len + 1, loader_len, total % loader_len
        args.check_iterations()  # neither num_updates nor epochs: TrainingArgsError
        per_epoch = loader_len
        batch_maxnum = args["batch_maxnum"]
        if batch_maxnum is not None:
            if batch_maxnum > loader_len:
                warnings.warn(
                    f"'batch_maxnum'={batch_maxnum} exceeds the {loader_len} batches of the training data "
                    f"loader: capped to {loader_len} batches per epoch",
                    TrainingArgsWarning,
                    stacklevel=3,
                )
            per_epoch = min(batch_maxnum, loader_len)
        return args["epochs"] + 1, per_epoch, 0

    # -- configuration (read-only) ---------------------------------------------------------------
    @property
    def training_args(self) -> TrainingArgs:
        """The validated training arguments this accountant follows."""
        return self._args

    @property
    def num_epochs(self) -> int:
        """Epochs that :meth:`iterate_epochs` yields, including the extra, possibly empty, last one."""
        return self._num_epochs

    @property
    def num_batches_per_epoch(self) -> int:
        """Batches in every epoch but the last (``min(batch_maxnum, L)`` with epochs, else ``L``)."""
        return self._per_epoch

    @property
    def num_batches_in_last_epoch(self) -> int:
        """Batches in the last epoch: the remainder of ``num_updates``, 0 with ``epochs``."""
        return self._in_last_epoch

    @property
    def num_iterations_total(self) -> int:
        """Iterations the full loop will perform: ``(num_epochs - 1) * per_epoch + in_last_epoch``."""
        return (self._num_epochs - 1) * self._per_epoch + self._in_last_epoch

    # -- progress (read-only) --------------------------------------------------------------------
    @property
    def current_epoch(self) -> int:
        """1-based index of the current epoch; 0 before :meth:`iterate_epochs` started."""
        return self._epoch

    @property
    def current_batch(self) -> int:
        """1-based index of the current batch within its epoch; 0 before its first batch."""
        return self._batch

    @property
    def num_steps_done(self) -> int:
        """Iterations (batches) yielded so far: K, the local steps actually taken."""
        return self._steps_done

    @property
    def num_samples_observed(self) -> int:
        """Samples counted by :meth:`increment_sample_counters` over the whole run."""
        return self._samples_total

    @property
    def num_samples_observed_in_epoch(self) -> int:
        """Samples counted by :meth:`increment_sample_counters` in the current epoch."""
        return self._samples_in_epoch

    # -- iteration -------------------------------------------------------------------------------
    def _batches_in_epoch(self, epoch: int) -> int:
        return self._in_last_epoch if epoch == self._num_epochs else self._per_epoch

    def iterate_epochs(self) -> Iterator[int]:
        """Yield epoch numbers 1..num_epochs; starting it resets every counter (a new run)."""
        self._epoch = self._batch = self._steps_done = 0
        self._samples_in_epoch = self._samples_total = 0
        for epoch in range(1, self._num_epochs + 1):
            self._epoch, self._batch, self._samples_in_epoch = epoch, 0, 0
            yield epoch

    def iterate_batches(self) -> Iterator[int]:
        """Yield batch numbers 1..n for the current epoch, counting each as one step done.

        Raises:
            PlanError: when called before :meth:`iterate_epochs` yielded an epoch.
        """
        if self._epoch == 0:
            raise PlanError("iterate_batches() called outside an epoch: loop over iterate_epochs() first")
        return self._batches(self._epoch)

    def _batches(self, epoch: int) -> Iterator[int]:
        self._batch = 0
        for batch in range(1, self._batches_in_epoch(epoch) + 1):
            self._batch = batch
            self._steps_done += 1
            yield batch

    def increment_sample_counters(self, n_samples: int) -> None:
        """Count ``n_samples`` (the size of the batch just drawn) in the epoch and run totals."""
        if isinstance(n_samples, bool) or not isinstance(n_samples, numbers.Integral) or n_samples < 0:
            raise PlanError(
                f"increment_sample_counters expects a non-negative int, got {type(n_samples).__name__} "
                f"{n_samples!r}"
            )
        self._samples_in_epoch += int(n_samples)
        self._samples_total += int(n_samples)

    # -- reporting -------------------------------------------------------------------------------
    def _is_last_iteration(self) -> bool:
        return self._steps_done >= self.num_iterations_total

    def _is_last_batch_of_epoch(self) -> bool:
        return self._batch >= self._batches_in_epoch(self._epoch)

    def should_log_this_batch(self) -> bool:
        """Whether to report now: first step, every ``log_interval`` steps, last step, or a dry run.

        With ``epochs``, the first and last batch of every epoch are also reported. False outside a batch.
        """
        if self._batch == 0:
            return False
        if self._args["dry_run"] or self._steps_done % self._args["log_interval"] == 0:
            return True
        if self._whole_run_mode:
            return self._steps_done == 1 or self._is_last_iteration()
        return self._batch == 1 or self._is_last_batch_of_epoch()

    def reporting_on_num_samples(self) -> tuple[int, int]:
        """(samples observed, samples expected): over the run with num_updates, in the epoch with epochs.

        The expected count is batch size × batches (the loader's ``batch_size`` if it has one, else the
        ``batch_size`` argument), replaced by the real count at the last iteration of the run / epoch.
        """
        if self._whole_run_mode:
            done = self._samples_total
            last = self._is_last_iteration()
            expected = self._batch_size * self.num_iterations_total
        else:
            done = self._samples_in_epoch
            last = self._is_last_batch_of_epoch()
            expected = self._batch_size * self._batches_in_epoch(self._epoch)
        return done, (done if last else expected)

    def reporting_on_num_iter(self) -> tuple[int, int]:
        """(iteration, iterations expected): over the run with num_updates, in the epoch with epochs."""
        if self._whole_run_mode:
            return self._steps_done, self.num_iterations_total
        return self._batch, self._batches_in_epoch(self._epoch)

    def reporting_on_epoch(self) -> int | None:
        """The current epoch with ``epochs``; None with num_updates or a dry run (epochs mean nothing there)."""
        return None if self._whole_run_mode else self._epoch
