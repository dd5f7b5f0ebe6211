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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fedcore.errors import PlanApprovalError

__all__ = ["PlanFile", "imported_base_classes", "plan_class_names", "plan_file"]


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
    """``(plan classes, all classes)`` of the module ``source``, each name once, in file order.

    A module's classes are those defined at its top level or in its statement blocks (``if``/``else``,
    ``try``/``except``/``finally``, ``with``, loops): the module's attributes a server may import. Not those
    inside functions or classes. A name defined twice is the last definition, the one Python keeps.
    A plan class derives from a base whose name ends with ``TrainingPlan`` (``NumpyTrainingPlan``,
    ``fedcore.plans.TorchTrainingPlan``...), directly or through classes of the same file defined before it.

    Raises:
        PlanApprovalError: the source does not parse (no server could import it).
    """
    try:
        tree = ast.parse(source, filename=str(path))
    except SyntaxError as exc:
        raise PlanApprovalError(
            f"{path} is not valid Python (line {exc.lineno}: {exc.msg}); a server could not load it either"
        ) from None
    names: dict[str, None] = {}  # ordered set: first position kept
    plans: set[str] = set()
    for node in _module_classes(tree.body):  # in file order, as Python runs them: bases come first
        names[node.name] = None
        if any(_is_plan_base(base, plans) for base in node.bases):
            plans.add(node.name)
        else:
            plans.discard(node.name)  # redefined as a plain class
    return [name for name in names if name in plans], list(names)


def imported_base_classes(source: str) -> list[str]:
    """Classes of ``source`` (already parsed by :func:`plan_class_names`) with a base from outside the file
    (``from mylib import BasePlan``) that may be a plan through another module: ``--name`` may name them, as
    no reading of this file alone can tell. A base that is ``object`` or a class of the file does not count."""
    tree = ast.parse(source)
    seen: set[str] = set()
    found: dict[str, None] = {}
    for node in _module_classes(tree.body):
        for base in node.bases:
            name = base.attr if isinstance(base, ast.Attribute) else base.id if isinstance(base, ast.Name) else ""
            if isinstance(base, ast.Attribute) or (name and name not in seen and name != "object"):
                found[node.name] = None
        seen.add(node.name)
    return list(found)


def _module_classes(body: list[ast.stmt]) -> Iterator[ast.ClassDef]:
    """The class definitions of a module's statements, nested blocks included, functions and classes not."""
    for node in body:
        if isinstance(node, ast.ClassDef):
            yield node
        elif not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            blocks = [getattr(node, field, []) for field in ("body", "orelse", "finalbody")]
            blocks += [part.body for part in getattr(node, "handlers", []) + getattr(node, "cases", [])]
            for block in blocks:
                if isinstance(block, list):  # ast.Lambda's body (an expression) cannot appear here; be sure
                    yield from _module_classes(block)


def _is_plan_base(base: ast.expr, plans: set[str]) -> bool:
    name = base.attr if isinstance(base, ast.Attribute) else base.id if isinstance(base, ast.Name) else ""
    return name.endswith("TrainingPlan") or name in plans
