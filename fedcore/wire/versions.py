"""The fedstream.v1 protocol version and the one rule about it: majors must match, minors are compatible."""

from __future__ import annotations

from typing import Any

from fedcore.errors import VersionMismatchError

PROTOCOL_VERSION: tuple[int, int] = (1, 0)
"""(major, minor) spoken by this code. Minor versions only add optional fields (compatible both ways)."""


def format_version(version: tuple[int, int]) -> str:
    """``(1, 0)`` -> ``"1.0"``."""
    return f"{version[0]}.{version[1]}"


def check_version(pb_version: Any, *, side: str = "server") -> None:
    """Refuse a peer whose ``ProtocolVersion`` message has another major version than ours.

    ``pb_version`` is a ``fedstream.v1.ProtocolVersion`` (or anything with ``major``/``minor``); an unset
    message reads as 0.0 and is refused. ``side`` names this end in the message ("server" or "node").
    Raises :class:`~fedcore.errors.VersionMismatchError` naming both versions.
    """
    major, minor = int(pb_version.major), int(pb_version.minor)
    if major != PROTOCOL_VERSION[0]:
        raise VersionMismatchError(
            f"protocol version {major}.{minor} is not supported by this {side} "
            f"({side} speaks {PROTOCOL_VERSION[0]}.x, exactly {format_version(PROTOCOL_VERSION)})"
        )
