"""The fedserver command line, run as a real process: certs, nodes, serve, help."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server_testkit import WireNode, async_test, channel_options

from fedserver.auth import NodeStore
from fedserver.certs import CertificateBundle
from fedserver.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def fedserver(home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FEDSERVER_HOME": str(home)}
    proc = subprocess.run([sys.executable, "-m", "fedserver", *args], capture_output=True, text=True,
                          env=env, cwd=home.parent, timeout=60, check=False)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_help_reads_like_a_manual() -> None:
    parser = build_parser()
    text = parser.format_help()
    for section in ("files:", "environment:", "exit status:", "examples:"):
        assert section in text
    for command in ("serve", "nodes", "certs"):
        assert command in text
    sub = subprocess.run([sys.executable, "-m", "fedserver", "serve", "--help"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60, check=False)
    assert sub.returncode == 0 and "--max-payload-size" in sub.stdout and "grpc_health_probe" in sub.stdout


def test_nodes_enroll_list_revoke(tmp_path: Path) -> None:
    home = tmp_path / "home"
    missing = fedserver(home, "nodes", "list", check=False)
    assert missing.returncode == 2 and f"no server home at {home}" in missing.stderr  # test_cli_missing_home
    assert not home.exists()  # listing never creates a home or a database
    token = fedserver(home, "nodes", "enroll", "hospital-a", "-q").stdout.strip()
    assert NodeStore(home / "nodes.db").lookup(token) == "hospital-a"
    verbose = fedserver(home, "nodes", "enroll", "hospital-b").stdout
    assert "shown once" in verbose and re.search(r"fsn1_\S+", verbose)
    listing = fedserver(home, "nodes", "list").stdout.splitlines()
    assert listing[0].split() == ["NODE", "ID", "ENROLLED", "STATUS"]
    assert [line.split()[0] for line in listing[1:]] == ["hospital-a", "hospital-b"]
    fedserver(home, "nodes", "revoke", "hospital-a")
    assert "revoked" in fedserver(home, "nodes", "list").stdout.splitlines()[1]
    assert NodeStore(home / "nodes.db").lookup(token) is None
    failed = fedserver(home, "nodes", "revoke", "nobody", check=False)
    assert failed.returncode == 1 and "fedserver: error: node 'nobody' is not enrolled" in failed.stderr
    bad = fedserver(home, "nodes", "enroll", "bad/id", check=False)
    assert bad.returncode == 1 and "invalid node id 'bad/id'" in bad.stderr


def test_certs_init_server_node(tmp_path: Path) -> None:
    home = tmp_path / "home"
    fedserver(home, "certs", "init", "--name", "Project X CA")
    fedserver(home, "certs", "server", "--host", "fed.example.org")
    fedserver(home, "certs", "node", "hospital-a")
    certs = home / "certs"
    ca = CertificateBundle.load(certs, "ca")
    node = CertificateBundle.load(certs / "nodes", "hospital-a")
    assert (ca.common_name, node.common_name) == ("Project X CA", "hospital-a")
    node.certificate.verify_directly_issued_by(ca.certificate)
    for key in (certs / "ca.key", certs / "server.key", certs / "nodes" / "hospital-a.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    again = fedserver(home, "certs", "init", check=False)
    assert again.returncode == 1 and "already exists; refusing to overwrite" in again.stderr
    fedserver(home, "certs", "init", "--force")
    assert CertificateBundle.load(certs, "ca").cert_pem != ca.cert_pem


def test_serve_without_certificates_says_what_to_do(tmp_path: Path) -> None:
    home = tmp_path / "home"
    fedserver(home, "nodes", "enroll", "a", "-q")
    failed = fedserver(home, "serve", "--port", "0", check=False)
    assert failed.returncode == 1 and "server.crt does not exist" in failed.stderr
    plain = fedserver(tmp_path / "empty", "serve", "--port", "0", "--tls", "insecure", check=False)
    assert plain.returncode == 1 and "no node is enrolled" in plain.stderr


@async_test
async def test_serve_runs_until_sigterm_with_tls(tmp_path: Path) -> None:
    home = tmp_path / "home"
    fedserver(home, "certs", "init")
    fedserver(home, "certs", "server")
    token = fedserver(home, "nodes", "enroll", "a", "-q").stdout.strip()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FEDSERVER_HOME": str(home)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fedserver", "serve", "--port", "0", "--grace", "1", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        port = int(re.search(r":(\d+) \(tls\)", line).group(1))
        creds = grpc.ssl_channel_credentials((home / "certs" / "ca.crt").read_bytes())
        async with grpc.aio.secure_channel(f"localhost:{port}", creds, options=channel_options()) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            node = WireNode(channel, token)
            assert (await node.register()).node_id == "a"
            waiting = asyncio.create_task(node.poll(wait=20))
            await asyncio.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
            got = await asyncio.wait_for(waiting, 10)
            assert got.shutdown is not None
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
