"""Text the node did not write, made fit for its log: a training plan's exception, a server's refusal details.

Such text can be huge (an exception quoting a whole array or data file) and can hold characters that move the
cursor, recolour the operator's terminal or forge log lines (``\\n``, ``\\x1b[...``). :func:`log_text` keeps the
start, says how much was cut, and escapes what cannot be printed (:func:`fedcore.text_output.printable_excerpt`).
The reply sent to the server has its own bound (``fedcore.wire.messages.MAX_ERROR_MESSAGE``).
"""

from __future__ import annotations

from fedcore.text_output import printable_excerpt

__all__ = ["LOG_TEXT_LIMIT", "log_text"]

#: Characters of foreign text one log line keeps (before escaping): enough for a traceback's message.
LOG_TEXT_LIMIT = 2000


def log_text(text: object, limit: int = LOG_TEXT_LIMIT) -> str:
    """``str(text)``'s first ``limit`` characters, then ``... [N more characters cut]`` if longer, with every
    non-printable character written as its escape (``\\n``, ``\\x1b``): ``fedcore.text_output.printable_excerpt``
    with the node log's limit."""
    return printable_excerpt(str(text), limit)
