"""``Experiment``: the researcher's API — a training plan, its arguments, an aggregator, rounds.

::

    exp = Experiment(plan=MyPlan, training_args={"num_updates": 100, "lr": 0.05},
                     aggregator=Scaffold(server_lr=1.0), rounds=10, dataset_tags=["demo"],
                     min_nodes=2, round_timeout=120, checkpoint_dir="runs/ckpt", history_db="runs/history.db")
    history = exp.run()                                # list of RoundReport
    exp = Experiment.resume("runs/ckpt")               # after a crash: from the last completed round
    exp.run()

Without ``server=`` or ``server_config=``, ``run()`` serves as ``fedserver run`` does with no server option
(127.0.0.1:50051, TLS, the server home ``$FEDSERVER_HOME`` or ``./fedserver-home``: its certificates and
enrolled nodes), and a resumed experiment as its run did (the checkpoint's ``serving``), like ``fedserver run
--resume``: :mod:`fedserver.experiment_serving`.

The plan's whole module source is what nodes approve and run. After every completed round the global
parameters, the aggregator's full state and the experiment's own state are checkpointed atomically, and
a run resumed from round k's checkpoint produces the same parameters as an uninterrupted run. A round's
last step — the average, the checkpoint, the history and the report — is done whole: a Ctrl-C or a cancelled
``run_async`` that arrives during it waits for it (seconds at GB scale), so a round is either applied
everywhere or not at all, and ``run()`` again goes on exactly (a checkpoint that cannot be written is the
exception: the round is recorded and reported, then the write's error stops the run).

``low_memory=True`` (FedAvg; needs ``checkpoint_dir``) keeps the global model x out of memory for most of
a round, reloading it from the checkpoint that holds it when needed: see :mod:`fedserver.global_params`.

Around the round loop: :mod:`fedserver.experiment_state` (what a checkpoint holds of the experiment, and
how ``resume`` reads it back), :mod:`fedserver.experiment_config` (the constructor's checks),
:mod:`fedserver.experiment_evaluation` (``evaluate()``), :mod:`fedserver.node_records` (history rows of node
outcomes and late results), :mod:`fedserver.eligible_nodes` (which connected nodes can take part).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from fedcore.aggregators import Aggregator, FedAverage
from fedcore.errors import ExperimentError, RoundFailedError, ServerStateError, TrainingArgsError
from fedcore.plans import TrainingPlan
from fedcore.strategies import AllNodes, NodeSelector
from fedcore.tasks import PlanSource, TrainTask
from fedcore.training_args import TrainingArgs
from fedserver.auth import NodeStore
from fedserver.checkpoints import CheckpointStore
from fedserver.config import ServerConfig
from fedserver.eligible_nodes import eligible_nodes
from fedserver.experiment_buffers import checkpoint_model_state, complete_with_buffers, initial_state
from fedserver.experiment_config import check_experiment_config
from fedserver.experiment_evaluation import ExperimentEvaluation
from fedserver.experiment_serving import run_serving, serving_state
from fedserver.experiment_state import (
    STATE_FORMAT,
    describe_experiment,
    experiment_state,
    resumable_checkpoint_dir,
    resume_arguments,
    same_history_db,
)
from fedserver.global_params import GlobalParams, check_low_memory_config
from fedserver.history import HistoryStore
from fedserver.node_records import LateResults, node_result_record
from fedserver.off_loop import run_off_loop, to_completion
from fedserver.round_model import RoundModel
from fedserver.rounds import CollectedRound, NodeOutcome, RoundReport, collect_round, finish_round
from fedserver.server import FedServer
from fedserver.tasks import TaskHandle

# STATE_FORMAT and resumable_checkpoint_dir live in experiment_state; importable from here as before
__all__ = ["STATE_FORMAT", "Experiment", "resumable_checkpoint_dir"]

log = logging.getLogger(__name__)


class Experiment(GlobalParams, ExperimentEvaluation):
    """A federated training run; constructor arguments are its configuration (see the module docstring).

    Args:
        plan: a TrainingPlan subclass defined in a .py file (nodes receive that file's source), or a PlanSource.
        training_args: validated by :class:`fedcore.TrainingArgs` (unknown keys refused).
        aggregator: FedAverage() (default) or Scaffold(server_lr=...).
        rounds: number of rounds to run in total.
        dataset_tags: nodes train on a dataset carrying all these tags; only such nodes are selected.
        selection: a node selector applied to the nodes that have the tags (default: all of them).
        min_nodes: quorum: a round completes only with at least this many aggregated replies.
        round_timeout: seconds without activity (no report, no bytes) after which a node is given up.
        wait_after_quorum: once ``min_nodes`` replies are aggregated, wait at most this many seconds for the
            other selected nodes, then close their tasks (outcome ``timeout``; the nodes stop training).
            None (default): wait for every node (each bounded by ``round_timeout`` of inactivity only).
        node_wait_timeout: seconds to wait, before each round, for ``expected_nodes`` eligible nodes to connect.
        expected_nodes: how many eligible nodes a round waits for (up to ``node_wait_timeout``) before it
            starts; it starts with those connected then, if at least ``min_nodes``. None (default):
            ``min_nodes``, so a round starts as soon as the quorum is connected.
        checkpoint_dir / history_db: where checkpoints and the SQLite history go (None: not kept).
        server / server_config / node_store: a running FedServer to use, or the config of one to start (then
            ``node_store`` is needed unless ``tls="mtls"``). Neither: served as ``fedserver run`` serves, from the
            server home, with the home's node store unless ``node_store`` is given (module docstring).
        on_round: called with each RoundReport after it is checkpointed (e.g. to evaluate the model).
        keep_round_params: False drops a round's global parameters from its report in ``reports`` once the
            next round completes, so memory holds one model, not one per round (``params`` and the last
            report keep the latest); True keeps every round's; None (default): True, or False with low_memory.
        low_memory: release x during each round once every node has it, reload it from the checkpoint
            when needed (module docstring). Needs ``checkpoint_dir`` and an aggregator that does not keep
            x (``Aggregator.keeps_global_params``: FedAverage, not Scaffold). While a round runs, ``params``
            is None.
    """

    def __init__(
        self,
        plan: type[TrainingPlan] | PlanSource,
        training_args: Mapping[str, Any],
        *,
        aggregator: Aggregator | None = None,
        rounds: int,
        dataset_tags: Sequence[str] = (),
        selection: NodeSelector | None = None,
        min_nodes: int = 1,
        round_timeout: float = 300.0,
        wait_after_quorum: float | None = None,
        node_wait_timeout: float = 120.0,
        expected_nodes: int | None = None,
        model_args: Mapping[str, Any] | None = None,
        name: str = "experiment",
        checkpoint_dir: str | Path | None = None,
        keep_checkpoints: int | None = None,
        history_db: str | Path | None = None,
        server: FedServer | None = None,
        server_config: ServerConfig | None = None,
        node_store: NodeStore | None = None,
        on_round: Callable[[RoundReport], None] | None = None,
        progress: bool = True,
        keep_round_params: bool | None = None,
        low_memory: bool = False,
    ) -> None:
        self.plan = plan if isinstance(plan, PlanSource) else PlanSource.from_class(plan)
        self.training_args = TrainingArgs.from_dict(dict(training_args))
        self.aggregator = aggregator if aggregator is not None else FedAverage()
        try:  # what every node would refuse, refused before a task is sent
            self.training_args.check_iterations()
            self.aggregator.check_training_args(self.training_args)
        except TrainingArgsError as exc:
            raise ExperimentError(f"training_args: {exc}") from None
        check_experiment_config(rounds=rounds, min_nodes=min_nodes, expected_nodes=expected_nodes,
                                round_timeout=round_timeout, node_wait_timeout=node_wait_timeout,
                                wait_after_quorum=wait_after_quorum)
        if server is not None and server_config is not None:
            raise ExperimentError("give either a running server or a server_config, not both")
        if low_memory:
            check_low_memory_config(self.aggregator, checkpoint_dir, keep_round_params)
        self.rounds = rounds
        self.dataset_tags = sorted(set(dataset_tags))
        self.selection = selection
        self.min_nodes = min_nodes
        self.round_timeout = float(round_timeout)
        self.wait_after_quorum = None if wait_after_quorum is None else float(wait_after_quorum)
        self.node_wait_timeout = float(node_wait_timeout)
        self.expected_nodes = expected_nodes
        self.model_args = dict(model_args or {})
        self.name = name
        self.checkpoints = CheckpointStore(checkpoint_dir, keep_last=keep_checkpoints) if checkpoint_dir else None
        self.history_path = Path(history_db).absolute() if history_db else None  # a resume may run elsewhere
        self.server = server
        self.server_config = server_config
        self.node_store = node_store
        self.on_round = on_round
        self.progress = progress
        self.keep_round_params = (not low_memory) if keep_round_params is None else keep_round_params
        self.low_memory = bool(low_memory)
        #: how ``fedserver run`` served the run (:mod:`fedserver.experiment_serving`), carried in checkpoints
        self.serving: dict[str, Any] | None = None
        self._resumed_from: Path | None = None  # the checkpoint folder of a resume
        # state (checkpointed)
        self.completed_round = 0
        self._params: dict[str, np.ndarray] | None = None
        self._params_saved_as: int | None = None  # round of the checkpoint known to hold exactly ``params``
        self._buffers_filled_round: int | None = None  # a checkpoint without buffers that ``params`` completes
        self.buffer_names: list[str] | None = None  # the persistent buffers among x's entries, once known
        self.known_nodes: list[str] = []
        self.history_id: int | None = None
        self.reports: list[RoundReport] = []
        self._late = LateResults()  # timed-out or cancelled tasks of past rounds, until their late result comes
        self.node_wait_s = 0.0  # seconds the last run waited before its rounds for eligible nodes

    # -- public API (``params``: GlobalParams) ----------------------------------------------------
    def run(self) -> list[RoundReport]:
        """Run the remaining rounds (blocking; starts and stops its own server unless one was given)."""
        return asyncio.run(self.run_async())

    async def run_async(self) -> list[RoundReport]:
        """:meth:`run` for callers already inside an event loop (with ``server=`` a running FedServer)."""
        self.node_wait_s = 0.0
        async with self._serving() as server:
            history = HistoryStore(self.history_path) if self.history_path else None
            try:
                return await self._run_rounds(server, history)
            finally:
                if history is not None:
                    history.close()

    @contextlib.asynccontextmanager
    async def _serving(self) -> AsyncIterator[FedServer]:
        """The server to use: the one given, or one started and stopped afterwards, from ``server_config``, else
        as ``fedserver run`` would serve (:func:`run_serving`; its ``serving`` then goes into checkpoints)."""
        if self.server is not None:
            yield self.server
            return
        own = None
        if self.server_config is not None:
            if self.node_store is None and self.server_config.tls != "mtls":
                raise ExperimentError(f"server_config tls={self.server_config.tls!r} authenticates nodes by token: "
                                      "pass node_store=NodeStore(HOME/nodes.db), the store `fedserver nodes enroll` "
                                      "writes (or give no server_config: run() then serves from the server home)")
            server = FedServer(self.server_config, self.node_store)
        else:
            if self.serving is None and self._resumed_from is not None:
                log.warning("%s holds no 'serving' (its run was served by the caller's server or server_config, or "
                            "by an older fedserver): serving as `fedserver run` does with no server option",
                            self._resumed_from)
            own = run_serving(self.serving, self.node_store)
            for note in own.notes:
                log.info("%s", note)
            server = FedServer(own.config, own.node_store)
        try:
            port = await server.start()
        except ServerStateError:  # could not bind: the server's text names --port, which an Experiment lacks
            if own is None:
                raise
            raise own.bind_refused() from None
        if own is not None:
            self.serving = serving_state(own.args, port)
            log.info("serving on %s:%d (%s), server home %s", own.config.address, port, own.config.tls,
                     self.serving["home"])
        self.server = server
        try:
            yield server
        finally:
            await server.stop(grace=5.0)
            self.server = None

    def _key(self) -> str:
        """The experiment id the server's tasks carry."""
        return f"{self.name}-{self.history_id or 0}"

    @classmethod
    def resume(cls, checkpoint_dir: str | Path, **overrides: Any) -> Experiment:
        """Rebuild an experiment from its latest checkpoint; :meth:`run` then continues after that round.

        ``overrides`` are constructor arguments that checkpoints cannot hold (``server``, ``server_config``,
        ``node_store``, ``selection``, ``on_round``, ``progress``, ``keep_round_params``) or that may change (``rounds``,
        ``round_timeout``, ``wait_after_quorum``, ``node_wait_timeout``, ``history_db``, ``keep_checkpoints``,
        ``low_memory``).

        A ``checkpoint_dir`` that does not exist or holds no checkpoint raises CheckpointError naming it, and
        nothing is created (:func:`resumable_checkpoint_dir`). How the run was served (``serving``: address,
        port, TLS, home and ``options``, the other server options its command line chose) is kept in
        ``serving``: without ``server``/``server_config``, ``run()`` serves so, as ``fedserver run --resume``
        does (a checkpoint without it: as a new Experiment would, logged); a ``server`` or ``server_config``
        given here is used whole (a ServerConfig cannot tell a field left to its default from one set to it)
        and drops it. A checkpoint
        written before persistent buffers were federated gets them from the plan's fresh model, logged
        (:mod:`fedserver.experiment_buffers`).
        """
        args = resume_arguments(checkpoint_dir, overrides)
        checkpoint, state = args.checkpoint, args.checkpoint.experiment_state
        exp = cls(args.plan, args.training_args, **args.kwargs)
        exp.completed_round = checkpoint.round
        exp.params = checkpoint.params
        exp._params_saved_as = checkpoint.round
        model = checkpoint_model_state(checkpoint, exp.plan, exp.training_args, exp.model_args)
        exp.buffer_names = model.buffer_names
        if model.filled:  # written before buffers travelled: x completed with the plan's initial buffers
            exp.params = model.params  # no longer what the checkpoint holds
            exp._buffers_filled_round = checkpoint.round
        exp.known_nodes = list(state["known_nodes"])
        # checked by resume_arguments; None in checkpoints from before it, and once the caller serves the run
        exp.serving = None if overrides.get("server") or overrides.get("server_config") else state.get("serving")
        exp._resumed_from = checkpoint.folder
        exp.history_id = state.get("history_id") if same_history_db(exp.history_path, state["history_db"]) else None
        log.info("resuming experiment %r after round %d from %s", exp.name, checkpoint.round, checkpoint.folder)
        return exp

    def initial_params(self) -> dict[str, np.ndarray]:
        """x_0: the plan's freshly initialised weights (seeded by ``training_args['seed']``), as numpy: its
        parameters and persistent buffers (BatchNorm statistics), whose names it sets in ``buffer_names``."""
        state = initial_state(self.plan, self.training_args, self.model_args)
        self.buffer_names = state.buffer_names
        return state.params

    def _learn_buffers(self) -> None:
        """``buffer_names`` from the plan's model, for ``params`` set by hand (completed if it lacks buffers);
        nothing when the names are known and ``params`` holds them all. A method: no local of the round loop may
        keep x alive (low_memory releases it)."""
        assert self.params is not None
        if self.buffer_names is not None and set(self.buffer_names) <= self.params.keys():
            return
        completed = complete_with_buffers(self.params, self.plan, self.training_args, self.model_args,
                                          "the params set by hand")
        if completed.filled:
            self.params = completed.params
        self.buffer_names = completed.buffer_names

    # -- the loop ------------------------------------------------------------------------------
    async def _run_rounds(self, server: FedServer, history: HistoryStore | None) -> list[RoundReport]:
        await self._reload_released_params()  # low_memory, interrupted after the release
        if self.params is None:
            self.params = {k: np.array(v, copy=True) for k, v in self.initial_params().items()}
        else:
            self._learn_buffers()  # params set by hand: which are buffers (and any missing, filled)
        if self.low_memory and self.completed_round < self.rounds:
            self._check_params_checkpointable()
        if history is not None:
            if self.history_id is None:
                self.history_id = history.start_experiment(self.name, describe_experiment(self))
            else:
                history.reopen_experiment(self.history_id)
        key = self._key()
        bar = tqdm(total=self.rounds, initial=self.completed_round, desc=self.name, unit="round",
                   disable=not self.progress, leave=True)
        try:
            for round_index in range(self.completed_round + 1, self.rounds + 1):
                await self._one_round(server, history, round_index, key, bar)
        except BaseException as exc:
            if history is not None and self.history_id is not None:
                status = "failed" if isinstance(exc, Exception) else "stopped"
                history.finish_experiment(self.history_id, status, f"{type(exc).__name__}: {exc}")
            raise
        finally:
            bar.close()
            self._late.record(history, self.history_id)
        if history is not None and self.history_id is not None:
            history.finish_experiment(self.history_id, "completed")
        return self.reports

    async def _one_round(self, server: FedServer, history: HistoryStore | None, round_index: int,
                         key: str, bar: tqdm) -> None:
        """Run round ``round_index`` up to its replies; then average, checkpoint and report it as one step
        (:meth:`_complete_round`) that a cancellation (Ctrl-C, a cancelled ``run_async``) waits for."""
        self._late.record(history, self.history_id)
        waiting = time.perf_counter()
        candidates = await eligible_nodes(server, self.dataset_tags, self.min_nodes, self.node_wait_timeout,
                                           self.expected_nodes)
        self.node_wait_s += time.perf_counter() - waiting
        selector = self.selection or AllNodes()
        selected = selector.select(candidates, round_index)
        known = sorted(set(self.known_nodes) | {c.node_id for c in candidates})
        if history is not None and self.history_id is not None:
            history.start_round(self.history_id, round_index, selected, replace=True)
        if self.low_memory:
            self._checkpoint_params()
        task = TrainTask(key, round_index, self.plan, self.training_args.to_dict(), self.params,
                         self.aggregator.name, {}, self.dataset_tags, self.model_args)
        model = await RoundModel.create(task, server.config.chunk_size, reload=self._reloader(),
                                        buffers=self.buffer_names or ())
        del task
        held = self._hand_over_params()
        handles: list[TaskHandle] = []

        def record(outcome: NodeOutcome) -> None:
            if history is not None and self.history_id is not None:
                history.record_node_result(node_result_record(self.history_id, round_index, outcome))

        try:
            collected = await collect_round(server, self.aggregator, model, selected, known,
                                            min_nodes=self.min_nodes, inactivity_timeout=self.round_timeout,
                                            experiment_key=key, on_outcome=record, on_dispatch=handles.append,
                                            wait_after_quorum=self.wait_after_quorum)
        except BaseException as exc:
            await self._round_not_applied(exc, model, held, history, round_index)
            raise
        finally:
            self._late.watch(handles)
        step = self._complete_round(collected, model, held, history, known, bar)
        del model  # the step holds it until the average is in: x is not kept through the checkpoint
        await to_completion(step)

    async def _round_not_applied(self, exc: BaseException, model: RoundModel, held: bool | None,
                                 history: HistoryStore | None, round_index: int) -> None:
        """A round that ended before its average (failed, interrupted) or whose average failed: ``params`` is
        x again (reloaded if the round released it, unless interrupted) and the history says so."""
        if held is not None:
            if isinstance(exc, Exception) or not model.released:  # no reload when not released
                await self._take_back_params(model, held, exc)
            else:  # interrupted: a reload (seconds at scale) would hold up the shutdown
                log.warning("round=%d interrupted (%s) after the global model was released: params stays None; "
                            "checkpoint round %s holds it (run() reloads it, Experiment.resume() reads it)",
                            round_index, type(exc).__name__, self._params_saved_as)
        if isinstance(exc, RoundFailedError) and history is not None and self.history_id is not None:
            history.finish_round(self.history_id, round_index, "failed", error=str(exc))

    async def _complete_round(self, collected: CollectedRound, model: RoundModel, held: bool | None,
                              history: HistoryStore | None, known: list[str], bar: tqdm) -> None:
        """Average the round, then record it everywhere: ``params``, ``completed_round``, its checkpoint, the
        history, ``reports``, the progress bar and ``on_round``. Run whole (:func:`to_completion`): the
        average moves the aggregator to the next round (Scaffold's control variates), so a cancellation
        between it and the checkpoint or the report would leave a state that no run, resumed or not,
        can continue exactly. A checkpoint that cannot be written does not undo the round either: the round
        is recorded and reported like any other, then the write's error is raised (``params`` holds x⁺, which
        the next round's checkpoint saves; ``resume()`` would go on from the previous checkpoint)."""
        round_index = collected.round
        try:
            report = await finish_round(self.aggregator, collected)
        except BaseException as exc:
            await self._round_not_applied(exc, model, held, history, round_index)
            raise
        del model
        self.params = report.params
        self.known_nodes = known
        self.completed_round = round_index
        store, unsaved = self.checkpoints, None
        if store is not None:
            state = (self.aggregator.state(), experiment_state(self))
            try:  # in a worker thread: GBs of arrays, fsynced; the loop serves nodes meanwhile
                await run_off_loop(lambda: store.save(round_index, report.params, self.aggregator.name,
                                                      self.aggregator.config(), *state))
            except Exception as exc:  # noqa: BLE001 - raised below, once the round is recorded
                unsaved = exc
                log.error("round=%d: its checkpoint could not be written (%s: %s); the round is recorded, then the "
                          "run stops with that error", round_index, type(exc).__name__, exc)
            else:
                self._params_saved_as = round_index
        if history is not None and self.history_id is not None:
            history.finish_round(self.history_id, round_index, "completed", metrics=report.metrics,
                                 error=None if unsaved is None else f"checkpoint not written: {unsaved}")
        log.info("round=%d completed nodes=%s metrics=%s seconds=%.2f", round_index, report.succeeded,
                 report.metrics, report.duration_s)
        if not self.keep_round_params and self.reports:
            self.reports[-1] = replace(self.reports[-1], params={})
        self.reports.append(report)
        bar.update(1)
        bar.set_postfix({k: f"{v:.4g}" for k, v in report.metrics.items() if k.endswith(("loss", "accuracy"))})
        if self.on_round is not None:
            self.on_round(report)
        if unsaved is not None:
            raise unsaved
