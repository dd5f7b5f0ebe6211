"""PNG plots of a real history database: files are valid, sized to the subplots, and errors are named."""

from __future__ import annotations

import math

import numpy as np
import pytest
from matplotlib.image import imread

from fedcore.errors import HistoryError
from fedserver.history import HistoryStore
from fedserver.history_records import NodeResultRecord
from fedserver.plot import (
    _compared_series,
    available_metrics,
    compare_experiments,
    plot_history,
    sources_with_values,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def record_run(store: HistoryStore, name: str, rate: float, nodes: int = 3, rounds: int = 8) -> int:
    """A run whose loss decays like exp(-rate * round); node k is offset by k / 10."""
    exp = store.start_experiment(name, {"aggregator": name})
    for round in range(rounds):
        node_ids = [f"site-{k}" for k in range(nodes)]
        store.start_round(exp, round, node_ids)
        for k, node_id in enumerate(node_ids):
            loss = math.exp(-rate * round) + k / 10
            metrics = {"loss": loss, "accuracy": 1 - loss / 2}
            store.record_node_result(
                NodeResultRecord(exp, round, node_id, "succeeded", training_metrics=metrics)
            )
        store.finish_round(exp, round, metrics={"loss": math.exp(-rate * round)})
    store.finish_experiment(exp)
    return exp


@pytest.fixture
def store(tmp_path):
    with HistoryStore(tmp_path / "history.db") as history:
        yield history


def assert_png(path, columns: int) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 10_000
    pixels = imread(path)
    assert (
        pixels.shape[0] == 462 and pixels.shape[1] == 605 * columns
    )  # 5.5 x 4.2 inches per subplot, 110 dpi
    assert pixels[..., :3].std() > 0.05  # not a blank canvas


def test_plot_history_writes_a_png_with_one_subplot_per_metric(store, tmp_path):
    exp = record_run(store, "scaffold", 0.4)
    out = plot_history(store, exp, tmp_path / "plots" / "run.png")
    assert out == tmp_path / "plots" / "run.png"
    assert_png(out, columns=2)

    single = plot_history(store, exp, tmp_path / "loss.png", metrics=("loss",))
    assert_png(single, columns=1)


def test_plot_history_with_many_nodes_and_a_metric_without_global_values(store, tmp_path):
    exp = record_run(store, "fedavg", 0.2, nodes=30)
    # 'accuracy' has node values only; 'missing' has none at all: both still plot.
    assert_png(
        plot_history(store, exp, tmp_path / "many.png", metrics=("loss", "accuracy", "missing")), columns=3
    )


def test_plot_history_refuses_metrics_without_any_value_and_lists_the_recorded_ones(store, tmp_path):
    exp = record_run(store, "fedavg", 0.2)
    assert available_metrics(store, exp) == ["accuracy", "loss"]
    with pytest.raises(
        HistoryError, match=r"no values for \['los'\]; metrics recorded: \['accuracy', 'loss'\]"
    ):
        plot_history(store, exp, tmp_path / "x.png", metrics=["los"])
    assert not (tmp_path / "x.png").exists()


def test_compare_experiments_overlays_global_curves(store, tmp_path):
    scaffold = record_run(store, "scaffold", 0.5)
    fedavg = record_run(store, "fedavg", 0.15)
    out = compare_experiments(store, [scaffold, fedavg], tmp_path / "compare.png")
    assert_png(out, columns=2)
    # The two curves differ, so the picture differs from a plot of one experiment alone.
    alone = compare_experiments(store, [scaffold], tmp_path / "alone.png")
    assert not np.array_equal(imread(out), imread(alone))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda s, p: plot_history(s, 99, p), r"no experiment with id 99"),
        (lambda s, p: plot_history(s, 1, p, metrics="loss"), "metrics must be a non-empty sequence"),
        (lambda s, p: plot_history(s, 1, p, metrics=()), "metrics must be a non-empty sequence"),
        (lambda s, p: plot_history(s, 1, p, source="test"), "metric source must be one of"),
        (lambda s, p: compare_experiments(s, [], p), "experiment_ids must be a non-empty sequence"),
        (lambda s, p: compare_experiments(s, [1, 42], p), r"no experiment with id 42"),
        (
            lambda s, p: compare_experiments(s, [1], p, metrics=["f1"]),
            r"experiments \[1\] have no global values",
        ),
    ],
)
def test_bad_arguments_are_named(store, tmp_path, call, message):
    record_run(store, "fedavg", 0.2, rounds=2)
    with pytest.raises(HistoryError, match=message):
        call(store, tmp_path / "bad.png")


def test_node_metric_names_find_the_rounds_aggregates_as_real_runs_name_them(store, tmp_path):
    """Real rounds store ``train_loss`` / ``val_after_accuracy`` (fedserver.rounds.round_metrics) while nodes
    store ``loss``: the default metrics found no global curve (compare raised 'no global values')."""
    exp = store.start_experiment("real", {})
    for round in range(1, 4):
        store.start_round(exp, round, ["site-0"])
        store.record_node_result(NodeResultRecord(exp, round, "site-0", "succeeded",
                                                  training_metrics={"loss": 1.0 / round},
                                                  validation_after={"accuracy": 0.5 + round / 10}))
        store.finish_round(exp, round, metrics={"train_loss": 1.0 / round, "val_after_accuracy": 0.5 + round / 10})
    assert_png(compare_experiments(store, [exp], tmp_path / "compare.png", metrics=("loss",)), columns=1)
    assert_png(plot_history(store, exp, tmp_path / "after.png", metrics=("accuracy",), source="validation_after"),
               columns=1)


def test_compare_finds_a_metric_nodes_report_only_on_validation(store, tmp_path):
    """``fedserver plot --compare`` with the default metrics: ``accuracy`` is recorded as
    ``val_after_accuracy`` only (no training accuracy); its panel read "no values for 'accuracy'"."""
    exps = []
    for name, rate in (("scaffold", 0.4), ("fedavg", 0.2)):
        exp = store.start_experiment(name, {})
        for round in range(1, 5):
            store.start_round(exp, round, ["site-0"])
            store.finish_round(exp, round, metrics={"train_loss": math.exp(-rate * round),
                                                    "val_after_accuracy": 1 - math.exp(-rate * round)})
        exps.append(exp)
    sources = sources_with_values(store, exps, ("loss", "accuracy"))
    assert sources == {"loss": "training", "accuracy": "validation_after"}
    assert [_compared_series(store, exps[0], m, s)[0] for m, s in sources.items()] == [
        "train_loss", "val_after_accuracy"]
    assert_png(compare_experiments(store, exps, tmp_path / "both.png"), columns=2)


def test_compare_without_any_value_lists_the_recorded_global_metrics(store, tmp_path):
    exp = store.start_experiment("real", {})
    store.start_round(exp, 1, ["site-0"])
    store.finish_round(exp, 1, metrics={"train_loss": 0.5, "val_after_accuracy": 0.7})
    with pytest.raises(HistoryError, match=r"no global values for \['f1'\]; global metrics recorded: "
                                           r"\['train_loss', 'val_after_accuracy'\]"):
        compare_experiments(store, [exp], tmp_path / "x.png", metrics=["f1"])
    assert not (tmp_path / "x.png").exists()
