"""HTTP/2 flow-control settings both ends share: message framing overhead and receive-window values.

A receive window is how many bytes the peer may send ahead of what the receiver has read. gRPC's default
grows it by bandwidth-delay probing; a fixed window caps a stream at window / round-trip time, and one
smaller than a chunk message makes every chunk wait for window updates. Each side resolves ``"auto"``
its own way (fednode.receive_window, fedserver.config.ServerConfig.receive_window).
"""

from __future__ import annotations

from typing import Any

#: Bytes a gRPC message may carry beyond one chunk's data (protobuf framing, offsets, header fields).
MESSAGE_OVERHEAD = 64 * 1024
#: ``receive_window_bytes`` value that lets each side choose (fixed on a near link, probing otherwise).
AUTO_WINDOW = "auto"
#: Smallest fixed receive window (HTTP/2's default initial window).
MIN_RECEIVE_WINDOW = 65535
#: What a ``receive_window_bytes`` setting may be, for error messages.
RECEIVE_WINDOW_CHOICES = f"'auto', None (BDP probing) or an int >= {MIN_RECEIVE_WINDOW}"


def chunk_message_window(chunk_size: int) -> int:
    """The smallest window that holds one whole chunk message (its data and its framing)."""
    return chunk_size + MESSAGE_OVERHEAD


def valid_receive_window(value: Any) -> bool:
    """Whether ``value`` is a ``receive_window_bytes`` setting: "auto", None, or an int of bytes."""
    if value is None or value == AUTO_WINDOW:
        return True
    return isinstance(value, int) and not isinstance(value, bool) and value >= MIN_RECEIVE_WINDOW
