"""NodeClient end to end against the real FedServer: tokens, TLS, mTLS, failures, restarts, shutdown."""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import pytest
from fake_node_service import arun, node_config, running
from tcp_proxy import CuttingProxy

from fedcore.wire import TaskKind, TrainingProgress
from fednode.client import ClientState, NodeClient
from fednode.handler import EchoHandler, TaskReply
from fedserver.auth import NodeStore
from fedserver.certs import create_ca, create_node_certificate, create_server_certificate
from fedserver.config import ServerConfig
from fedserver.server import FedServer
from fedserver.tasks import TaskState


def server_config(**overrides) -> ServerConfig:
    values = {"port": 0, "tls": "insecure", "max_poll_wait_seconds": 2.0, "heartbeat_interval_seconds": 0.5,
              "shutdown_retry_after_seconds": 0.2, "chunk_size": 64 * 1024}
    values.update(overrides)
    return ServerConfig(**values)


class Trainer:
    """Doubles the params, reporting progress and a log line; fails on round 13."""

    def handle(self, task, reporter):
        if task.round == 13:
            raise RuntimeError("unlucky round")
        reporter.progress(TrainingProgress(epoch=1, iteration=5, total_iterations=5, loss=0.25))
        reporter.log("INFO", f"trained round {task.round}")
        return TaskReply.succeeded({"params": {k: 2 * v for k, v in task.payload["params"].items()}})


def test_round_trip_with_token_over_insecure_channel(tmp_path):
    async def scenario():
        store = NodeStore(tmp_path / "nodes.db")
        token = store.enroll("site-a")
        server = FedServer(server_config(), store)
        port = await server.start()
        client = NodeClient(node_config(port, token=token, node_name="Site A"), Trainer(), capabilities=["numpy"])
        try:
            async with running(client):
                assert await server.wait_for_nodes(1, timeout=10) == ["site-a"]
                w = np.random.default_rng(0).standard_normal(100_000).astype(np.float32)
                payload = server.encode_payload({"params": {"w": w}})
                handle = server.dispatch("site-a", TaskKind.TRAIN, payload, experiment_id="exp", round=1,
                                         inactivity_timeout=30)
                result = await handle.result(timeout=20)
                failing = server.dispatch("site-a", TaskKind.TRAIN, payload, experiment_id="exp", round=13)
                failed = await failing.result(timeout=20)
        finally:
            await server.stop(grace=1)
        assert result.outcome is TaskState.SUCCEEDED, result.error_message
        np.testing.assert_array_equal(result.payload["params"]["w"], 2 * w)
        assert result.bytes_received > 400_000 and result.bytes_sent == payload.total_size
        assert handle.latest_progress == TrainingProgress(epoch=1, iteration=5, total_iterations=5, loss=0.25)
        assert [line.message for _, line in handle.logs] == ["trained round 1"]
        assert failed.outcome is TaskState.FAILED
        assert failed.error_message == "RuntimeError: unlucky round"
        assert client.node_id == "site-a" and client.results_delivered == 2

    arun(scenario())


def test_revoked_token_is_refused(tmp_path):
    async def scenario():
        store = NodeStore(tmp_path / "nodes.db")
        token = store.enroll("site-a")
        store.revoke("site-a")
        server = FedServer(server_config(), store)
        port = await server.start()
        try:
            client = NodeClient(node_config(port, token=token), EchoHandler())
            with pytest.raises(Exception, match="UNAUTHENTICATED.*unknown or revoked node token"):
                await asyncio.wait_for(client.run(), 10)
        finally:
            await server.stop(grace=1)

    arun(scenario())


async def _until(predicate) -> None:
    while not predicate():
        await asyncio.sleep(0.01)


def _pki(tmp_path):
    ca = create_ca()
    ca_path, _ = ca.write(tmp_path, "ca")
    cert, key = create_server_certificate(ca).write(tmp_path, "server")
    node_cert, node_key = create_node_certificate(ca, "site-m").write(tmp_path, "site-m")
    return ca_path, cert, key, node_cert, node_key


def test_tls_with_pinned_ca_and_token(tmp_path):
    async def scenario():
        ca_path, cert, key, _, _ = _pki(tmp_path)
        store = NodeStore(tmp_path / "nodes.db")
        token = store.enroll("site-t")
        server = FedServer(server_config(tls="tls", cert_file=cert, key_file=key, address="127.0.0.1"), store)
        port = await server.start()
        client = NodeClient(node_config(port, tls="tls", ca_cert=ca_path, token=token,
                                        server=f"localhost:{port}"), EchoHandler())
        try:
            async with running(client):
                assert await server.wait_for_nodes(1, timeout=10) == ["site-t"]
                handle = server.dispatch("site-t", TaskKind.EVALUATE, server.encode_payload({"x": 1}),
                                         experiment_id="exp", round=1)
                result = await handle.result(timeout=10)
        finally:
            await server.stop(grace=1)
        assert result.outcome is TaskState.SUCCEEDED and result.payload == {"x": 1}

    arun(scenario())


def test_mtls_identity_comes_from_the_client_certificate(tmp_path):
    async def scenario():
        ca_path, cert, key, node_cert, node_key = _pki(tmp_path)
        server = FedServer(server_config(tls="mtls", cert_file=cert, key_file=key, ca_file=ca_path))
        port = await server.start()
        client = NodeClient(node_config(port, tls="mtls", ca_cert=ca_path, client_cert=node_cert,
                                        client_key=node_key, token=None, node_name="whatever"), EchoHandler())
        try:
            async with running(client):
                assert await server.wait_for_nodes(1, timeout=10) == ["site-m"]
                await asyncio.wait_for(_until(lambda: client.sessions), 10)
        finally:
            await server.stop(grace=1)
        assert client.node_id == "site-m"

    arun(scenario())


def test_tls_with_another_ca_never_connects(tmp_path):
    async def scenario():
        _, cert, key, _, _ = _pki(tmp_path)
        other_ca, _ = create_ca("someone else").write(tmp_path / "other", "ca")
        store = NodeStore(tmp_path / "nodes.db")
        token = store.enroll("site-t")
        server = FedServer(server_config(tls="tls", cert_file=cert, key_file=key), store)
        port = await server.start()
        client = NodeClient(node_config(port, tls="tls", ca_cert=other_ca, token=token,
                                        server=f"localhost:{port}"), EchoHandler())
        try:
            async with running(client):
                await asyncio.sleep(1.5)
                assert client.sessions == 0 and client.state in (ClientState.CONNECTING, ClientState.WAITING)
                assert server.registry.connected() == []
        finally:
            await server.stop(grace=1)

    arun(scenario())


def test_server_stop_sends_shutdown_and_node_joins_the_restarted_server(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fednode.client")

    async def scenario():
        store = NodeStore(tmp_path / "nodes.db")
        token = store.enroll("site-a")
        first = FedServer(server_config(max_poll_wait_seconds=30.0), store)
        port = await first.start()
        client = NodeClient(node_config(port, token=token, poll_wait_seconds=30.0), EchoHandler())
        async with running(client):
            await first.wait_for_nodes(1, timeout=10)
            await asyncio.sleep(0.2)  # the node is in its long poll
            await first.stop(grace=2)  # ServerShutdown(retry_after=0.2) to the waiting poll
            second = FedServer(server_config(port=port), store)
            await second.start()
            try:
                assert await second.wait_for_nodes(1, timeout=10) == ["site-a"]
                handle = second.dispatch("site-a", TaskKind.TRAIN, second.encode_payload({"params": {}}),
                                         experiment_id="exp", round=2)
                result = await handle.result(timeout=10)
            finally:
                await second.stop(grace=1)
        assert result.outcome is TaskState.SUCCEEDED
        assert client.sessions == 2
        assert "server shutting down (server stopping)" in caplog.text

    arun(scenario())


def test_oversized_task_is_refused_and_reported_to_the_server(tmp_path):
    async def scenario():
        store = NodeStore(tmp_path / "nodes.db")
        token = store.enroll("site-a")
        server = FedServer(server_config(), store)
        port = await server.start()
        client = NodeClient(node_config(port, token=token, max_payload_size=100_000), EchoHandler())
        try:
            async with running(client):
                await server.wait_for_nodes(1, timeout=10)
                big = server.encode_payload({"w": np.zeros(100_000, np.float32)})
                handle = server.dispatch("site-a", TaskKind.TRAIN, big, experiment_id="exp", round=1)
                result = await handle.result(timeout=10)
        finally:
            await server.stop(grace=1)
        assert result.outcome is TaskState.REFUSED
        assert "exceeds the limit of 100000 bytes" in result.error_message

    arun(scenario())


def test_network_cut_mid_upload_resumes_from_acknowledged_offset(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fednode.client")

    async def scenario():
        store = NodeStore(tmp_path / "nodes.db")
        token = store.enroll("site-a")
        server = FedServer(server_config(), store)
        port = await server.start()
        proxy = CuttingProxy(port)
        proxy_port = await proxy.start()
        client = NodeClient(node_config(proxy_port, token=token, upload_chunk_size=64 * 1024), Trainer())
        try:
            async with running(client):
                await server.wait_for_nodes(1, timeout=10)
                w = np.random.default_rng(1).standard_normal(1_000_000).astype(np.float32)  # 4 MB
                proxy.cut_after(1_500_000)  # mid-upload: the download flows the other way
                handle = server.dispatch("site-a", TaskKind.TRAIN, server.encode_payload({"params": {"w": w}}),
                                         experiment_id="exp", round=1)
                result = await handle.result(timeout=30)
        finally:
            await proxy.stop()
            await server.stop(grace=1)
        assert proxy.cuts == 1
        assert result.outcome is TaskState.SUCCEEDED, result.error_message
        np.testing.assert_array_equal(result.payload["params"]["w"], 2 * w)
        resumed = [r.getMessage() for r in caplog.records if "resuming the upload" in r.getMessage()]
        assert resumed and " at byte 0 " not in resumed[-1]  # resumed from the server's offset, not 0
        assert client.sessions == 2

    arun(scenario())

