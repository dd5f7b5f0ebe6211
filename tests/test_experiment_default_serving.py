"""``Experiment`` without ``server=`` or ``server_config=`` serves as ``fedserver run`` does, and a resumed one as
its run did (the checkpoint's ``serving``), like ``fedserver run --resume``.

A new user's README example, ``Experiment(plan=..., ..., wait_after_quorum=60).run()``, raised from inside run()
"Experiment needs server= (a running FedServer) or server_config="; so did ``Experiment.resume(DIR).run()``,
though the checkpoint said how the run was served. Real gRPC, real ``fednode start`` processes, a server home
made by the ``fedserver certs`` and ``fedserver nodes`` commands.
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from e2e_support import ROOT, TESTS, least_squares_sites, node_env, prepare_nodes, run_cli, stop_processes
from plans_lsq import LinearPlan

from fedcore.errors import ExperimentError
from fedserver.checkpoints import CheckpointStore
from fedserver.config import ServerConfig
from fedserver.experiment import Experiment

ARGS = {"num_updates": 2, "lr": 0.02, "seed": 7}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _server_home(home: Path, *node_ids: str) -> dict[str, str]:
    """``fedserver certs init``, ``certs server`` and ``nodes enroll`` in ``home``: each node's token."""
    run_cli("fedserver", "--home", str(home), "certs", "init")
    run_cli("fedserver", "--home", str(home), "certs", "server")
    return {node_id: run_cli("fedserver", "--home", str(home), "nodes", "enroll", node_id, "--quiet").stdout
            for node_id in node_ids}


README_EXAMPLE = """\
from fedcore.aggregators import Scaffold
from fedserver import Experiment
from plans_lsq import LinearPlan as MyPlan

exp = Experiment(plan=MyPlan, training_args={"num_updates": 2, "lr": 0.02, "test_ratio": 0.25, "seed": 1},
                 aggregator=Scaffold(server_lr=1.0), rounds=1, dataset_tags=["lsq"], min_nodes=1,
                 wait_after_quorum=60, checkpoint_dir="runs/api", history_db="history.db", progress=False)
history = exp.run()
final = exp.evaluate()
print("rounds", [r.round for r in history], "evaluated", final.num_samples)
"""

RESUME_EXAMPLE = """\
from fedserver import Experiment

exp = Experiment.resume("runs/api", rounds=2, progress=False)
print("rounds", [r.round for r in exp.run()])
"""


def _python(script: str, cwd: Path, home: Path) -> subprocess.CompletedProcess[str]:
    env = node_env(FEDSERVER_HOME=str(home), PYTHONPATH=f"{ROOT}:{TESTS}")
    return subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, text=True, capture_output=True,
                          timeout=180, check=False)


def test_the_readme_example_runs_as_written_and_resume_goes_on(tmp_path: Path) -> None:
    """No server_config: 127.0.0.1:50051, TLS, $FEDSERVER_HOME's certificate and enrolled node; then
    ``Experiment.resume(DIR)`` serves as the checkpoint says and trains round 2."""
    if not _port_free(50051):
        pytest.skip("port 50051 (fedserver run's default, the example's) is in use on this machine")
    home = tmp_path / "srv"
    tokens = _server_home(home, "site-0")
    (node,) = prepare_nodes(tmp_path, least_squares_sites(1), range(1), tokens.__getitem__)
    work = tmp_path / "work"
    work.mkdir()
    try:
        node.start(50051, home / "certs" / "ca.crt")
        first = _python(README_EXAMPLE, work, home)
        assert first.returncode == 0, first.stdout + first.stderr + node.log()[-3000:]
        assert "rounds [1] evaluated 20" in first.stdout, first.stdout  # 80 samples, 25 % held out
        serving = CheckpointStore(work / "runs" / "api").load_experiment_state(1)["serving"]
        assert serving == {"address": "127.0.0.1", "port": 50051, "tls": "tls", "cert": None, "key": None,
                           "ca": None, "home": str(home), "options": {}}
        second = _python(RESUME_EXAMPLE, work, home)
    finally:
        stop_processes([node])
    assert second.returncode == 0, second.stdout + second.stderr + node.log()[-3000:]
    assert "rounds [2]" in second.stdout, second.stdout
    assert CheckpointStore(work / "runs" / "api").load_experiment_state(2)["serving"] == serving


def test_resume_serves_on_the_checkpoints_port_tls_home_and_options(tmp_path: Path, monkeypatch, caplog) -> None:
    """A checkpoint served on port P with TLS from home H and --max-poll-wait 2: the node dials only P and
    trusts only H's CA, so the resumed run completes only if it serves so."""
    monkeypatch.delenv("FEDSERVER_HOME", raising=False)
    monkeypatch.chdir(tmp_path)  # the default home, ./fedserver-home, is not the run's
    home = tmp_path / "srv"
    tokens = _server_home(home, "site-0")
    port = _free_port()
    ckpt = tmp_path / "ckpt"
    exp = Experiment(LinearPlan, ARGS, rounds=2, dataset_tags=["lsq"], checkpoint_dir=ckpt, progress=False,
                     low_memory=True)
    exp.params = exp.initial_params()
    exp.serving = {"address": "127.0.0.1", "port": port, "tls": "tls", "cert": None, "key": None, "ca": None,
                   "home": str(home), "options": {"max_poll_wait_seconds": 2.0}}
    exp._checkpoint_params()  # a low-memory run saves x as round 0 before its first round
    (node,) = prepare_nodes(tmp_path, least_squares_sites(1), range(1), tokens.__getitem__)
    try:
        node.start(port, home / "certs" / "ca.crt")
        resumed = Experiment.resume(ckpt, progress=False, node_wait_timeout=60)
        with caplog.at_level(logging.INFO, logger="fedserver.experiment"):
            reports = resumed.run()
    finally:
        stop_processes([node])
    assert [r.round for r in reports] == [1, 2]
    assert f"serving on 127.0.0.1:{port} (tls), server home {home}" in caplog.text
    assert "applied --max-poll-wait 2.0" in caplog.text
    assert CheckpointStore(ckpt).load_experiment_state(2)["serving"] == exp.serving
    assert not (tmp_path / "fedserver-home").exists()


# -- what cannot be served is refused at run(), before anything is bound or created ---------------------------


def test_no_certificate_in_the_home_names_it_and_the_two_ways_out(tmp_path: Path, monkeypatch) -> None:
    home = tmp_path / "srv"
    monkeypatch.setenv("FEDSERVER_HOME", str(home))
    exp = Experiment(LinearPlan, ARGS, rounds=1, progress=False)
    with pytest.raises(ExperimentError) as err:
        exp.run()
    message = str(err.value)
    assert "serves as `fedserver run` does with no server option: on 127.0.0.1:50051 (tls)" in message, message
    assert f"from the server home {home} ($FEDSERVER_HOME)" in message, message
    assert f"cert_file {home / 'certs' / 'server.crt'} does not exist" in message, message
    assert "`fedserver certs init`, then `fedserver certs server`" in message, message
    assert "or pass server_config=ServerConfig(...) and node_store=NodeStore(...)" in message, message
    assert not home.exists()


def test_the_default_home_is_named_as_such(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("FEDSERVER_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ExperimentError, match=r"the default home: \$FEDSERVER_HOME is unset"):
        Experiment(LinearPlan, ARGS, rounds=1, progress=False).run()
    assert not (tmp_path / "fedserver-home").exists()


def test_no_enrolled_node_names_the_node_store_and_the_command(tmp_path: Path, monkeypatch) -> None:
    home = tmp_path / "srv"
    _server_home(home)
    monkeypatch.setenv("FEDSERVER_HOME", str(home))
    with pytest.raises(ExperimentError) as err:
        Experiment(LinearPlan, ARGS, rounds=1, progress=False).run()
    assert f"no node is enrolled in {home / 'nodes.db'}" in str(err.value), err.value
    assert "run `fedserver nodes enroll ID`, or pass node_store=NodeStore(...)" in str(err.value), err.value


def _round0_checkpoint(tmp_path: Path, serving: dict | None) -> Path:
    ckpt = tmp_path / "ckpt"
    exp = Experiment(LinearPlan, ARGS, rounds=1, checkpoint_dir=ckpt, progress=False, low_memory=True)
    exp.params = exp.initial_params()
    exp.serving = serving
    exp._checkpoint_params()
    return ckpt


def test_a_checkpoint_whose_home_is_not_here_is_refused_naming_it(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("FEDSERVER_HOME", raising=False)
    gone = tmp_path / "gone"
    ckpt = _round0_checkpoint(tmp_path, {"address": "127.0.0.1", "port": 6000, "tls": "insecure", "cert": None,
                                         "key": None, "ca": None, "home": str(gone), "options": {}})
    with pytest.raises(ExperimentError) as err:
        Experiment.resume(ckpt, progress=False).run()
    assert f"the checkpoint's serving.home {gone} does not exist" in str(err.value), err.value
    assert "$FEDSERVER_HOME=DIR for --home" in str(err.value), err.value
    assert not gone.exists()


def test_a_checkpoint_without_serving_serves_as_a_new_experiment_and_says_so(tmp_path: Path, monkeypatch,
                                                                                caplog) -> None:
    home = tmp_path / "srv"
    monkeypatch.setenv("FEDSERVER_HOME", str(home))
    ckpt = _round0_checkpoint(tmp_path, None)
    with caplog.at_level(logging.WARNING, logger="fedserver.experiment"), pytest.raises(ExperimentError) as err:
        Experiment.resume(ckpt, progress=False).run()
    assert "holds no 'serving'" in caplog.text and "serving as `fedserver run` does" in caplog.text, caplog.text
    assert f"from the server home {home} ($FEDSERVER_HOME)" in str(err.value), err.value


def test_a_server_config_in_a_token_mode_needs_a_node_store(tmp_path: Path) -> None:
    exp = Experiment(LinearPlan, ARGS, rounds=1, progress=False,
                     server_config=ServerConfig(port=_free_port(), tls="insecure"))
    with pytest.raises(ExperimentError, match=r"tls='insecure' authenticates nodes by token: pass node_store="):
        exp.run()


def test_fedserver_run_still_refuses_a_home_without_enrolled_nodes(tmp_path: Path, monkeypatch, capsys) -> None:
    """``fedserver run`` builds its server with the function the Experiment uses: same refusal as before."""
    from fedserver.cli import main

    home = tmp_path / "srv"
    _server_home(home)
    monkeypatch.setenv("FEDSERVER_HOME", str(home))
    plan = f"{TESTS / 'plans_lsq.py'}:LinearPlan"
    assert main(["run", "--plan", plan, "--args", json.dumps(ARGS), "--rounds", "1", "--no-progress"]) == 1
    assert ("fedserver: error: no node is enrolled, so no node could connect: run `fedserver nodes enroll ID`"
            in capsys.readouterr().err)


def test_the_snippets_match_the_readme() -> None:
    """The README's Python example is the shape the first test runs (no server_config, resume without one)."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("```python\n", 1)[1].split("```", 1)[0]
    assert "server_config" not in block and "Experiment(plan=MyPlan" in block, block
    assert "exp.run()" in textwrap.dedent(block)
