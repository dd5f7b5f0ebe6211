"""A server stopped while its node trains, resumed from its checkpoint on the same port, sees the node at once.

The user's walk-through: ``fedserver run --checkpoint-dir runs/s8`` stopped with Ctrl-C a moment into round 2
while the node trained, then ``fedserver run --resume --checkpoint-dir runs/s8 --node-wait 90``: the resumed
run waited 90 s and failed "only 0 connected node(s)". The node never saw a connection fail (it was training:
no stream open), so it never registered again, and the new server answered its polls with NoTask without
counting it. Now the new server refuses the node's calls ERROR_REASON_UNKNOWN_NODE until it registers, and
fednode registers again at its next progress report or heartbeat: the resumed run finishes within seconds of
its start, with the node process the test started once.

Real processes: ``fedserver run`` (TLS, its own home) and one ``fednode start`` training the slow plan
(0.2 s per step, 30 steps a round).
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from e2e_support import ROOT, TESTS, least_squares_sites, node_env, prepare_nodes, run_cli, stop_processes

from fedserver.checkpoints import CheckpointStore

SLOW_PLAN = f"{TESTS / 'plans_slow.py'}:SlowLinearPlan"
ARGS = {"num_updates": 30, "lr": 0.02, "seed": 7}  # 6 s of training a round


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_until(proc: subprocess.Popen, prefix: str, timeout: float) -> list[str]:
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # readline returns at the latest when the process exits
        line = proc.stdout.readline()
        seen.append(line)
        if not line or line.startswith(prefix):
            break
    return seen


def test_a_run_resumed_while_its_node_trains_sees_the_node_within_seconds(tmp_path: Path) -> None:
    home = tmp_path / "srv"
    run_cli("fedserver", "certs", "init", "--home", str(home))
    run_cli("fedserver", "certs", "server", "--home", str(home))
    (node,) = prepare_nodes(tmp_path, least_squares_sites(1), range(1), lambda node_id: run_cli(
        "fedserver", "nodes", "enroll", node_id, "--quiet", "--home", str(home)).stdout)
    port = _free_port()
    env = node_env(PYTHONPATH=str(ROOT))
    env.pop("FEDSERVER_HOME", None)
    common = ["--home", str(home), "run"]
    first = subprocess.Popen(
        [sys.executable, "-m", "fedserver", *common, "--plan", SLOW_PLAN, "--args", json.dumps(ARGS),
         "--rounds", "2", "--tags", "lsq", "--port", str(port), "--checkpoint-dir", "runs/s8",
         "--history-db", "history.db", "--node-wait", "60", "--max-poll-wait", "2", "--no-progress"],
        cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    resumed = None
    try:
        node.start(port, home / "certs" / "ca.crt")
        seen = _read_until(first, "round 1/2", 60)
        assert seen[-1].startswith("round 1/2"), "".join(seen) + node.log()
        time.sleep(1.5)  # round 2's task is training on the node (6 s)
        first.send_signal(signal.SIGINT)
        out, err = first.communicate(timeout=30)
        assert first.returncode == 130, "".join(seen) + out + err
        started = time.monotonic()
        resumed = subprocess.run(
            [sys.executable, "-m", "fedserver", *common, "--resume", "--checkpoint-dir", "runs/s8",
             "--node-wait", "90", "--expected-nodes", "1", "--no-progress"],
            cwd=tmp_path, env=env, text=True, capture_output=True, timeout=120, check=False)
        took = time.monotonic() - started
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate(timeout=10)
        stop_processes([node])
    log = node.log()
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr + log[-3000:]
    assert "round 2/2" in resumed.stdout, resumed.stdout
    assert CheckpointStore(tmp_path / "runs" / "s8").latest_round() == 2
    assert node.starts == 1  # the same node process served both runs
    # seen while it still trained round 2 of the first run: registered again at a report or heartbeat
    assert "registered again as site-0: the server no longer knew this node (it restarted?)" in log, log[-3000:]
    assert took < 30, f"the resumed run took {took:.1f} s\n{resumed.stdout}{resumed.stderr}"
