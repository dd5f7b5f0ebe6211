"""``fedserver run`` warns once when round 1 would start with fewer nodes than are enrolled.

With the defaults (``--min-nodes 1``, ``--expected-nodes`` = min-nodes) round 1 goes to the first node that
reconnects, however many are enrolled. The default stays; a run without ``--expected-nodes`` whose server home
enrols more (active) nodes than its quorum says so in one stderr line naming the option to pass.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from e2e_support import TESTS

from fedserver.auth import NodeStore
from fedserver.cli import main
from fedserver.home import nodes_db

ARGS = {"num_updates": 2, "lr": 0.02, "seed": 7}
WARNING = "fedserver: warning: "


def _run(tmp_path: Path, capsys, enrolled: list[str], *extra: str, revoked: tuple[str, ...] = ()) -> str:
    home = tmp_path / "home"
    store = NodeStore(nodes_db(home))
    for node_id in enrolled:
        store.enroll(node_id)
    for node_id in revoked:
        store.revoke(node_id)
    code = main(["--home", str(home), "run", "--plan", f"{TESTS / 'plans_lsq.py'}:LinearPlan", "--args",
                 json.dumps(ARGS), "--rounds", "1", "--tls", "insecure", "--port", "0", "--node-wait", "0.1",
                 "--no-progress", "--history-db", str(tmp_path / "h.db"), *extra])
    out, err = capsys.readouterr()
    assert code == 1, out + err  # no node connects: round 1 fails below quorum
    return err


def test_more_nodes_enrolled_than_the_quorum_warns_once(tmp_path, capsys) -> None:
    err = _run(tmp_path, capsys, ["site-a", "site-b", "site-c"])
    warnings = [line for line in err.splitlines() if line.startswith(WARNING)]
    assert warnings == [
        ("fedserver: warning: 3 nodes are enrolled, but round 1 starts as soon as 1 node(s) are connected; pass "
        "--expected-nodes 3 to wait (up to --node-wait) for 3")], err


@pytest.mark.parametrize("enrolled, extra, revoked", [
    (["site-a", "site-b", "site-c"], ("--expected-nodes", "2"), ()),  # the user said how many
    (["site-a", "site-b"], ("--min-nodes", "2"), ()),  # the quorum is every node
    (["site-a"], (), ()),
    (["site-a", "site-b"], (), ("site-b",)),  # a revoked node cannot connect
])
def test_no_warning_when_the_quorum_or_expected_nodes_covers_the_enrolled(tmp_path, capsys, enrolled, extra,
                                                                         revoked) -> None:
    err = _run(tmp_path, capsys, enrolled, *extra, revoked=revoked)
    assert WARNING not in err, err


def test_with_tags_the_warning_does_not_ask_to_wait_for_every_enrolled_node(tmp_path, capsys) -> None:
    """Some enrolled nodes may hold no dataset with the tags: --expected-nodes 3 would then wait out --node-wait
    before every round."""
    err = _run(tmp_path, capsys, ["site-a", "site-b", "site-c"], "--tags", "cardio")
    warnings = [line for line in err.splitlines() if line.startswith(WARNING)]
    assert warnings == [
        ("fedserver: warning: 3 nodes are enrolled, but round 1 starts as soon as 1 node(s) are connected; pass "
         "--expected-nodes K to wait (up to --node-wait) for the K of them that hold a dataset tagged ['cardio']")], err
