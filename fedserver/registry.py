"""Which nodes are there: what each announced at Register, when it was last seen, what it is working on.

The registry is in-memory state of a running server (nodes register again after every reconnect, and
a record is never removed while the server runs). A node this server process has no record of (it
restarted since the node's last Register) has every call but Register refused ERROR_REASON_UNKNOWN_NODE
(:meth:`fedserver.service.NodeService._identify`), which makes it register again. A node counts as *connected* while it holds a poll open or was seen within ``liveness_timeout`` seconds
(any authenticated call counts) or holds an UploadResult stream open, except after a *dropped* stream:
when its last open PollTask or UploadResult stream was cancelled or broken before the server finished it
(the process died, the connection broke), the node is disconnected at once, until its next authenticated
call. A stream that ends normally (NoTask, a task sent completely, a refusal) leaves the node connected
while it polls again, so a re-polling node never flaps. Times are ``time.monotonic()`` seconds.

Tasks of a node that drops stay open (``in_flight`` is kept): a node that reconnects within the task
board's reconnect grace gets them back (a queued task on its next poll, a broken download or upload
resumes); past the grace they fail (:meth:`fedserver.task_board.TaskBoard.watch`), see
:attr:`NodeRecord.disconnected_since`. That holds for the same node *process* coming back: each Register
carries the process's ``instance_id``, and one that differs from the recorded id (:meth:`NodeRegistry.restarted`)
means a new process that holds none of the earlier one's tasks
(:meth:`fedserver.task_board.TaskBoard.node_restarted` ends them at once, and the earlier process's polls
still open: each ends as a refusal, not a drop, so ``open_polls`` falls back and the node stays connected).
The same id again is the same process on a new connection: the polls it opened before end with NoTask
(:meth:`fedserver.task_board.TaskBoard.node_reregistered`), not a drop either. Every later call of a node
process names its instance in the call metadata (:func:`fedserver.auth.call_instance_id`), and a call of
another instance than the one registered last is refused (:meth:`NodeRegistry.check_instance`), and so is
a Register of an instance a later one replaced: an old process that was uploading or training at the
restart cannot come back (not even by reconnecting) and compete for the node's tasks.

Within one process, polls are ordered by ``PollTaskRequest.poll_sequence`` (1, 2, ... per process, across
its connections): the record keeps the highest seen from the node's current instance
(:attr:`NodeRecord.poll_sequence`, kept by a Register of the same instance, forgotten by another's), and a
poll that does not exceed it is a late poll of a connection the process abandoned
(:meth:`NodeRegistry.check_poll_sequence`): refused before it touches a task, since its ``held_task_ids``
are older than the process's latest poll and would send back to the queue a task the process holds.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from fedcore.errors import NodeSupersededError, StalePollError, UnknownNodeError
from fedcore.event_wait import wait_event
from fedcore.strategies import NodeInfo
from fedcore.wire import DatasetInfo, NodeRegistration
from fedserver.task_board import clock_text

#: Replaced instance ids remembered per node (a Register of one of them is refused); restarts are rare.
MAX_REPLACED_INSTANCES = 16


@dataclass
class NodeRecord:
    """One registered node."""

    node_id: str
    name: str
    datasets: tuple[DatasetInfo, ...]
    capabilities: tuple[str, ...]
    client_version: str
    liveness_timeout: float
    instance_id: str = ""  # of the process that registered last ("": unknown, an older node)
    instance_since: float = field(default_factory=time.time)  # wall time of that process's first Register
    replaced: tuple[str, ...] = ()  # instance ids of earlier processes it replaced, latest first (bounded)
    poll_sequence: int = 0  # highest PollTaskRequest.poll_sequence seen from instance_id (0: none yet)
    registered_at: float = field(default_factory=time.monotonic)
    last_seen: float = field(default_factory=time.monotonic)
    open_polls: int = 0
    open_uploads: int = 0  # UploadResult streams in progress (a long upload makes no other call)
    in_flight: set[str] = field(default_factory=set)  # ids of open tasks dispatched to this node
    dropped_at: float | None = None  # when its last open stream dropped; None once it calls again
    drops: int = 0  # streams of it that dropped since the server started (a flaky link shows here)

    @property
    def connected(self) -> bool:
        return self.disconnected_since is None

    @property
    def disconnected_since(self) -> float | None:
        """None while connected; else since when it is not: the drop of its last stream, or the end of its
        liveness window (``last_seen + liveness_timeout``) for a node that fell silent."""
        if self.open_polls > 0 or self.open_uploads > 0:
            return None
        if self.dropped_at is not None:
            return self.dropped_at
        silent_from = self.last_seen + self.liveness_timeout
        return silent_from if time.monotonic() > silent_from else None

    @property
    def disconnect_cause(self) -> str:
        """Why :attr:`disconnected_since` is set, in words (for error messages)."""
        if self.dropped_at is not None:
            return "its last open stream was cancelled or broken"
        return f"no call for {self.liveness_timeout:g} s"

    @property
    def tags(self) -> frozenset[str]:
        """Union of the tags of the node's datasets."""
        return frozenset(tag for d in self.datasets for tag in d.tags)

    @property
    def num_samples(self) -> int:
        return sum(d.num_samples for d in self.datasets)

    def node_info(self) -> NodeInfo:
        """What node-selection strategies look at (fedcore.strategies)."""
        return NodeInfo(self.node_id, self.tags, self.num_samples,
                        dataset_tags=tuple(frozenset(d.tags) for d in self.datasets))


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
                            self.liveness_timeout, reg.instance_id)
        if old is not None:
            record.registered_at, record.open_polls, record.open_uploads, record.in_flight, record.drops = (
                old.registered_at, old.open_polls, old.open_uploads, old.in_flight, old.drops)
            record.replaced = old.replaced
            if old.instance_id == reg.instance_id:  # the same process again: its polls keep their order
                record.instance_since, record.poll_sequence = old.instance_since, old.poll_sequence
            elif old.instance_id and reg.instance_id:
                record.replaced = (old.instance_id, *old.replaced)[:MAX_REPLACED_INSTANCES]
        self._nodes[node_id] = record
        self._changed.set()
        return record

    def restarted(self, node_id: str, instance_id: str) -> str | None:
        """The instance id recorded for ``node_id`` if a Register carrying ``instance_id`` comes from a new
        process of it (a non-empty id that differs: ``""`` returned when the earlier process sent none);
        None for the same process, an unknown instance (``instance_id`` empty) or a node not seen before.
        Ask before :meth:`register`, which records the new id."""
        record = self._nodes.get(node_id)
        if record is None or not instance_id or instance_id == record.instance_id:
            return None
        return record.instance_id

    def check_instance(self, node_id: str, instance_id: str, *, registering: bool = False) -> None:
        """Refuse a call of ``node_id`` from the process ``instance_id`` (non-empty) if another process of the
        node registered since: NodeSupersededError (FAILED_PRECONDITION), which fednode and the JS node take
        as the end of the process. Any call but a Register: ``instance_id`` (its metadata) is not the one
        registered last. A Register (``registering``): ``instance_id`` is one a later process replaced, so a
        replaced process that reconnects cannot take the node back. No refusal while the node is unknown
        (not registered since the server started) or its last Register carried no instance id."""
        record = self._nodes.get(node_id)
        if record is None or not record.instance_id or record.instance_id == instance_id:
            return
        if registering and instance_id not in record.replaced:
            return  # a new process: the Register is what makes it the node's current one
        raise NodeSupersededError(
            f"call of node {node_id} superseded by a newer instance of the node: instance {record.instance_id} "
            f"registered at {clock_text(record.instance_since)} in place of instance {instance_id}; this call "
            f"belongs to an earlier process")

    def check_poll_sequence(self, node_id: str, instance_id: str, sequence: int) -> None:
        """Accept a PollTask of ``node_id``'s process ``instance_id`` numbered ``sequence``
        (PollTaskRequest.poll_sequence) and record it as the highest seen, or raise StalePollError (ABORTED)
        when it is not greater than one seen already from that process: a late poll of a connection the
        process abandoned (it re-registered and polled again meanwhile). Checks nothing for ``sequence`` 0
        (older nodes), a call naming no instance, an unknown node, or an instance that is not the node's
        registered one (:meth:`check_instance` decided about it already)."""
        record = self._nodes.get(node_id)
        if not sequence or not instance_id or record is None or record.instance_id != instance_id:
            return
        if sequence <= record.poll_sequence:
            raise StalePollError(
                f"stale PollTask of node {node_id}: its poll_sequence {sequence} is not greater than "
                f"{record.poll_sequence}, the highest this process (instance {instance_id}) has sent; a late "
                f"poll of a connection the process abandoned, refused untouched (no task, no requeue)")
        record.poll_sequence = sequence

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

    def poll_closed(self, node_id: str, *, dropped: bool = False) -> bool:
        """A PollTask stream of the node ended; ``dropped``: cancelled or broken before the server finished
        it. A drop with no other stream open disconnects the node now rather than after ``liveness_timeout``
        (returns True then)."""
        record = self._nodes.get(node_id)
        if record is None:
            return False
        record.open_polls = max(0, record.open_polls - 1)
        return self._stream_closed(record, dropped)

    def upload_opened(self, node_id: str) -> None:
        record = self._nodes.get(node_id)
        if record is not None:
            record.open_uploads += 1
            record.last_seen = time.monotonic()
            record.dropped_at = None

    def upload_closed(self, node_id: str, *, dropped: bool = False) -> bool:
        """An UploadResult stream of the node ended; like :meth:`poll_closed`."""
        record = self._nodes.get(node_id)
        if record is None:
            return False
        record.open_uploads = max(0, record.open_uploads - 1)
        return self._stream_closed(record, dropped)

    @staticmethod
    def _stream_closed(record: NodeRecord, dropped: bool) -> bool:
        now = time.monotonic()
        record.drops += int(dropped)
        if dropped and record.open_polls == 0 and record.open_uploads == 0:
            record.dropped_at = now
            return True
        record.last_seen = now
        return False

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
            if not await wait_event(self._changed, remaining):
                return self.connected()
