"""`buf lint` (STANDARD rules, protos/buf.yaml) must pass on the .proto files."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_buf_lint_clean() -> None:
    buf = shutil.which("buf")
    if buf is None:
        pytest.fail("buf is not installed: pip install buf-bin (part of the test extra)")
    proc = subprocess.run([buf, "lint"], cwd=ROOT / "protos", check=False, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
