"""A training plan read from its ``.py`` file exactly as a server will send it, for approval ahead of tasks.

A server sends a plan class as ``PlanSource.from_class``: ``inspect.getsource`` of the class's whole
module, which is the file as Python reads it (``linecache`` through ``tokenize.open``):

- decoded by its PEP 263 coding declaration, UTF-8 by default, a UTF-8 BOM dropped;
- line endings ``\\r\\n`` and ``\\r`` made ``\\n`` (universal newlines; form feeds and U+2028 stay);
- a final ``\\n`` added when the last line has none.

The plan id is the SHA-256 of that text's UTF-8 bytes. For a UTF-8 file with Unix line endings that
ends in a newline it is what ``sha256sum FILE`` prints; for any other file it is not, and
:class:`PlanFile` says so. The file is parsed (``ast``) to find its class names, never executed.
"""

from __future__ import annotations

import ast
import io
import os
import tokenize
from dataclasses import dataclass
from pathlib import Path

from fedcore.errors import PlanApprovalError

__all__ = ["PlanFile", "plan_class_names", "plan_file"]


@dataclass(frozen=True)
class PlanFile:
    """A plan file: the source a server sends for it, and whether that differs from the file's bytes."""

    path: Path
    source: str
    same_as_bytes: bool  # the source's UTF-8 bytes are the file's bytes (sha256sum gives the plan id)


def plan_file(path: str | os.PathLike[str], raw: bytes) -> PlanFile:
    """The file ``path`` whose bytes are ``raw``, read as ``inspect.getsource`` reads a module (see the module
    docstring; the caller reads the bytes, so that it reports an unreadable file as it sees fit).

    Raises:
        PlanApprovalError: it is empty, or not decodable Python source (no server could send it).
    """
    path = Path(path)
    try:  # what tokenize.open does, which linecache (hence inspect.getsource) reads files with
        encoding, _ = tokenize.detect_encoding(io.BytesIO(raw).readline)
        source = io.TextIOWrapper(io.BytesIO(raw), encoding, line_buffering=True).read()
    except (SyntaxError, UnicodeDecodeError) as exc:
        raise PlanApprovalError(
            f"{path} cannot be read as Python source ({exc}); a server could not send it either: save it "
            f"as UTF-8 or declare its encoding (# -*- coding: ... -*-)") from None
    if not source:
        raise PlanApprovalError(f"{path} is empty: a training plan file defines a class")
    if not source.endswith("\n"):
        source += "\n"  # linecache ends the last line
    return PlanFile(path, source, source.encode("utf-8") == raw)


def plan_class_names(source: str, path: Path) -> tuple[list[str], list[str]]:
    """``(plan classes, all classes)`` defined at the top level of ``source``, in file order.

    A plan class derives from a base whose name ends with ``TrainingPlan`` (``NumpyTrainingPlan``,
    ``fedcore.plans.TorchTrainingPlan``...), directly or through other classes of the same file.

    Raises:
        PlanApprovalError: the source does not parse (no server could import it).
    """
    try:
        tree = ast.parse(source, filename=str(path))
    except SyntaxError as exc:
        raise PlanApprovalError(
            f"{path} is not valid Python (line {exc.lineno}: {exc.msg}); a server could not load it either"
        ) from None
    classes = [node for node in tree.body if isinstance(node, ast.ClassDef)]
    plans: set[str] = set()
    changed = True
    while changed:  # a base defined further up the file may make a class a plan
        changed = False
        for node in classes:
            if node.name not in plans and any(_is_plan_base(base, plans) for base in node.bases):
                plans.add(node.name)
                changed = True
    return [c.name for c in classes if c.name in plans], [c.name for c in classes]


def _is_plan_base(base: ast.expr, plans: set[str]) -> bool:
    name = base.attr if isinstance(base, ast.Attribute) else base.id if isinstance(base, ast.Name) else ""
    return name.endswith("TrainingPlan") or name in plans
