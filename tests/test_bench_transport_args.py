"""scripts/bench_transport.py refuses arguments its runs would crash on, naming the flag."""

from __future__ import annotations

from pathlib import Path

import pytest
from script_cli import refused

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_transport.py"
TINY = ["--sizes", "1", "--skip-huge", "--repeat", "1", "--quiet-wait", "0", "--settle", "0", "--gap", "0",
        "--skip-context"]  # should a bad argument get through, the run it starts stays short


@pytest.mark.parametrize(("args", "message"), [
    (["--transfers", "0"], "argument --transfers: must be >= 1 (row 'first' is transfer 1), got 0"),
    (["--transfers", "two"], "argument --transfers: expected a whole number >= 1, got 'two'"),
    (["--node-window", "1000"], "argument --node-window: a receive window must be >= 65535 bytes"),
    (["--server-window", "0"], "argument --server-window: a receive window must be >= 65535 bytes"),
    (["--node-window", "big"], "argument --node-window: expected 'bdp' or a byte count >= 65535, got 'big'"),
])
def test_bad_arguments_are_refused_naming_the_flag(args: list[str], message: str) -> None:
    assert message in refused(SCRIPT, TINY, *args)
