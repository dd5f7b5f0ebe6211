"""``fedserver run``: bad input refused with a clear message (in process), and one real run as processes.

The real run: ``fedserver certs`` and ``fedserver nodes enroll`` set up a server home, two ``fednode
start`` processes connect over TLS, ``python -m fedserver run`` trains 3 Scaffold rounds and exits 0;
with the nodes gone, ``--resume`` for a 4th round fails below quorum and exits 1, checkpoint intact.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from e2e_support import ROOT, TESTS, least_squares_sites, node_env, prepare_nodes, run_cli, stop_processes
from plans_lsq import LinearPlan

from fedcore.aggregators import Scaffold
from fedcore.errors import ExperimentError, LowMemoryAggregatorError
from fedserver.checkpoints import CheckpointStore
from fedserver.cli import build_parser, main
from fedserver.cli_run import _experiment
from fedserver.experiment import Experiment
from fedserver.history import HistoryStore

ARGS = {"num_updates": 20, "lr": 0.02, "batch_size": 16, "seed": 7}
PLAN = f"{TESTS / 'plans_lsq.py'}:LinearPlan"


def fedserver_main(argv: list[str], capsys) -> tuple[int, str]:
    status = main(argv)
    return status, capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--plan", "missing.py:Plan", "--rounds", "1"], "plan file 'missing.py' does not exist"),
    (["--plan", "plans_lsq.py", "--rounds", "1"], "--plan must be FILE.py:CLASS"),
    (["--plan", f"{TESTS / 'plans_lsq.py'}:NoSuchPlan", "--rounds", "1"],
     "defines no 'NoSuchPlan'; training plans defined there: LinearPlan"),
    (["--plan", f"{TESTS / 'plans_lsq.py'}:NumpyModel", "--rounds", "1"],
     "is class NumpyModel, not a TrainingPlan subclass (derive it from fedcore.plans.TorchTrainingPlan"),
    (["--plan", f"{TESTS / 'plans_lsq.py'}:np", "--rounds", "1"], "is a module, not a TrainingPlan subclass"),
    (["--plan", PLAN, "--rounds", "1", "--args", "{num_updates: 3}"],
     "--args is not valid JSON: Expecting property name enclosed in double quotes at line 1 column 2"),
    (["--plan", PLAN, "--rounds", "1", "--args", "[1, 2]"], "--args must be a JSON object"),
    (["--plan", PLAN, "--rounds", "1", "--args", '{"num_update": 3}'], "unknown training argument(s) 'num_update'"),
    (["--plan", PLAN, "--rounds", "1", "--server-lr", "0.5"], "--server-lr applies to --aggregator scaffold only"),
    (["--plan", PLAN, "--rounds", "1", "--aggregator", "scaffold", "--server-lr", "-1"], "server_lr must be"),
    (["--rounds", "1"], "a new run needs --plan FILE.py:CLASS and --rounds N"),
    (["--plan", PLAN, "--rounds", "1", "--low-memory"],
     ("--low-memory reloads the global model from the last checkpoint: it needs --checkpoint-dir DIR (and "
     "--aggregator fedavg)")),
    (["--plan", PLAN, "--rounds", "1", "--low-memory", "--checkpoint-dir", "ckpt", "--aggregator", "scaffold"],
     "--low-memory needs --aggregator fedavg, not 'scaffold' (Scaffold keeps the global model"),
])
def test_bad_input_exits_1_naming_the_problem(argv, message, capsys, tmp_path) -> None:
    status, err = fedserver_main(["--home", str(tmp_path / "home"), "run", *argv], capsys)
    assert status == 1, err
    assert err.startswith("fedserver: error: ") and message in err, err
    assert not (tmp_path / "home").exists(), "bad input is refused before anything is created"


@pytest.mark.parametrize("argv, message", [
    (["--resume"], "--resume needs --checkpoint-dir"),
    (["--resume", "--low-memory"], "--resume needs --checkpoint-dir"),
    (["--resume", "--checkpoint-dir", "ckpt", "--plan", PLAN, "--server-lr", "2"],
     "--resume continues with the checkpoint's own configuration; drop --plan, --server-lr"),
])
def test_resume_usage_mistakes_exit_2(argv, message, capsys, tmp_path) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--home", str(tmp_path / "home"), "run", *argv])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and f"fedserver run: error: {message}" in err, err
    assert not (tmp_path / "home").exists(), "bad input is refused before anything is created"


def test_args_file_errors_name_the_file(capsys, tmp_path) -> None:
    bad = tmp_path / "args.json"
    bad.write_text('{"lr": 0.1,}')
    status, err = fedserver_main(["run", "--plan", PLAN, "--rounds", "1", "--args-file", str(bad)], capsys)
    assert status == 1 and f"--args-file '{bad}' is not valid JSON" in err, err
    status, err = fedserver_main(["run", "--plan", PLAN, "--rounds", "1", "--args-file", str(tmp_path / "no.json")],
                                 capsys)
    assert status == 1 and "cannot read the file: No such file or directory" in err, err


def test_new_run_refuses_a_checkpoint_dir_that_holds_a_run(capsys, tmp_path) -> None:
    CheckpointStore(tmp_path / "ckpt").save(2, {"w": np.zeros(3, np.float32)}, "fedavg", {}, {}, {"format": 1})
    status, err = fedserver_main(["run", "--plan", PLAN, "--rounds", "3", "--checkpoint-dir", str(tmp_path / "ckpt")],
                                 capsys)
    assert status == 1 and "already holds a run (last round 2): add --resume to continue it" in err, err


def test_help_reads_like_a_man_page(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["run", "--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0
    for section in ("training plan (--plan FILE.py:CLASS)", "training arguments", "aggregation", "checkpoints",
                    "resuming", "examples:", "exit status:", "files:", "environment:", "FEDSERVER_HISTORY_DB",
                    "server memory (--low-memory", "--low-memory  ", "needs --checkpoint-dir and --aggregator fedavg"):
        assert section in out, section


def test_low_memory_reaches_the_experiment_new_or_resumed(tmp_path) -> None:
    ckpt = tmp_path / "ckpt"
    base = ["run", "--history-db", str(tmp_path / "h.db"), "--checkpoint-dir", str(ckpt), "--no-progress"]
    args = build_parser().parse_args(base + ["--plan", PLAN, "--rounds", "1", "--args", json.dumps(ARGS),
                                             "--low-memory"])
    exp = _experiment(args, None, None)
    assert exp.low_memory and exp.checkpoints is not None and not exp.keep_round_params
    plain = _experiment(build_parser().parse_args(base + ["--plan", PLAN, "--rounds", "1", "--args", json.dumps(ARGS)]),
                        None, None)
    assert not plain.low_memory


def test_low_memory_resume_of_a_scaffold_run_says_what_it_needs(tmp_path, capsys) -> None:
    ckpt = tmp_path / "ckpt"
    exp = Experiment(LinearPlan, ARGS, aggregator=Scaffold(), rounds=2, checkpoint_dir=ckpt, progress=False,
                     server_config=None)
    exp.params = exp.initial_params()
    exp._checkpoint_params()  # a Scaffold run's checkpoint, as round 0
    args = build_parser().parse_args(["run", "--resume", "--checkpoint-dir", str(ckpt), "--low-memory"])
    with pytest.raises(ExperimentError) as err:
        _experiment(args, None, None)
    assert str(err.value).startswith("--low-memory needs checkpoints and the fedavg aggregator: ")
    assert "Scaffold does" in str(err.value)


def test_low_memory_resume_refusals_are_told_apart_by_type_not_by_wording(tmp_path) -> None:
    """A damaged checkpoint in a folder whose path says low_memory is not a Scaffold refusal."""
    ckpt = tmp_path / "low_memory" / "ckpt"
    exp = Experiment(LinearPlan, ARGS, rounds=2, checkpoint_dir=ckpt, progress=False)
    exp.params = exp.initial_params()
    exp._checkpoint_params()
    checkpoint = exp.checkpoints.load(0)
    exp.checkpoints.save(0, checkpoint.params, checkpoint.aggregator_name, checkpoint.aggregator_config,
                         checkpoint.aggregator_state, {**checkpoint.experiment_state, "format": 99})
    args = build_parser().parse_args(["run", "--resume", "--checkpoint-dir", str(ckpt), "--low-memory"])
    with pytest.raises(ExperimentError) as err:
        _experiment(args, None, None)
    assert "experiment state format 99" in str(err.value)
    assert not str(err.value).startswith("--low-memory needs"), err.value
    with pytest.raises(LowMemoryAggregatorError, match="Scaffold does"):
        Experiment(LinearPlan, ARGS, aggregator=Scaffold(), rounds=1, checkpoint_dir=ckpt, low_memory=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_run_as_a_process_with_fednode_processes(tmp_path: Path) -> None:
    home = tmp_path / "server"
    run_cli("fedserver", "certs", "init", "--home", str(home))
    run_cli("fedserver", "certs", "server", "--home", str(home))

    def enroll(node_id: str) -> str:
        return run_cli("fedserver", "nodes", "enroll", node_id, "--quiet", "--home", str(home)).stdout

    nodes = prepare_nodes(tmp_path, least_squares_sites(2), range(2), enroll)
    port = _free_port()
    ckpt, db = tmp_path / "ckpt", tmp_path / "history.db"
    base = [sys.executable, "-m", "fedserver", "--home", str(home), "run", "--port", str(port),
            "--max-poll-wait", "2", "--checkpoint-dir", str(ckpt), "--history-db", str(db)]
    command = base + ["--plan", PLAN, "--args", json.dumps(ARGS), "--aggregator", "scaffold", "--server-lr", "1.0",
                      "--rounds", "3", "--tags", "lsq", "--min-nodes", "2", "--round-timeout", "10",
                      "--node-wait", "20", "--name", "cli-e2e", "--evaluate"]
    server = subprocess.Popen(command, cwd=ROOT, env=node_env(), text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    try:
        for node in nodes:
            node.start(port, home / "certs" / "ca.crt")
        out, err = server.communicate(timeout=30)
        logs = "\n".join(n.log() for n in nodes)
        assert server.returncode == 0, f"{out}\n{err}\n{logs}"
        stop_processes(nodes)
        # with the nodes gone, one more round cannot reach its quorum: exit 1, checkpoint of round 3 intact
        again = subprocess.run(base + ["--resume", "--rounds", "4", "--node-wait", "1"], cwd=ROOT, env=node_env(),
                               text=True, capture_output=True, timeout=30, check=False)
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate(timeout=10)
        stop_processes(nodes)

    assert f"fedserver: serving on 127.0.0.1:{port} (tls); experiment 'cli-e2e'" in out, out
    lines = [line for line in out.splitlines() if line.startswith("round ")]
    assert [line.split()[1] for line in lines] == ["1/3", "2/3", "3/3"], out
    assert all("nodes 2/2" in line and "train_loss=" in line for line in lines), out
    assert "completed 3 round(s)" in out and f"checkpoints: {ckpt} (latest round 3)" in out, out
    assert "cli-e2e" in err and "3/3" in err, f"a tqdm bar over rounds on stderr: {err!r}"
    # --evaluate: the final model on both nodes, every local sample (test_ratio 0), then one line per node
    (head,) = [line for line in out.splitlines() if line.startswith("evaluation of round ")]
    assert head.startswith("evaluation of round 3  nodes 2/2  samples 160  loss="), out
    node_lines = out.split(head, 1)[1].splitlines()[1:3]
    assert [line.split()[0] for line in node_lines] == ["site-0", "site-1"], out
    assert all("80 samples (all)  loss=" in line for line in node_lines), out
    with HistoryStore(db) as history:
        (experiment,) = history.experiments()
        assert experiment.name == "cli-e2e" and experiment.config["aggregator"] == "scaffold"
        assert [r.status for r in history.rounds(experiment.id)] == ["completed"] * 3

    assert again.returncode == 1, again.stdout + again.stderr
    assert "fedserver: error: only 0 connected node(s)" in again.stderr and "quorum is 2" in again.stderr
    assert f"the checkpoint of round 3 is intact; once the nodes are back: fedserver --home {home} run --resume " \
           f"--checkpoint-dir {ckpt}\n" in again.stderr
    assert CheckpointStore(ckpt).latest_round() == 3
