"""``fednode dataset ...`` and ``fednode plans ...`` through argparse, on real node homes in tmp_path.

Most tests mount the commands with their ``register(subparsers)`` on a parser built here (the same way
the top-level ``fednode`` parser mounts them) and run in-process; the last ones run the real
``python -m fednode`` in a subprocess for exit statuses and error printing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedcore.errors import DatasetFileError, DatasetFormatError, DatasetRegistryError, PlanApprovalError
from fednode import cli_datasets, cli_plans
from fednode.approvals import PlanApprovals
from fednode.datasets import DatasetRegistry
from fednode.home import DB_FILENAME, HOME_ENV_VAR, db_path, node_home

ROOT = Path(__file__).resolve().parents[1]
CSV = "age,bmi,label\n63,27.5,1\n41,22.0,0\n57,31.2,1\n"
PLAN = "class LinearPlan:\n    '''a plan'''\n"


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="fednode")
    top.add_argument("--home", default=None)  # as a top-level CLI may have it
    commands = top.add_subparsers(dest="command", required=True)
    cli_datasets.register(commands)
    cli_plans.register(commands)
    return top


def run(*argv: str) -> int:
    args = parser().parse_args(list(argv))
    return args.func(args)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.delenv(HOME_ENV_VAR, raising=False)
    return tmp_path / "site-home"


@pytest.fixture
def csv_file(tmp_path):
    path = tmp_path / "heart.csv"
    path.write_text(CSV)
    return path


# ---------------------------------------------------------------------------------------------- home
def test_node_home_resolution_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(HOME_ENV_VAR, raising=False)
    assert node_home() == tmp_path / "fednode-home"
    monkeypatch.setenv(HOME_ENV_VAR, str(tmp_path / "from-env"))
    assert node_home() == tmp_path / "from-env"
    assert node_home("given") == tmp_path / "given"
    assert db_path(node_home("given")) == tmp_path / "given" / DB_FILENAME


def test_env_home_and_db_options_choose_the_database(tmp_path, monkeypatch, csv_file, capsys):
    monkeypatch.setenv(HOME_ENV_VAR, str(tmp_path / "env-home"))
    assert run("dataset", "add", "a", str(csv_file), "--target", "label") == 0
    assert run("dataset", "add", "b", str(csv_file), "--target", "label", "--home", str(tmp_path / "h2")) == 0
    assert run("dataset", "add", "c", str(csv_file), "--target", "label", "--db", str(tmp_path / "x.db")) == 0
    assert run("--home", str(tmp_path / "h3"), "dataset", "add", "d", str(csv_file), "--target", "label") == 0
    names = {
        path: [r.name for r in DatasetRegistry(path).list()]
        for path in (tmp_path / "env-home" / DB_FILENAME, tmp_path / "h2" / DB_FILENAME, tmp_path / "x.db",
                     tmp_path / "h3" / DB_FILENAME)
    }
    assert list(names.values()) == [["a"], ["b"], ["c"], ["d"]]


# ---------------------------------------------------------------------------------------------- dataset
def test_dataset_add_list_show_remove(home, tmp_path, csv_file, capsys):
    np.savez(tmp_path / "img.npz", X=np.zeros((6, 2, 2)), y=np.arange(6))
    assert run("dataset", "add", "heart", str(csv_file), "--target", "label", "-t", "tabular,heart",
               "--home", str(home)) == 0
    out = capsys.readouterr().out
    assert "registered dataset 'heart': 3 samples, features [3, 2] float32, csv, tags heart,tabular" in out
    assert run("dataset", "add", "img", str(tmp_path / "img.npz"), "--dtype", "keep", "--tags", "imaging",
               "--home", str(home)) == 0
    capsys.readouterr()

    assert run("dataset", "list", "--home", str(home)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "FORMAT", "SAMPLES", "SHAPE", "DTYPE", "TAGS"]
    assert lines[1].split() == ["heart", "csv", "3", "3x2", "float32", "heart,tabular"]
    assert lines[2].split() == ["img", "npz", "6", "6x2x2", "float64", "imaging"]

    assert run("dataset", "list", "--tags", "heart", "--json", "--home", str(home)) == 0
    (entry,) = json.loads(capsys.readouterr().out)
    assert (entry["name"], entry["shape"], entry["dtype"]) == ("heart", [3, 2], "<f4")
    assert entry["path"] == str(csv_file)  # local output: the operator sees paths

    assert run("dataset", "show", "heart", "--verify", "--home", str(home)) == 0
    out = capsys.readouterr().out
    assert f"path:       {csv_file}" in out
    assert "target:     label [3] float32" in out
    assert "verified:" in out

    assert run("dataset", "remove", "heart", "--home", str(home)) == 0
    assert "removed dataset 'heart'" in capsys.readouterr().out
    assert csv_file.exists()
    assert [r.name for r in DatasetRegistry(db_path(home)).list()] == ["img"]


def test_dataset_list_when_empty(home, capsys):
    DatasetRegistry(db_path(home))  # a home whose datasets were all removed (a missing one: test_cli_missing_home)
    assert run("dataset", "list", "--home", str(home)) == 0
    assert "no datasets registered" in capsys.readouterr().out


def test_dataset_errors_surface_as_store_errors(home, tmp_path, csv_file):
    with pytest.raises(DatasetRegistryError, match="needs a target column"):
        run("dataset", "add", "heart", str(csv_file), "--home", str(home))
    bad = tmp_path / "bad.csv"
    bad.write_text("a,sex,label\n1,M,0\n")
    with pytest.raises(DatasetFormatError, match="column 'sex' is not numeric: line 2"):
        run("dataset", "add", "bad", str(bad), "--target", "label", "--home", str(home))
    assert not home.exists()  # a failed add creates no home (tests/test_node_cli_first_run.py)
    run("dataset", "add", "heart", str(csv_file), "--target", "label", "--home", str(home))
    with pytest.raises(DatasetRegistryError, match="no dataset named 'nope'"):
        run("dataset", "show", "nope", "--home", str(home))
    csv_file.write_text(CSV + "1,2,3\n")
    with pytest.raises(DatasetFileError, match="changed since registration"):
        run("dataset", "show", "heart", "--verify", "--home", str(home))


def test_dataset_usage_errors_exit_2(home, capsys):
    with pytest.raises(SystemExit) as info:
        run("dataset", "add", "x", "f.csv", "--dtype", "int8", "--home", str(home))
    assert info.value.code == 2
    assert "invalid choice: 'int8'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- plans
def test_plans_list_show_approve_reject(home, capsys):
    record = PlanApprovals(db_path(home)).submit(PLAN, "LinearPlan", "researcher-1")
    short = record.sha256[:12]

    assert run("plans", "list", "--home", str(home)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["ID", "STATUS", "NAME", "ORIGIN"]
    assert lines[1].split()[:4] == [short, "pending", "LinearPlan", "researcher-1"]

    assert run("plans", "show", record.sha256[:8], "--home", str(home)) == 0
    out = capsys.readouterr().out
    assert f"sha256:     {record.sha256}" in out
    assert out.endswith(PLAN)  # the full source, as submitted

    assert run("plans", "approve", short, "--note", "reviewed", "--home", str(home)) == 0
    assert f"plan {short} (LinearPlan) is now approved" in capsys.readouterr().out
    assert PlanApprovals(db_path(home)).is_approved(PLAN)

    assert run("plans", "list", "--status", "pending", "--home", str(home)) == 0
    assert "no training plans with status pending" in capsys.readouterr().out

    assert run("plans", "reject", short, "--note", "revoked", "--home", str(home)) == 0
    capsys.readouterr()
    assert run("plans", "list", "--json", "--home", str(home)) == 0
    (entry,) = json.loads(capsys.readouterr().out)
    assert (entry["sha256"], entry["status"], entry["note"]) == (record.sha256, "rejected", "revoked")
    assert "source" not in entry

    assert run("plans", "show", short, "--json", "--home", str(home)) == 0
    assert json.loads(capsys.readouterr().out)["source"] == PLAN


def test_plans_errors_surface_as_store_errors(home):
    PlanApprovals(db_path(home)).submit(PLAN, "LinearPlan")
    with pytest.raises(PlanApprovalError, match="too short"):
        run("plans", "approve", "abc", "--home", str(home))
    with pytest.raises(PlanApprovalError, match="no training plan"):
        run("plans", "show", "0" * 12, "--home", str(home))


def test_refusal_message_command_works_verbatim(home):
    store = PlanApprovals(db_path(home))
    message = store.refusal_message(store.submit(PLAN, "LinearPlan"))
    command = message.split("approve it with `")[1].split("`")[0]
    argv = command.split()
    assert argv[:3] == ["fednode", "plans", "approve"]
    assert run(*argv[1:], "--home", str(home)) == 0
    assert store.is_approved(PLAN)


@pytest.mark.parametrize("argv", [["dataset"], ["dataset", "add"], ["plans"], ["plans", "approve"]])
def test_help_reads_like_a_man_page(argv, capsys):
    with pytest.raises(SystemExit) as info:
        parser().parse_args([*argv, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: fednode {' '.join(argv)}")
    assert "files:" in text and DB_FILENAME in text and HOME_ENV_VAR in text
    if argv == ["plans"]:
        assert "examples:" in text and "SHA-256" in text and "fednode plans approve" in text


# ------------------------------------------------------------------------------------ python -m fednode
def fednode(home: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, HOME_ENV_VAR: str(home)}
    return subprocess.run([sys.executable, "-m", "fednode", *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120, check=False)


def test_real_command_registers_lists_and_reports_errors(home, csv_file):
    done = fednode(home, "dataset", "add", "heart", str(csv_file), "--target", "label", "--tags", "cardio")
    assert done.returncode == 0, done.stderr
    assert "registered dataset 'heart'" in done.stdout
    listed = fednode(home, "dataset", "list", "--json")
    assert [d["name"] for d in json.loads(listed.stdout)] == ["heart"]
    again = fednode(home, "dataset", "add", "heart", str(csv_file), "--target", "label")
    assert again.returncode == 1
    assert again.stderr.startswith("fednode: error: a dataset named 'heart' is already registered")
    assert (home / DB_FILENAME).is_file()


def test_real_command_approves_a_pending_plan(home):
    record = PlanApprovals(db_path(home)).submit(PLAN, "LinearPlan", "researcher-1")
    done = fednode(home, "plans", "approve", record.sha256[:8], "--note", "reviewed")
    assert done.returncode == 0, done.stderr
    assert PlanApprovals(db_path(home)).get(record.sha256).note == "reviewed"
    unknown = fednode(home, "plans", "show", "deadbeef00")
    assert unknown.returncode == 1 and "no training plan 'deadbeef00'" in unknown.stderr
