"""scripts/demo.py --out: the demo replaces only a folder it made, never a user's folder."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("demo_script", ROOT / "scripts" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_user_folder_with_files_is_refused_and_kept(demo, tmp_path: Path) -> None:
    (tmp_path / "results.csv").write_text("precious\n")
    with pytest.raises(ValueError, match="non-empty folder the demo did not make"):
        demo.prepare_output(tmp_path, default=tmp_path / "elsewhere")
    assert (tmp_path / "results.csv").read_text() == "precious\n"


def test_file_is_refused(demo, tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        demo.prepare_output(target, default=tmp_path / "elsewhere")
    assert target.read_text() == "x"


def test_missing_or_empty_folder_is_used_and_marked(demo, tmp_path: Path) -> None:
    for target in (tmp_path / "new" / "deeper", tmp_path / "empty"):
        if target.name == "empty":
            target.mkdir()
        demo.prepare_output(target, default=tmp_path / "elsewhere")
        assert [p.name for p in target.iterdir()] == [demo.OUTPUT_MARK]


def test_folder_an_earlier_demo_made_is_replaced(demo, tmp_path: Path) -> None:
    target = tmp_path / "out"
    demo.prepare_output(target, default=tmp_path / "elsewhere")
    (target / "history.db").write_text("old run")
    demo.prepare_output(target, default=tmp_path / "elsewhere")
    assert [p.name for p in target.iterdir()] == [demo.OUTPUT_MARK]


def test_default_folder_is_replaced_even_without_the_mark(demo, tmp_path: Path) -> None:
    default = tmp_path / "demo-output"
    default.mkdir()
    (default / "history.db").write_text("made before the mark existed")
    demo.prepare_output(default.resolve(), default=default)
    assert [p.name for p in default.iterdir()] == [demo.OUTPUT_MARK]


def test_cli_refuses_a_user_folder(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py"), "--out", str(tmp_path)],
                         check=False, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "non-empty folder the demo did not make" in run.stderr
    assert (tmp_path / "keep.txt").read_text() == "mine"
