"""A port already in use is a clear ServerStateError, never a traceback nor a silent second server.

gRPC sets SO_REUSEPORT by default: a second fedserver on a port another one serves (a resume while the old run
still runs, now that a resume serves on the port the run used) bound silently and the two split the nodes.
A port held by any other socket raised a bare RuntimeError "Failed to bind" in insecure mode."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from server_testkit import async_test, running_server

from fedcore.errors import ServerStateError
from fedserver.auth import NodeStore
from fedserver.certs import create_ca, create_server_certificate
from fedserver.config import ServerConfig
from fedserver.server import FedServer


@async_test
async def test_a_second_fedserver_on_the_same_port_is_refused(tmp_path: Path) -> None:
    async with running_server(tmp_path) as kit:
        port = kit.server.port
        second = FedServer(ServerConfig(port=port, tls="insecure"), NodeStore(tmp_path / "other.db"))
        with pytest.raises(ServerStateError, match=rf"could not bind 127\.0\.0\.1:{port} .*is another server"):
            await second.start()
        await second.stop(grace=0)


@async_test
async def test_a_port_held_by_another_socket_is_refused_in_every_tls_mode(tmp_path: Path) -> None:
    ca = create_ca()
    cert, key = create_server_certificate(ca, ["localhost"]).write(tmp_path, "server")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        for config in (ServerConfig(port=port, tls="insecure"),
                       ServerConfig(port=port, tls="tls", cert_file=cert, key_file=key)):
            server = FedServer(config, NodeStore(tmp_path / "n.db"))
            with pytest.raises(ServerStateError, match=rf"could not bind 127\.0\.0\.1:{port} .*is another server"):
                await server.start()
            await server.stop(grace=0)
