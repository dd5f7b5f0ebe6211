"""Plain-text output shared by the ``fedserver`` and ``fednode`` commands: aligned tables, times, byte sizes,
and text from the other side made safe to print."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

__all__ = ["escape_unprintable", "format_bytes", "format_time", "key_values", "printable_excerpt", "text_table"]


def escape_unprintable(text: str) -> str:
    """``text`` with every non-printable character written as its Python escape (``\\n``, ``\\x1b``,
    ``\\u2028``): text a node or a server sent must not move the cursor, recolour or break a line of ours."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def printable_excerpt(text: str, limit: int) -> str:
    """``text`` from the other side as one printable line: its first ``limit`` characters, then ``... [N more
    characters cut]`` if longer, with every non-printable character written as its escape
    (:func:`escape_unprintable`). Such text can be huge (an exception quoting a whole array) and can hold
    characters that move the cursor, recolour a terminal or forge a log line. The limit counts characters
    before escaping. What ``fedserver``'s ``shown_text`` and ``fednode``'s ``log_text`` show."""
    if len(text) <= limit:
        return escape_unprintable(text)
    return f"{escape_unprintable(text[:limit])}... [{len(text) - limit} more characters cut]"


def text_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Columns left-aligned and separated by two spaces, headers first; no trailing spaces; None shows as ``-``."""
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[j]) for row in cells) for j in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def key_values(pairs: Sequence[tuple[str, object]]) -> str:
    """``key: value`` lines with the values aligned."""
    width = max((len(key) for key, _ in pairs), default=0) + 1
    return "\n".join(f"{key + ':':<{width}} {value}" for key, value in pairs)


def format_time(timestamp: float | None) -> str:
    """Unix time as local ISO 8601 to the second (``2025-01-31T14:02:11+01:00``), ``-`` for None."""
    if timestamp is None:
        return "-"
    return datetime.fromtimestamp(timestamp).astimezone().isoformat(timespec="seconds")


def format_bytes(size: int) -> str:
    """``1536`` → ``1.5 KiB``; exact bytes below 1 KiB."""
    if size < 1024:
        return f"{size} B"
    value = size / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"
