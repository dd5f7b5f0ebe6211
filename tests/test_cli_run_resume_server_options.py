"""``fedserver run --resume`` applies the other server options the run was started with (``serving.options``).

A run started with ``--max-payload-size`` raised for a big model, resumed with the printed command, served
with the 4 GiB default... or here the reverse: every option but address/port/TLS/home fell back to its default.
The checkpoint now keeps the options the command line chose, a resume applies them unless given again (the
command line wins, one stderr line names both), and the resumed server is observed over the wire: a node's
Register answer carries max_payload_size and max_poll_wait_seconds.
"""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from e2e_support import ROOT, TESTS, least_squares_sites, node_env, prepare_nodes, run_cli, stop_processes
from plans_lsq import LinearPlan

from fedcore.wire.messages import NodeRegistration, ServerSettings
from fedserver.auth import NodeStore
from fedserver.checkpoints import CheckpointStore
from fedserver.cli import build_parser, main
from fedserver.cli_serve import config_from_args
from fedserver.experiment import Experiment
from fedserver.experiment_serving import (
    DEFAULTS,
    OPTION_FIELDS,
    apply_server_options,
    apply_serving,
    hint_command,
)
from fedserver.home import nodes_db

ARGS = {"num_updates": 2, "lr": 0.02, "seed": 7}
SLOW_PLAN = f"{TESTS / 'plans_slow.py'}:SlowLinearPlan"
MiB = 1 << 20


def _fedserver(*argv: str, cwd: Path, home: Path) -> subprocess.Popen[str]:
    env = node_env(PYTHONPATH=str(ROOT), FEDSERVER_HOME=str(home))
    return subprocess.Popen([sys.executable, "-m", "fedserver", *argv], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _settings(port: int, token: str, ca_file: Path) -> ServerSettings:
    """What the server tells a node that registers: its limits, over the wire."""
    from fednode.config import NodeConfig
    from fednode.transport import NodeConnection

    async def register() -> ServerSettings:
        config = NodeConfig(server=f"127.0.0.1:{port}", tls="tls", ca_cert=ca_file, token=token)
        connection = NodeConnection(config, receive_window=None)
        try:
            return await connection.register(NodeRegistration(node_name="probe"))
        finally:
            await connection.close()

    return asyncio.run(register())


def _lines_until(proc: subprocess.Popen[str], start: str) -> list[str]:
    """``proc``'s stdout lines up to the first that starts with ``start`` (or its end)."""
    seen = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # readline returns at the latest when the process exits
        line = proc.stdout.readline()
        seen.append(line)
        if not line or line.startswith(start):
            break
    return seen


def _interrupt(proc: subprocess.Popen[str], seen: list[str]) -> tuple[str, str]:
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, "".join(seen) + out + err
    return "".join(seen) + out, err


def _serve_then_interrupt(proc: subprocess.Popen[str], token: str, ca_file: Path
                          ) -> tuple[ServerSettings, str, str]:
    """Wait for ``proc``'s serving line, register over the wire, then Ctrl-C it: (settings, stdout, stderr)."""
    try:
        seen = _lines_until(proc, "fedserver: serving on")
        match = re.search(r"serving on 127\.0\.0\.1:(\d+) \(tls\)", seen[-1])
        assert match, "".join(seen) + proc.stderr.read()
        settings = _settings(int(match.group(1)), token, ca_file)
        # a Ctrl-C in the loop iteration where the registration wakes the node wait is lost: Python 3.11's
        # asyncio.wait_for returns the woken event's result and swallows the cancel (NodeRegistry.wait_for_nodes);
        # the run then waits out --node-wait. Not this test's subject: let the wake-up pass first
        time.sleep(0.5)
        out, err = _interrupt(proc, seen)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    return settings, out, err


def test_a_resume_serves_with_the_options_the_run_was_started_with(tmp_path: Path) -> None:
    """Started with --max-payload-size 3MiB --max-poll-wait 2.5 and interrupted after a round; resumed without
    them, the server still says 3 MiB and 2.5 s to a registering node; given again on a resume, the command line
    wins, and the printed resume command keeps that choice while the checkpoint on disk does not hold it yet."""
    home = tmp_path / "srv"
    run_cli("fedserver", "certs", "init", "--home", str(home))
    run_cli("fedserver", "certs", "server", "--home", str(home))
    ca_file = home / "certs" / "ca.crt"
    store = NodeStore(nodes_db(home))
    nodes = prepare_nodes(tmp_path, least_squares_sites(1), range(1), store.enroll)
    probe = store.enroll("probe")
    ckpt = tmp_path / "ckpt"
    first = _fedserver("run", "--plan", SLOW_PLAN, "--args", json.dumps(ARGS), "--rounds", "50", "--tags", "lsq",
                       "--checkpoint-dir", str(ckpt), "--history-db", str(tmp_path / "h.db"), "--port", "0",
                       "--node-wait", "60", "--no-progress", "--max-payload-size", "3MiB", "--max-poll-wait", "2.5",
                       cwd=tmp_path, home=home)
    try:
        seen = _lines_until(first, "fedserver: serving on")
        match = re.search(r"serving on 127\.0\.0\.1:(\d+) \(tls\)", seen[-1])
        assert match, "".join(seen) + first.stderr.read()
        nodes[0].start(int(match.group(1)), ca_file)
        seen += _lines_until(first, "round 1/50")
        assert seen[-1].startswith("round 1/50"), "".join(seen) + nodes[0].log()
        _interrupt(first, seen)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate(timeout=10)
        stop_processes(nodes)
    latest = CheckpointStore(ckpt).latest_round()
    options = CheckpointStore(ckpt).load_experiment_state(latest)["serving"]["options"]
    assert options == {"max_payload_size": 3 * MiB, "max_poll_wait_seconds": 2.5}  # the chosen ones only

    resume = ("run", "--resume", "--checkpoint-dir", str(ckpt), "--node-wait", "60", "--no-progress")
    settings, out, err = _serve_then_interrupt(_fedserver(*resume, cwd=tmp_path, home=home), probe, ca_file)
    assert (settings.max_payload_size, settings.max_poll_wait_seconds) == (3 * MiB, 2.5), out + err
    assert settings.max_chunk_size == 4 * MiB  # not chosen: the default
    assert ("fedserver: the checkpoint's server options: applied --max-payload-size 3145728, --max-poll-wait 2.5\n"
            in err), err
    (hint,) = re.findall(r"once the nodes are back: (.*)$", err, re.MULTILINE)
    assert hint == f"fedserver run --resume --checkpoint-dir {ckpt}", hint  # the checkpoint holds them

    settings, out, err = _serve_then_interrupt(
        _fedserver(*resume, "--max-payload-size", "5MiB", cwd=tmp_path, home=home), probe, ca_file)
    assert (settings.max_payload_size, settings.max_poll_wait_seconds) == (5 * MiB, 2.5), out + err
    assert ("fedserver: the checkpoint's server options: applied --max-poll-wait 2.5; overridden by the command "
            "line: --max-payload-size 5242880 (the checkpoint's: 3145728)\n") in err, err
    (hint,) = re.findall(r"once the nodes are back: (.*)$", err, re.MULTILINE)
    assert hint == f"fedserver run --resume --checkpoint-dir {ckpt} --max-payload-size 5242880", hint

    argv = shlex.split(hint)  # the printed command, as printed, serves as the interrupted resume did
    settings, out, err = _serve_then_interrupt(
        _fedserver(*argv[1:-2], "--node-wait", "60", "--no-progress", *argv[-2:], cwd=tmp_path, home=home),
        probe, ca_file)
    assert (settings.max_payload_size, settings.max_poll_wait_seconds) == (5 * MiB, 2.5), out + err


# -- in process: old checkpoints, bad stored values ------------------------------------------------------------


@pytest.fixture
def site(tmp_path: Path, monkeypatch) -> dict[str, Path]:
    """A server home with an enrolled node (no node connects) and a low-memory run's round-0 checkpoint whose
    run chose --max-poll-wait 2.5 and --reconnect-grace none."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FEDSERVER_HOME", raising=False)
    home = tmp_path / "home"
    NodeStore(nodes_db(home)).enroll("site-a")
    ckpt = tmp_path / "ckpt"
    exp = Experiment(LinearPlan, ARGS, rounds=2, checkpoint_dir=ckpt, progress=False, low_memory=True)
    exp.params = exp.initial_params()
    exp.serving = {"address": "127.0.0.1", "port": 0, "tls": "insecure", "cert": None, "key": None, "ca": None,
                   "home": str(home), "options": {"max_poll_wait_seconds": 2.5, "reconnect_grace_seconds": None}}
    exp._checkpoint_params()  # a low-memory run saves x as round 0 before its first round
    return {"home": home, "ckpt": ckpt}


def _set_options(site, options: object) -> Path:
    store = CheckpointStore(site["ckpt"])
    c = store.load_latest()
    state = dict(c.experiment_state)
    state["serving"] = dict(state["serving"])
    if options is None:
        del state["serving"]["options"]
    else:
        state["serving"]["options"] = options
    store.save(0, c.params, c.aggregator_name, c.aggregator_config, c.aggregator_state, state)
    return site["ckpt"] / "round-0000" / "experiment.json"


def _resume(site, capsys, *extra: str) -> tuple[int, str, str]:
    code = main(["run", "--resume", "--checkpoint-dir", str(site["ckpt"]), "--node-wait", "0.1", "--no-progress",
                 *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_checkpoint_without_options_resumes_as_before(site, capsys) -> None:
    _set_options(site, None)
    code, out, err = _resume(site, capsys)
    assert code == 1, out + err  # served (no node came)
    assert "serving on 127.0.0.1:" in out, out
    assert "server options" not in err and "warning" not in err, err


def test_an_explicit_none_overrides_and_a_stored_none_applies(site, capsys) -> None:
    code, out, err = _resume(site, capsys, "--max-poll-wait", "4", "--receive-window", "bdp")
    assert code == 1, out + err
    assert ("the checkpoint's server options: applied --reconnect-grace none; overridden by the command line: "
            "--max-poll-wait 4.0 (the checkpoint's: 2.5)\n") in err, err
    # no round was saved with them: the printed command gives them, the stored ones it leaves to the checkpoint
    (hint,) = re.findall(r"once the nodes are back: (.*)$", err, re.MULTILINE)
    assert hint.endswith(" --receive-window bdp --max-poll-wait 4.0") and "--reconnect-grace" not in hint, hint


@pytest.mark.parametrize("options, message", [
    ({"max_payload_size": "1MiB"}, "'serving.options.max_payload_size' must be an int > 0, got '1MiB'"),
    ({"max_poll_wait_seconds": -1}, ("'serving.options.max_poll_wait_seconds' must be a finite number of "
                                    "seconds > 0, got -1")),
    ({"max_poll_wait_seconds": 10**400}, ("'serving.options.max_poll_wait_seconds' must be a finite number of "
                                          "seconds > 0, got 1" + "0" * 76 + "...")),  # an int no float holds: no traceback
    ({"reconnect_grace_seconds": "none"}, ("'serving.options.reconnect_grace_seconds' must be null or a finite "
                                          "number of seconds >= 0, got 'none'")),
    ({"receive_window_bytes": 1000}, ("'serving.options.receive_window_bytes' must be 'auto', null (BDP probing) "
                                     "or an int >= 65535, got 1000")),
    ({"chunk_size": 8 * MiB}, "'serving.options': chunk_size 8388608 must not exceed max_chunk_size 4194304"),
    ([2.5], "'serving.options' must be a map, got [2.5]"),
])
def test_a_bad_stored_option_exits_2_naming_the_file_and_the_key(site, capsys, options, message) -> None:
    path = _set_options(site, options)
    code, out, err = _resume(site, capsys)
    assert code == 2, out + err
    assert err == f"fedserver run: error: cannot resume: {path}: {message}\n", err  # one line
    assert "serving on" not in out, out  # nothing started


def test_an_unknown_stored_option_is_named_and_ignored(site, capsys) -> None:
    path = _set_options(site, {"max_poll_wait_seconds": 2.5, "ping_budget": 3})
    code, out, err = _resume(site, capsys)
    assert code == 1 and "serving on" in out, out + err
    assert (f"fedserver: warning: {path}: serving.options ['ping_budget'] are not server options of this "
            "fedserver (a checkpoint of a newer version?): ignored\n") in err, err
    assert "applied --max-poll-wait 2.5\n" in err, err


# -- the table: every server option fedserver run takes is remembered, by the field it sets ----------------------

VALUES = {"max_payload_size": ("7MiB", 7 * MiB), "max_chunk_size": ("3MiB", 3 * MiB),
          "chunk_size": ("512KiB", 512 << 10), "max_concurrent_uploads": ("3", 3),
          "max_upload_buffer": ("64MiB", 64 * MiB), "receive_window": ("256KiB", 256 << 10),
          "upload_line_wait": ("7", 7.0), "upload_place_kept": ("9", 9.0), "max_poll_wait": ("4", 4.0),
          "reconnect_grace": ("none", None)}


def test_every_server_option_of_run_is_remembered_by_its_field(tmp_path: Path) -> None:
    """A server option added to ``fedserver run`` without a place in OPTION_FIELDS would silently fall back to
    its default on resume: this fails first. Each option's value reaches its ServerConfig field, is kept by
    that name, and a resume that omits it gets it back."""
    parser = build_parser()
    run = parser._subparsers._group_actions[0].choices["run"]
    group = next(g for g in run._action_groups if g.title.startswith("server"))
    assert {a.dest for a in group._group_actions} == set(DEFAULTS) | set(OPTION_FIELDS)
    assert set(VALUES) == set(OPTION_FIELDS)
    argv = [word for dest, (text, _) in VALUES.items() for word in (f"--{dest.replace('_', '-')}", text)]
    args = parser.parse_args(["run", "--home", str(tmp_path), "--tls", "insecure", *argv])
    apply_serving(args, None)
    config = config_from_args(args)
    for dest, (_, value) in VALUES.items():
        assert getattr(config, OPTION_FIELDS[dest]) == value, dest
    assert args.server_options == {OPTION_FIELDS[dest]: value for dest, (_, value) in VALUES.items()}

    stored = {"home": str(tmp_path), "options": json.loads(json.dumps(args.server_options))}  # via JSON
    again = parser.parse_args(["run", "--resume", "--checkpoint-dir", "ckpt", "--tls", "insecure"])
    assert apply_server_options(again, stored).overridden == []
    apply_serving(again, None)
    assert config_from_args(again) == config
    current = {**stored, "address": "127.0.0.1", "port": 1, "tls": "insecure", "cert": None, "key": None, "ca": None}
    assert "--max" not in hint_command(Path("ckpt"), current, current)  # remembered: not repeated


def test_an_option_given_with_its_default_value_is_remembered(tmp_path: Path) -> None:
    args = build_parser().parse_args(["run", "--home", str(tmp_path), "--tls", "insecure", "--max-poll-wait", "30"])
    apply_serving(args, None)
    assert args.server_options == {"max_poll_wait_seconds": 30.0}  # given, even with the default value
    from fedserver.config import ServerConfig
    assert config_from_args(args) == ServerConfig(tls="insecure")
