"""A mistyped home is bad usage naming it, not a fresh empty home that answers the command.

Before: ``fednode dataset list --home /srv/fedndoe`` (a typo) created /srv/fedndoe/node.db and printed "no datasets
registered"; ``plans approve`` did the same and then failed "no training plan"; ``fedserver nodes revoke`` created
the server home. Now the commands that only read or change what a home holds exit 2, name the directory (and
where its path came from: --home, $FEDNODE_HOME, the default) and the commands that create a home, and create
nothing. The commands that put something in a home (``fednode dataset add``, ``fedserver nodes enroll``) still
create it. Real ``fednode`` / ``fedserver`` processes, real SQLite files.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fednode.approvals import PlanApprovals
from fednode.datasets import DatasetRegistry
from fednode.home import DB_FILENAME, HOME_ENV_VAR, db_path
from fedserver.auth import NodeStore

ROOT = Path(__file__).resolve().parents[1]
PLAN = "class LinearPlan:\n    '''a plan'''\n"

READ_OR_CHANGE = [["dataset", "list"], ["dataset", "list", "--json"], ["dataset", "show", "heart"],
                  ["dataset", "remove", "heart"], ["plans", "list"], ["plans", "show", "0123456789ab"],
                  ["plans", "approve", "0123456789ab"], ["plans", "reject", "0123456789ab"]]


def run(program: str, cwd: Path, *argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items()
                   if k not in (HOME_ENV_VAR, "FEDSERVER_HOME", "FEDSERVER_HISTORY_DB")}
    environment.update(PYTHONPATH=str(ROOT), **env)
    return subprocess.run([sys.executable, "-m", program, *argv], capture_output=True, text=True, env=environment,
                          timeout=60, cwd=str(cwd), check=False)


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# -- fednode ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", READ_OR_CHANGE, ids=" ".join)
def test_fednode_with_a_mistyped_home_exits_2_naming_it_and_creates_nothing(tmp_path: Path, command) -> None:
    typo = tmp_path / "sites" / "fedndoe"
    before = tree(tmp_path)
    done = run("fednode", tmp_path, *command, "--home", str(typo))
    assert done.returncode == 2, done.stderr
    assert f"argument --home: no node home at {typo} (no such directory)" in done.stderr
    assert f"`fednode dataset add NAME FILE --home {typo}`" in done.stderr and "`fednode start --home" in done.stderr
    assert done.stdout == "" and "Traceback" not in done.stderr
    assert tree(tmp_path) == before  # not even the parent directory


def test_fednode_says_where_the_home_came_from(tmp_path: Path) -> None:
    from_env = run("fednode", tmp_path, "plans", "list", **{HOME_ENV_VAR: str(tmp_path / "env-home")})
    assert from_env.returncode == 2
    assert f"${HOME_ENV_VAR}: no node home at {tmp_path / 'env-home'} (no such directory)" in from_env.stderr
    default = run("fednode", tmp_path, "dataset", "list")
    assert default.returncode == 2
    assert (f"no --home given and ${HOME_ENV_VAR} unset: no node home at {tmp_path / 'fednode-home'}"
            in default.stderr)
    db = tmp_path / "other.db"
    by_db = run("fednode", tmp_path, "plans", "list", "--db", str(db))
    assert by_db.returncode == 2 and f"argument --db: no node database at {db}: check the path" in by_db.stderr
    assert tree(tmp_path) == []


def test_a_directory_without_node_db_is_no_home_and_stays_empty(tmp_path: Path) -> None:
    """E.g. --home pointing at the project directory instead of the node home inside it."""
    project = tmp_path / "project"
    project.mkdir()
    done = run("fednode", tmp_path, "dataset", "list", "--home", str(project))
    assert done.returncode == 2
    assert f"argument --home: {project} holds no {DB_FILENAME}, so it is no node home" in done.stderr
    assert tree(project) == []


def test_an_existing_home_still_answers_and_add_still_creates_one(tmp_path: Path) -> None:
    home = tmp_path / "site-home"
    (tmp_path / "heart.csv").write_text("age,label\n63,1\n41,0\n")
    added = run("fednode", tmp_path, "dataset", "add", "heart", "heart.csv", "--target", "label", "--home", str(home))
    assert added.returncode == 0, added.stderr
    assert (home / DB_FILENAME).is_file()
    listed = run("fednode", tmp_path, "dataset", "list", "--home", str(home))
    assert listed.returncode == 0 and listed.stdout.splitlines()[1].split()[0] == "heart"
    assert run("fednode", tmp_path, "plans", "list", "--home", str(home)).stdout == "no training plans seen yet\n"
    record = PlanApprovals(db_path(home)).submit(PLAN, "LinearPlan")
    approved = run("fednode", tmp_path, "plans", "approve", record.short_id, "--home", str(home))
    assert approved.returncode == 0 and "is now approved" in approved.stdout
    removed = run("fednode", tmp_path, "dataset", "remove", "heart", "--home", str(home))
    assert removed.returncode == 0 and DatasetRegistry(db_path(home)).list() == []


# -- fedserver --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", [["nodes", "list"], ["nodes", "revoke", "site-a"]], ids=" ".join)
def test_fedserver_nodes_with_a_mistyped_home_exits_2_and_creates_nothing(tmp_path: Path, command) -> None:
    typo = tmp_path / "fedsrever-home"
    done = run("fedserver", tmp_path, "--home", str(typo), *command)
    assert done.returncode == 2, done.stderr
    assert f"argument --home: no server home at {typo} (no such directory)" in done.stderr
    assert f"`fedserver --home {typo} nodes enroll ID`" in done.stderr
    from_env = run("fedserver", tmp_path, *command, FEDSERVER_HOME=str(typo))
    assert from_env.returncode == 2 and f"$FEDSERVER_HOME: no server home at {typo}" in from_env.stderr
    assert tree(tmp_path) == []


def test_fedserver_nodes_in_a_home_without_enrolments(tmp_path: Path) -> None:
    """A home holding only certificates (mutual TLS) is a home: list says nobody is enrolled (exit 0), revoke
    that the node is not (exit 1); neither creates nodes.db. enroll creates the home."""
    home = tmp_path / "home"
    (home / "certs").mkdir(parents=True)
    listed = run("fedserver", tmp_path, "--home", str(home), "nodes", "list")
    assert listed.returncode == 0 and f"no nodes enrolled: no node database at {home / 'nodes.db'}" in listed.stdout
    revoked = run("fedserver", tmp_path, "--home", str(home), "nodes", "revoke", "site-a")
    assert revoked.returncode == 1
    assert "fedserver: error: node 'site-a' is not enrolled: no node database at" in revoked.stderr
    assert tree(home) == ["certs"]
    fresh = tmp_path / "fresh"
    enrolled = run("fedserver", tmp_path, "--home", str(fresh), "nodes", "enroll", "site-a", "-q")
    assert enrolled.returncode == 0 and NodeStore(fresh / "nodes.db").get("site-a") is not None


@pytest.mark.parametrize("command", [["history"], ["plot", "--experiment", "1", "--out", "x.png"]], ids=" ".join)
def test_fedserver_history_with_a_mistyped_db_exits_2_and_creates_nothing(tmp_path: Path, command) -> None:
    typo = tmp_path / "histroy.db"
    done = run("fedserver", tmp_path, *command, "--db", str(typo))
    assert done.returncode == 2, done.stderr
    assert f"argument --db: no history database at '{typo}': check the path (`fedserver run`" in done.stderr
    from_env = run("fedserver", tmp_path, *command, FEDSERVER_HISTORY_DB=str(typo))
    assert from_env.returncode == 2 and f"$FEDSERVER_HISTORY_DB: no history database at '{typo}'" in from_env.stderr
    default = run("fedserver", tmp_path, *command)
    assert default.returncode == 2
    assert "no --db given and $FEDSERVER_HISTORY_DB unset: no history database at 'history.db'" in default.stderr
    (tmp_path / "dir.db").mkdir()
    a_dir = run("fedserver", tmp_path, *command, "--db", str(tmp_path / "dir.db"))
    assert a_dir.returncode == 2 and f"'{tmp_path / 'dir.db'}' is a directory" in a_dir.stderr
    assert tree(tmp_path) == ["dir.db"]
