"""An Experiment serving as ``fedserver run`` does, on a port another socket holds, says how to serve elsewhere.

Without ``server=``/``server_config=`` an Experiment serves on ``fedserver run``'s 127.0.0.1:50051 (or, resumed,
on its checkpoint's port). A busy port raised the server's "Stop it or choose another port", but the
Experiment has no port option: the way out is ``server_config=ServerConfig(port=...)``. ``fedserver run``,
which has --port, keeps its message. The default port is taken from ``experiment_serving.DEFAULTS`` (the
table ``fedserver run`` fills its options from), set here to a port the test holds, never to 50051.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_support import TESTS
from plans_lsq import LinearPlan

from fedcore.errors import ExperimentError
from fedserver import experiment_serving
from fedserver.auth import NodeStore
from fedserver.certs import create_ca, create_server_certificate
from fedserver.experiment import Experiment

ARGS = {"num_updates": 2, "lr": 0.02, "seed": 7}


@pytest.fixture
def held_port() -> Iterator[int]:
    """A local port a listening socket holds for the test."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def _home_with_certificate(home: Path) -> Path:
    ca = create_ca()
    create_server_certificate(ca, ["localhost", "127.0.0.1"]).write(home / "certs", "server")
    return home


def test_a_busy_default_port_names_server_config_as_the_way_to_another_port(tmp_path, monkeypatch,
                                                                            held_port) -> None:
    home = _home_with_certificate(tmp_path / "srv")
    monkeypatch.setenv("FEDSERVER_HOME", str(home))
    monkeypatch.setitem(experiment_serving.DEFAULTS, "port", held_port)
    exp = Experiment(LinearPlan, ARGS, rounds=1, progress=False, node_store=NodeStore(tmp_path / "nodes.db"))
    with pytest.raises(ExperimentError) as err:
        exp.run()
    message = str(err.value)
    assert (f"serves as `fedserver run` does with no server option: on 127.0.0.1:{held_port} (tls) from the "
            f"server home {home}") in message, message
    assert f"could not bind 127.0.0.1:{held_port}" in message, message
    assert "Stop it, or serve on another port: pass server_config=ServerConfig(port=..., " in message, message
    assert f"cert_file='{home / 'certs' / 'server.crt'}', key_file='{home / 'certs' / 'server.key'}')" in message
    assert "choose another port" not in message and "--port" not in message, message
    assert exp.server is None and exp.serving is None  # nothing was served


def test_a_resume_on_its_busy_checkpoint_port_says_the_same(tmp_path, monkeypatch, held_port) -> None:
    monkeypatch.delenv("FEDSERVER_HOME", raising=False)
    ckpt = tmp_path / "ckpt"
    first = Experiment(LinearPlan, ARGS, rounds=1, checkpoint_dir=ckpt, progress=False, low_memory=True)
    first.params = first.initial_params()
    first.serving = {"address": "127.0.0.1", "port": held_port, "tls": "insecure", "cert": None, "key": None,
                     "ca": None, "home": str(tmp_path), "options": {}}
    first._checkpoint_params()
    with pytest.raises(ExperimentError) as err:
        Experiment.resume(ckpt, progress=False, node_store=NodeStore(tmp_path / "nodes.db")).run()
    message = str(err.value)
    assert f"as the checkpoint's run did (its serving): on 127.0.0.1:{held_port} (insecure)" in message, message
    assert ("Stop it, or serve on another port: pass server_config=ServerConfig(port=..., tls='insecure')"
            in message), message
    assert "choose another port" not in message, message


def test_fedserver_run_keeps_its_message_naming_port_choice(tmp_path, monkeypatch, capsys, held_port) -> None:
    """``fedserver run`` has --port: its message is the server's, as before."""
    from fedserver.cli import main

    home = tmp_path / "srv"
    NodeStore(home / "nodes.db").enroll("site-0")
    monkeypatch.setenv("FEDSERVER_HOME", str(home))
    plan = f"{TESTS / 'plans_lsq.py'}:LinearPlan"
    assert main(["run", "--plan", plan, "--args", json.dumps(ARGS), "--rounds", "1", "--no-progress",
                 "--tls", "insecure", "--port", str(held_port)]) == 1
    err = capsys.readouterr().err
    assert f"fedserver: error: could not bind 127.0.0.1:{held_port} (" in err, err
    assert err.rstrip().endswith("using the port? Stop it or choose another port"), err
    assert "server_config" not in err, err
