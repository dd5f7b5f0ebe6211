"""Identity, versions and standard services: tokens, NodeStore, version mismatch, health, reflection."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from server_testkit import async_test, encoded, running_server, version

from fedcore.errors import ServerConfigError, UnknownNodeError
from fedcore.wire import TaskKind
from fedserver.auth import TOKEN_PREFIX, NodeStore, token_digest
from fedstream.v1 import node_service_pb2 as pb


def test_node_store_keeps_only_token_digests(tmp_path: Path) -> None:
    store = NodeStore(tmp_path / "nodes.sqlite")
    token = store.enroll("hospital-a")
    assert token.startswith(TOKEN_PREFIX) and len(token) > 40
    assert store.lookup(token) == "hospital-a"
    assert store.lookup(token + "x") is None
    raw = (tmp_path / "nodes.sqlite").read_bytes()
    assert token.encode() not in raw and token_digest(token).encode() in raw
    with sqlite3.connect(tmp_path / "nodes.sqlite") as conn:
        assert conn.execute("SELECT token_sha256 FROM nodes").fetchall() == [(token_digest(token),)]


def test_revoke_and_reenroll(tmp_path: Path) -> None:
    store = NodeStore(tmp_path / "nodes.sqlite")
    old = store.enroll("a")
    store.revoke("a")
    assert store.lookup(old) is None and store.is_revoked("a")
    assert [n.node_id for n in store.list()] == ["a"] and not store.list()[0].active
    new = store.enroll("a")
    assert store.lookup(new) == "a" and store.lookup(old) is None and not store.is_revoked("a")
    with pytest.raises(UnknownNodeError, match="'zz' is not enrolled"):
        store.revoke("zz")
    with pytest.raises(ServerConfigError, match="invalid node id 'bad id'"):
        store.enroll("bad id")
    assert NodeStore(tmp_path / "nodes.sqlite").lookup(new) == "a"  # a real file, shared by processes


@pytest.mark.parametrize(("metadata", "message"), [
    ((), "missing metadata 'authorization: Bearer <token>'"),
    ((("authorization", "Bearer fsn1_nope"),), "unknown or revoked node token"),
    ((("authorization", "Basic abc"),), "must read 'Bearer <token>'"),
])
@async_test
async def test_calls_without_a_valid_token_are_unauthenticated(tmp_path: Path, metadata: tuple,
                                                               message: str) -> None:
    async with running_server(tmp_path) as kit:
        node = kit.node()
        node.metadata = metadata
        for call in (node.register(), node.poll(wait=0.1), node.heartbeat(), node.status("t"),
                     node.upload("t", encoded(1))):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
            assert message in err.value.details()


@async_test
async def test_revoked_node_is_cut_off_at_the_next_call(tmp_path: Path) -> None:
    async with running_server(tmp_path) as kit:
        node = await kit.registered_node("a")
        kit.store.revoke("a")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await node.poll(wait=0.1)
        assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED


@async_test
async def test_identity_comes_from_the_token_not_from_the_request(tmp_path: Path) -> None:
    async with running_server(tmp_path) as kit:
        node = kit.node("real-id")
        reply = await node.register(name="pretends-to-be-someone-else")
        assert reply.node_id == "real-id" and "pretends-to-be-someone-else" not in kit.server.registry


@async_test
async def test_version_mismatch_is_failed_precondition_naming_both_versions(tmp_path: Path) -> None:
    async with running_server(tmp_path) as kit:
        node = await kit.registered_node("a")
        expected = "protocol version 2.1 is not supported by this server (server speaks 1.x, exactly 1.0)"
        for call in (
            node.register(ver=version(2, 1)),
            node.stub.Heartbeat(pb.HeartbeatRequest(version=version(2, 1)), metadata=node.metadata),
            node.stub.GetUploadStatus(pb.GetUploadStatusRequest(version=version(2, 1), task_id="t"),
                                      metadata=node.metadata),
            node.upload("t", encoded(1), ver=version(2, 1)),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
            assert err.value.details() == expected
        stream = node.stub.PollTask(pb.PollTaskRequest(version=version(0, 9)), metadata=node.metadata)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            [m async for m in stream]
        assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert "protocol version 0.9 is not supported" in err.value.details()
        assert (await node.register(ver=version(1, 5))).node_id == "a"  # a newer minor is compatible


@async_test
async def test_health_serving_then_not_serving_during_shutdown(tmp_path: Path) -> None:
    async with running_server(tmp_path) as kit:
        channel = kit.node().channel
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "fedstream.v1.NodeService"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        await kit.server.stop(grace=1.0)
        statuses = []
        try:
            while (reply := await watch.read()) is not grpc.aio.EOF:
                statuses.append(reply.status)
        except grpc.aio.AioRpcError:
            pass  # the stream ends when the server goes away
        assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses


@async_test
async def test_reflection_lists_the_services(tmp_path: Path) -> None:
    async with running_server(tmp_path) as kit:
        stub = reflection_pb2_grpc.ServerReflectionStub(kit.node().channel)

        async def ask():
            yield reflection_pb2.ServerReflectionRequest(list_services="")
            yield reflection_pb2.ServerReflectionRequest(file_containing_symbol="fedstream.v1.NodeService")

        replies = [r async for r in stub.ServerReflectionInfo(ask(), timeout=5)]
        names = {s.name for s in replies[0].list_services_response.service}
        assert {"fedstream.v1.NodeService", "grpc.health.v1.Health",
                "grpc.reflection.v1alpha.ServerReflection"} <= names
        assert replies[1].file_descriptor_response.file_descriptor_proto  # grpcurl can describe it


@async_test
async def test_report_and_dispatch_use_the_authenticated_id(tmp_path: Path) -> None:
    async with running_server(tmp_path) as kit:
        node = await kit.registered_node("a")
        handle = kit.server.dispatch("a", TaskKind.TRAIN, encoded(1), experiment_id="e", round=1)
        got = await node.poll(wait=1)
        assert got.descriptor.task_id == handle.task_id
        assert kit.server.registry.get("a").in_flight == {handle.task_id}
