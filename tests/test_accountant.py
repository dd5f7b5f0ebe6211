"""MiniBatchTrainingIterationsAccountant: the num_updates seed's table, totals, reporting, logging, errors."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcore.accountant import MiniBatchTrainingIterationsAccountant
from fedcore.errors import PlanError, TrainingArgsError, TrainingArgsWarning
from fedcore.training_args import TrainingArgs


class Loader:
    """A sized iterable of (data, target) batches; ``batch_sizes`` gives each batch's length."""

    def __init__(self, batch_sizes: list[int], batch_size: int | None = None) -> None:
        self.batch_sizes = batch_sizes
        if batch_size is not None:
            self.batch_size = batch_size

    def __len__(self) -> int:
        return len(self.batch_sizes)

    def __iter__(self):
        for n in self.batch_sizes:
            yield [0.0] * n, [0] * n


@dataclass
class Plan:
    training_data_loader: Any
    training_args: Any = field(default_factory=dict)


def plan(num_batches: int, batch: int = 2, **args: Any) -> Plan:
    return Plan(Loader([batch] * num_batches), args)


@dataclass
class Step:
    epoch: int
    batch: int
    log: bool
    samples: tuple[int, int]
    iters: tuple[int, int]
    reported_epoch: int | None


def run(p: Plan, acc: MiniBatchTrainingIterationsAccountant | None = None) -> list[Step]:
    """The canonical loop of the seed; records what the accountant says at every step."""
    acc = acc or MiniBatchTrainingIterationsAccountant(p)
    steps = []
    for epoch in acc.iterate_epochs():
        it = iter(p.training_data_loader)
        for batch in acc.iterate_batches():
            data, _target = next(it)  # StopIteration here would mean more batches than the loader has
            acc.increment_sample_counters(len(data))
            steps.append(Step(epoch, batch, acc.should_log_this_batch(), acc.reporting_on_num_samples(),
                              acc.reporting_on_num_iter(), acc.reporting_on_epoch()))
    return steps


# -- the seed's table (loader of length 4) ------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "epochs", "last", "per_epoch", "total"),
    [
        ({"epochs": 1}, 2, 0, 4, 4),
        ({"epochs": 1, "batch_maxnum": 2}, 2, 0, 2, 2),
        ({"num_updates": 7}, 2, 3, 4, 7),
        ({"num_updates": 3}, 1, 3, 4, 3),
    ],
)
def test_seed_table(args, epochs, last, per_epoch, total):
    p = plan(4, **args)
    acc = MiniBatchTrainingIterationsAccountant(p)
    assert (acc.num_epochs, acc.num_batches_in_last_epoch, acc.num_batches_per_epoch) == (epochs, last, per_epoch)
    assert acc.num_iterations_total == total
    steps = run(p, acc)
    assert len(steps) == total == acc.num_steps_done
    assert sorted({s.epoch for s in steps}) == list(range(1, epochs + 1 if last else epochs))


def test_always_one_extra_possibly_empty_epoch():
    p = plan(4, epochs=2)
    acc = MiniBatchTrainingIterationsAccountant(p)
    yielded = []
    for epoch in acc.iterate_epochs():
        yielded.append((epoch, list(acc.iterate_batches())))
    assert yielded == [(1, [1, 2, 3, 4]), (2, [1, 2, 3, 4]), (3, [])]


def test_epochs_and_batch_maxnum_give_exactly_their_product():
    steps = run(plan(10, epochs=2, batch_maxnum=3))
    assert [(s.epoch, s.batch) for s in steps] == [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3)]


def test_num_updates_wins_over_epochs_and_batch_maxnum():
    p = plan(10, epochs=2, batch_maxnum=3, num_updates=17)  # a plain dict: validated by the accountant
    with pytest.warns(TrainingArgsWarning) as record:
        acc = MiniBatchTrainingIterationsAccountant(p)
    assert {str(w.message).split("=")[0] for w in record} == {"'epochs'", "'batch_maxnum'"}
    assert acc.num_batches_per_epoch == 10  # batch_maxnum does not apply with num_updates
    assert len(run(p, acc)) == 17 == acc.num_steps_done


def test_training_args_instance_does_not_warn_twice():
    with pytest.warns(TrainingArgsWarning):
        args = TrainingArgs(num_updates=5, epochs=9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        acc = MiniBatchTrainingIterationsAccountant(Plan(Loader([1] * 3), args))
    assert acc.training_args is args and acc.num_iterations_total == 5


def test_training_args_as_a_method():
    class MethodPlan:
        training_data_loader = Loader([2] * 3)

        def training_args(self):
            return {"num_updates": 4}

    assert MiniBatchTrainingIterationsAccountant(MethodPlan()).num_iterations_total == 4


def test_batch_maxnum_above_loader_length_is_capped_with_warning():
    p = plan(4, epochs=2, batch_maxnum=10)
    with pytest.warns(TrainingArgsWarning, match="'batch_maxnum'=10 exceeds the 4 batches.*capped to 4"):
        acc = MiniBatchTrainingIterationsAccountant(p)
    assert acc.num_batches_per_epoch == 4
    assert len(run(p, acc)) == 8


def test_batch_maxnum_equal_to_loader_length_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        acc = MiniBatchTrainingIterationsAccountant(plan(4, epochs=1, batch_maxnum=4))
    assert acc.num_iterations_total == 4


@pytest.mark.parametrize(
    "args",
    [{"dry_run": True, "num_updates": 100}, {"dry_run": True, "epochs": 5, "batch_maxnum": 3}, {"dry_run": True}],
)
@pytest.mark.parametrize("num_batches", [1, 4])
def test_dry_run_is_exactly_one_iteration(args, num_batches):
    p = Plan(Loader([2] * num_batches), args)
    acc = MiniBatchTrainingIterationsAccountant(p)
    steps = run(p, acc)
    assert len(steps) == 1 == acc.num_steps_done == acc.num_iterations_total
    assert steps[0].log and steps[0].samples == (2, 2) and steps[0].iters == (1, 1)


# -- reporting ------------------------------------------------------------------------------


def test_reporting_with_num_updates_is_over_the_whole_run():
    # 11 samples in batches of 3, last one partial; 6 updates span two passes.
    p = Plan(Loader([3, 3, 3, 2], batch_size=3), {"num_updates": 6, "log_interval": 4})
    got = [(s.epoch, s.batch, s.log, s.samples, s.iters, s.reported_epoch) for s in run(p)]
    assert got == [
        (1, 1, True, (3, 18), (1, 6), None),  # first step
        (1, 2, False, (6, 18), (2, 6), None),
        (1, 3, False, (9, 18), (3, 6), None),
        (1, 4, True, (11, 18), (4, 6), None),  # 4 % log_interval == 0
        (2, 1, False, (14, 18), (5, 6), None),
        (2, 2, True, (17, 17), (6, 6), None),  # last step: the real total replaces the prediction
    ]


def test_reporting_with_epochs_is_per_epoch():
    # no batch_size on the loader: the prediction uses the batch_size argument (2)
    p = Plan(Loader([2, 2, 1]), {"epochs": 2, "batch_size": 2, "log_interval": 100})
    acc = MiniBatchTrainingIterationsAccountant(p)
    got = [(s.epoch, s.batch, s.log, s.samples, s.iters, s.reported_epoch) for s in run(p, acc)]
    assert got == [
        (1, 1, True, (2, 6), (1, 3), 1),  # first batch of the epoch
        (1, 2, False, (4, 6), (2, 3), 1),
        (1, 3, True, (5, 5), (3, 3), 1),  # last batch of the epoch: real epoch total
        (2, 1, True, (2, 6), (1, 3), 2),
        (2, 2, False, (4, 6), (2, 3), 2),
        (2, 3, True, (5, 5), (3, 3), 2),
    ]
    assert acc.num_samples_observed == 10 and acc.num_steps_done == 6


def test_loader_batch_size_preferred_over_argument():
    p = Plan(Loader([5, 5, 5], batch_size=5), {"num_updates": 3, "batch_size": 2})
    assert run(p)[0].samples == (5, 15)


def test_counters_reset_per_epoch_and_per_run():
    p = plan(3, batch=4, epochs=2)
    acc = MiniBatchTrainingIterationsAccountant(p)
    seen = []
    for _ in acc.iterate_epochs():
        seen.append(acc.num_samples_observed_in_epoch)
        for _ in acc.iterate_batches():
            acc.increment_sample_counters(4)
    assert seen == [0, 0, 0] and acc.num_samples_observed == 24
    run(p, acc)  # a second run starts from zero
    assert acc.num_steps_done == 6 and acc.num_samples_observed == 24


def test_num_steps_done_counts_only_steps_taken():
    acc = MiniBatchTrainingIterationsAccountant(plan(4, num_updates=10))
    for _ in acc.iterate_epochs():
        for batch in acc.iterate_batches():
            if batch == 3:
                break
        break
    assert acc.num_steps_done == 3 and acc.num_iterations_total == 10
    assert (acc.current_epoch, acc.current_batch) == (1, 3)


def _logged_steps(p: Plan) -> list[int]:
    return [k for k, s in enumerate(run(p), start=1) if s.log]


def test_logging_cadence_with_num_updates():
    # first step, every log_interval steps, last step; epoch boundaries are not special
    assert _logged_steps(plan(7, num_updates=25, log_interval=10)) == [1, 10, 20, 25]


def test_logging_cadence_with_epochs():
    # first and last batch of each epoch (1, 7, 8, 14) plus every 5 steps overall (5, 10)
    assert _logged_steps(plan(7, epochs=2, log_interval=5)) == [1, 5, 7, 8, 10, 14]


def test_logging_with_log_interval_one_logs_everything():
    assert _logged_steps(plan(3, num_updates=5, log_interval=1)) == [1, 2, 3, 4, 5]


def test_no_logging_outside_a_batch():
    acc = MiniBatchTrainingIterationsAccountant(plan(3, num_updates=5))
    assert acc.should_log_this_batch() is False
    assert (acc.current_epoch, acc.current_batch, acc.num_steps_done) == (0, 0, 0)


# -- errors ---------------------------------------------------------------------------------


def test_neither_num_updates_nor_epochs():
    with pytest.raises(TrainingArgsError, match="set num_updates or epochs"):
        MiniBatchTrainingIterationsAccountant(plan(4))
    with pytest.raises(TrainingArgsError, match="set num_updates or epochs"):
        MiniBatchTrainingIterationsAccountant(plan(4, batch_maxnum=2))


def test_empty_loader():
    with pytest.raises(TrainingArgsError, match="empty.*len 0"):
        MiniBatchTrainingIterationsAccountant(plan(0, num_updates=3))


def test_missing_or_unsized_loader():
    with pytest.raises(PlanError, match="no 'training_data_loader'"):
        MiniBatchTrainingIterationsAccountant(Plan(None, {"epochs": 1}))
    with pytest.raises(PlanError, match="of type generator has no len"):
        MiniBatchTrainingIterationsAccountant(Plan((b for b in [1, 2]), {"epochs": 1}))


def test_missing_or_bad_training_args():
    class NoArgs:
        training_data_loader = Loader([1])

    with pytest.raises(PlanError, match="no 'training_args'"):
        MiniBatchTrainingIterationsAccountant(NoArgs())
    with pytest.raises(TrainingArgsError, match="must be a TrainingArgs or a mapping, got list"):
        MiniBatchTrainingIterationsAccountant(Plan(Loader([1]), [("epochs", 1)]))
    with pytest.raises(TrainingArgsError, match="unknown training argument.*'epoch'"):
        MiniBatchTrainingIterationsAccountant(Plan(Loader([1]), {"epoch": 1}))


def test_iterate_batches_outside_an_epoch():
    acc = MiniBatchTrainingIterationsAccountant(plan(2, epochs=1))
    with pytest.raises(PlanError, match="outside an epoch"):
        acc.iterate_batches()


@pytest.mark.parametrize("bad", [-1, True, 1.5, "3"])
def test_bad_sample_count(bad):
    acc = MiniBatchTrainingIterationsAccountant(plan(2, epochs=1))
    with pytest.raises(PlanError, match="non-negative int"):
        acc.increment_sample_counters(bad)


# -- properties -----------------------------------------------------------------------------


def _count_iterations(p: Plan) -> int:
    acc = MiniBatchTrainingIterationsAccountant(p)
    n = sum(1 for _ in acc.iterate_epochs() for _ in acc.iterate_batches())
    assert n == acc.num_steps_done == acc.num_iterations_total
    return n


@settings(max_examples=150, deadline=None)
@given(num_batches=st.integers(1, 50), num_updates=st.integers(1, 500))
def test_num_updates_gives_exactly_num_updates(num_batches, num_updates):
    assert _count_iterations(plan(num_batches, num_updates=num_updates)) == num_updates


@settings(max_examples=150, deadline=None)
@given(num_batches=st.integers(1, 50), epochs=st.integers(1, 20), batch_maxnum=st.one_of(st.none(),
                                                                                       st.integers(1, 60)))
def test_epochs_give_epochs_times_capped_batch_maxnum(num_batches, epochs, batch_maxnum):
    p = plan(num_batches, epochs=epochs, batch_maxnum=batch_maxnum)
    per_epoch = num_batches if batch_maxnum is None else min(batch_maxnum, num_batches)
    if batch_maxnum is not None and batch_maxnum > num_batches:
        with pytest.warns(TrainingArgsWarning, match="capped"):
            n = _count_iterations(p)
    else:
        n = _count_iterations(p)
    assert n == epochs * per_epoch
