"""The experiment's own part of a checkpoint (``experiment.json``): what it holds, and how a resume checks it
and turns it back into ``Experiment`` constructor arguments.

:func:`experiment_state` is what every checkpoint saves beside x and the aggregator; :func:`describe_experiment`
is the summary of the same configuration that the history keeps. :func:`resume_arguments` is the reverse
path that ``Experiment.resume`` takes: find the checkpoint, check its state, rebuild the aggregator and
map the state (and the caller's overrides) to constructor arguments.

The checkpoint store verifies sizes and digests, not meaning: a file written by another fedserver version or
edited by hand (and its manifest rewritten) can match its digest and still lack a key or hold a value of
the wrong type. :func:`check_experiment_state` refuses such a state with a CheckpointError naming the file
and the key, instead of a KeyError or TypeError from inside ``Experiment.resume`` or a constructor message
that names no file (rounds, min_nodes, timeouts, training arguments and the plan's syntax are checked here
too), and :func:`resume_arguments` an aggregator file it cannot load, or a history database whose experiment
is not the checkpoint's (the resumed rounds would be written over another experiment's).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedcore.aggregators import build_aggregator
from fedcore.errors import CheckpointError, ExperimentError, FedstreamError, HistoryError, TrainingArgsError
from fedcore.tasks import PlanSource
from fedcore.training_args import TrainingArgs
from fedserver.checkpoints import AGGREGATOR, EXPERIMENT, LATEST, Checkpoint, CheckpointStore
from fedserver.experiment_serving import check_serving_state
from fedserver.history import stored_experiment

if TYPE_CHECKING:
    from fedserver.experiment import Experiment

#: Version of the state :func:`experiment_state` writes; a resume refuses any other.
STATE_FORMAT = 1

#: Keys ``Experiment.resume`` reads without a default.
REQUIRED_KEYS = ("name", "rounds", "dataset_tags", "min_nodes", "round_timeout", "node_wait_timeout", "model_args",
                 "history_db", "plan", "training_args", "known_nodes")

#: Constructor arguments ``Experiment.resume`` takes as overrides: those a checkpoint cannot hold, and those
#: that may change between runs.
RESUME_OVERRIDES = frozenset({"server", "server_config", "node_store", "selection", "on_round", "progress", "rounds",
                              "keep_round_params", "round_timeout", "wait_after_quorum", "node_wait_timeout",
                              "expected_nodes", "history_db", "keep_checkpoints", "low_memory"})


def experiment_state(exp: Experiment) -> dict[str, Any]:
    """The experiment's part of a checkpoint: its configuration and ``completed_round``, ``known_nodes``,
    ``history_id`` (JSON-able)."""
    return {"format": STATE_FORMAT, "name": exp.name, "completed_round": exp.completed_round,
            "plan": {"name": exp.plan.name, "source": exp.plan.source},
            "training_args": exp.training_args.to_dict(), "model_args": exp.model_args,
            "rounds": exp.rounds, "dataset_tags": exp.dataset_tags, "min_nodes": exp.min_nodes,
            "round_timeout": exp.round_timeout, "node_wait_timeout": exp.node_wait_timeout,
            "wait_after_quorum": exp.wait_after_quorum, "expected_nodes": exp.expected_nodes,
            "low_memory": exp.low_memory, "known_nodes": exp.known_nodes,
            "history_id": exp.history_id, "history_db": str(exp.history_path) if exp.history_path else None,
            "buffers": exp.buffer_names,  # persistent buffers among x's entries (fedserver.experiment_buffers)
            "serving": exp.serving}  # how fedserver run served it (fedserver.experiment_serving)


def describe_experiment(exp: Experiment) -> dict[str, Any]:
    """The configuration the history records for the experiment (the plan by name and digest, not source)."""
    return {"plan": exp.plan.name, "plan_sha256": exp.plan.sha256, "training_args": exp.training_args.to_dict(),
            "aggregator": exp.aggregator.name, "aggregator_config": exp.aggregator.config(),
            "rounds": exp.rounds, "dataset_tags": exp.dataset_tags, "min_nodes": exp.min_nodes,
            "round_timeout": exp.round_timeout, "wait_after_quorum": exp.wait_after_quorum}


def check_experiment_state(state: dict[str, Any], path: Path) -> dict[str, Any]:
    """``state`` (read from ``path``) when ``Experiment.resume`` can use it, else CheckpointError (its format
    number is checked by the caller first)."""
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"{path}: experiment state lacks {missing}")
    plan = state["plan"]
    if not isinstance(plan, dict) or not isinstance(plan.get("name"), str) or not isinstance(plan.get("source"), str):
        raise CheckpointError(f"{path}: 'plan' must be a map with 'name' and 'source' strings, got {_short(plan)}")
    for key in ("training_args", "model_args"):
        if not isinstance(state[key], dict):
            raise CheckpointError(f"{path}: {key!r} must be a map, got {_short(state[key])}")
    for key in ("known_nodes", "dataset_tags"):
        value = state[key]
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise CheckpointError(f"{path}: {key!r} must be a list of strings, got {_short(value)}")
    if not isinstance(state["name"], str):
        raise CheckpointError(f"{path}: 'name' must be a string, got {_short(state['name'])}")
    if state["history_db"] is not None and not isinstance(state["history_db"], str):
        raise CheckpointError(f"{path}: 'history_db' must be a path string or null, got {_short(state['history_db'])}")
    wait = state.get("wait_after_quorum")
    if wait is not None and (isinstance(wait, bool) or not isinstance(wait, (int, float))
                             or not 0 <= wait < math.inf):
        raise CheckpointError(f"{path}: 'wait_after_quorum' must be a finite number of seconds >= 0 or null, "
                              f"got {_short(wait)}")
    expected = state.get("expected_nodes")
    if expected is not None and (isinstance(expected, bool) or not isinstance(expected, int) or expected < 1):
        raise CheckpointError(f"{path}: 'expected_nodes' must be an int >= 1 or null, got {_short(expected)}")
    history_id = state.get("history_id")
    if history_id is not None and (isinstance(history_id, bool) or not isinstance(history_id, int)):
        raise CheckpointError(f"{path}: 'history_id' must be an int or null, got {_short(history_id)}")
    for key in ("rounds", "min_nodes"):
        if isinstance(state[key], bool) or not isinstance(state[key], int) or state[key] < 1:
            raise CheckpointError(f"{path}: {key!r} must be an int >= 1, got {_short(state[key])}")
    for key in ("round_timeout", "node_wait_timeout"):
        value = state[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise CheckpointError(f"{path}: {key!r} must be a finite number of seconds > 0, got {_short(value)}")
    check_serving_state(state.get("serving"), path)
    try:
        TrainingArgs.from_dict(state["training_args"])
    except TrainingArgsError as exc:
        raise CheckpointError(f"{path}: 'training_args': {exc}") from None
    try:  # compiled, not run: a plan that cannot even compile would fail on every node
        compile(plan["source"], plan["name"], "exec")
    except (SyntaxError, ValueError) as exc:
        raise CheckpointError(f"{path}: the source of plan {plan['name']!r} does not compile: {exc}") from None
    return state


def resumable_checkpoint_dir(checkpoint_dir: str | Path) -> Path:
    """``checkpoint_dir`` as a Path if it is a directory holding a checkpoint (its ``latest.json``), else
    CheckpointError naming the path. Only looks: a mistyped path must not become a new, empty directory (the
    CheckpointStore would create it) and a resume must not start from nothing."""
    path = Path(checkpoint_dir)
    if not path.exists():
        raise CheckpointError(f"cannot resume: checkpoint directory {str(path)!r} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"cannot resume: checkpoint directory {str(path)!r} is not a directory")
    if not (path / LATEST).exists():
        raise CheckpointError(f"cannot resume: checkpoint directory {str(path)!r} holds no checkpoint (no {LATEST}: "
                              "no round of a run was ever checkpointed there)")
    return path


@dataclass(frozen=True)
class ResumeArguments:
    """What ``Experiment.resume`` builds an experiment from: the latest checkpoint (x, ``completed_round``,
    the checked state) and the constructor's arguments (the aggregator in its saved state, overrides applied)."""

    checkpoint: Checkpoint
    plan: PlanSource
    training_args: dict[str, Any]
    kwargs: dict[str, Any]


def resume_arguments(checkpoint_dir: str | Path, overrides: Mapping[str, Any]) -> ResumeArguments:
    """Read and check the latest checkpoint in ``checkpoint_dir`` and map it to constructor arguments.

    Unknown overrides raise ExperimentError (before anything is read); a missing directory or checkpoint, or
    a state of another format or shape, raises CheckpointError/ExperimentError naming it.
    """
    unknown = sorted(set(overrides) - RESUME_OVERRIDES)
    if unknown:
        raise ExperimentError(f"resume() cannot override {unknown}; allowed: {sorted(RESUME_OVERRIDES)}")
    checkpoint = CheckpointStore(resumable_checkpoint_dir(checkpoint_dir)).load_latest()
    state = checkpoint.experiment_state
    path = checkpoint.folder / EXPERIMENT
    if state.get("format") != STATE_FORMAT:
        raise ExperimentError(f"{path}: experiment state format {_short(state.get('format'))}, expected "
                              f"{STATE_FORMAT} (written by another fedserver version?)")
    check_experiment_state(state, path)
    if state.get("completed_round", checkpoint.round) != checkpoint.round:
        raise CheckpointError(f"{path}: 'completed_round' is {_short(state['completed_round'])}, but the folder's "
                              f"manifest is of round {checkpoint.round} (a file of another checkpoint?)")
    try:
        aggregator = build_aggregator(checkpoint.aggregator_name, checkpoint.aggregator_config)
        aggregator.load_state(checkpoint.aggregator_state)
    except (FedstreamError, KeyError, TypeError, ValueError) as exc:  # a file's content, whatever it holds
        raise CheckpointError(f"{checkpoint.folder / AGGREGATOR}: cannot restore aggregator "
                              f"{_short(checkpoint.aggregator_name)}: {exc}") from None
    kwargs: dict[str, Any] = {
        "aggregator": aggregator, "rounds": state["rounds"], "dataset_tags": state["dataset_tags"],
        "min_nodes": state["min_nodes"], "round_timeout": state["round_timeout"],
        "node_wait_timeout": state["node_wait_timeout"], "model_args": state["model_args"],
        "name": state["name"], "checkpoint_dir": checkpoint_dir, "history_db": state["history_db"],
        "low_memory": state.get("low_memory", False),
        "wait_after_quorum": state.get("wait_after_quorum"),  # absent from checkpoints before session 8
        "expected_nodes": state.get("expected_nodes"),  # idem
    }
    kwargs.update(overrides)
    plan = PlanSource.from_source(state["plan"]["name"], state["plan"]["source"])
    history_db = kwargs["history_db"]
    if state.get("history_id") is not None and same_history_db(history_db, state["history_db"]):
        _check_history_experiment(Path(history_db), state, plan, path)  # the experiment resume() reopens
    return ResumeArguments(checkpoint, plan, state["training_args"], kwargs)


def same_history_db(current: str | Path | None, stored: str | None) -> bool:
    """Whether history database ``current`` is the checkpoint's ``stored`` one. Checkpoints store it absolute
    (since session 9); an older relative one is taken from the working directory, as it was then."""
    return bool(current and stored) and Path(current).absolute() == Path(stored).absolute()  # type: ignore[arg-type]


def _check_history_experiment(db: Path, state: Mapping[str, Any], plan: PlanSource, path: Path) -> None:
    """CheckpointError unless history database ``db`` holds the checkpoint's experiment ``history_id`` (same
    name and plan): a resume reopens it and replaces its rounds after the checkpoint's, so another experiment
    of that id (a database deleted and started again, or another copy) would lose its rounds. Reads only."""
    history_id = state["history_id"]
    other_db = "resume with another history database (fedserver run --history-db NEW.db, or history_db=) to " \
               "record the resumed rounds as a new experiment"
    try:
        record = stored_experiment(db, history_id)
    except HistoryError as exc:
        raise CheckpointError(f"{path}: the run is recorded in history database {str(db)!r}, which cannot be "
                              f"read: {exc}; {other_db}") from None
    if record is None:
        missing = "has no experiment of that id" if db.is_file() else "does not exist"
        raise CheckpointError(f"{path}: the run is recorded as experiment {history_id} of history database "
                              f"{str(db)!r}, which {missing} (moved or deleted?); {other_db}")
    recorded_sha = record.config.get("plan_sha256") if isinstance(record.config, dict) else None
    if record.name != state["name"] or recorded_sha not in (None, plan.sha256):
        raise CheckpointError(
            f"{path}: history database {str(db)!r} holds experiment {history_id} as {_short(record.name)} (plan "
            f"{str(recorded_sha)[:12]}), not this checkpoint's {_short(state['name'])} (plan {plan.sha256[:12]}): "
            f"its rounds would be overwritten; {other_db}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."
