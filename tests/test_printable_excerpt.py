"""``fedcore.text_output.printable_excerpt``: the one implementation of "foreign text as one printable line, cut"
that fedserver's ``shown_text`` (history, run lines) and fednode's ``log_text`` (node log) both show."""

from __future__ import annotations

import pytest

from fedcore.text_output import printable_excerpt
from fednode.log_text import LOG_TEXT_LIMIT, log_text
from fedserver.history_records import SHOWN_TEXT_CHARS, shown_text

CASES = ["", "plain", "x" * 5000, "line\nforged\x1b[31m", "é\u2028" * 3000, "\x00" * 10]


@pytest.mark.parametrize(("text", "limit", "expected"), [
    ("abc", 3, "abc"),
    ("abcd", 3, "abc... [1 more characters cut]"),
    ("a\nb\x1b[0m", 10, "a\\nb\\x1b[0m"),
    ("\n" * 5, 2, "\\n\\n... [3 more characters cut]"),  # the limit counts characters before escaping
    ("\u2028ok", 1, "\\u2028... [2 more characters cut]"),
])
def test_keeps_the_start_says_how_much_was_cut_and_escapes(text, limit, expected) -> None:
    assert printable_excerpt(text, limit) == expected
    assert printable_excerpt(text, limit).isprintable()


@pytest.mark.parametrize("text", CASES)
def test_shown_text_and_log_text_are_it_with_their_limits(text) -> None:
    assert shown_text(text) == printable_excerpt(text, SHOWN_TEXT_CHARS)
    assert shown_text(text, 7) == printable_excerpt(text, 7)
    assert log_text(text) == printable_excerpt(text, LOG_TEXT_LIMIT)
    assert log_text(ValueError(text), 9) == printable_excerpt(text, 9)  # log_text takes any object, as str()
