"""Runs a script of ``scripts/`` as its own process, for tests of its command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def refused(script: Path, tiny_args: list[str], *args: str) -> str:
    """Runs ``script`` with ``tiny_args`` (a run that stays short, should a bad argument get through) and
    ``args``; asserts it exits 2 (argparse's usage error) and returns its stderr."""
    out = subprocess.run([sys.executable, str(script), *tiny_args, *args], check=False, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2, (out.returncode, out.stdout[-2000:], out.stderr[-2000:])
    return out.stderr
