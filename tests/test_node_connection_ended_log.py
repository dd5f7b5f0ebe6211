"""How a node logs a lost connection: the first failure of a run (a server that restarted or stopped) at
INFO, every later one, while the server stays away, at WARNING with its attempt number."""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest
from fake_node_service import arun, node_config, running

from fednode.client import NodeClient
from fednode.handler import EchoHandler


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_first_failed_connection_is_info_later_ones_warn(caplog: pytest.LogCaptureFixture) -> None:
    port = _free_port()  # nothing listens there: every Register fails UNAVAILABLE

    async def main() -> None:
        client = NodeClient(node_config(port), EchoHandler())
        async with running(client):
            for _ in range(200):
                if sum("reconnecting in" in r.getMessage() for r in caplog.records) >= 3:
                    break
                await asyncio.sleep(0.05)

    with caplog.at_level(logging.INFO, logger="fednode.client"):
        arun(main())
    lines = [r for r in caplog.records if "reconnecting in" in r.getMessage()]
    assert len(lines) >= 3, [r.getMessage() for r in caplog.records]
    assert lines[0].levelno == logging.INFO and "connection to the server ended" in lines[0].getMessage()
    assert all(r.levelno == logging.WARNING and "(attempt " in r.getMessage() for r in lines[1:])
