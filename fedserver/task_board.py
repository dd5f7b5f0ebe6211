"""Every task of a running server: open handles, per-node delivery queues, and records of closed tasks.

Delivery is a long poll: :meth:`TaskBoard.next_for` waits on the node's ``asyncio.Event`` with a finite
timeout and hands out the oldest undelivered task that no other stream is sending. A task stays queued
until its payload has been streamed completely, so a poll after a broken download gets it again.

A node that disconnects (:attr:`~fedserver.registry.NodeRecord.disconnected_since`: its last stream
dropped, or it fell silent) keeps its open tasks for ``reconnect_grace`` seconds: a node that calls again
in time carries on (its queued task on the next poll, a broken download or upload resumed); past the
grace every open task of it ends FAILED with an error saying when it disconnected, so a round waits
``reconnect_grace``, not the task's inactivity timeout, for a node that is gone. One timer per node with
open tasks (:meth:`TaskBoard.watch`) re-checks at the earliest moment the node could be given up.

The grace is for the same node *process* coming back. A node that registers with another instance id
(a new process: it was killed or restarted) holds none of the tasks sent to the earlier one, so
:meth:`TaskBoard.node_restarted` ends them FAILED at once (those the old process holds: a stream is sending
it, or it was delivered: running, uploading); a queued task no stream is sending (never taken, or its
download was cut) stays queued for the new process. The PollTask streams of the node open at that moment
are the old process's too (a process registers before it polls), possibly on a half-open connection that
gRPC keepalive would drop only tens of seconds later: each poll carries the node's *poll generation* from
when it opened (:meth:`TaskBoard.poll_generation`), a restart bumps it and wakes the node's polls, and a
poll of an older generation takes nothing and ends with NodeSupersededError (:meth:`TaskBoard.check_poll`),
so a task dispatched meanwhile goes to the new process. The same process registering again (after a
network blip, on a new connection) bumps it too (:meth:`TaskBoard.node_reregistered`): its polls from
before that Register, likely on the dead connection, take nothing and end quietly (``check_poll`` returns
False: the service answers NoTask), instead of the oldest of them taking the next task into a socket
nobody reads. A process polls one task at a time and abandons every poll it opened before that Register,
so a task that only such streams are sending (its header went into the dead connection, where the stream
blocks until keepalive drops it) is free for the process's new poll, which sends it again from offset 0:
each handle keeps the poll generation of every stream sending it (``TaskHandle.sender_generations``).

A task whose whole payload fit into the buffers of a dead connection counts as delivered (its stream
ended after the last chunk) though the process never got it. A poll that reports the tasks its process
holds (``PollTaskRequest.reports_held_tasks``; the node sends one only once every earlier poll stream of
it has ended or been abandoned) settles that: :meth:`TaskBoard.requeue_lost` puts every task delivered to
that very process (``TaskHandle.delivered_to``, its instance id) whose upload has not begun and which the
poll does not name back on the node's queue, in dispatch order, to be sent again from offset 0 (not after
its inactivity timeout, or never without one); the poll itself is never given a new task it names (only
the download it resumes). A task whose upload header came from that process, even one the server refused
on that header (too large, malformed, busy: :meth:`TaskBoard.result_offered`), is the process's: never
sent again, however its later polls read (a node that gives up such a result reports the task FAILED).

Closed tasks leave a small record (node id, why it closed, a weak reference to the handle) so a late
result is refused with FAILED_PRECONDITION rather than NOT_FOUND, and noted on the handle if the caller
still holds it. The oldest records are forgotten beyond ``max_closed``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass

from fedcore.errors import (
    MessageError,
    NodeSupersededError,
    PermissionDeniedError,
    TaskClosedError,
    UnknownTaskError,
)
from fedcore.event_wait import wait_event
from fedcore.wire import TaskOutcome
from fedserver.tasks import TaskHandle, TaskState

log = logging.getLogger(__name__)

#: Seconds a disconnected node has to come back before its open tasks fail (fednode's reconnect backoff
#: is capped at 30 s with full jitter, so a live node whose link broke is usually back within a few).
DEFAULT_RECONNECT_GRACE = 30.0


@dataclass(frozen=True)
class NodeLiveness:
    """What the board needs to know about a node: since when it is disconnected (None: connected), why,
    and the latest moment it could become disconnected by silence (``time.monotonic()`` seconds)."""

    disconnected_since: float | None
    cause: str
    silent_from: float


@dataclass(frozen=True)
class _PollGeneration:
    """A node's poll generation, bumped by each Register carrying an instance id; ``restart`` is the
    generation its last restart began (polls older than that belong to a replaced process, ``message``
    says so), 0 if it never restarted."""

    generation: int
    restart: int
    message: str


_NO_GENERATION = _PollGeneration(0, 0, "")


@dataclass
class ClosedTask:
    node_id: str
    state: TaskState
    reason: str
    handle: weakref.ReferenceType[TaskHandle]
    bytes_received: int = 0
    late_uploads: int = 0

    result_received: bool = False  # the node's result (any outcome) reached the server before the task closed


class TaskBoard:
    """Open and closed tasks by id, and a delivery queue per node."""

    def __init__(self, on_close: Callable[[TaskHandle], None] | None = None, max_closed: int = 100_000,
                 *, reconnect_grace: float | None = DEFAULT_RECONNECT_GRACE) -> None:
        self.reconnect_grace = reconnect_grace  # seconds; None: tasks of a gone node wait for their timeout
        self.liveness: Callable[[str], NodeLiveness | None] | None = None  # set by the service (the registry)
        self._watches: dict[str, asyncio.TimerHandle] = {}
        self._open: dict[str, TaskHandle] = {}
        self._by_node: dict[str, dict[str, TaskHandle]] = {}  # the open tasks of each node, in dispatch order
        self._closed: OrderedDict[str, ClosedTask] = OrderedDict()
        self._queues: dict[str, list[TaskHandle]] = {}
        self._wakeups: dict[str, asyncio.Event] = {}
        # per node: its poll generation (bumped by each Register with an instance id), the generation its
        # last restart began, and why that restart superseded the polls before it
        self._generations: dict[str, _PollGeneration] = {}
        self._on_close = on_close
        self.max_closed = max_closed
        self.stopping = False

    # -- adding and closing ------------------------------------------------------------------------
    def add(self, handle: TaskHandle) -> None:
        """Queue ``handle`` for its node and wake that node's polls."""
        self._open[handle.task_id] = handle
        self._by_node.setdefault(handle.node_id, {})[handle.task_id] = handle
        self._queues.setdefault(handle.node_id, []).append(handle)
        self._wakeup(handle.node_id).set()
        if handle.node_id not in self._watches:
            self.watch(handle.node_id)

    def closed(self, handle: TaskHandle) -> None:
        """Called by a handle when it ends (its ``on_close``)."""
        self._open.pop(handle.task_id, None)
        of_node = self._by_node.get(handle.node_id, {})
        of_node.pop(handle.task_id, None)
        if not of_node:
            self._by_node.pop(handle.node_id, None)
        queue = self._queues.get(handle.node_id)
        if queue and handle in queue:
            queue.remove(handle)
        self._closed[handle.task_id] = ClosedTask(handle.node_id, handle.state, handle.close_reason,
                                                  weakref.ref(handle), handle.bytes_received,
                                                  result_received=handle.result_received)
        while len(self._closed) > self.max_closed:
            self._closed.popitem(last=False)
        if self._on_close is not None:
            self._on_close(handle)

    def open_tasks(self, node_id: str | None = None) -> list[TaskHandle]:
        if node_id is None:
            return list(self._open.values())
        return list(self._by_node.get(node_id, {}).values())

    def cancel_all(self, reason: str, *, experiment_id: str | None = None, round: int | None = None) -> int:
        """Cancel the open tasks matching ``experiment_id`` / ``round`` (all if None); return how many."""
        victims = [h for h in self._open.values()
                   if (experiment_id is None or h.experiment_id == experiment_id)
                   and (round is None or h.round == round)]
        return sum(h.cancel(reason) for h in victims)

    # -- nodes that went away ----------------------------------------------------------------------------
    def watch(self, node_id: str) -> None:
        """(Re)check ``node_id`` now: call when it may have disconnected (a dropped stream) or got a task.

        Fails its open tasks if it has been disconnected for ``reconnect_grace`` seconds, else arms one
        timer for the earliest moment that could happen (while connected: the end of its liveness window
        plus the grace, at least ``reconnect_grace`` from now). No open task: no timer.
        """
        timer = self._watches.pop(node_id, None)
        if timer is not None:
            timer.cancel()
        grace = self.reconnect_grace
        tasks = self.open_tasks(node_id)
        status = self.liveness(node_id) if self.liveness is not None else None
        if grace is None or not tasks or status is None or self.stopping:
            return
        now = time.monotonic()
        if status.disconnected_since is None:
            due = max(status.silent_from, now) + grace
        else:  # a task dispatched to a node already gone gets the grace from its dispatch
            dues = [(max(status.disconnected_since, h.dispatched_at) + grace, h) for h in tasks]
            lost = [h for d, h in dues if now >= d - 1e-3]  # timers may fire early
            if lost:
                self._give_up(node_id, lost, status, grace)
            due = min((d for d, h in dues if h not in lost), default=None)
            if due is None:
                return
        self._watches[node_id] = asyncio.get_running_loop().call_later(due - now, self.watch, node_id)

    def _give_up(self, node_id: str, tasks: list[TaskHandle], status: NodeLiveness, grace: float) -> None:
        assert status.disconnected_since is not None
        when = clock_text(time.time() - (time.monotonic() - status.disconnected_since))
        message = (f"node {node_id} disconnected at {when} ({status.cause}) and did not reconnect within "
                   f"{grace:g} s")
        log.warning("%s: failing its %d open task(s)", message, len(tasks))
        for handle in tasks:
            handle.lose(f"{message} ({handle.state.value})")

    def node_restarted(self, node_id: str, old_instance: str, new_instance: str) -> list[TaskHandle]:
        """A new process of ``node_id`` (``new_instance``) registered in place of ``old_instance``: end every
        open task the old one holds FAILED now (:meth:`TaskHandle.lose`, so a later call naming it is
        refused) and return them. Held: a poll stream is sending it, or it was delivered (the node runs or
        uploads it). A queued task no stream is sending stays queued for the new process, whether no poll
        took it yet or its download was cut (the old process's partial copy is of no use to the new one,
        which downloads it from the start). Every poll of the node open now belongs to the old process: its
        generation is over, so it takes nothing and ends (:meth:`check_poll` raises NodeSupersededError)."""
        when, old = clock_text(time.time()), old_instance or "(unknown)"
        generation = self.poll_generation(node_id) + 1
        self._generations[node_id] = _PollGeneration(generation, generation, (
            f"PollTask stream of node {node_id} superseded by a newer instance of the node: instance "
            f"{new_instance} registered at {when} in place of instance {old}; this stream belongs to an "
            f"earlier process"))
        self._wakeup(node_id).set()  # waiting polls of the old process see the new generation and end
        lost = [h for h in self.open_tasks(node_id) if h.senders > 0 or h.state is not TaskState.QUEUED]
        if not lost:
            return []
        message = (f"node {node_id} restarted at {when}: a new process (instance {new_instance}) "
                   f"registered in place of instance {old}, which held this task")
        log.warning("%s: failing its %d task(s) sent to the old process", message, len(lost))
        for handle in lost:
            handle.lose(f"{message} ({handle.state.value})")
        return lost

    # -- lookups with the protocol's checks ------------------------------------------------------------
    def lookup(self, task_id: str, node_id: str, *, late_outcome: TaskOutcome | None = None) -> TaskHandle:
        """The open task ``task_id`` if it was sent to ``node_id``.

        Raises UnknownTaskError (no such task), PermissionDeniedError (sent to another node, open or not),
        TaskClosedError (closed; with ``late_outcome`` the refused late result is recorded).
        """
        handle = self._open.get(task_id)
        if handle is not None:
            if handle.node_id != node_id:
                raise PermissionDeniedError(f"task {task_id} was not sent to node {node_id}")
            return handle
        record = self._closed.get(task_id)
        if record is None:
            raise UnknownTaskError(f"no task with id {task_id!r}")
        if record.node_id != node_id:
            raise PermissionDeniedError(f"task {task_id} was not sent to node {node_id}")
        if late_outcome is not None:
            record.late_uploads += 1
            closed_handle = record.handle()
            if closed_handle is not None:
                closed_handle.record_late(late_outcome)
        raise TaskClosedError(f"task {task_id} is no longer accepted ({record.reason})")

    def closed_record(self, task_id: str) -> ClosedTask | None:
        return self._closed.get(task_id)

    # -- delivery --------------------------------------------------------------------------------------
    def node_reregistered(self, node_id: str) -> None:
        """The process of ``node_id`` that registered last registered again (the same instance id: it came
        back after a network blip, on a new connection). Its polls open before this are of its earlier
        connection, likely dead or half-open: they take no task and end quietly (:meth:`check_poll` returns
        False for them), so the next task goes to the poll the process opens now. A poll already sending a
        task goes on (the process resumes that download on its new connection if this one is dead), but
        no longer holds it: a poll of the new generation may take it and send it from offset 0 (the
        process never saw its header, or it would resume it)."""
        current = self._generations.get(node_id, _NO_GENERATION)
        self._generations[node_id] = _PollGeneration(current.generation + 1, current.restart, current.message)
        self._wakeup(node_id).set()

    def poll_generation(self, node_id: str) -> int:
        """The current poll generation of ``node_id`` (0 until it registers with an instance id): a PollTask
        stream takes it when it opens and hands it to :meth:`next_for` and :meth:`check_poll`."""
        return self._generations.get(node_id, _NO_GENERATION).generation

    def check_poll(self, node_id: str, generation: int) -> bool:
        """Whether a poll of ``node_id`` opened in ``generation`` is still the node's latest: True if no
        Register came since; False if only the same process registered again since (:meth:`node_reregistered`:
        the poll should take no task and end quietly). Raises NodeSupersededError if a newer process of the
        node registered since (:meth:`node_restarted`)."""
        current = self._generations.get(node_id, _NO_GENERATION)
        if generation < current.restart:
            raise NodeSupersededError(current.message)
        return generation == current.generation

    def _wakeup(self, node_id: str) -> asyncio.Event:
        event = self._wakeups.get(node_id)
        if event is None:
            event = self._wakeups[node_id] = asyncio.Event()
        return event

    def _take(self, node_id: str, generation: int, held: Collection[str]) -> TaskHandle | None:
        """The oldest queued task of ``node_id`` that no stream of poll ``generation`` or later is sending
        (streams of earlier generations were abandoned by the process: it registered again since) and that
        is not in ``held`` (the poll's process has it), with a sender of ``generation`` counted."""
        for handle in self._queues.get(node_id, ()):
            if handle.state is TaskState.QUEUED and all(g < generation for g in handle.sender_generations) \
                    and handle.task_id not in held:
                if handle.sender_generations:
                    log.info("task %s: node %s registered again since its stream(s) of poll generation %s "
                             "opened; sending it again from offset 0 on a poll of generation %d",
                             handle.task_id, node_id, sorted(handle.sender_generations), generation)
                handle.sender_generations.append(generation)
                return handle
        return None

    async def next_for(self, node_id: str, wait_seconds: float, *, generation: int | None = None,
                       held: Collection[str] = ()) -> TaskHandle | None:
        """The next task to stream to ``node_id`` (a sender of ``generation`` counted), or None after the wait.

        The oldest queued task that no stream of this poll's generation is sending: one whose only senders
        are streams of earlier generations (the same process registered again since they opened, so it
        abandoned them) is taken too, and sent again. Returns None at once when the board is stopping. With
        ``generation`` (the poll's, from :meth:`poll_generation` when it opened; None: the node's current
        one) it raises NodeSupersededError, taking nothing, as soon as a newer process of the node
        registers, and returns None as soon as the same process registers again (:meth:`check_poll`). The
        caller must :meth:`release` the handle, with the same ``generation``, when its stream ends, whether
        or not the payload went through. A task named in ``held`` (the poll's process has it, see
        :meth:`requeue_lost`) is not taken. A NaN ``wait_seconds`` raises MessageError: it would never pass
        the deadline, and its NaN timers fire at once (the poll would spin the event loop until cancelled).
        """
        if math.isnan(wait_seconds):
            raise MessageError(f"poll wait_seconds must be a number of seconds, got {wait_seconds!r}")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_seconds
        event = self._wakeup(node_id)
        while not self.stopping:
            if generation is not None and not self.check_poll(node_id, generation):
                return None  # the same process registered again since this poll opened: it takes nothing
            for handle in self._queues.get(node_id, ()):
                handle.touch()  # the node is polling for it: alive
            handle = self._take(node_id, self.poll_generation(node_id) if generation is None else generation, held)
            if handle is not None:
                return handle
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            event.clear()
            await wait_event(event, remaining)  # timed out: one more look, then the deadline check returns None
        return None

    def acquire(self, handle: TaskHandle, *, generation: int | None = None) -> None:
        """Count one more stream sending ``handle`` (a resumed download), of poll ``generation`` (None: the
        node's current one)."""
        handle.sender_generations.append(self.poll_generation(handle.node_id) if generation is None else generation)

    def release(self, handle: TaskHandle, *, delivered: bool, generation: int | None = None,
                instance_id: str = "") -> None:
        """A stream sending ``handle`` ended; ``delivered`` when its last chunk went out; ``generation`` is
        the one it took the task with (:meth:`next_for`, :meth:`acquire`; None: the oldest sender ends);
        ``instance_id`` the node process its poll came from (its metadata; "": unknown).
        Deliveries count once: the first marks the task delivered (RUNNING) and takes it off the queue; a
        later one (a stale stream that went on, or the copy sent again after it) is only activity. A stale
        stream's delivery while a stream of a later generation still sends the task does not count: the
        process abandoned the stale one, and the later copy decides."""
        senders = handle.sender_generations
        if senders:
            senders.remove(generation if generation in senders else min(senders))
        if delivered and generation is not None and any(g > generation for g in senders):
            # a stale stream finished, but the process abandoned it and a newer poll is sending the task
            # again: that copy decides (counting this one would take the task off the queue, and if the new
            # copy broke too, nothing would send it again until its inactivity timeout)
            delivered = False
        if delivered and not handle.done():
            handle.mark_delivered(instance_id)
            queue = self._queues.get(handle.node_id)
            if queue and handle in queue:
                queue.remove(handle)
        elif not handle.done():
            self._wakeup(handle.node_id).set()  # let another poll pick it up

    def result_offered(self, task_id: str, node_id: str, instance_id: str) -> None:
        """An UploadResult header of ``node_id``'s process ``instance_id`` names ``task_id`` (call it before
        anything may refuse that header). If the open task was delivered to that very process, the process
        plainly got it, whatever becomes of this upload: the handle is flagged (``result_offered``) and
        :meth:`requeue_lost` never sends it again. Otherwise (unknown, closed, another node's or process's
        task, a call naming no process) nothing happens: the upload's own checks refuse what must be."""
        handle = self._open.get(task_id)
        if handle is not None and instance_id and handle.node_id == node_id and handle.delivered_to == instance_id:
            handle.result_offered = True

    def requeue_lost(self, node_id: str, instance_id: str, held: Collection[str]) -> list[TaskHandle]:
        """A poll of ``node_id``'s process ``instance_id`` reports the ids of the tasks it holds (``held``:
        received whole or being received, result not yet acknowledged; the process sends this only once
        every earlier poll stream of it has ended or been abandoned). Every task delivered to that process
        (RUNNING, ``delivered_to`` it: its last chunk went out and its stream ended) that ``held`` does not
        name went whole into a dead connection: back on the node's queue in dispatch order, to be sent
        again from offset 0. Returned; none for an empty ``instance_id`` (a process the server cannot tell
        from another). A task whose upload has begun (UPLOADING), or whose upload header came from that
        process (``result_offered``: a result refused on its header, which the process then gave up), is the
        node's and never sent again: the node would compute a result the server refuses again, and again."""
        if not instance_id:
            return []
        lost = [h for h in self.open_tasks(node_id)
                if h.state is TaskState.RUNNING and h.delivered_to == instance_id and not h.result_offered
                and h.task_id not in held]
        queue = self._queues.setdefault(node_id, [])
        for handle in lost:
            delivered_at = handle.delivered_at or time.monotonic()
            log.warning("task %s: node %s (instance %s) polls without it among the %d task(s) it holds, %.1f s "
                        "after its last chunk went out: the payload went into a dead connection; sending it "
                        "again from offset 0", handle.task_id, node_id, instance_id, len(held),
                        time.monotonic() - delivered_at)
            handle.requeue()
            later = [i for i, queued in enumerate(queue) if queued.dispatched_at > handle.dispatched_at]
            queue.insert(later[0] if later else len(queue), handle)
        if lost:
            self._wakeup(node_id).set()
        return lost

    def stop(self) -> None:
        """Make every waiting poll return None now (the server is shutting down)."""
        self.stopping = True
        for event in self._wakeups.values():
            event.set()
        for timer in self._watches.values():
            timer.cancel()
        self._watches.clear()


def clock_text(wall: float) -> str:
    """Local wall-clock time ``HH:MM:SS.mmm`` of ``wall`` (Unix seconds), for error messages."""
    return time.strftime("%H:%M:%S", time.localtime(wall)) + f".{int(wall % 1 * 1000):03d}"
