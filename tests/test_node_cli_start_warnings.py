"""``fednode start`` says what will go wrong before it serves: a token file others can read, a node with no
dataset (it can train nothing), a home it just created (a mistyped ``--home`` made a new empty one).

Real ``python -m fednode start`` processes against a port nobody listens on (the node retries with backoff);
each test reads stderr up to the "serving" banner, then stops the node with SIGTERM.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fednode.cli import main
from fednode.config import NodeConfig
from fednode.start_checks import check_start_files
from fedserver.certs import create_ca, create_node_certificate

ROOT = Path(__file__).resolve().parents[1]
CSV = "age,bmi,label\n63,27.5,1\n41,22.0,0\n57,31.2,1\n"


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_output(home: Path, token: Path, *extra: str) -> str:
    """stderr of `fednode start` up to and including its banner; the process is then stopped."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("FEDNODE_")}, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fednode", "start", "--server", f"127.0.0.1:{_unused_port()}", "--insecure",
         "--token-file", str(token), "--name", "site-a", "--home", str(home), *extra],
        cwd=home.parent, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines: list[str] = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if "Ctrl-C to stop" in line:
                break
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        proc.stderr.close()
    assert lines and "Ctrl-C to stop" in lines[-1], "".join(lines)
    return "".join(lines)


@pytest.fixture
def token(tmp_path):
    path = tmp_path / "hospital-a.token"
    path.write_text("fsn1_abcdef\n")
    path.chmod(0o644)  # what `fedserver nodes enroll hospital-a --quiet > hospital-a.token` leaves
    return path


def test_a_new_home_without_datasets_and_a_readable_token_are_each_one_warning(tmp_path, token):
    home = tmp_path / "nodeA-typo"
    err = start_output(home, token)
    warnings = err.splitlines()[:-1]
    (perm,) = [line for line in warnings if "chmod 600" in line]
    assert perm == (f"fednode: warning: token file {token} is readable by group or others (mode 0644): anyone "
                    f"who can read it can act as this node; run `chmod 600 {token}`"), err
    (created,) = [line for line in warnings if "new node home" in line]
    assert created.startswith(f"fednode: created a new node home at {home}"), err
    (empty,) = [line for line in warnings if "no datasets" in line]
    assert empty.startswith(f"fednode: warning: no datasets registered in {home}: this node can train nothing"), err
    assert f"`fednode dataset add NAME FILE --home {home}`" in empty, err
    assert len(warnings) == 3, err
    assert (home / "node.db").is_file()


def test_a_ready_node_starts_without_warnings(tmp_path, token):
    home = tmp_path / "site-a"
    data = tmp_path / "d.csv"
    data.write_text(CSV)
    assert main(["dataset", "add", "heart", str(data), "--target", "label", "--home", str(home)]) == 0
    token.chmod(0o600)
    err = start_output(home, token)
    assert err.splitlines()[:-1] == [], err
    assert "1 datasets" in err or "1 dataset" in err, err


def test_the_echo_handler_needs_no_dataset_and_creates_no_home(tmp_path, token):
    token.chmod(0o600)
    home = tmp_path / "unused-home"
    err = start_output(home, token, "--handler", "echo")
    assert err.splitlines()[:-1] == [], err
    assert not home.exists()


def test_a_private_key_others_can_read_is_a_warning_too(tmp_path):
    ca = create_ca("warnings CA")
    ca_file, _ = ca.write(tmp_path, "ca")
    cert, key = create_node_certificate(ca, "site-a").write(tmp_path, "site-a")
    config = NodeConfig(server="h:1", tls="mtls", ca_cert=ca_file, client_cert=cert, client_key=key)
    assert check_start_files(config) == []
    key.chmod(0o640)
    assert check_start_files(config) == [
        (f"key file {key} is readable by group or others (mode 0640): anyone who can read it can act as this "
         f"node; run `chmod 600 {key}`")]
