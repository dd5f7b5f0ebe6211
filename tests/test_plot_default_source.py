"""``fedserver plot`` (and --compare) without --source: a metric the nodes report only on validation is
plotted from there.

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
from fedserver.plot import compare_experiments, plot_history, sources_with_values


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


# -- fedserver plot --compare ----------------------------------------------------------------------


def _record_run(store: HistoryStore, name: str, rate: float, *, when: str = "before",
                training_accuracy: bool = False) -> int:
    """A run whose nodes report accuracy on validation ``when`` ('before' or 'after') and, if asked, in
    training too; the rounds store the aggregates as ``fedserver.rounds.round_metrics`` names them."""
    exp = store.start_experiment(name, {"aggregator": name})
    for round_index in range(1, 6):
        store.start_round(exp, round_index, ["site-0"])
        loss = float(np.exp(-rate * round_index))
        training = {"loss": loss, **({"accuracy": 0.2 + loss / 4} if training_accuracy else {})}
        validation = {"accuracy": 1 - loss}
        store.record_node_result(NodeResultRecord(
            exp, round_index, "site-0", "succeeded", training_metrics=training,
            validation_before=validation if when == "before" else None,
            validation_after=validation if when == "after" else None))
        metrics = {f"train_{k}": v for k, v in training.items()} | {f"val_{when}_accuracy": 1 - loss}
        store.finish_round(exp, round_index, metrics=metrics)
    store.finish_experiment(exp)
    return exp


def test_the_source_of_compared_experiments_is_the_first_with_a_value_in_any_of_them(tmp_path) -> None:
    with HistoryStore(tmp_path / "history.db") as store:
        before = _record_run(store, "before", 0.3)
        after = _record_run(store, "after", 0.2, when="after")
        assert sources_with_values(store, [before], ["loss", "accuracy"]) == {
            "loss": "training", "accuracy": "validation_before"}
        assert sources_with_values(store, [before, after], ["loss", "accuracy"]) == {
            "loss": "training", "accuracy": "validation_after"}
        assert sources_with_values(store, [after, before], ["accuracy"]) == {"accuracy": "validation_after"}


def test_compare_without_source_draws_accuracy_from_validation_and_says_so(tmp_path, capsys) -> None:
    """Both runs report accuracy only before training: the accuracy panel of --compare read "no values"."""
    db = tmp_path / "history.db"
    with HistoryStore(db) as store:
        ids = [_record_run(store, "scaffold", 0.5), _record_run(store, "fedavg", 0.15)]
    out = tmp_path / "compare.png"
    assert main(["plot", "--db", str(db), "--experiment", "1", "--compare", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed == (f"no training values: plotted accuracy from validation_before (--source to choose)\n"
                       f"wrote {out}\n"), printed
    empty = tmp_path / "empty.png"
    with HistoryStore(db) as store:  # what --compare drew before: no curve of accuracy
        compare_experiments(store, ids, empty, source="training")
    assert _ink(out, 1) > 1.5 * _ink(empty, 1), "the accuracy panel holds curves, not 'no values'"
    assert _ink(out, 0) == pytest.approx(_ink(empty, 0), abs=0.01)  # loss: the same training curves


def test_compare_with_an_explicit_source_draws_that_source_and_says_nothing(tmp_path, capsys) -> None:
    db = tmp_path / "history.db"
    with HistoryStore(db) as store:
        ids = [_record_run(store, name, rate, training_accuracy=True) for name, rate in (("a", 0.5), ("b", 0.1))]
        compare_experiments(store, ids, tmp_path / "training.png", metrics=["accuracy"])
        compare_experiments(store, ids, tmp_path / "before.png", metrics=["accuracy"], source="validation_before")
    out = tmp_path / "chosen.png"
    assert main(["plot", "--db", str(db), "--experiment", "1", "--compare", "2", "--metric", "accuracy",
                 "--source", "validation_before", "--out", str(out)]) == 0
    assert capsys.readouterr().out == f"wrote {out}\n"
    assert np.array_equal(imread(out), imread(tmp_path / "before.png"))
    assert not np.array_equal(imread(out), imread(tmp_path / "training.png"))  # not the default's choice
