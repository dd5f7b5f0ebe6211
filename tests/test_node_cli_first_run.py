"""A new user's first ``fednode`` commands: a failed ``dataset add`` leaves nothing behind, the start banner
says who the node is and counts in English.

- ``fednode --home site-x dataset add x data/nonexist.csv`` (exit 1) used to create ``site-x/node.db``: the
  file is now checked before the home is created.
- Under mutual TLS without ``--name`` the node introduced itself with the host name although the server
  knows it by the certificate's common name: that name is now the default, and the banner says the id.
- "1 datasets" in the banner.

Real ``python -m fednode start`` processes against a port nobody listens on, stopped after the banner.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_node_cli_start_warnings import CSV, start_output

from fednode.cli import build_parser, main
from fednode.cli_start import config_from_args
from fednode.start_checks import certificate_common_name
from fedserver.certs import create_ca, create_node_certificate


@pytest.mark.parametrize("where", [("--home", "site-x"), ("--db", "site-x/nested/node.db")])
def test_a_dataset_add_failing_on_its_input_creates_no_home(tmp_path: Path, capsys, where) -> None:
    flag, relative = where
    target = tmp_path / relative
    status = main([flag, str(target), "dataset", "add", "x", str(tmp_path / "data" / "nonexist.csv"),
                   "--target", "label"])
    err = capsys.readouterr().err
    assert status == 1 and "nonexist.csv" in err, err
    assert not (tmp_path / "site-x").exists()


def test_a_dataset_add_with_a_bad_file_creates_no_home_and_a_good_one_then_registers(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("age,label\n1,x\n")
    home = tmp_path / "site-x"
    assert main(["--home", str(home), "dataset", "add", "x", str(bad), "--target", "label"]) == 1
    assert not home.exists(), capsys.readouterr().err
    good = tmp_path / "good.csv"
    good.write_text(CSV)
    assert main(["--home", str(home), "dataset", "add", "x", str(good), "--target", "label"]) == 0
    assert "registered dataset 'x': 3 samples" in capsys.readouterr().out
    # an existing home: a duplicate name is refused before the file is read, as before
    assert main(["--home", str(home), "dataset", "add", "x", str(tmp_path / "nonexist.csv"), "--target", "label"]) == 1
    assert "already registered" in capsys.readouterr().err


@pytest.fixture
def mtls(tmp_path: Path) -> dict[str, Path]:
    ca = create_ca("first run CA")
    ca_file, _ = ca.write(tmp_path, "ca")
    cert, key = create_node_certificate(ca, "clinic-a").write(tmp_path, "clinic-a")
    return {"ca": ca_file, "cert": cert, "key": key}


def test_under_mutual_tls_the_default_name_is_the_certificate_common_name(mtls, tmp_path: Path) -> None:
    def config(*extra: str):
        args = build_parser().parse_args(["start", "--server", "h:1", "--ca-cert", str(mtls["ca"]), "--cert",
                                          str(mtls["cert"]), "--key", str(mtls["key"]), *extra])
        return config_from_args(args)

    assert certificate_common_name(mtls["cert"]) == "clinic-a"
    assert certificate_common_name(tmp_path / "missing.crt") is None
    assert config().node_name == "clinic-a"
    assert config("--name", "Clinic A").node_name == "Clinic A"


def test_the_banner_names_the_mtls_id_and_counts_one_dataset(mtls, tmp_path: Path) -> None:
    home = tmp_path / "site-a"
    data = tmp_path / "a.csv"
    data.write_text(CSV)
    assert main(["--home", str(home), "dataset", "add", "a", str(data), "--target", "label"]) == 0
    token = tmp_path / "t.token"
    token.write_text("fsn1_abcdef\n")
    token.chmod(0o600)
    banner = start_output(home, token).splitlines()[-1]
    assert re.search(r"serving 127\.0\.0\.1:\d+ as 'site-a' \(insecure, handler train, 1 dataset\)", banner), banner
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = _mtls_banner(home, mtls, port)
    assert f"serving 127.0.0.1:{port} as 'clinic-a' (node id 'clinic-a' from its certificate, mtls, handler " \
           "train, 1 dataset); Ctrl-C to stop" in out, out


def _mtls_banner(home: Path, mtls: dict[str, Path], port: int) -> str:
    """stderr of `fednode start` under mutual TLS, without --name, up to its banner; then SIGTERM."""
    root = Path(__file__).resolve().parents[1]
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("FEDNODE_")}, "PYTHONPATH": str(root)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fednode", "start", "--server", f"127.0.0.1:{port}", "--ca-cert", str(mtls["ca"]),
         "--cert", str(mtls["cert"]), "--key", str(mtls["key"]), "--home", str(home)],
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
    return "".join(lines)
