"""Test harness: a real FedServer and real NodeClients (real gRPC on loopback) in one event loop.

Nodes run the real TrainingTaskHandler with real SQLite dataset registries and approval stores; only the
processes are shared (end-to-end tests with separate processes live in test_e2e_*.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fednode.approvals import PlanApprovals
from fednode.client import NodeClient
from fednode.config import NodeConfig
from fednode.datasets import DatasetRegistry
from fednode.runner import TrainingTaskHandler
from fedserver.auth import NodeStore
from fedserver.config import ServerConfig
from fedserver.server import FedServer


@dataclass
class RunningNode:
    node_id: str
    client: NodeClient
    task: asyncio.Task
    approvals: PlanApprovals
    registry: DatasetRegistry


def least_squares_sites(n_sites: int = 3, n: int = 80, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Heterogeneous linear-regression data: each site has its own feature shift and true weights."""
    rng = np.random.default_rng(seed)
    sites = []
    for i in range(n_sites):
        X = rng.normal(loc=i - 1.0, scale=1.0 + 0.5 * i, size=(n, 3))
        w = np.array([1.0, -2.0, 0.5]) + 0.7 * rng.standard_normal(3)
        y = X @ w + 0.3 + 0.05 * rng.standard_normal(n)
        sites.append((X.astype(np.float32), y.reshape(-1, 1).astype(np.float32)))
    return sites


@contextlib.asynccontextmanager
async def federation(tmp: Path, sites: Sequence[tuple[np.ndarray, np.ndarray]], *, tags: Sequence[str] = ("lsq",),
                     auto_approve: bool = True, start_nodes: bool = True,
                     server_kwargs: dict | None = None) -> AsyncIterator[tuple[FedServer, list[RunningNode], callable]]:
    """Start a server and one node per site; yields (server, nodes, start_node(i))."""
    store = NodeStore(tmp / "server-nodes.db")
    server = FedServer(ServerConfig(port=0, tls="insecure", max_poll_wait_seconds=2.0,
                                    heartbeat_interval_seconds=1.0, **(server_kwargs or {})), store)
    port = await server.start()
    nodes: list[RunningNode] = []

    def start_node(i: int) -> RunningNode:
        node_id = f"site-{i}"
        home = tmp / node_id
        home.mkdir(exist_ok=True)
        data = home / "data.npz"
        if not data.exists():
            X, y = sites[i]
            np.savez(data, X=X, y=y)
        registry = DatasetRegistry(home / "node.db")
        if not registry.list():
            registry.add(name=f"data-{i}", path=data, tags=list(tags))
        approvals = PlanApprovals(home / "node.db", auto_approve=auto_approve)
        config = NodeConfig(server=f"127.0.0.1:{port}", tls="insecure", token=store.enroll(node_id),
                            node_name=node_id, poll_wait_seconds=1.0)
        client = NodeClient(config, TrainingTaskHandler(registry, approvals), registry.metadata(), ["numpy"])
        node = RunningNode(node_id, client, asyncio.get_running_loop().create_task(client.run()), approvals, registry)
        nodes.append(node)
        return node

    if start_nodes:
        for i in range(len(sites)):
            start_node(i)
    try:
        yield server, nodes, start_node
    finally:
        for node in nodes:
            node.client.stop()
        if nodes:
            await asyncio.wait([n.task for n in nodes], timeout=15)
        await server.stop(grace=1.0)
