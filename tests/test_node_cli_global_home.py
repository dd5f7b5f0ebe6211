"""``fednode --home DIR COMMAND``: the node home (and ``--db``) before the command, as ``fedserver`` takes it.

Before, ``fednode --home DIR dataset list`` failed with ``invalid choice: 'DIR'``. Options given after the
command replace those given before it: a command's own ``--home`` or ``--db`` wins over both global ones.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fednode.cli import main
from fednode.home import DB_FILENAME, HOME_ENV_VAR

ROOT = Path(__file__).resolve().parents[1]
CSV = "age,bmi,label\n63,27.5,1\n41,22.0,0\n57,31.2,1\n"


@pytest.fixture
def homes(tmp_path, monkeypatch):
    """Two node homes: A holds dataset 'alpha', B holds 'beta'."""
    monkeypatch.delenv(HOME_ENV_VAR, raising=False)
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "d.csv"
    data.write_text(CSV)
    for name, dataset in (("A", "alpha"), ("B", "beta")):
        assert main(["dataset", "add", dataset, str(data), "--target", "label", "--home", str(tmp_path / name)]) == 0
    return tmp_path / "A", tmp_path / "B"


def listed(capsys, *argv: str) -> str:
    capsys.readouterr()
    assert main(list(argv)) == 0
    return capsys.readouterr().out


def test_home_before_the_command(homes, capsys):
    a, b = homes
    out = listed(capsys, "--home", str(a), "dataset", "list")
    assert "alpha" in out and "beta" not in out, out
    out = listed(capsys, "--db", str(b / DB_FILENAME), "dataset", "list")
    assert "beta" in out and "alpha" not in out, out
    assert "no training plans seen yet" in listed(capsys, "--home", str(a), "plans", "list")


def test_the_commands_own_option_wins(homes, capsys):
    a, b = homes
    out = listed(capsys, "--home", str(a), "dataset", "list", "--home", str(b))
    assert "beta" in out and "alpha" not in out, out
    out = listed(capsys, "--db", str(a / DB_FILENAME), "dataset", "list", "--home", str(b))
    assert "beta" in out and "alpha" not in out, out
    out = listed(capsys, "--home", str(a), "dataset", "list", "--db", str(b / DB_FILENAME))
    assert "beta" in out and "alpha" not in out, out


def test_global_home_is_created_by_dataset_add_and_checked_by_list(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(HOME_ENV_VAR, raising=False)
    data = tmp_path / "d.csv"
    data.write_text(CSV)
    new = tmp_path / "new-home"
    assert main(["--home", str(new), "dataset", "add", "gamma", str(data), "--target", "label"]) == 0
    assert (new / DB_FILENAME).is_file()
    with pytest.raises(SystemExit) as info:
        main(["--home", str(tmp_path / "nodeA-typo"), "dataset", "list"])
    assert info.value.code == 2
    assert f"argument --home: no node home at {tmp_path / 'nodeA-typo'}" in capsys.readouterr().err


def test_help_shows_the_global_options(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "--home DIR" in out and "--db FILE" in out, out
    assert "before or after the command" in out, out


def test_as_a_process(homes):
    a, _ = homes
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("FEDNODE_")}, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "fednode", "--home", str(a), "dataset", "list"], cwd=a.parent,
                          env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "alpha" in done.stdout
