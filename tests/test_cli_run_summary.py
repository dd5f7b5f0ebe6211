"""``fedserver run``'s first and last lines say what the run did.

A finished run resumed for ``--evaluate`` printed ``rounds 6..5`` and ``completed 0 round(s) in 0.0 s (0.01 s per
round)``: it now says that the run is complete and only the evaluation runs. A run's summary divided its whole
time by its rounds, so a 2-round run whose rounds took 0.3 s each but waited 17 s for its nodes reported "9.00 s
per round": the rounds' own time is now reported apart from the wait for nodes.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

from e2e_support import ROOT, TESTS, least_squares_sites, node_env, prepare_nodes, run_cli, stop_processes
from plans_lsq import LinearPlan

from fedserver.auth import NodeStore
from fedserver.cli import main
from fedserver.experiment import Experiment
from fedserver.home import nodes_db

ARGS = {"num_updates": 2, "lr": 0.02, "seed": 7}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_finished_run_resumed_to_evaluate_says_only_the_evaluation_runs(tmp_path, capsys) -> None:
    home, ckpt = tmp_path / "home", tmp_path / "ckpt"
    NodeStore(nodes_db(home)).enroll("site-a")
    exp = Experiment(LinearPlan, ARGS, rounds=5, checkpoint_dir=ckpt, progress=False)
    exp.params = exp.initial_params()
    exp.completed_round = 5
    exp._checkpoint_params()  # the checkpoint of a finished 5-round run
    code = main(["--home", str(home), "run", "--resume", "--checkpoint-dir", str(ckpt), "--evaluate",
                 "--tls", "insecure", "--port", "0", "--node-wait", "0.1", "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 1, out + err  # no node connected: the evaluation fails
    assert "the run is complete (5 rounds): only the evaluation runs" in out, out
    assert "rounds 6..5" not in out and "completed 0 round(s)" not in out, out
    assert "fedserver: error: only 0 connected node(s)" in err, err


def test_the_summary_tells_the_rounds_time_from_the_wait_for_nodes(tmp_path: Path) -> None:
    home = tmp_path / "server"
    run_cli("fedserver", "certs", "init", "--home", str(home))
    run_cli("fedserver", "certs", "server", "--home", str(home))
    nodes = prepare_nodes(tmp_path, least_squares_sites(1), range(1), lambda node_id: run_cli(
        "fedserver", "nodes", "enroll", node_id, "--quiet", "--home", str(home)).stdout)
    port = _free_port()
    command = [sys.executable, "-m", "fedserver", "--home", str(home), "run", "--port", str(port),
               "--max-poll-wait", "2", "--plan", f"{TESTS / 'plans_lsq.py'}:LinearPlan", "--args", json.dumps(ARGS),
               "--rounds", "2", "--tags", "lsq", "--node-wait", "60", "--no-progress",
               "--history-db", str(tmp_path / "history.db")]
    server = subprocess.Popen(command, cwd=ROOT, env=node_env(), text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    try:
        assert server.stdout.readline().startswith("fedserver: serving on ")
        time.sleep(3.0)  # the run waits for its node meanwhile
        nodes[0].start(port, home / "certs" / "ca.crt")
        out, err = server.communicate(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate(timeout=10)
        stop_processes(nodes)
    assert server.returncode == 0, out + err + nodes[0].log()[-3000:]
    durations = [float(d) for d in re.findall(r"^round \d/2 .*\((\d+\.\d+) s\)$", out, re.MULTILINE)]
    assert len(durations) == 2, out
    match = re.search(r"^completed 2 round\(s\) in (\d+\.\d) s: (\d+\.\d\d) s per round, (\d+\.\d) s waiting for "
                      r"nodes$", out, re.MULTILINE)
    assert match, out
    total, per_round, waited = map(float, match.groups())
    assert abs(per_round - sum(durations) / 2) <= 0.011, (per_round, durations)
    assert waited >= 2.9 and total >= waited + sum(durations) - 0.1, out
