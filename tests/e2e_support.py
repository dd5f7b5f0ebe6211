"""End-to-end test kit: a TLS FedServer in the test process and ``python -m fednode start`` subprocesses.

Each node gets its own home, an NPZ dataset registered with ``python -m fednode dataset add``, a token
from :meth:`NodeStore.enroll` in a 0600 file, and runs with ``OMP_NUM_THREADS=1``. Every wait has a
finite timeout and :class:`Federation` kills every process it started when its ``async with`` ends.

::

    async with Federation(tmp_path, sites) as fed:
        fed.prepare(range(3))                       # homes, datasets, tokens (CLI processes in parallel)
        fed.start_node(0, gate=fed.gate_dir)        # gated: see tests/plans_gated.py
        await fed.wait_registered(["site-0"])
        handle = await fed.wait_task("site-0", TaskState.RUNNING)
        fed.nodes["site-0"].kill()
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import numpy as np

from fedserver.auth import NodeStore
from fedserver.certs import create_ca, create_server_certificate
from fedserver.config import ServerConfig
from fedserver.server import FedServer
from fedserver.tasks import TaskHandle, TaskState

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
GATE_ENV = "FEDSTREAM_TEST_GATE"  # read by tests/plans_gated.py in the node processes
CLI_TIMEOUT = 60.0


def node_env(**extra: str) -> dict[str, str]:
    """Environment of a child process: ours, one BLAS thread, no stray gate, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k != GATE_ENV}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}, **extra)
    return env


def run_cli(*argv: str, check: bool = True, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """``python -m <argv>`` from the repository root; ``check``: raise with its output on a non-zero exit."""
    proc = subprocess.run([sys.executable, "-m", *argv], check=False, cwd=ROOT, env=node_env(), text=True,
                          capture_output=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"`{' '.join(argv)}` exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def run_clis(commands: Sequence[Sequence[str]]) -> None:
    """Run several ``python -m`` commands in parallel; raise with the output of the first that fails."""
    procs = [subprocess.Popen([sys.executable, "-m", *argv], cwd=ROOT, env=node_env(), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for argv in commands]
    try:
        for argv, proc in zip(commands, procs):
            out, _ = proc.communicate(timeout=CLI_TIMEOUT)
            if proc.returncode != 0:
                raise AssertionError(f"`{' '.join(argv)}` exited {proc.returncode}\n{out}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


@dataclass(frozen=True)
class Pki:
    """A project CA and the server certificate signed by it (SAN localhost, 127.0.0.1, ::1)."""

    ca_file: Path
    cert_file: Path
    key_file: Path


def make_pki(directory: Path) -> Pki:
    ca = create_ca("fedstream e2e test CA")
    ca_file, _ = ca.write(directory, "ca")
    cert_file, key_file = create_server_certificate(ca).write(directory, "server")
    return Pki(ca_file, cert_file, key_file)


def least_squares_sites(n_sites: int = 3, n: int = 80, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Heterogeneous linear-regression data (3 features): each site has its own shift and true weights."""
    rng = np.random.default_rng(seed)
    sites = []
    for i in range(n_sites):
        X = rng.normal(loc=i - 1.0, scale=1.0 + 0.5 * i, size=(n, 3))
        w = np.array([1.0, -2.0, 0.5]) + 0.7 * rng.standard_normal(3)
        y = X @ w + 0.3 + 0.05 * rng.standard_normal(n)
        sites.append((X.astype(np.float32), y.reshape(-1, 1).astype(np.float32)))
    return sites


@dataclass
class NodeProcess:
    """One ``fednode start`` process (restartable: same home, token and name)."""

    node_id: str
    home: Path
    token_file: Path
    log_path: Path
    popen: subprocess.Popen | None = None
    starts: int = 0

    def start(self, port: int, ca_file: Path, *, auto_approve: bool = True, gate: Path | None = None,
              extra: Sequence[str] = ()) -> None:
        """Start ``fednode start``; ``extra`` options go last (so ``--stop-grace 5`` replaces the default 1)."""
        if self.running:
            raise AssertionError(f"{self.node_id} is already running (pid {self.popen.pid})")
        argv = [sys.executable, "-m", "fednode", "-v", "start", "--server", f"127.0.0.1:{port}",
                "--ca-cert", str(ca_file), "--token-file", str(self.token_file), "--name", self.node_id,
                "--home", str(self.home), "--poll-wait", "2", "--stop-grace", "1"]
        if auto_approve:
            argv.append("--auto-approve")
        argv += list(extra)
        env = node_env(**({GATE_ENV: str(gate)} if gate is not None else {}))
        with open(self.log_path, "a") as log:
            log.write(f"==== start #{self.starts + 1}: {' '.join(argv[1:])}\n")
            log.flush()
            self.popen = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.starts += 1

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL: the node dies mid-whatever, without a goodbye."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(timeout=10)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds."""
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def prepare_nodes(tmp: Path, sites: Sequence[tuple[np.ndarray, np.ndarray]], indices: Iterable[int],
                  enroll: Callable[[str], str], tags: Sequence[str] = ("lsq",)) -> list[NodeProcess]:
    """For each site ``i`` in ``indices``: home ``tmp/site-i`` with ``data.npz`` registered as ``data-i``
    (``fednode dataset add``, run in parallel) and the token ``enroll("site-i")`` in a 0600 file."""
    prepared, commands = [], []
    for i in indices:
        node_id = f"site-{i}"
        home = tmp / node_id
        home.mkdir(parents=True, exist_ok=True)
        data = home / "data.npz"
        X, y = sites[i]
        np.savez(data, X=X, y=y)
        token_file = home / "node.token"
        token_file.write_text(enroll(node_id).strip() + "\n")
        token_file.chmod(0o600)
        commands.append(["fednode", "dataset", "add", f"data-{i}", str(data), "--tags", ",".join(tags),
                         "--home", str(home)])
        prepared.append(NodeProcess(node_id, home, token_file, tmp / f"{node_id}.log"))
    run_clis(commands)
    return prepared


def stop_processes(nodes: Iterable[NodeProcess], timeout: float = 5.0) -> None:
    """SIGTERM every running node, then SIGKILL those still alive after ``timeout`` seconds in all."""
    nodes = list(nodes)
    for node in nodes:
        if node.running:
            node.popen.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for node in nodes:
        if node.popen is None:
            continue
        try:
            node.popen.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            node.kill()


@dataclass
class Federation:
    """A TLS FedServer (port 0) in this process and node processes; use as ``async with``."""

    tmp: Path
    sites: Sequence[tuple[np.ndarray, np.ndarray]]
    heartbeat_interval: float = 0.5
    tags: Sequence[str] = ("lsq",)
    nodes: dict[str, NodeProcess] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.pki = make_pki(self.tmp / "pki")
        self.store = NodeStore(self.tmp / "server" / "nodes.db")
        self.gate_dir = self.tmp / "gate"
        self.gate_dir.mkdir(exist_ok=True)
        self.server: FedServer | None = None
        self.port = 0

    def server_config(self, port: int = 0) -> ServerConfig:
        return ServerConfig(address="127.0.0.1", port=port, tls="tls", cert_file=self.pki.cert_file,
                            key_file=self.pki.key_file, max_poll_wait_seconds=2.0,
                            heartbeat_interval_seconds=self.heartbeat_interval)

    async def __aenter__(self) -> Self:
        self.server = FedServer(self.server_config(), self.store)
        self.port = await self.server.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            self.stop_all()
        finally:
            if self.server is not None:
                await self.server.stop(grace=1.0)

    def stop_all(self) -> None:
        """Stop every node process (SIGTERM, then SIGKILL); never raises for one that already died."""
        stop_processes(self.nodes.values())

    # -- nodes ---------------------------------------------------------------------------------
    @staticmethod
    def node_id(i: int) -> str:
        return f"site-{i}"

    def prepare(self, indices: Iterable[int]) -> list[NodeProcess]:
        """Homes, data files, datasets (``fednode dataset add``, in parallel) and tokens for sites ``indices``."""
        prepared = prepare_nodes(self.tmp, self.sites, indices, self.store.enroll, self.tags)
        self.nodes.update((node.node_id, node) for node in prepared)
        return prepared

    def start_node(self, i: int, *, auto_approve: bool = True, gate: Path | None = None,
                   extra: Sequence[str] = ()) -> NodeProcess:
        node = self.nodes[self.node_id(i)]
        node.start(self.port, self.pki.ca_file, auto_approve=auto_approve, gate=gate, extra=extra)
        return node

    def open_gate(self, name: str | int = "all") -> None:
        """Let gated nodes' task number ``name`` (or every task: "all") train (tests/plans_gated.py)."""
        (self.gate_dir / str(name)).touch()

    def logs(self) -> str:
        return "\n".join(f"---- {n.node_id}\n{n.log()[-4000:]}" for n in self.nodes.values())

    # -- waiting on the server's view ------------------------------------------------------------
    async def wait_registered(self, node_ids: Iterable[str], timeout: float = 15.0,
                              newer_than: float | None = None) -> None:
        """Wait until each of ``node_ids`` is registered and connected (re-registered after ``newer_than``,
        a ``time.monotonic()`` stamp, when given)."""
        wanted = list(node_ids)
        registry = self.server.registry

        def ready() -> bool:
            for node_id in wanted:
                if node_id not in registry or not registry.get(node_id).connected:
                    return False
                if newer_than is not None and registry.get(node_id).last_seen < newer_than:
                    return False
            return True

        await eventually(ready, timeout, f"nodes {wanted} registered", self.logs)

    async def wait_task(self, node_id: str, state: TaskState, timeout: float = 15.0,
                        round: int | None = None) -> TaskHandle:
        """The open task of ``node_id`` (of ``round`` if given) once it is in ``state``."""
        found: list[TaskHandle] = []

        def check() -> bool:
            for handle in self.server.board.open_tasks(node_id):
                if handle.state is state and (round is None or handle.round == round):
                    found.append(handle)
                    return True
            return False

        await eventually(check, timeout, f"a {state.value} task on {node_id}", self.logs)
        return found[0]


async def eventually(predicate: Callable[[], bool], timeout: float, what: str,
                     context: Callable[[], str] = str) -> None:
    """Re-check ``predicate`` every 20 ms until it holds; AssertionError naming ``what`` after ``timeout`` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}\n{context()}")
        await asyncio.sleep(0.02)
