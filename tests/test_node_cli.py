"""``fednode`` command line: help, option mapping, and `fednode start` as a real process stopped by SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import grpc
import pytest
from e2e_support import eventually
from fake_node_service import arun
from server_testkit import WireNode, channel_options

from fedcore.errors import NodeConfigError
from fedcore.wire import TaskKind
from fednode.cli import build_parser, main
from fednode.cli_start import config_from_args
from fedserver.auth import NodeStore
from fedserver.config import ServerConfig
from fedserver.server import FedServer
from fedserver.tasks import TaskState

ROOT = Path(__file__).resolve().parents[1]


def parse(*argv: str):
    return build_parser().parse_args(["start", "--server", "h:1", *argv])


def test_help_reads_like_a_man_page(capsys):
    with pytest.raises(SystemExit) as info:
        main(["start", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for section in ("security:", "handlers (--handler):", "stopping:", "examples:", "exit status:", "files:"):
        assert section in text
    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    assert all(name in top for name in ("start", "dataset", "plans"))


def test_options_map_to_node_config(tmp_path):
    token = tmp_path / "token"
    token.write_text("abc\n")
    cfg = config_from_args(parse("--insecure", "--token-file", str(token), "--name", "n",
                                 "--chunk-size", "512KiB", "--max-payload", "2GiB"))
    assert (cfg.tls, cfg.node_name, cfg.upload_chunk_size, cfg.max_payload_size) == ("insecure", "n", 512 << 10, 2 << 30)
    assert cfg.resolve_token() == "abc"
    ca = tmp_path / "ca.crt"
    cfg = config_from_args(parse("--ca-cert", str(ca), "--token-file", str(token)))
    assert cfg.tls == "tls" and cfg.ca_cert == ca
    cfg = config_from_args(parse("--ca-cert", str(ca), "--cert", "n.crt", "--key", "n.key"))
    assert cfg.tls == "mtls" and cfg.client_cert == Path("n.crt") and cfg.resolve_token() is None


def test_upload_retry_windows_map_to_node_config(tmp_path):
    token = tmp_path / "token"
    token.write_text("abc\n")
    default = config_from_args(parse("--insecure", "--token-file", str(token)))
    assert (default.busy_upload_retry_seconds, default.queued_upload_retry_seconds) == (120.0, 1800.0)
    cfg = config_from_args(parse("--insecure", "--token-file", str(token), "--busy-upload-retry", "300",
                                 "--queued-upload-retry", "7200.5"))
    assert (cfg.busy_upload_retry_seconds, cfg.queued_upload_retry_seconds) == (300.0, 7200.5)


@pytest.mark.parametrize(("argv", "message"), [
    (("--insecure", "--cert", "a", "--key", "b"), "--cert/--key need TLS"),
    (("--ca-cert", "ca", "--cert", "a"), "needs both --cert and --key"),
    (("--ca-cert", "ca",), "give --token-file FILE \\(from `fedserver nodes enroll`\\) or --cert/--key"),
])
def test_bad_option_combinations_name_the_problem(argv, message, monkeypatch):
    monkeypatch.delenv("FEDNODE_TOKEN_FILE", raising=False)
    with pytest.raises(NodeConfigError, match=message):
        config_from_args(parse(*argv))


@pytest.mark.parametrize("flag, value, reason", [
    ("--chunk-size", "lots", "invalid size 'lots': use e.g. 1048576, 512KiB, 4MiB or 4GiB"),
    ("--max-payload", "-4GiB", "invalid size '-4GiB': a size cannot be negative"),
    ("--receive-pool", "1.5GiB", "invalid size '1.5GiB': use e.g. 1048576"),
    ("--busy-upload-retry", "0", "invalid duration '0': must be finite seconds > 0"),
    ("--busy-upload-retry", "two minutes", "invalid duration 'two minutes': must be seconds > 0"),
    ("--queued-upload-retry", "inf", "invalid duration 'inf': must be finite seconds > 0"),
    ("--queued-upload-retry", "nan", "invalid duration 'nan': must be finite seconds > 0"),
    ("--queued-upload-retry", "-5", "invalid duration '-5': must be finite seconds > 0"),
])
def test_bad_value_is_a_usage_error_naming_the_flag(flag, value, reason, capsys):
    with pytest.raises(SystemExit) as info:
        parse("--insecure", f"{flag}={value}")
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: {reason}" in err, err


def _start_command(port: int, token_file: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "fednode", "start", "--server", f"127.0.0.1:{port}", "--insecure",
            "--token-file", str(token_file), "--name", "cli-node", "--handler", "echo", *extra]


async def _kill_if_running(proc: asyncio.subprocess.Process) -> None:
    """Kills and reaps a `fednode start` process that a failing test left running."""
    if proc.returncode is None:
        proc.kill()
        await proc.wait()


def test_start_serves_tasks_and_stops_cleanly_on_sigterm(tmp_path):
    async def scenario():
        store = NodeStore(tmp_path / "nodes.db")
        token_file = tmp_path / "node.token"
        token_file.write_text(store.enroll("cli-node") + "\n")
        server = FedServer(ServerConfig(port=0, tls="insecure", max_poll_wait_seconds=30), store)
        port = await server.start()
        proc = await asyncio.create_subprocess_exec(
            *_start_command(port, token_file, "--home", str(tmp_path / "home")), cwd=ROOT,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            assert await server.wait_for_nodes(1, timeout=30) == ["cli-node"]
            handle = server.dispatch("cli-node", TaskKind.TRAIN, server.encode_payload({"x": [1, 2]}),
                                     experiment_id="exp", round=1)
            result = await handle.result(timeout=20)
            await asyncio.sleep(0.2)  # back in its long poll
            proc.send_signal(signal.SIGTERM)
            _, err = await asyncio.wait_for(proc.communicate(), 10)
        finally:
            await _kill_if_running(proc)
            await server.stop(grace=1)
        assert result.outcome is TaskState.SUCCEEDED and result.payload == {"x": [1, 2]}
        assert proc.returncode == 0, err.decode()
        text = err.decode()
        assert "serving 127.0.0.1" in text and "SIGTERM received: stopping" in text

    arun(scenario())


def test_start_with_unknown_token_exits_2(tmp_path):
    async def scenario():
        store = NodeStore(tmp_path / "nodes.db")
        token_file = tmp_path / "node.token"
        token_file.write_text("fsn1_not-a-real-token\n")
        server = FedServer(ServerConfig(port=0, tls="insecure"), store)
        port = await server.start()
        try:
            proc = await asyncio.create_subprocess_exec(
                *_start_command(port, token_file), cwd=ROOT, stderr=asyncio.subprocess.PIPE)
            _, err = await asyncio.wait_for(proc.communicate(), 30)
        finally:
            await server.stop(grace=1)
        assert proc.returncode == 2
        assert "refused by the server" in err.decode() and "UNAUTHENTICATED" in err.decode()

    arun(scenario())


def test_start_superseded_by_another_process_of_the_node_exits_2_saying_so(tmp_path):
    """Another process registers with this node's token while `fednode start` waits in its poll: the
    server ends that poll "superseded"; the process exits 2 saying another process of the node took over."""
    async def scenario():
        store = NodeStore(tmp_path / "nodes.db")
        token_file = tmp_path / "node.token"
        token = store.enroll("cli-node")
        token_file.write_text(token + "\n")
        server = FedServer(ServerConfig(port=0, tls="insecure", max_poll_wait_seconds=30), store)
        port = await server.start()
        proc = await asyncio.create_subprocess_exec(
            *_start_command(port, token_file, "--home", str(tmp_path / "home")), cwd=ROOT,
            stderr=asyncio.subprocess.PIPE)
        try:
            await eventually(lambda: "cli-node" in server.registry and server.registry.get("cli-node").open_polls == 1,
                             30, "the node's long poll")
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=channel_options())
            try:
                await WireNode(channel, token).register(instance_id="b" * 32)  # a second process of the node
            finally:
                await channel.close()
            _, err = await asyncio.wait_for(proc.communicate(), 10)
        finally:
            await _kill_if_running(proc)
            await server.stop(grace=1)
        assert proc.returncode == 2, err.decode()
        text = err.decode()
        assert "fednode: stopped: another process of this node registered with the server" in text, text
        assert "superseded by a newer instance of the node: instance " + "b" * 32 in text, text
        assert "Traceback" not in text, text

    arun(scenario())
