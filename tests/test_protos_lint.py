"""`buf lint` (STANDARD rules, protos/buf.yaml) must pass on the .proto files."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_buf_lint_clean() -> None:
    # buf-bin installs into the environment's bin folder, which is not on PATH when the venv is not activated
    beside = Path(sys.executable).parent / "buf"
    buf = str(beside) if beside.exists() else shutil.which("buf")
    if buf is None:
        pytest.fail("buf is not installed: pip install buf-bin (part of the test extra)")
    proc = subprocess.run([buf, "lint"], cwd=ROOT / "protos", check=False, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
