"""Session 9, bad inputs: ``fedserver run --resume`` mistakes beyond a mistyped directory.

A damaged or foreign checkpoint, a history database whose experiment is not the checkpoint's, or options that
contradict the checkpoint used to exit 1 (some only after the server had started and the history had been
written, some with a constructor's message naming no file, some not at all: --rounds below the checkpoint
ran nothing and exited 0, --aggregator and --min-nodes were silently ignored). Each is now the user's mistake:
exit 2, one line naming the file or the option and what was expected against what was found, and nothing
stored is written (checkpoint directory, history database, server home).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from plans_lsq import LinearPlan

from fedcore.aggregators import Scaffold
from fedcore.errors import CheckpointError
from fedserver.auth import NodeStore
from fedserver.checkpoints import CheckpointStore
from fedserver.cli import main
from fedserver.experiment import Experiment
from fedserver.experiment_state import describe_experiment
from fedserver.history import HistoryStore
from fedserver.home import nodes_db

ARGS = {"num_updates": 5, "lr": 0.02, "seed": 7}


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file under ``roots`` with the SHA-256 of its bytes: what 'nothing is written' compares."""
    found = {}
    for root in roots:
        for path in sorted(root.rglob("*")) if root.is_dir() else [root]:
            if path.is_file():
                found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


@pytest.fixture
def site(tmp_path: Path) -> dict[str, Path]:
    """A server home with an enrolled node, and a checkpoint of round 2 (of 3) recorded as experiment 1 of a
    history database, as a run leaves them."""
    home = tmp_path / "home"
    NodeStore(nodes_db(home)).enroll("site-a")
    ckpt, db = tmp_path / "ckpt", tmp_path / "history.db"
    make_checkpoint(ckpt, db)
    return {"home": home, "ckpt": ckpt, "db": db, "root": tmp_path}


def make_checkpoint(ckpt: Path, db: Path, *, aggregator=None, name: str = "lsq") -> None:
    exp = Experiment(LinearPlan, ARGS, aggregator=aggregator, rounds=3, checkpoint_dir=ckpt, history_db=db,
                     name=name, progress=False)
    with HistoryStore(db) as history:
        exp.history_id = history.start_experiment(exp.name, describe_experiment(exp))
        history.finish_experiment(exp.history_id, "failed", "RoundFailedError: round 3 failed")
    exp.params = exp.initial_params()
    exp.completed_round = 2
    exp._checkpoint_params()


def edit_state(ckpt: Path, **changes) -> None:
    """Rewrite the latest checkpoint with ``changes`` to its experiment.json (manifest digests stay valid)."""
    store = CheckpointStore(ckpt)
    c = store.load_latest()
    store.save(c.round, c.params, c.aggregator_name, c.aggregator_config, c.aggregator_state,
               {**c.experiment_state, **changes})


def resume(site: dict[str, Path], capsys, *extra: str) -> tuple[int, str]:
    before = snapshot(site["home"], site["ckpt"], site["db"])
    try:
        code = main(["--home", str(site["home"]), "run", "--resume", "--checkpoint-dir", str(site["ckpt"]),
                     "--tls", "insecure", "--port", "0", "--node-wait", "0.1", "--no-progress", *extra])
    except SystemExit as exited:
        code = exited.code
    err = capsys.readouterr().err
    assert snapshot(site["home"], site["ckpt"], site["db"]) == before, "a refused resume writes nothing"
    return code, err


def refused_in_one_line(code: int, err: str) -> str:
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("fedserver run: error: cannot resume: "), err
    return err


# -- damaged checkpoints: the file and the fault ----------------------------------------------------------


def test_a_truncated_model_file_names_the_file_and_both_sizes(site, capsys) -> None:
    params = site["ckpt"] / "round-0002" / "params.msgpack"
    size = params.stat().st_size
    params.write_bytes(params.read_bytes()[:10])
    err = refused_in_one_line(*resume(site, capsys))
    assert f"{params}: size 10 bytes, the manifest says {size} (truncated or overwritten)" in err, err


def test_a_damaged_pointer_names_latest_json(site, capsys) -> None:
    (site["ckpt"] / "latest.json").write_text("{oops")
    err = refused_in_one_line(*resume(site, capsys))
    assert f"{site['ckpt'] / 'latest.json'}: invalid JSON" in err, err
    (site["ckpt"] / "latest.json").write_text('{"format_version": 1, "round": 5, "folder": "round-0005"}')
    err = refused_in_one_line(*resume(site, capsys))
    assert "latest.json points to round 5, but folder round-0005 is missing" in err, err


@pytest.mark.parametrize("changes, message", [
    ({"format": 99}, "experiment state format 99, expected 1"),
    ({"rounds": 0}, "'rounds' must be an int >= 1, got 0"),
    ({"min_nodes": "2"}, "'min_nodes' must be an int >= 1, got '2'"),
    ({"round_timeout": -1}, "'round_timeout' must be a finite number of seconds > 0, got -1"),
    ({"training_args": {"num_update": 5}}, "'training_args': unknown training argument(s) 'num_update'"),
    ({"plan": {"name": "LinearPlan", "source": "class LinearPlan(:\n"}},
     "the source of plan 'LinearPlan' does not compile"),
    ({"completed_round": 7}, "'completed_round' is 7, but the folder's manifest is of round 2"),
])
def test_a_bad_experiment_state_names_experiment_json_and_the_key(site, capsys, changes, message) -> None:
    edit_state(site["ckpt"], **changes)
    err = refused_in_one_line(*resume(site, capsys))
    assert f"{site['ckpt'] / 'round-0002' / 'experiment.json'}: {message}" in err, err


def test_an_aggregator_file_that_cannot_be_restored_names_aggregator_msgpack(site, capsys) -> None:
    store = CheckpointStore(site["ckpt"])
    c = store.load_latest()
    store.save(2, c.params, "scaffold", {}, {"format": 1}, c.experiment_state)  # a FedAvg state as Scaffold's
    err = refused_in_one_line(*resume(site, capsys))
    assert f"{site['ckpt'] / 'round-0002' / 'aggregator.msgpack'}: cannot restore aggregator 'scaffold': " in err


# -- a history database that is not the checkpoint's ----------------------------------------------------


def test_a_history_database_gone_is_refused_before_a_new_one_is_created(site, capsys) -> None:
    site["db"].unlink()
    err = refused_in_one_line(*resume(site, capsys))
    assert (f"the run is recorded as experiment 1 of history database {str(site['db'])!r}, which does not exist "
            "(moved or deleted?); resume with another history database (fedserver run --history-db NEW.db") in err
    assert not site["db"].exists()


def test_another_experiment_under_the_same_id_keeps_its_rounds(site, capsys) -> None:
    """history.db deleted and started again by another run: its experiment 1 is not the checkpoint's."""
    site["db"].unlink()
    with HistoryStore(site["db"]) as history:
        other = history.start_experiment("mnist-cnn", {"plan": "CNN", "plan_sha256": "ab" * 32})
        history.start_round(other, 1, ["site-a"])
        history.finish_round(other, 1, metrics={"loss": 0.5})
    err = refused_in_one_line(*resume(site, capsys))
    assert (f"history database {str(site['db'])!r} holds experiment 1 as 'mnist-cnn' (plan abababababab), not this "
            "checkpoint's 'lsq' (plan ") in err, err
    with HistoryStore(site["db"]) as history:
        assert [r.round for r in history.rounds(1)] == [1]
        assert history.experiment(1).name == "mnist-cnn"
    # the API refuses it too, before anything is written
    with pytest.raises(CheckpointError, match="its rounds would be overwritten"):
        Experiment.resume(site["ckpt"], progress=False)


def test_a_new_history_database_records_the_resume_as_a_new_experiment(site, capsys) -> None:
    site["db"].unlink()
    exp = Experiment.resume(site["ckpt"], progress=False, history_db=site["root"] / "new.db")
    assert exp.history_id is None and exp.completed_round == 2


# -- options that contradict the checkpoint -----------------------------------------------------------------


def test_rounds_below_the_checkpoint_are_refused(site, capsys) -> None:
    err = refused_in_one_line(*resume(site, capsys, "--rounds", "1"))
    assert (f"--rounds 1 is below the round the checkpoint holds (2, {str(site['ckpt'] / 'round-0002')!r}): "
            "give --rounds N > 2") in err, err


@pytest.mark.parametrize("flag, value", [("--aggregator", "scaffold"), ("--min-nodes", "3")])
def test_options_the_checkpoint_fixes_are_refused_not_ignored(site, capsys, flag, value) -> None:
    code, err = resume(site, capsys, flag, value)
    assert code == 2, err
    assert err.splitlines()[-1] == ("fedserver run: error: --resume continues with the checkpoint's own "
                                    f"configuration; drop {flag}"), err


def test_low_memory_on_a_scaffold_checkpoint_is_refused(tmp_path, capsys) -> None:
    home = tmp_path / "home"
    NodeStore(nodes_db(home)).enroll("site-a")
    make_checkpoint(tmp_path / "ckpt", tmp_path / "history.db", aggregator=Scaffold())
    site = {"home": home, "ckpt": tmp_path / "ckpt", "db": tmp_path / "history.db"}
    err = refused_in_one_line(*resume(site, capsys, "--low-memory"))
    assert "--low-memory needs checkpoints and the fedavg aggregator" in err and "Scaffold does" in err, err


def test_evaluate_with_a_checkpoint_that_holds_no_seed_is_refused(site, capsys) -> None:
    edit_state(site["ckpt"], training_args={"num_updates": 5, "lr": 0.02, "test_ratio": 0.25})
    err = refused_in_one_line(*resume(site, capsys, "--evaluate"))
    assert "--evaluate: the checkpoint's training arguments" in err and "evaluation needs a seed" in err, err


def test_a_good_checkpoint_still_gets_past_the_checks(site, capsys) -> None:
    """No node connects: the run fails below quorum (exit 1, an operation failed), after the checks."""
    code = main(["--home", str(site["home"]), "run", "--resume", "--checkpoint-dir", str(site["ckpt"]),
                 "--tls", "insecure", "--port", "0", "--node-wait", "0.1", "--no-progress", "--rounds", "3"])
    err = capsys.readouterr().err
    assert code == 1 and "quorum is 1" in err, err
    with HistoryStore(site["db"]) as history:
        resumed = history.experiment(1)  # the checkpoint's experiment, reopened and failed again
        assert resumed.status == "failed" and "quorum is 1" in resumed.error and len(history.experiments()) == 1
