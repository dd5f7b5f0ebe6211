"""The node's "auto" download window: the rule, the round-trip measurement, and the channel switch over real
gRPC (a near loopback link gets a fixed window of one chunk message, a slow link keeps probing)."""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import pytest
from fake_node_service import arun, node_config, running
from server_testkit import running_server
from tcp_proxy import TcpProxy

from fedcore.wire import ServerSettings, TaskKind
from fedcore.wire.convert import server_settings_from_pb, server_settings_to_pb
from fednode.client import NodeClient
from fednode.config import MESSAGE_OVERHEAD
from fednode.handler import EchoHandler
from fednode.receive_window import NEAR_LINK_RATE, auto_window, chunk_message_window, measure_rtt
from fedserver.server import FedServer
from fedserver.tasks import TaskState

MiB = 1 << 20


def test_auto_fixes_one_chunk_message_while_it_still_moves_the_near_link_rate():
    window = chunk_message_window(MiB)
    assert window == MiB + MESSAGE_OVERHEAD == 1114112
    limit = window / NEAR_LINK_RATE  # the longest round trip at which the window still allows the rate
    assert auto_window(limit * 0.99, MiB) == window
    assert auto_window(limit * 1.01, MiB) is None
    assert auto_window(50e-3, MiB) is None  # a WAN: probing
    assert auto_window(20e-6, 4 * MiB) == 4 * MiB + MESSAGE_OVERHEAD  # bigger chunks, bigger window
    assert auto_window(20e-6, 0) is None  # server did not announce its chunk size
    assert auto_window(float("inf"), MiB) is None


def test_measure_rtt_keeps_the_fastest_round_trip():
    delays = iter([0.03, 0.005, 0.02])

    async def call() -> None:
        await asyncio.sleep(next(delays))

    rtt = arun(measure_rtt(call, samples=3))
    assert 0.005 <= rtt < 0.02


def test_register_response_announces_the_task_chunk_size():
    settings = ServerSettings("n", (1, 0), 30.0, 4 * MiB, 1 << 30, 10.0, task_chunk_size=MiB)
    assert server_settings_from_pb(server_settings_to_pb(settings)) == settings
    older = server_settings_to_pb(settings)
    older.ClearField("task_chunk_size")
    assert server_settings_from_pb(older).task_chunk_size == 0


class DelayingProxy(TcpProxy):
    """Holds every read ``delay`` seconds before forwarding it: a long link."""

    def __init__(self, target_port: int, delay: float) -> None:
        super().__init__(target_port)
        self.delay = delay

    async def _before_write(self, upstream: bool) -> bool:
        await asyncio.sleep(self.delay)
        return True


async def _download_once(server: FedServer, client: NodeClient) -> None:
    assert await server.wait_for_nodes(1, timeout=10) == ["site-a"]
    w = np.arange(300_000, dtype=np.float32)
    handle = server.dispatch("site-a", TaskKind.TRAIN, server.encode_payload({"params": {"w": w}}),
                             experiment_id="exp", round=1, inactivity_timeout=30)
    result = await handle.result(timeout=30)
    assert result.outcome is TaskState.SUCCEEDED, result.error_message
    np.testing.assert_array_equal(result.payload["params"]["w"], w)


@pytest.mark.parametrize("delay", [0.0, 0.01], ids=["loopback", "long-link"])
def test_node_picks_its_download_window_from_the_measured_round_trip(tmp_path, caplog, delay):
    """Over loopback the heartbeats come back in well under 4 ms, so one 4 MiB chunk message moves >= 1 GB/s:
    the node moves to a channel with that fixed window (and downloads over it). Through a proxy that holds
    each read 10 ms the round trip is >= 20 ms: the node stays on its probing channel."""
    async def scenario():
        async with running_server(tmp_path, chunk_size=4 * MiB, max_poll_wait_seconds=2.0) as kit:
            proxy = DelayingProxy(kit.server.port, delay)
            client = NodeClient(node_config(await proxy.start(), token=kit.store.enroll("site-a")), EchoHandler())
            assert client.config.receive_window_bytes == "auto" and client.receive_window is None
            try:
                async with running(client):
                    await _download_once(kit.server, client)
            finally:
                await proxy.stop()
        return client

    with caplog.at_level(logging.INFO, logger="fednode"):
        client = arun(scenario())
    assert client.settings is not None and client.settings.task_chunk_size == 4 * MiB
    assert client.link_rtt is not None
    if delay == 0.0:
        assert client.link_rtt < 4e-3
        assert client.receive_window == 4 * MiB + MESSAGE_OVERHEAD
        assert "download window 4259840 bytes fixed (was BDP probing)" in caplog.text
    else:
        assert client.link_rtt >= 2 * delay
        assert client.receive_window is None
        assert "download window" not in caplog.text


def test_fixed_or_probing_configs_measure_nothing(tmp_path):
    async def scenario(window):
        async with running_server(tmp_path / str(window), chunk_size=MiB, max_poll_wait_seconds=2.0) as kit:
            config = node_config(kit.server.port, token=kit.store.enroll("site-a"), receive_window_bytes=window)
            client = NodeClient(config, EchoHandler())
            async with running(client):
                await _download_once(kit.server, client)
        return client

    for window in (None, 2 * MiB):
        (tmp_path / str(window)).mkdir()
        client = arun(scenario(window))
        assert client.link_rtt is None and client.receive_window == window


@pytest.mark.parametrize("argv, window", [
    ([], "auto"), (["--receive-window", "bdp"], None), (["--receive-window", "1088KiB"], 1088 * 1024),
    (["--receive-window", "AUTO"], "auto"),
])
def test_fednode_start_receive_window_flag(tmp_path, argv, window):
    import argparse

    from fednode.cli_start import config_from_args, register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    token = tmp_path / "node.token"
    token.write_text("abc\n")
    args = parser.parse_args(["start", "--server", "h:1", "--insecure", "--token-file", str(token), *argv])
    assert config_from_args(args).receive_window_bytes == window


@pytest.mark.parametrize("value, problem", [
    ("1000", "invalid window '1000': must be 'auto', 'bdp' or at least 65535 bytes (64KiB)"),
    ("wide", "invalid size 'wide': use e.g. 1048576, 512KiB, 4MiB or 4GiB, or auto or bdp"),
    ("-1MiB", "invalid size '-1MiB': a size cannot be negative"),
])
def test_fednode_start_rejects_a_bad_receive_window(tmp_path, capsys, value, problem):
    import argparse

    from fednode.cli_start import register

    parser = argparse.ArgumentParser(prog="fednode")
    register(parser.add_subparsers())
    with pytest.raises(SystemExit) as exited:
        parser.parse_args(["start", "--server", "h:1", "--insecure", f"--receive-window={value}"])
    assert exited.value.code == 2
    assert f"argument --receive-window: {problem}" in " ".join(capsys.readouterr().err.split())
