"""``fedserver serve`` / ``fedserver run`` server-memory flags: --max-upload-buffer and --receive-window.

Bad values go through the real entry point (``fedserver.cli.main`` in process for the table, ``python -m
fedserver`` for the exit status) and must be refused naming the flag and the value; good values must
reach :class:`ServerConfig` and a real ``serve`` process must start with them.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fedserver.cli import build_parser, main
from fedserver.cli_serve import config_from_args
from fedserver.experiment_serving import apply_serving

ROOT = Path(__file__).resolve().parents[1]
GiB, MiB, KiB = 1 << 30, 1 << 20, 1 << 10

BAD = [
    ("--max-upload-buffer", "-5", "a size cannot be negative"),
    ("--max-upload-buffer", "-1GiB", "a size cannot be negative"),
    ("--max-upload-buffer", "lots", "use e.g. 1048576, 512KiB, 4MiB or 4GiB"),
    ("--max-upload-buffer", "1.5GiB", "use e.g. 1048576"),
    ("--max-upload-buffer", "0", "must be more than 0 bytes"),
    ("--max-upload-buffer", "64XB", "use e.g. 1048576"),
    ("--receive-window", "-256KiB", "a size cannot be negative"),
    ("--receive-window", "wide", "use e.g. 1048576, 512KiB, 4MiB or 4GiB, or auto or bdp"),
    ("--receive-window", "1000", "must be 'auto', 'bdp' or at least 65535 bytes (64KiB)"),
    ("--receive-window", "0", "must be 'auto', 'bdp' or at least 65535 bytes"),
    ("--max-concurrent-uploads", "-2", "must be an integer > 0"),
    ("--max-concurrent-uploads", "many", "must be an integer > 0"),
    ("--reconnect-grace", "-1", "must be seconds >= 0, or none"),
    ("--reconnect-grace", "soon", "must be seconds >= 0, or none"),
    ("--reconnect-grace", "inf", "must be seconds >= 0, or none"),
]


def fedserver(*argv: str, home: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FEDSERVER_HOME": str(home)}
    return subprocess.Popen([sys.executable, "-m", "fedserver", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=home.parent)


@pytest.mark.parametrize("command", ["serve", "run"])
@pytest.mark.parametrize("flag, value, reason", BAD)
def test_bad_values_are_refused_naming_flag_and_value(command: str, flag: str, value: str, reason: str,
                                                      tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([command, "--home", str(tmp_path), "--tls", "insecure", f"{flag}={value}"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"fedserver {command}: error: argument {flag}: " in err
    assert f"{value!r}" in err and reason in err, err


def test_bad_values_exit_2_from_the_command_line(tmp_path: Path) -> None:
    runs = [fedserver("serve", "--tls", "insecure", "--max-upload-buffer", "-5", home=tmp_path / "h"),
            fedserver("run", "--receive-window", "wide", home=tmp_path / "h")]
    outs = [proc.communicate(timeout=60) for proc in runs]
    assert [proc.returncode for proc in runs] == [2, 2]
    assert "fedserver serve: error: argument --max-upload-buffer: invalid size '-5': a size cannot be " \
           "negative" in outs[0][1]
    assert "fedserver run: error: argument --receive-window: invalid size 'wide'" in outs[1][1]
    assert not (tmp_path / "h").exists()  # refused before anything was created


@pytest.mark.parametrize("command", ["serve", "run"])
@pytest.mark.parametrize("argv, upload_buffer, setting, window", [
    ([], 4 * GiB, "auto", MiB + 64 * KiB),  # the default listens on 127.0.0.1: one chunk message fixed
    (["--address", "0.0.0.0"], 4 * GiB, "auto", None),  # on a network: probing
    (["--max-upload-buffer", "64MiB", "--receive-window", "256KiB"], 64 * MiB, 256 * KiB, 256 * KiB),
    (["--max-upload-buffer", "1048576", "--receive-window", "65535"], MiB, 65535, 65535),
    (["--receive-window", "256k", "--receive-window", "BDP"], 4 * GiB, None, None),  # the last one wins
    (["--receive-window", "256k", "--receive-window", "AUTO"], 4 * GiB, "auto", MiB + 64 * KiB),
])
def test_values_reach_the_server_config(command: str, argv: list[str], upload_buffer: int, setting: int | str | None,
                                        window: int | None, tmp_path: Path) -> None:
    args = build_parser().parse_args([command, "--home", str(tmp_path), "--tls", "insecure", *argv])
    if command == "run":  # run's serving options stay None when not given (a resume takes the checkpoint's)
        apply_serving(args, None)  # a new run: the defaults, as cli_run does before config_from_args
    config = config_from_args(args)
    assert (config.max_upload_buffer_bytes, config.receive_window_bytes) == (upload_buffer, setting)
    options = dict(config.grpc_options())
    assert options.get("grpc.http2.lookahead_bytes") == window and ("grpc.http2.bdp_probe" in options) == bool(window)


@pytest.mark.parametrize("command", ["serve", "run"])
def test_help_explains_the_trade_off(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    flat = " ".join(capsys.readouterr().out.split())
    assert "--max-upload-buffer SIZE" in flat and "--receive-window auto|bdp|SIZE" in flat
    assert "one chunk message fixed while listening on loopback" in flat
    assert "replies are then received one after another" in flat
    assert "bandwidth-delay probing" in flat and "caps an upload at SIZE per network round trip" in flat


def test_serve_starts_with_bounded_memory(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert main(["nodes", "--home", str(home), "enroll", "a", "-q"]) == 0
    proc = fedserver("serve", "--tls", "insecure", "--port", "0", "--grace", "0.5", "--max-upload-buffer", "64MiB",
                     "--receive-window", "256KiB", home=home)
    try:
        line = proc.stdout.readline()
        assert re.search(r"serving on 127\.0\.0\.1:\d+ \(insecure\)", line), line + proc.stderr.read()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


@pytest.mark.parametrize("argv, grace", [([], 30.0), (["--reconnect-grace", "2.5"], 2.5),
                                         (["--reconnect-grace", "0"], 0.0), (["--reconnect-grace", "None"], None)])
def test_reconnect_grace_reaches_the_task_board(argv: list[str], grace: float | None, tmp_path: Path) -> None:
    from fedserver.auth import NodeStore
    from fedserver.server import FedServer

    args = build_parser().parse_args(["serve", "--home", str(tmp_path), "--tls", "insecure", *argv])
    config = config_from_args(args)
    assert config.reconnect_grace_seconds == grace
    assert FedServer(config, NodeStore(tmp_path / "nodes.db")).board.reconnect_grace == grace


def test_server_config_refuses_a_bad_grace() -> None:
    from fedcore.errors import ServerConfigError
    from fedserver.config import ServerConfig

    for bad in (-1.0, float("nan"), "30", True):
        with pytest.raises(ServerConfigError, match="reconnect_grace_seconds must be None or a finite number"):
            ServerConfig(tls="insecure", reconnect_grace_seconds=bad)  # type: ignore[arg-type]
