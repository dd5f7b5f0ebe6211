"""scripts/bench_node_malloc.py refuses arguments its runs could not use, naming the flag (no run is timed)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from script_cli import refused

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_node_malloc.py"
TINY = ["--updates", "1", "--warmup", "0", "--workloads", "mlp-b32"]  # should a bad argument get through


@pytest.mark.parametrize(("args", "message"), [
    (["--repeat", "0"], "argument --repeat: must be >= 1 (the median needs a run), got 0"),
    (["--repeat", "x"], "argument --repeat: expected a whole number >= 1, got 'x'"),
    (["--updates", "0"], "argument --updates: must be >= 1 (a task trains at least one step), got 0"),
    (["--warmup", "-1"], "argument --warmup: must be >= 0 (0 = no warm-up task), got -1"),
    (["--settings", "node,fast"], "argument --settings: unknown setting(s) ['fast']; choose from node, none,"),
    (["--workloads", "resnet"], "argument --workloads: invalid choice: 'resnet'"),
])
def test_bad_arguments_are_refused_naming_the_flag(args: list[str], message: str) -> None:
    assert message in refused(SCRIPT, TINY, *args)


def test_settings_always_include_the_baseline_once() -> None:
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import bench_node_malloc
    finally:
        sys.path.remove(str(SCRIPT.parent))
    assert bench_node_malloc.parse_args(["--settings", "arena1"]).settings == ["arena1", "none"]
    assert bench_node_malloc.parse_args(["--settings", "none,node,none"]).settings == ["none", "node"]
    assert bench_node_malloc.parse_args([]).settings == ["node", "none"]
