"""``fedserver run``: run a federated :class:`~fedserver.experiment.Experiment` from the command line.

The inputs a researcher types (a plan file and class, training arguments as JSON, an aggregator) are
turned into the Experiment API's objects here, each refused with a message that names the problem; the
rounds themselves run in :mod:`fedserver.experiment`. The server options are those of ``fedserver serve``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import importlib.util
import json
import os
import signal
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from fedcore.aggregators import AGGREGATORS, Aggregator, build_aggregator
from fedcore.command_line import EXIT_REFUSED, parse_grace_seconds, parse_seconds
from fedcore.errors import (
    CheckpointError,
    ExperimentError,
    FedstreamError,
    HistoryError,
    LowMemoryAggregatorError,
    RoundFailedError,
    TrainingArgsError,
)
from fedcore.plans import TrainingPlan
from fedcore.text_output import escape_unprintable
from fedcore.training_args import TrainingArgs
from fedserver.auth import NodeStore
from fedserver.checkpoints import EXPERIMENT, CheckpointStore, folder_name
from fedserver.cli_history import DB_ENV_VAR, DEFAULT_DB
from fedserver.cli_serve import add_server_options
from fedserver.config import ServerConfig
from fedserver.evaluation import EvaluationReport, check_evaluable
from fedserver.experiment import Experiment, resumable_checkpoint_dir
from fedserver.experiment_serving import (
    DEFAULTS,
    NONE_WORDS,
    OPTION_FIELDS,
    apply_server_options,
    apply_serving,
    hint_command,
    missing_checkpoint_paths,
    none_as_word,
    server_from_args,
    serving_state,
)
from fedserver.history_records import SHOWN_NAME_CHARS, shown_text
from fedserver.home import FILES_HELP, add_home_option
from fedserver.rounds import RoundReport
from fedserver.server import FedServer

__all__ = ["format_round", "format_timing", "load_plan_class_from_file", "load_training_args", "register"]

_RAW = argparse.RawDescriptionHelpFormatter
_ARGS_EXAMPLE = '{"num_updates": 100, "lr": 0.05}'

DESCRIPTION = f"""\
Run a federated training experiment: start the server, wait for nodes, then for each round send every
selected node the global model and the training plan, aggregate the replies as they arrive, checkpoint,
and print one line per round under a progress bar. Nodes run `fednode start` and must have approved
the plan (`fednode plans approve`), or be started with --auto-approve for demos.

training plan (--plan FILE.py:CLASS):
  CLASS is a subclass of fedcore.plans.TorchTrainingPlan or NumpyTrainingPlan defined in FILE.py. The
  whole source of FILE.py is what nodes receive, approve by its SHA-256 and run, so it must import only
  what nodes have (fedcore, numpy, torch). It also runs here, to initialise the global model.

training arguments (--args JSON or --args-file FILE.json):
  a JSON object, e.g. '{_ARGS_EXAMPLE}'. Keys:
{textwrap.fill(", ".join(TrainingArgs.valid_keys()), width=100, initial_indent="    ", subsequent_indent="    ")}
  num_updates (local steps per round) wins over epochs; seed makes the model initialisation and the
  batch order reproducible.

aggregation (--aggregator):
  fedavg    x <- sum_i n_i y_i / sum_i n_i, weighted by the samples each node saw (default)
  scaffold  Scaffold with control variates (Karimireddy et al. 2020, option II); --server-lr is the
            global step size eta_g (default 1.0); needs plain SGD (momentum 0, weight_decay 0)

rounds, nodes and time:
  Each round selects every connected node with a dataset carrying all --tags. A node that fails,
  refuses or stays silent for --round-timeout seconds (no progress report, heartbeat or transferred
  byte: a slow but moving transfer never times out) is recorded and left out; the round completes
  if at least --min-nodes replies were aggregated, and otherwise fails naming the missing nodes. A
  reply that arrives after its round ended is refused and recorded as 'late', never applied. Before
  each round the server waits up to --node-wait seconds for --expected-nodes eligible nodes (default
  --min-nodes), then starts with those connected if they are at least --min-nodes. Set
  --expected-nodes to the number of sites: nodes find a freshly started server within their
  reconnect backoff (up to 30 s), and a round starts without those not yet back.
  Stragglers: by default a round waits for every node it selected. --wait-after-quorum SECONDS
  closes the tasks still running that long after --min-nodes replies are in (outcome 'timeout'; those
  nodes stop training at their next heartbeat or progress report and upload nothing); 0 closes them
  as soon as the quorum is in.
  --evaluate: after the last round, the final model goes to every eligible node as an evaluation
  task (no training): each node evaluates it on the split --args' test_ratio and seed hold out (every
  local sample when test_ratio is 0; test_ratio > 0 needs a seed, else no split is held out from
  training and the run is refused before it starts); it waits for every node. One line gives the
  sample-weighted means, one per node follows.
  `fedserver run --resume --checkpoint-dir DIR --evaluate` evaluates the model of a finished run's
  last checkpoint (no round is left to train).

checkpoints and resuming (--checkpoint-dir, --resume):
  After every completed round the global model, the aggregator's full state (Scaffold: every control
  variate) and the experiment's configuration are written atomically to --checkpoint-dir. A failed
  or interrupted run leaves the last completed round's checkpoint intact; `fedserver run --resume
  --checkpoint-dir DIR` continues after it with the same plan and arguments (only --rounds,
  --round-timeout, --wait-after-quorum (`none` to wait for every node again), --node-wait,
  --expected-nodes and --history-db may change) and gives the same numbers as an uninterrupted run.
  It serves as the run did: the checkpoint keeps --address, --port (the port bound), --tls, --cert,
  --key, --ca and the server home; one given with --resume (or $FEDSERVER_HOME, like --home)
  overrides the checkpoint's (stderr names it); a checkpoint home or file that is not there is refused
  (exit 2) naming the flag to pass. The other server options the run's command line gave (--max-payload-size,
  --max-poll-wait, --receive-window, ...) are kept too and apply again unless given with --resume (one
  stderr line names those applied and those the command line overrides). After a failure or Ctrl-C the command that resumes the run is printed, ready to run.

output:
  stdout: the server address, one line per round (round, nodes that replied / selected, aggregated
  metrics: train_*, val_before_*, val_after_*, seconds, nodes left out and why), and a summary.
  stderr: the progress bar (--no-progress to hide it), warnings and errors. Every round and node
  result also goes to the history database (`fedserver history`, `fedserver plot`).

security (--tls): as `fedserver serve`: tls (default; server certificate in HOME/certs, nodes send the
token from `fedserver nodes enroll`), mtls (node certificates from `fedserver certs node`), insecure
(plaintext; loopback experiments only).

server memory (--low-memory, --max-upload-buffer, --receive-window): --low-memory lets the server drop
the global model during a round once every node has downloaded it, and reload it from the last
checkpoint when needed (a resumed download, a failed round): peak memory ~2 models instead of ~3, for a
checkpoint of the model before each round and a reload (seconds per GB) when one is needed. It needs
--checkpoint-dir and --aggregator fedavg (Scaffold keeps the model for its control variates).
--max-upload-buffer and --receive-window: as `fedserver serve`. The defaults favour speed;
with many nodes or large models, --max-upload-buffer 64MiB --receive-window 256KiB bound the replies
held at once (they are then received one after another; `fedserver serve --help` says more)."""

EPILOG = f"""\
examples:
  fedserver run --plan plans/mlp.py:MLPPlan --args '{_ARGS_EXAMPLE}' --rounds 10 \\
                --tags cardio --min-nodes 2 --checkpoint-dir runs/mlp
  fedserver run --plan plans/mlp.py:MLPPlan --args-file args.json --aggregator scaffold \\
                --server-lr 1.0 --rounds 20 --tags cardio --min-nodes 3 --name mlp-scaffold
  fedserver run --resume --checkpoint-dir runs/mlp --rounds 20     # continue after a failure

exit status:
  0 every round completed; 1 a round failed below quorum, or bad input (plan file, class, JSON,
  training arguments, server configuration), with the reason on stderr; 2 bad command-line usage,
  or a --resume the checkpoint cannot serve: a --checkpoint-dir that does not exist or holds no
  checkpoint, a damaged or foreign checkpoint, a history database whose experiment is not the
  checkpoint's, options that contradict it (one line names the file or option; nothing is written);
  130 interrupted by SIGINT or SIGTERM (the last completed round's checkpoint stays usable)

{FILES_HELP}
  {DB_ENV_VAR}   history database when --history-db is not given (default ./{DEFAULT_DB})"""


def register(subparsers: Any) -> None:
    """Add ``run`` to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    run = subparsers.add_parser("run", help="run a federated training experiment", description=DESCRIPTION,
                                epilog=EPILOG, formatter_class=_RAW)
    add_home_option(run)
    what = run.add_argument_group("experiment")
    what.add_argument("--plan", metavar="FILE.py:CLASS", help="the training plan class and the file defining it")
    given = what.add_mutually_exclusive_group()
    given.add_argument("--args", metavar="JSON", help=f"training arguments as a JSON object, e.g. '{_ARGS_EXAMPLE}'")
    given.add_argument("--args-file", type=Path, metavar="FILE", help="training arguments from a JSON file")
    what.add_argument("--aggregator", choices=sorted(AGGREGATORS),
                      help="how replies are combined (default: fedavg)")
    what.add_argument("--server-lr", type=float, metavar="ETA",
                      help="Scaffold's global step size eta_g (default: 1.0; scaffold only)")
    what.add_argument("--rounds", type=int, metavar="N", help="total number of rounds (required unless --resume)")
    what.add_argument("--name", help="experiment name in the history and on the progress bar (default: CLASS)")
    nodes = run.add_argument_group("nodes and timeouts")
    nodes.add_argument("--tags", metavar="TAG[,TAG...]", action="append", default=[],
                       help="select nodes with a dataset carrying all these tags; comma separated, repeatable")
    nodes.add_argument("--min-nodes", type=int, metavar="K",
                       help="quorum: replies a round needs to complete (default: 1)")
    nodes.add_argument("--round-timeout", type=parse_seconds, metavar="SECONDS",
                       help="give a node up after this long without any activity (default: 300)")
    nodes.add_argument("--wait-after-quorum", type=_parse_wait_after_quorum, metavar="SECONDS|none",
                       help="once --min-nodes replies are in, close the tasks still running after this long "
                            "(default: none, wait for every node)")
    nodes.add_argument("--node-wait", type=parse_seconds, metavar="SECONDS",
                       help="wait this long before each round for --expected-nodes nodes (default: 120)")
    nodes.add_argument("--expected-nodes", type=int, metavar="N",
                       help="wait (up to --node-wait) for N eligible nodes before each round, then start with "
                            "those connected if at least --min-nodes (default: --min-nodes)")
    out = run.add_argument_group("outputs")
    out.add_argument("--checkpoint-dir", type=Path, metavar="DIR",
                     help="write a checkpoint after every round here (default: none)")
    out.add_argument("--history-db", type=Path, metavar="FILE",
                     help=f"history database (default: ${DB_ENV_VAR}, else ./{DEFAULT_DB})")
    out.add_argument("--resume", action="store_true",
                     help="continue the experiment checkpointed in --checkpoint-dir after its last round")
    out.add_argument("--no-progress", action="store_true", help="no progress bar (the per-round lines stay)")
    out.add_argument("--evaluate", action="store_true",
                     help="after the last round, evaluate the final model on every eligible node (no training) "
                          "and print each node's metrics and their sample-weighted means")
    out.add_argument("--low-memory", action="store_true",
                     help="drop the global model during each round once every node has it, reload it from the "
                          "checkpoint when needed (needs --checkpoint-dir and --aggregator fedavg)")
    serving = run.add_argument_group("server (as `fedserver serve`)")
    add_server_options(serving)
    for action in serving._group_actions:  # None = not given: a resume takes the checkpoint's value then
        if (action.dest in DEFAULTS or action.dest in OPTION_FIELDS) and action.default is not None:
            action.help = (action.help or "").replace("%(default)s", str(action.default))
            action.default = None
        if action.dest in NONE_WORDS:  # --reconnect-grace none, --receive-window bdp: given, not None
            action.type = none_as_word(action.type, NONE_WORDS[action.dest])
    run.set_defaults(func=_run, usage_error=run.error)


# -- turning command-line text into Experiment inputs ----------------------------------------------
def load_plan_class_from_file(spec: str) -> type[TrainingPlan]:
    """Import ``FILE.py`` of ``FILE.py:CLASS`` and return its TrainingPlan subclass ``CLASS``.

    Raises:
        ExperimentError: malformed spec, missing file, import failure, no such class, not a TrainingPlan.
    """
    path_text, sep, class_name = spec.rpartition(":")
    if not sep or not path_text or not class_name.isidentifier():
        raise ExperimentError(f"--plan must be FILE.py:CLASS (e.g. plans/mlp.py:MLPPlan), got {spec!r}")
    path = Path(path_text)
    if not path.is_file():
        raise ExperimentError(f"--plan: plan file {path_text!r} does not exist or is not a file")
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    module_name = f"fedserver_run_plan_{digest}"
    loader_spec = importlib.util.spec_from_file_location(module_name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise ExperimentError(f"--plan: {path_text!r} is not a Python source file (expected FILE.py)")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[module_name] = module  # dataclasses and inspect.getsource look the module up here
    try:
        loader_spec.loader.exec_module(module)
    except Exception as exc:  # the researcher's file: any failure is reported
        sys.modules.pop(module_name, None)
        raise ExperimentError(f"--plan: importing {path_text!r} failed: {type(exc).__name__}: {exc}") from exc
    found = getattr(module, class_name, None)
    if found is None:
        plans = sorted(name for name, value in vars(module).items()
                       if isinstance(value, type) and issubclass(value, TrainingPlan) and value.__module__ == module_name)
        raise ExperimentError(f"--plan: {path_text!r} defines no {class_name!r}; training plans defined there: "
                              f"{', '.join(plans) if plans else 'none'}")
    if not (isinstance(found, type) and issubclass(found, TrainingPlan)) or found is TrainingPlan:
        what = f"class {found.__name__}" if isinstance(found, type) else f"a {type(found).__name__}"
        raise ExperimentError(f"--plan: {class_name!r} in {path_text!r} is {what}, not a TrainingPlan subclass "
                              "(derive it from fedcore.plans.TorchTrainingPlan or NumpyTrainingPlan)")
    return found


def load_training_args(text: str | None, path: Path | None) -> dict[str, Any]:
    """The training arguments of ``--args`` (JSON text) or ``--args-file``, validated by TrainingArgs."""
    where = "--args"
    if path is not None:
        where = f"--args-file {str(path)!r}"
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ExperimentError(f"{where}: cannot read the file: {getattr(exc, 'strerror', None) or exc}") from None
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ExperimentError(f"{where} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}; "
                              f"expected an object such as '{_ARGS_EXAMPLE}'") from None
    if not isinstance(value, dict):
        raise ExperimentError(f"{where} must be a JSON object of training arguments such as '{_ARGS_EXAMPLE}', "
                              f"got a JSON {type(value).__name__}")
    try:
        return TrainingArgs.from_dict(value).to_dict()
    except TrainingArgsError as exc:
        raise ExperimentError(f"{where}: {exc}") from None


def _aggregator(args: argparse.Namespace) -> Aggregator:
    name = args.aggregator or "fedavg"
    if args.server_lr is not None and name != "scaffold":
        raise ExperimentError(f"--server-lr applies to --aggregator scaffold only, not {name!r}")
    config = {"server_lr": args.server_lr} if args.server_lr is not None else {}
    return build_aggregator(name, config)


def _tags(values: list[str]) -> list[str]:
    return [tag.strip() for value in values for tag in value.split(",") if tag.strip()]


def _history_db(args: argparse.Namespace) -> Path:
    return args.history_db or Path(os.environ.get(DB_ENV_VAR) or DEFAULT_DB)


def format_round(report: RoundReport, total: int) -> str:
    """One line per round: ``round 3/10  nodes 2/3  train_loss=0.1234 ...  (1.20 s)  left out: site-2 (timeout)``."""
    metrics = shown_text("  ".join(f"{shown_text(name, SHOWN_NAME_CHARS)}={value:.4g}"  # names from the nodes
                                   for name, value in sorted(report.metrics.items())), 1000)
    line = (f"round {report.round}/{total}  nodes {len(report.succeeded)}/{len(report.selected)}"
            f"{'  ' + metrics if metrics else ''}  ({report.duration_s:.2f} s)")
    left_out = [f"{o.node_id} ({o.outcome})" for o in report.outcomes if o.outcome != "succeeded"]
    return line + (f"  left out: {', '.join(left_out)}" if left_out else "")


def format_timing(reports: list[RoundReport], seconds: float, node_wait_s: float) -> str:
    """``completed 2 round(s) in 18.0 s: 0.27 s per round, 17.5 s waiting for nodes``: the rounds' own time (from
    their tasks to their average) apart from the wait for nodes before them, which a per-round mean would hide."""
    per_round = sum(r.duration_s for r in reports) / len(reports)
    return (f"completed {len(reports)} round(s) in {seconds:.1f} s: {per_round:.2f} s per round, "
            f"{node_wait_s:.1f} s waiting for nodes")


# -- the command -----------------------------------------------------------------------------------
#: ``--wait-after-quorum none``: wait for every node (how a resumed run undoes a checkpointed wait).
WAIT_OFF = "none"


def _parse_wait_after_quorum(text: str) -> float | str:
    """``--wait-after-quorum``: finite seconds >= 0, or ``none``."""
    if text.strip().lower() == WAIT_OFF:
        return WAIT_OFF
    try:
        return parse_grace_seconds(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"invalid wait {text!r}: must be seconds >= 0, or none") from None


def _check_options(args: argparse.Namespace) -> None:
    if args.resume:  # a --resume mistake is bad usage (exit 2), refused before anything is created
        if args.checkpoint_dir is None:
            args.usage_error("--resume needs --checkpoint-dir DIR (the checkpoints of the run to continue)")
        fixed = [flag for flag, value in (("--plan", args.plan), ("--args", args.args),
                                          ("--args-file", args.args_file), ("--name", args.name),
                                          ("--tags", args.tags or None), ("--server-lr", args.server_lr),
                                          ("--aggregator", args.aggregator), ("--min-nodes", args.min_nodes))
                 if value is not None]
        if fixed:
            args.usage_error(f"--resume continues with the checkpoint's own configuration; drop {', '.join(fixed)}")
        try:  # a mistyped DIR: neither the DIR nor the home is created
            resumable_checkpoint_dir(args.checkpoint_dir)
        except CheckpointError as exc:
            args.usage_error(f"argument --checkpoint-dir: {exc}; check the path, or drop --resume to start a new run")
        return
    if args.low_memory and args.checkpoint_dir is None:
        raise ExperimentError("--low-memory reloads the global model from the last checkpoint: it needs "
                              "--checkpoint-dir DIR (and --aggregator fedavg)")
    if args.low_memory and (args.aggregator or "fedavg") != "fedavg":
        raise ExperimentError(f"--low-memory needs --aggregator fedavg, not {args.aggregator!r} (Scaffold keeps the "
                              "global model in memory during a round)")
    if args.plan is None or args.rounds is None:
        raise ExperimentError("a new run needs --plan FILE.py:CLASS and --rounds N (or --resume)")
    if args.checkpoint_dir is not None:
        latest = CheckpointStore(args.checkpoint_dir).latest_round() if args.checkpoint_dir.is_dir() else None
        if latest is not None:
            raise ExperimentError(f"--checkpoint-dir {str(args.checkpoint_dir)!r} already holds a run (last round "
                                  f"{latest}): add --resume to continue it, or choose another directory")


def _experiment(args: argparse.Namespace, server: FedServer, on_round) -> Experiment:
    common: dict[str, Any] = {"server": server, "on_round": on_round, "progress": not args.no_progress}
    if args.low_memory:
        common["low_memory"] = True
    if args.resume:
        overrides = {key: value for key, value in (("rounds", args.rounds), ("round_timeout", args.round_timeout),
                                                   ("node_wait_timeout", args.node_wait),
                                                   ("expected_nodes", args.expected_nodes),
                                                   ("history_db", args.history_db)) if value is not None}
        if args.wait_after_quorum is not None:
            overrides["wait_after_quorum"] = None if args.wait_after_quorum == WAIT_OFF else args.wait_after_quorum
        try:
            return Experiment.resume(args.checkpoint_dir, **common, **overrides)
        except LowMemoryAggregatorError as exc:  # the checkpointed run uses Scaffold
            raise ExperimentError(f"--low-memory needs checkpoints and the fedavg aggregator: {exc}") from None
    plan = load_plan_class_from_file(args.plan)
    return Experiment(
        plan, load_training_args(args.args, args.args_file), aggregator=_aggregator(args), rounds=args.rounds,
        dataset_tags=_tags(args.tags), min_nodes=1 if args.min_nodes is None else args.min_nodes,
        round_timeout=300.0 if args.round_timeout is None else args.round_timeout,
        node_wait_timeout=120.0 if args.node_wait is None else args.node_wait, expected_nodes=args.expected_nodes,
        wait_after_quorum=None if args.wait_after_quorum in (None, WAIT_OFF) else args.wait_after_quorum,
        name=args.name or plan.__name__, checkpoint_dir=args.checkpoint_dir, history_db=_history_db(args), **common)


def _run(args: argparse.Namespace) -> int:
    _check_options(args)
    resumed = None
    if args.resume:  # the checkpoint read and checked before a port is bound or a file written
        try:
            resumed = _resumed_experiment(args)
        except (CheckpointError, ExperimentError, HistoryError) as exc:  # the user's checkpoint or options
            print(f"fedserver run: error: cannot resume: {escape_unprintable(str(exc))}", file=sys.stderr)
            return EXIT_REFUSED
        missing = missing_checkpoint_paths(args, resumed.serving)
        if missing:  # a checkpoint from another machine: refused before a home is created
            args.usage_error(missing)
        remembered = apply_server_options(args, resumed.serving)
        overridden = apply_serving(args, resumed.serving)
        if remembered.unknown:  # written by a newer fedserver: nothing here could apply them
            print(f"fedserver: warning: {_experiment_file(resumed)}: serving.options {remembered.unknown} are not "
                  "server options of this fedserver (a checkpoint of a newer version?): ignored", file=sys.stderr)
        if remembered.line():
            print(remembered.line(), file=sys.stderr)
        if resumed.serving is None:
            print("fedserver: the checkpoint does not say how its run was served (written before fedserver kept "
                  "it): serving as the command line says", file=sys.stderr)
        elif overridden:
            print(f"fedserver: serving as the checkpoint's run did, except: {'; '.join(overridden)}", file=sys.stderr)
    else:
        apply_serving(args, None)  # refuse bad input before a port is bound
        load_plan_class_from_file(args.plan)
        training_args = load_training_args(args.args, args.args_file)
        _aggregator(args)
        if args.evaluate:  # not after hours of training
            check_evaluable(TrainingArgs.from_dict(training_args))
    config, store = server_from_args(args)
    return asyncio.run(_serve_and_run(args, config, store, resumed))


def _experiment_file(exp: Experiment) -> Path:
    """The experiment.json a resumed ``exp`` was read from."""
    return exp.checkpoints.directory / folder_name(exp.completed_round) / EXPERIMENT


def _resumed_experiment(args: argparse.Namespace) -> Experiment:
    """The experiment of ``--checkpoint-dir`` with the options applied, once nothing contradicts the checkpoint:
    CheckpointError/ExperimentError/HistoryError name what does (the file, or the option and the value the
    checkpoint holds). Reads only; the server is attached later."""
    exp = _experiment(args, None, None)
    where = exp.checkpoints.directory / folder_name(exp.completed_round) if exp.checkpoints else args.checkpoint_dir
    if args.rounds is not None and args.rounds < exp.completed_round:
        raise ExperimentError(f"--rounds {args.rounds} is below the round the checkpoint holds ({exp.completed_round}, "
                              f"{str(where)!r}): give --rounds N > {exp.completed_round} to train more rounds, or "
                              "drop --rounds to finish the run as configured")
    if args.evaluate:  # a resumed run's arguments: before its rounds, not after
        try:
            check_evaluable(exp.training_args)
        except ExperimentError as exc:
            raise ExperimentError(f"--evaluate: the checkpoint's training arguments ({str(where)!r}): {exc}") from None
    return exp


async def _serve_and_run(args: argparse.Namespace, config: ServerConfig, store: NodeStore,
                         resumed: Experiment | None = None) -> int:
    server = FedServer(config, store)
    port = await server.start()
    loop = asyncio.get_running_loop()
    current = asyncio.current_task()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, current.cancel)
    exp: Experiment | None = None

    def on_round(report: RoundReport) -> None:
        tqdm.write(format_round(report, exp.rounds), file=sys.stdout)

    try:
        if resumed is None:
            exp = _experiment(args, server, on_round)
        else:
            exp = resumed
            exp.server, exp.on_round = server, on_round
        exp.serving = serving_state(args, port)
        rounds = (f"rounds {exp.completed_round + 1}..{exp.rounds}" if exp.completed_round < exp.rounds else
                  f"the run is complete ({exp.rounds} rounds): "
                  f"{'only the evaluation runs' if args.evaluate else 'no round to train'}")
        print(f"fedserver: serving on {config.address}:{port} ({config.tls}); experiment {exp.name!r}: plan "
              f"{exp.plan.name} ({exp.plan.sha256[:12]}), {exp.aggregator.name}, {rounds}, "
              f"tags {exp.dataset_tags or 'any'}, quorum {exp.min_nodes}", flush=True)
        _warn_early_start(exp, store, args.evaluate)
        started = time.perf_counter()
        reports = await exp.run_async()
        seconds = time.perf_counter() - started
        evaluation = await _evaluate(exp) if args.evaluate else None
    except RoundFailedError as exc:
        print(f"fedserver: error: {exc}", file=sys.stderr)
        _print_resume_hint(exp)
        return 1
    except asyncio.CancelledError:
        current.uncancel()  # our own signal handler asked for it: handled here
        print("\nfedserver: interrupted", file=sys.stderr)
        _print_resume_hint(exp)
        return 130
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        await server.stop(grace=5.0)
    if reports:
        print(format_timing(reports, seconds, exp.node_wait_s))
        print("final metrics: " + ("  ".join(f"{k}={v:.4g}" for k, v in sorted(reports[-1].metrics.items())) or "-"))
    if exp.checkpoints is not None:
        print(f"checkpoints: {exp.checkpoints.directory} (latest round {exp.completed_round})")
    if exp.history_path is not None:
        print(f"history: {exp.history_path}, experiment {exp.history_id} "
              f"(fedserver history --db {exp.history_path} --experiment {exp.history_id})")
    if isinstance(evaluation, EvaluationReport):
        print(format_evaluation(evaluation))
    elif evaluation is not None:
        print(f"fedserver: error: {evaluation}", file=sys.stderr)
        return 1
    return 0


def _warn_early_start(exp: Experiment, store: NodeStore, evaluate: bool) -> None:
    """One stderr line when more nodes are enrolled than the quorum and no --expected-nodes says how many to wait
    for: the first round then goes to the first ``min_nodes`` nodes back, the others joining only the next."""
    enrolled = sum(1 for node in store.list() if node.active)
    if exp.expected_nodes is not None or enrolled <= exp.min_nodes:
        return
    first = f"round {exp.completed_round + 1}" if exp.completed_round < exp.rounds else "the evaluation" \
        if evaluate else None
    if first is not None:
        # with --tags, some enrolled nodes may hold no such dataset: waiting for all of them would wait out --node-wait
        those = (f"the K of them that hold a dataset tagged {exp.dataset_tags}" if exp.dataset_tags
                 else f"{enrolled}")
        print(f"fedserver: warning: {enrolled} nodes are enrolled, but {first} starts as soon as {exp.min_nodes} "
              f"node(s) are connected; pass --expected-nodes {'K' if exp.dataset_tags else enrolled} to wait (up to "
              f"--node-wait) for {those}", file=sys.stderr, flush=True)


async def _evaluate(exp: Experiment) -> EvaluationReport | FedstreamError:
    """The final model's evaluation, or why it failed (the rounds, checkpoints and history stand either way)."""
    try:
        return await exp.evaluate_async()
    except FedstreamError as exc:
        return exc


def format_evaluation(report: EvaluationReport) -> str:
    """``evaluation of round 10  nodes 3/3  samples 60  loss=0.1234`` then one indented line per node."""
    metrics = shown_text("  ".join(f"{shown_text(name, SHOWN_NAME_CHARS)}={value:.4g}"
                                   for name, value in report.metrics.items()), 1000)
    head = (f"evaluation of round {report.round}  nodes {len(report.succeeded)}/{len(report.selected)}  "
            f"samples {report.num_samples}{'  ' + metrics if metrics else ''}  ({report.duration_s:.2f} s)")
    lines = [head]
    for outcome in report.outcomes:  # what a node sent is escaped and cut: no terminal control from a node
        if outcome.result is None:
            lines.append(f"  {outcome.node_id}  {outcome.outcome}: {shown_text(outcome.error)}")
            continue
        own = shown_text("  ".join(f"{shown_text(name, SHOWN_NAME_CHARS)}={value:.4g}"
                                   for name, value in sorted(outcome.result.metrics.items())), 1000)
        lines.append(f"  {outcome.node_id}  {outcome.result.num_samples} samples ({outcome.result.split})  {own}")
    return "\n".join(lines)


def _print_resume_hint(exp: Experiment | None) -> None:
    """After a failed or interrupted run: the command that resumes it, serving as this run did (the options the
    latest checkpoint does not hold, e.g. overrides of a resume that saved no round yet, and --home)."""
    if exp is None or exp.checkpoints is None:
        return
    try:
        latest = exp.checkpoints.latest_round()
        saved = None if latest is None else exp.checkpoints.load_experiment_state(latest).get("serving")
    except CheckpointError as exc:
        print(f"fedserver: the checkpoint cannot be read back: {escape_unprintable(str(exc))}", file=sys.stderr)
        return
    if latest is None:
        print("fedserver: no round completed, so there is no checkpoint to resume from", file=sys.stderr)
        return
    what = f"round {latest}" if latest else "round 0 (the initial model)"
    print(f"fedserver: the checkpoint of {what} is intact; once the nodes are back: "
          f"{hint_command(exp.checkpoints.directory, exp.serving, saved if isinstance(saved, dict) else None)}",
          file=sys.stderr)
