"""Which nodes are there: what each announced at Register, when it was last seen, what it is working on.

The registry is in-memory state of a running server (nodes register again after every reconnect). A
node counts as *connected* while it holds a poll open or was seen within ``liveness_timeout`` seconds
(any authenticated call counts), except after a *dropped* poll: when its last open PollTask stream was
cancelled or broken before the server finished it (the process died, the connection broke), the node is
disconnected at once, until its next authenticated call. A poll that ends normally (NoTask, a task sent
completely, a refusal) leaves the node connected while it polls again, so a re-polling node never flaps.
Times are ``time.monotonic()`` seconds.

Tasks queued for a node that drops stay queued (``in_flight`` is kept): a node that reconnects gets
them on its next poll, one that does not come back lets them end by their inactivity timeout.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from fedcore.errors import UnknownNodeError
from fedcore.strategies import NodeInfo
from fedcore.wire import DatasetInfo, NodeRegistration


@dataclass
class NodeRecord:
    """One registered node."""

    node_id: str
    name: str
    datasets: tuple[DatasetInfo, ...]
    capabilities: tuple[str, ...]
    client_version: str
    liveness_timeout: float
    registered_at: float = field(default_factory=time.monotonic)
    last_seen: float = field(default_factory=time.monotonic)
    open_polls: int = 0
    in_flight: set[str] = field(default_factory=set)  # ids of open tasks dispatched to this node
    dropped_at: float | None = None  # when its last open poll dropped; None once it calls again
    drops: int = 0  # polls of it that dropped since the server started (a flaky link shows here)

    @property
    def connected(self) -> bool:
        if self.open_polls > 0:
            return True
        return self.dropped_at is None and time.monotonic() - self.last_seen <= self.liveness_timeout

    @property
    def tags(self) -> frozenset[str]:
        """Union of the tags of the node's datasets."""
        return frozenset(tag for d in self.datasets for tag in d.tags)

    @property
    def num_samples(self) -> int:
        return sum(d.num_samples for d in self.datasets)

    def node_info(self) -> NodeInfo:
        """What node-selection strategies look at (fedcore.strategies)."""
        return NodeInfo(self.node_id, self.tags, self.num_samples)


class NodeRegistry:
    """Registered nodes by id, with a wait for a quorum that wakes on registrations (no polling)."""

    def __init__(self, liveness_timeout: float) -> None:
        self.liveness_timeout = liveness_timeout
        self._nodes: dict[str, NodeRecord] = {}
        self._changed = asyncio.Event()

    def register(self, node_id: str, reg: NodeRegistration) -> NodeRecord:
        """Record (or refresh) a node's announcement; its open tasks and polls are kept."""
        old = self._nodes.get(node_id)
        record = NodeRecord(node_id, reg.node_name, reg.datasets, reg.capabilities, reg.client_version,
                            self.liveness_timeout)
        if old is not None:
            record.registered_at, record.open_polls, record.in_flight, record.drops = (
                old.registered_at, old.open_polls, old.in_flight, old.drops)
        self._nodes[node_id] = record
        self._changed.set()
        return record

    def touch(self, node_id: str) -> None:
        """The node made an authenticated call: it is alive (again, if a poll of it had dropped)."""
        record = self._nodes.get(node_id)
        if record is not None:
            record.last_seen = time.monotonic()
            record.dropped_at = None

    def poll_opened(self, node_id: str) -> None:
        record = self._nodes.get(node_id)
        if record is not None:
            record.open_polls += 1
            record.last_seen = time.monotonic()
            record.dropped_at = None

    def poll_closed(self, node_id: str, *, dropped: bool = False) -> None:
        """A PollTask stream of the node ended; ``dropped``: cancelled or broken before the server finished
        it. A drop with no other poll open disconnects the node now rather than after ``liveness_timeout``."""
        record = self._nodes.get(node_id)
        if record is not None:
            now = time.monotonic()
            record.open_polls = max(0, record.open_polls - 1)
            record.drops += int(dropped)
            if dropped and record.open_polls == 0:
                record.dropped_at = now
            else:
                record.last_seen = now

    def get(self, node_id: str) -> NodeRecord:
        try:
            return self._nodes[node_id]
        except KeyError:
            raise UnknownNodeError(
                f"node {node_id!r} has not registered (registered: {sorted(self._nodes) or 'none'})") from None

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._nodes

    def __len__(self) -> int:
        return len(self._nodes)

    def nodes(self) -> list[NodeRecord]:
        """Every registered node, by id."""
        return [self._nodes[k] for k in sorted(self._nodes)]

    def connected(self) -> list[str]:
        """Ids of the connected nodes, sorted."""
        return [r.node_id for r in self.nodes() if r.connected]

    def node_infos(self, connected_only: bool = True) -> list[NodeInfo]:
        """Candidates for a node-selection strategy."""
        return [r.node_info() for r in self.nodes() if r.connected or not connected_only]

    async def wait_for_nodes(self, n: int, timeout: float) -> list[str]:
        """Wait until at least ``n`` nodes are connected or ``timeout`` seconds pass.

        Returns the connected node ids at that moment: possibly fewer than ``n`` after a timeout, so the
        caller compares ``len(result)`` with its quorum.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            remaining = deadline - loop.time()
            # fewer registered than n cannot make n connected: skip the O(N) scan (a thousand nodes
            # registering one by one would otherwise cost a million liveness checks)
            if len(self._nodes) >= n or remaining <= 0:
                ids = self.connected()
                if len(ids) >= n or remaining <= 0:
                    return ids
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                return self.connected()
