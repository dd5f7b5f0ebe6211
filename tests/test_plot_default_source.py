"""``fedserver plot`` without --source: a metric the nodes report only on validation is plotted from there.

The guide's ``fedserver plot --experiment 3 --out run3.png`` drew an empty "accuracy" panel ("no values for
'accuracy'") for a plan that reports accuracy only among its validation metrics, and the user had to find
``--source validation_after``. An explicit --source is still taken as given.
"""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.image import imread

from fedserver.cli import main
from fedserver.history import HistoryStore
from fedserver.history_records import NodeResultRecord
from fedserver.plot import plot_history, sources_with_values


def _record(store: HistoryStore, *, after: bool = True, before: bool = True) -> int:
    """Nodes report loss in training, accuracy only on validation (before and/or after training)."""
    exp = store.start_experiment("val-only", {"aggregator": "fedavg"})
    for round_index in range(1, 5):
        store.start_round(exp, round_index, ["site-0", "site-1"])
        for k, node_id in enumerate(["site-0", "site-1"]):
            accuracy = 0.5 + round_index / 10 + k / 20
            store.record_node_result(NodeResultRecord(
                exp, round_index, node_id, "succeeded", training_metrics={"loss": 1.0 / round_index + k},
                validation_before={"accuracy": accuracy - 0.05} if before else None,
                validation_after={"accuracy": accuracy} if after else None))
        metrics = {"train_loss": 1.0 / round_index, **({"val_after_accuracy": 0.6} if after else {})}
        store.finish_round(exp, round_index, metrics=metrics)
    store.finish_experiment(exp)
    return exp


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "history.db"
    with HistoryStore(path) as store:
        _record(store)
        _record(store, after=False)
        _record(store, after=False, before=False)
    return path


def test_each_metric_takes_the_first_source_holding_values(db) -> None:
    with HistoryStore(db) as store:
        assert sources_with_values(store, 1, ["loss", "accuracy"]) == {"loss": "training",
                                                                      "accuracy": "validation_after"}
        assert sources_with_values(store, 2, ["accuracy"]) == {"accuracy": "validation_before"}
        assert sources_with_values(store, 3, ["loss", "accuracy"]) == {"loss": "training", "accuracy": "training"}


def _ink(path, half: int) -> float:
    """Share of non-white pixels in the left (0) or right (1) half of a two-subplot PNG."""
    pixels = imread(path)[..., :3]
    width = pixels.shape[1] // 2
    part = pixels[:, half * width:(half + 1) * width]
    return float(np.mean(part.min(axis=2) < 0.9))


def test_plot_without_source_draws_accuracy_from_validation_and_says_so(db, tmp_path, capsys) -> None:
    out = tmp_path / "run.png"
    assert main(["plot", "--db", str(db), "--experiment", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed == (f"no training values: plotted accuracy from validation_after (--source to choose)\n"
                       f"wrote {out}\n"), printed
    empty = tmp_path / "empty.png"
    with HistoryStore(db) as store:  # what the guide's command drew before: the training source for both
        plot_history(store, 1, empty, source="training")
    assert _ink(out, 1) > 1.5 * _ink(empty, 1), "the accuracy panel holds curves, not 'no values'"
    assert _ink(out, 0) == pytest.approx(_ink(empty, 0), abs=0.01)  # loss: the same training curves


def test_an_explicit_source_is_never_second_guessed(db, tmp_path, capsys) -> None:
    out = tmp_path / "run.png"
    assert main(["plot", "--db", str(db), "--experiment", "1", "--source", "training", "--out", str(out)]) == 0
    assert capsys.readouterr().out == f"wrote {out}\n"


def test_nothing_is_said_when_every_metric_has_training_values(db, tmp_path, capsys) -> None:
    out = tmp_path / "loss.png"
    assert main(["plot", "--db", str(db), "--experiment", "3", "--metric", "loss", "--out", str(out)]) == 0
    assert capsys.readouterr().out == f"wrote {out}\n"
