"""``fedserver run --resume`` serves as the run it continues did: address, port, --tls and its files, home.

A run served with ``--home srv --address 0.0.0.0 --port P`` and interrupted printed ``once the nodes are back:
fedserver run --resume --checkpoint-dir runs/int``; that command served on 127.0.0.1:50051 with the default
home, the nodes dialled P, and it failed after --node-wait. The checkpoint now holds the serving settings
(``serving`` in experiment.json), a resume uses them unless its command line gives others (and says which it
overrides), and the printed command works as printed. A failed resume of a round-0 checkpoint (low memory)
said there was no checkpoint to resume from.
"""

from __future__ import annotations

import json
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from e2e_support import ROOT, TESTS, least_squares_sites, node_env, prepare_nodes, run_cli, stop_processes
from plans_lsq import LinearPlan

from fedcore.errors import CheckpointError
from fedserver.auth import NodeStore
from fedserver.checkpoints import CheckpointStore
from fedserver.cli import main
from fedserver.experiment import Experiment
from fedserver.experiment_state import check_experiment_state
from fedserver.home import nodes_db

ARGS = {"num_updates": 2, "lr": 0.02, "seed": 7}
SLOW_PLAN = f"{TESTS / 'plans_slow.py'}:SlowLinearPlan"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fedserver(argv: list[str]) -> list[str]:
    assert argv[0] == "fedserver", argv
    return [sys.executable, "-m", "fedserver", *argv[1:]]


def test_the_printed_resume_command_serves_where_the_nodes_dial(tmp_path: Path) -> None:
    """The user's session: a run with its own home, address and port, Ctrl-C, then the printed command as is."""
    home = tmp_path / "srv"
    run_cli("fedserver", "certs", "init", "--home", str(home))
    run_cli("fedserver", "certs", "server", "--home", str(home))
    nodes = prepare_nodes(tmp_path, least_squares_sites(1), range(1), lambda node_id: run_cli(
        "fedserver", "nodes", "enroll", node_id, "--quiet", "--home", str(home)).stdout)
    port = _free_port()
    env = node_env(PYTHONPATH=str(ROOT))
    env.pop("FEDSERVER_HOME", None)
    first = subprocess.Popen(
        _fedserver(["fedserver", "--home", "srv", "run", "--plan", SLOW_PLAN, "--args", json.dumps(ARGS),
                    "--rounds", "5", "--tags", "lsq", "--address", "0.0.0.0", "--port", str(port),
                    "--checkpoint-dir", "runs/int", "--history-db", "history.db", "--node-wait", "60",
                    "--max-poll-wait", "2", "--no-progress"]),
        cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    resumed = None
    try:
        nodes[0].start(port, home / "certs" / "ca.crt")
        seen = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # readline returns at the latest when the process exits
            line = first.stdout.readline()
            seen.append(line)
            if not line or line.startswith("round 1/5"):
                break
        assert seen[-1].startswith("round 1/5"), "".join(seen) + nodes[0].log()
        first.send_signal(signal.SIGINT)
        out, err = first.communicate(timeout=30)
        assert first.returncode == 130, "".join(seen) + out + err
        (hint,) = re.findall(r"once the nodes are back: (.*)$", err, re.MULTILINE)
        assert hint.startswith("fedserver --home "), hint  # not the default home: named
        resumed = subprocess.run(_fedserver(shlex.split(hint)), cwd=tmp_path, env=env, text=True,
                                 capture_output=True, timeout=120, check=False)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate(timeout=10)
        stop_processes(nodes)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr + nodes[0].log()[-3000:]
    assert f"serving on 0.0.0.0:{port} (tls)" in resumed.stdout, resumed.stdout
    assert "round 5/5" in resumed.stdout, resumed.stdout
    assert CheckpointStore(tmp_path / "runs" / "int").latest_round() == 5
    serving = CheckpointStore(tmp_path / "runs" / "int").load_experiment_state(5)["serving"]
    assert serving == {"address": "0.0.0.0", "port": port, "tls": "tls", "cert": None, "key": None, "ca": None,
                       "home": str(home), "options": {"max_poll_wait_seconds": 2.0}}  # the chosen ones


# -- in process: overrides, old checkpoints, round 0 ----------------------------------------------------------


@pytest.fixture
def site(tmp_path: Path, monkeypatch) -> dict[str, Path]:
    """A server home with an enrolled node (no node connects) and a low-memory run's round-0 checkpoint."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FEDSERVER_HOME", raising=False)
    home = tmp_path / "home"
    NodeStore(nodes_db(home)).enroll("site-a")
    ckpt = tmp_path / "ckpt"
    exp = Experiment(LinearPlan, ARGS, rounds=2, checkpoint_dir=ckpt, progress=False, low_memory=True)
    exp.params = exp.initial_params()
    exp.serving = {"address": "127.0.0.1", "port": _free_port(), "tls": "insecure", "cert": None, "key": None,
                   "ca": None, "home": str(home)}
    exp._checkpoint_params()  # a low-memory run saves x as round 0 before its first round
    return {"home": home, "ckpt": ckpt, "port": exp.serving["port"]}


def _resume(site, capsys, *extra: str) -> tuple[int, str, str]:
    code = main(["run", "--resume", "--checkpoint-dir", str(site["ckpt"]), "--node-wait", "0.1", "--no-progress",
                 *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_failed_resume_of_a_round_0_checkpoint_says_how_to_resume_it(site, capsys) -> None:
    code, out, err = _resume(site, capsys)
    assert code == 1, out + err
    assert f"serving on 127.0.0.1:{site['port']} (insecure)" in out, "the checkpoint's port, tls and home"
    assert "no checkpoint to resume from" not in err, err
    assert ("the checkpoint of round 0 (the initial model) is intact; once the nodes are back: "
            f"fedserver --home {site['home']} run --resume --checkpoint-dir {site['ckpt']}\n") in err, err


def test_options_given_override_the_checkpoint_and_are_named_and_kept_in_the_hint(site, capsys) -> None:
    other = _free_port()
    code, out, err = _resume(site, capsys, "--port", str(other))
    assert code == 1, out + err
    assert f"serving on 127.0.0.1:{other} (insecure)" in out, out
    assert (f"serving as the checkpoint's run did, except: --port {other} (the checkpoint's: {site['port']})"
            in err), err
    # no round was saved with the new port: the printed command still needs it
    assert f"--checkpoint-dir {site['ckpt']} --port {other}\n" in err, err


def test_a_checkpoint_from_before_resumes_as_the_command_line_says(site, capsys) -> None:
    store = CheckpointStore(site["ckpt"])
    c = store.load_latest()
    state = dict(c.experiment_state)
    del state["serving"]
    store.save(0, c.params, c.aggregator_name, c.aggregator_config, c.aggregator_state, state)
    code, out, err = _resume(site, capsys, "--home", str(site["home"]), "--tls", "insecure", "--port", "0")
    assert code == 1, out + err
    assert "serving on 127.0.0.1:" in out and "(insecure)" in out, out
    assert "the checkpoint does not say how its run was served" in err, err
    assert re.search(r"--checkpoint-dir \S+ --port \d+ --tls insecure\n", err), err


@pytest.mark.parametrize("serving, message", [
    ("0.0.0.0", "'serving' must be a map or null"),
    ({"address": "", "port": 1, "tls": "tls", "cert": None, "key": None, "ca": None, "home": "/h"},
     "'serving.address' must be a non-empty string"),
    ({"address": "a", "port": 70000, "tls": "tls", "cert": None, "key": None, "ca": None, "home": "/h"},
     "'serving.port' must be an int from 0 to 65535, got 70000"),
    ({"address": "a", "port": 1, "tls": "ssl", "cert": None, "key": None, "ca": None, "home": "/h"},
     "'serving.tls' must be one of insecure, tls, mtls, got 'ssl'"),
    ({"address": "a", "port": 1, "tls": "tls", "cert": 3, "key": None, "ca": None, "home": "/h"},
     "'serving.cert' must be a path string or null, got 3"),
    ({"address": "a", "port": 1, "tls": "tls", "cert": None, "key": None, "ca": None, "home": None},
     "'serving.home' must be a path string, got None"),
    ({"address": "a"}, "'serving' lacks ['port', 'tls', 'cert', 'key', 'ca', 'home']"),
])
def test_a_bad_serving_state_names_the_file_and_key(site, serving, message) -> None:
    state = CheckpointStore(site["ckpt"]).load_experiment_state(0)
    with pytest.raises(CheckpointError) as err:
        check_experiment_state({**state, "serving": serving}, Path("x/experiment.json"))
    assert str(err.value).startswith(f"x/experiment.json: {message}"), err.value


def test_new_run_defaults_unchanged(tmp_path) -> None:
    """The run parser's serving options default to None only to tell 'not given' apart: a new run still
    serves on 127.0.0.1:50051 with tls."""
    from fedserver.cli import build_parser
    from fedserver.experiment_serving import apply_serving

    args = build_parser().parse_args(["run", "--plan", "p.py:P", "--rounds", "1"])
    assert (args.address, args.port, args.tls) == (None, None, None)
    assert apply_serving(args, None) == []
    assert (args.address, args.port, args.tls) == ("127.0.0.1", 50051, "tls")
    assert not hasattr(args, "home")  # left to home_from_args: --home, $FEDSERVER_HOME, the default


# -- a checkpoint moved to another machine: the home and files it names are not there -------------------------


def _set_serving(site, **changes) -> dict:
    store = CheckpointStore(site["ckpt"])
    c = store.load_latest()
    state = dict(c.experiment_state)
    state["serving"] = {**state["serving"], **changes}
    store.save(0, c.params, c.aggregator_name, c.aggregator_config, c.aggregator_state, state)
    return state["serving"]


def _refused(site, capsys, *extra: str) -> str:
    with pytest.raises(SystemExit) as exited:
        _resume(site, capsys, *extra)
    err = capsys.readouterr().err
    assert exited.value.code == 2, err
    return err


def test_a_checkpoint_home_that_is_not_here_is_refused_and_nothing_is_created(site, tmp_path, capsys) -> None:
    gone = tmp_path / "old" / "srv"
    _set_serving(site, home=str(gone))
    err = _refused(site, capsys)
    assert (f"the checkpoint's serving.home {gone} does not exist (the run was served from there); "
            "pass --home DIR") in err, err
    assert not (tmp_path / "old").exists()


def test_fedserver_home_is_a_choice_like_home_and_overrides_the_checkpoint(site, tmp_path, capsys,
                                                                          monkeypatch) -> None:
    gone = tmp_path / "old" / "srv"
    _set_serving(site, home=str(gone))
    monkeypatch.setenv("FEDSERVER_HOME", str(site["home"]))
    code, out, err = _resume(site, capsys)
    assert code == 1, out + err  # served (no node came), from the home the environment names
    assert f"except: $FEDSERVER_HOME {site['home']} (the checkpoint's: {gone})" in err, err
    assert f"fedserver --home {site['home']} run --resume" in err, err
    assert not (tmp_path / "old").exists()


def test_checkpoint_certificate_files_that_are_not_here_name_where_they_came_from(site, tmp_path, capsys) -> None:
    cert, key = tmp_path / "gone" / "s.crt", tmp_path / "gone" / "s.key"
    _set_serving(site, tls="tls", cert=str(cert), key=str(key))
    err = _refused(site, capsys)
    assert (f"the checkpoint's serving.cert {cert} does not exist (the run was served with it); pass --cert FILE"
            in err), err
    assert f"the checkpoint's serving.key {key} does not exist" in err and "pass --key FILE" in err, err
    # insecure: the files are not used, so their absence is no reason to refuse
    code, out, err = _resume(site, capsys, "--tls", "insecure")
    assert code == 1 and "(insecure)" in out, out + err


def test_the_hint_names_home_when_the_checkpoint_holds_another_one(tmp_path, monkeypatch) -> None:
    """The failed resume served from the default home; the checkpoint on disk says /old/srv."""
    from fedserver.experiment_serving import hint_command
    from fedserver.home import server_home

    monkeypatch.delenv("FEDSERVER_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    saved = {"address": "127.0.0.1", "port": 50917, "tls": "tls", "cert": None, "key": None, "ca": None,
             "home": str(tmp_path / "old" / "srv")}
    current = {**saved, "home": str(server_home(None))}
    words = shlex.split(hint_command(Path("ckpt"), current, saved))
    assert words[:3] == ["fedserver", "--home", current["home"]], words
    assert shlex.split(hint_command(Path("ckpt"), saved, saved))[:2] == ["fedserver", "--home"]  # not the default
    assert "--home" not in shlex.split(hint_command(Path("ckpt"), current, current))
