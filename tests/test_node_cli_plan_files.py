"""``fednode plans approve --file``: a plan approved from its file before any task brought it.

The digest approved must be the one the server sends for that file: ``PlanSource.from_class`` sends
``inspect.getsource`` of the plan's whole module, i.e. the file as Python reads it (coding declaration, BOM
dropped, line endings made ``\\n``, a final newline added). Each variant below is compared with the real
``from_class`` of the file imported as ``fedserver run --plan`` imports it. The last test is end to end: a
``fednode start`` process whose plan was approved from its file takes the first task of a ``fedserver run``
process without any pending step.
"""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from e2e_support import ROOT, TESTS, least_squares_sites, node_env, prepare_nodes, run_cli, stop_processes

from fedcore.tasks import PlanSource
from fednode.approvals import PlanApprovals
from fednode.cli import main
from fednode.home import HOME_ENV_VAR, db_path
from fednode.plan_files import plan_class_names
from fedserver.cli_run import load_plan_class_from_file

LSQ = (TESTS / "plans_lsq.py").read_text(encoding="utf-8")

VARIANTS = {
    "unix": LSQ.encode("utf-8"),
    "crlf": LSQ.replace("\n", "\r\n").encode("utf-8"),
    "old-mac-cr": LSQ.replace("\n", "\r").encode("utf-8"),
    "utf8-bom": b"\xef\xbb\xbf" + LSQ.encode("utf-8"),
    "no-final-newline": LSQ.rstrip("\n").encode("utf-8"),
    "latin-1-cookie": ("# -*- coding: latin-1 -*-\n# caf\u00e9 au lait\n" + LSQ).encode("latin-1"),
    "form-feed-and-u2028": LSQ.replace("\n\n", "\n\x0c\n", 1).encode("utf-8") + "# a\u2028b\n".encode("utf-8"),
}


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.delenv(HOME_ENV_VAR, raising=False)
    home = tmp_path / "site-home"
    home.mkdir()
    PlanApprovals(db_path(home))  # an existing node home, as `fednode dataset add` leaves it
    return home


def sent_sha256(path: Path, class_name: str = "LinearPlan") -> str:
    """What a server sends for ``path``: fedserver run's import, then PlanSource.from_class."""
    return PlanSource.from_class(load_plan_class_from_file(f"{path}:{class_name}")).sha256


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_approving_a_file_approves_the_digest_the_server_sends_for_it(variant, home, tmp_path, capsys):
    plan = tmp_path / f"plan_{variant.replace('-', '_')}.py"
    plan.write_bytes(VARIANTS[variant])
    expected = sent_sha256(plan)

    assert main(["plans", "approve", "--file", str(plan), "--note", "read it", "--home", str(home)]) == 0
    out = capsys.readouterr().out
    assert f"plan {expected[:12]} (LinearPlan) is now approved" in out, out
    assert f"sha256 {expected}" in out, out
    byte_digest = hashlib.sha256(VARIANTS[variant]).hexdigest()
    assert ("not the SHA-256 of the file's bytes" in out) == (byte_digest != expected), out

    record = PlanApprovals(db_path(home)).get(expected)
    assert (record.status, record.name, record.note) == ("approved", "LinearPlan", "read it")
    assert record.origin == f"file {plan}"
    # the stored source is what a task carries: submitting it finds the approval, no new pending plan
    sent = PlanSource.from_class(load_plan_class_from_file(f"{plan}:LinearPlan"))
    assert PlanApprovals(db_path(home)).require_approved(sent.source, sent.name).status == "approved"
    assert [r.sha256 for r in PlanApprovals(db_path(home)).list()] == [expected]


def test_reject_from_a_file_and_a_file_a_task_brought_first(home, tmp_path, capsys):
    plan = tmp_path / "plan.py"
    plan.write_text(LSQ)
    sent = PlanSource.from_class(load_plan_class_from_file(f"{plan}:LinearPlan"))
    approvals = PlanApprovals(db_path(home))
    approvals.submit(sent.source, sent.name, origin="researcher-1")  # a task brought it: pending
    assert main(["plans", "approve", "--file", str(plan), "--home", str(home)]) == 0
    record = approvals.get(sent.sha256)
    assert (record.status, record.origin) == ("approved", "researcher-1")  # first origin kept
    assert main(["plans", "reject", "--file", str(plan), "--note", "no", "--home", str(home)]) == 0
    assert approvals.get(sent.sha256).status == "rejected"
    assert f"plan {sent.sha256[:12]} (LinearPlan) is now rejected" in capsys.readouterr().out


def test_the_class_name_is_found_in_the_file_or_given(home, tmp_path, capsys):
    two = tmp_path / "two.py"
    two.write_text("from fedcore.plans import NumpyTrainingPlan\n\nclass Base(NumpyTrainingPlan):\n    pass\n\n"
                   "class A(Base):\n    pass\n\nclass B(Base):\n    pass\n\nclass Other:\n    pass\n")
    with pytest.raises(SystemExit) as info:
        main(["plans", "approve", "--file", str(two), "--home", str(home)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --name: {two} defines 3 training plan classes (Base, A, B): give --name CLASS" in err, err

    with pytest.raises(SystemExit) as info:
        main(["plans", "approve", "--file", str(two), "--name", "C", "--home", str(home)])
    assert info.value.code == 2
    assert "argument --name: no class 'C' in" in capsys.readouterr().err

    assert main(["plans", "approve", "--file", str(two), "--name", "B", "--home", str(home)]) == 0
    assert "(B) is now approved" in capsys.readouterr().out


def _indented(text: str) -> str:
    return "".join(f"    {line}\n" if line else "\n" for line in text.splitlines())


@pytest.mark.parametrize("block", [
    "import sys\nif sys.version_info >= (3,):\n{body}",
    "import sys\nif sys.version_info < (3,):\n    pass\nelse:\n{body}",
    "try:\n{body}except ImportError:\n    raise\n",
    "import contextlib\nwith contextlib.nullcontext():\n{body}",
])
def test_a_plan_class_defined_in_a_block_of_the_module_is_found(block, home, tmp_path, capsys):
    plan = tmp_path / "in_block.py"
    plan.write_text(block.format(body=_indented(LSQ)))
    expected = sent_sha256(plan)  # the server imports it as any other
    assert main(["plans", "approve", "--file", str(plan), "--home", str(home)]) == 0
    assert f"plan {expected[:12]} (LinearPlan) is now approved" in capsys.readouterr().out


def test_a_class_defined_in_a_function_is_not_a_plan_of_the_module(home, tmp_path, capsys):
    plan = tmp_path / "factory.py"
    plan.write_text("from fedcore.plans import NumpyTrainingPlan\n\ndef make():\n"
                    "    class Inner(NumpyTrainingPlan):\n        pass\n    return Inner\n")
    with pytest.raises(SystemExit) as info:
        main(["plans", "approve", "--file", str(plan), "--home", str(home)])
    assert info.value.code == 2
    assert f"argument --name: {plan} defines no class deriving from a TrainingPlan" in capsys.readouterr().err


def test_a_class_defined_twice_is_one_class_the_last_definition(home, tmp_path, capsys):
    plan = tmp_path / "twice.py"
    plan.write_text(LSQ + "\nclass LinearPlan(LinearPlan):\n    pass\n\nclass Helper:\n    pass\n\n"
                    "class Helper(LinearPlan):\n    pass\n")
    assert plan_class_names(plan.read_text(), plan) == (["LinearPlan", "Helper"], ["LinearPlan", "Helper"])
    plan.write_text(LSQ + "\nclass LinearPlan(LinearPlan):\n    pass\n")
    assert main(["plans", "approve", "--file", str(plan), "--home", str(home)]) == 0
    assert f"plan {sent_sha256(plan)[:12]} (LinearPlan) is now approved" in capsys.readouterr().out
    plan.write_text("from fedcore.plans import NumpyTrainingPlan\n\nclass P(NumpyTrainingPlan):\n    pass\n\n"
                    "class P:\n    pass\n")
    assert plan_class_names(plan.read_text(), plan) == ([], ["P"])  # the plain class replaced the plan


def test_a_name_that_is_not_a_plan_class_is_refused(home, tmp_path, capsys):
    plan = tmp_path / "helper.py"
    plan.write_text(LSQ + "\nclass Helper:\n    pass\n")
    with pytest.raises(SystemExit) as info:
        main(["plans", "approve", "--file", str(plan), "--name", "Helper", "--home", str(home)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert (f"argument --name: class 'Helper' in {plan} does not derive from a TrainingPlan: give one of its "
            f"training plan classes (LinearPlan)") in err, err
    assert PlanApprovals(db_path(home)).list() == []


def test_a_name_whose_base_comes_from_another_module_is_accepted(home, tmp_path, capsys):
    """``from mylib import BasePlan``: whether BasePlan is a TrainingPlan cannot be read from this file alone,
    so the operator's --name is trusted (a plain class of the file, above, is still refused)."""
    plan = tmp_path / "site_plan.py"
    plan.write_text("from mylib import BasePlan\nimport mylib\n\n\nclass SitePlan(BasePlan):\n    pass\n\n\n"
                    "class Other(mylib.Base):\n    pass\n\n\nclass Local(SitePlan):\n    pass\n")
    for name in ("SitePlan", "Other"):  # one digest: the record keeps the name it was first decided under
        assert main(["plans", "approve", "--file", str(plan), "--name", name, "--home", str(home)]) == 0
        assert "(SitePlan) is now approved" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:  # Local's base is a class of this file that is no known plan
        main(["plans", "approve", "--file", str(plan), "--name", "Local", "--home", str(home)])
    assert info.value.code == 2


@pytest.mark.parametrize("verb, says, never", [
    ("approve", "its first task runs without being refused", "is refused as rejected"),
    ("reject", "its first task is refused as rejected", "runs without being refused"),
])
def test_each_decision_explains_its_own_file_option(verb, says, never, capsys):
    with pytest.raises(SystemExit) as info:
        main(["plans", verb, "--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert says in out and never not in out, out


@pytest.mark.parametrize("argv, message", [
    (["approve"], "give the plan's ID or --file FILE"),
    (["approve", "0123456789ab", "--file", "x.py"], "give the plan's ID or --file FILE, not both"),
    (["approve", "0123456789ab", "--name", "P"], "argument --name: only with --file"),
    (["approve", "--file", "no/such/plan.py"], "argument --file: cannot read no/such/plan.py: No such file"),
])
def test_usage_mistakes_exit_2(argv, message, home, capsys):
    with pytest.raises(SystemExit) as info:
        main(["plans", *argv, "--home", str(home)])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    (b"", "is empty: a training plan file defines a class"),
    (b"class P(NumpyTrainingPlan:\n    pass\n", "is not valid Python (line 1:"),
    (b"# caf\xe9\nclass P:\n    pass\n", "cannot be read as Python source"),
])
def test_a_file_no_server_could_send_is_refused(content, message, home, tmp_path, capsys):
    plan = tmp_path / "bad.py"
    plan.write_bytes(content)
    assert main(["plans", "approve", "--file", str(plan), "--name", "P", "--home", str(home)]) == 1
    err = capsys.readouterr().err
    assert message in err, err
    assert PlanApprovals(db_path(home)).list() == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_plan_approved_from_its_file_runs_its_first_task_without_a_pending_step(tmp_path):
    server_home = tmp_path / "server"
    run_cli("fedserver", "certs", "init", "--home", str(server_home))
    run_cli("fedserver", "certs", "server", "--home", str(server_home))

    def enroll(node_id: str) -> str:
        return run_cli("fedserver", "nodes", "enroll", node_id, "--quiet", "--home", str(server_home)).stdout

    (node,) = prepare_nodes(tmp_path, least_squares_sites(1), [0], enroll)
    plan = tmp_path / "researcher" / "lsq_plan.py"  # as a Windows editor saves it: CRLF, no final newline
    plan.parent.mkdir()
    plan.write_bytes(LSQ.rstrip("\n").replace("\n", "\r\n").encode("utf-8"))
    approved = run_cli("fednode", "plans", "approve", "--file", str(plan), "--home", str(node.home),
                       "--note", "pre-approved").stdout
    sha = next(line.split()[1] for line in approved.splitlines() if line.startswith("sha256 "))

    port = _free_port()
    command = [sys.executable, "-m", "fedserver", "--home", str(server_home), "run", "--port", str(port),
               "--max-poll-wait", "2", "--plan", f"{plan}:LinearPlan",
               "--args", json.dumps({"num_updates": 5, "lr": 0.02, "batch_size": 16}), "--rounds", "1",
               "--min-nodes", "1", "--round-timeout", "20", "--node-wait", "20", "--no-progress"]
    server = subprocess.Popen(command, cwd=tmp_path, env=node_env(PYTHONPATH=str(ROOT)), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        node.start(port, server_home / "certs" / "ca.crt", auto_approve=False)
        out, err = server.communicate(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate(timeout=10)
        stop_processes([node])
    log = node.log()
    assert server.returncode == 0, f"{out}\n{err}\n{log}"
    assert f"plan LinearPlan ({sha[:12]})" in out, out
    assert "completed 1 round(s)" in out, out
    assert "not approved" not in log, log
    listed = json.loads(run_cli("fednode", "plans", "list", "--json", "--home", str(node.home)).stdout)
    assert [(p["sha256"], p["status"], p["note"]) for p in listed] == [(sha, "approved", "pre-approved")]
