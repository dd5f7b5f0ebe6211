"""What a checkpoint says about where the run lives stays true when it is resumed from elsewhere:
the history database is stored absolute (a resume from another working directory reopened another folder's
history.db of the same name, same experiment id, and replaced its rounds), and a resume served by the
caller's own server or server_config carries no stale ``serving`` into later checkpoints (a later `fedserver
run --resume` served on the first run's port, where the nodes no longer dialled)."""

from __future__ import annotations

import os
from pathlib import Path

from plans_lsq import LinearPlan

from fedserver.config import ServerConfig
from fedserver.experiment import Experiment
from fedserver.experiment_state import describe_experiment, experiment_state
from fedserver.history import HistoryStore

ARGS = {"num_updates": 2, "lr": 0.01, "seed": 1}
SERVING = {"address": "127.0.0.1", "port": 50917, "tls": "insecure", "cert": None, "key": None, "ca": None,
           "home": "/nonexistent-home"}


def _checkpointed(folder: Path, history_db: str) -> Path:
    exp = Experiment(LinearPlan, ARGS, rounds=2, checkpoint_dir=folder / "ckpt", history_db=history_db)
    exp.serving = dict(SERVING)
    with HistoryStore(Path(history_db) if Path(history_db).is_absolute() else folder / history_db) as history:
        exp.history_id = history.start_experiment(exp.name, describe_experiment(exp))
    exp.params = exp.initial_params()
    exp._checkpoint_params()
    return folder / "ckpt"


def test_the_history_db_is_stored_absolute_and_found_from_another_directory(tmp_path: Path) -> None:
    (tmp_path / "A").mkdir()
    (tmp_path / "B").mkdir()
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path / "A")
        ckpt = _checkpointed(tmp_path / "A", "history.db")
        os.chdir(tmp_path / "B")
        resumed = Experiment.resume(ckpt, progress=False)
    finally:
        os.chdir(cwd)
    assert resumed.history_path == tmp_path / "A" / "history.db"  # not B/history.db
    assert resumed.history_id == 1
    assert experiment_state(resumed)["history_db"] == str(tmp_path / "A" / "history.db")


def test_a_resume_served_by_the_caller_keeps_no_stale_serving(tmp_path: Path) -> None:
    ckpt = _checkpointed(tmp_path, str(tmp_path / "history.db"))
    assert Experiment.resume(ckpt, progress=False).serving == SERVING
    other = Experiment.resume(ckpt, progress=False, server_config=ServerConfig(port=60001, tls="insecure"))
    assert other.serving is None and experiment_state(other)["serving"] is None
