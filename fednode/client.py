"""``NodeClient``: the node's loop — register, long-poll, download, run the handler, upload, reconnect.

One session per connection::

    Register ─▶ deliver a pending result ─▶ loop { PollTask ─▶ download ─▶ handler (thread) ─▶ UploadResult }

With ``receive_window_bytes="auto"`` a few Heartbeats after Register time the round trip, and the session
moves to a fresh channel when that calls for another download window (:mod:`fednode.receive_window`).
Anything retrying can fix (server down, restarted, network cut, a stream silent for too long) ends the
session, except a unary call refused ERROR_REASON_UNKNOWN_NODE (a server restarted while a task ran): its
connection registers again and retries it (:class:`fednode.transport.NodeConnection`), the task's heartbeats
going on; the client waits ``uniform(0, min(30, 0.5·2ⁿ))`` seconds (full jitter, :class:`BackoffPolicy`)
and starts a new one on a fresh channel. Transfers survive: a broken download resumes from the bytes
already assembled, a broken upload from the offset ``GetUploadStatus`` acknowledges (0 after a server
restart: start over). A ServerShutdown waits ``retry_after`` instead; a poll the server ends with ABORTED is
made again at once (once in a row; then as a lost connection). A task of a kind this node does not know (a newer
server's) is answered REFUSED without downloading it, not taken for a malformed stream. A refusal of one task (closed, unknown,
not ours: a round cancelled it while it downloads) drops that task and polls again, and so does a task the
server closes while it runs or while its result waits for upload room (a heartbeat answers ``task_state``
CLOSED or UNKNOWN, or a Report is refused for it: training stops at its next batch, nothing is uploaded);
a result refused for itself (too large, malformed, the server still busy after retries) is replaced by a
FAILED report naming the refusal, so the round counts the task at once (also when grpc.aio hid the refusal behind a local
INTERNAL, grpc/grpc#36066: ``GetUploadStatus`` names it). A refusal that ends the node
(:func:`fednode.transport.fatal_refusal`: bad token, another protocol major version, a newer process of
this node registered) ends :meth:`NodeClient.run` with the error. Refusals are told apart by the server's
error reason (docs/protocol.md §7), by the status code when it sends none.

The client owns one part per job: receiving a polled task's payload (resumable downloads,
:class:`fednode.task_reception.TaskReception`), running it (the handler in a worker thread, its reports and
heartbeats meanwhile, :class:`fednode.task_execution.TaskExecution`) and delivering its result (resume,
busy retries, FAILED reports in place of refused results, :class:`fednode.result_delivery.ResultDelivery`);
it hands them its stop.

The client holds no global state and starts no thread of its own besides the handler's worker (from the
loop's default executor unless one is injected), so hundreds of clients can share one event loop.
Downloads are received into buffers from the client's own :class:`~fedcore.framing.BufferPool`
(``config.receive_pool_bytes``): the next task's payload reuses the memory of the previous one once
nothing references it, instead of faulting in fresh pages every round.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import secrets
from collections.abc import Awaitable, Iterable
from concurrent.futures import Executor
from typing import TypeVar

import grpc

from fedcore.errors import (
    ConnectionLostError,
    FramingError,
    MessageError,
    NodeError,
    ServerRefusedError,
)
from fedcore.framing import BufferPool
from fedcore.framing.memory import keep_chunk_memory, return_free_heap
from fedcore.wire import (
    DatasetInfo,
    NodeRegistration,
    ServerSettings,
    ShutdownNotice,
    TaskDescriptor,
    convert,
)
from fedcore.wire.flow_control import AUTO_WINDOW
from fednode.config import NodeConfig
from fednode.handler import TaskHandler
from fednode.log_text import log_text
from fednode.receive_window import auto_window, measure_rtt
from fednode.receive_window import describe as describe_window
from fednode.result_delivery import ResultDelivery
from fednode.task_execution import TaskExecution
from fednode.task_reception import PolledTask, TaskReception
from fednode.transfers import PendingUpload
from fednode.transport import (
    EOF,
    REGISTER_HINT,
    NodeConnection,
    UnknownKindTask,
    check_request_size,
    fatal_refusal,
    send_limit,
    task_refusal,
)

log = logging.getLogger(__name__)
#: Call codes of a connection that ended (server restarted or stopped, link cut): the first of a run of them is
#: logged at INFO, later ones (the server stays away) at WARNING.
_CONNECTION_ENDED = frozenset({grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE})

T = TypeVar("T")
CLIENT_VERSION = "fednode/0.1.0"


class ClientState(str, enum.Enum):
    """What the client is doing; read :attr:`NodeClient.state` for monitoring and tests."""

    CREATED = "created"
    CONNECTING = "connecting"  # opening a channel and registering
    WAITING = "waiting"  # backing off before the next connection attempt
    POLLING = "polling"
    DOWNLOADING = "downloading"
    RUNNING = "running"  # the handler is working on a task
    UPLOADING = "uploading"
    STOPPED = "stopped"


class _StopRequested(Exception):
    """Internal: stop() was called; unwinds the session to run()."""


class _Reconnect(Exception):
    """Internal: the server asked us to come back later (ServerShutdown)."""

    def __init__(self, delay: float, reason: str) -> None:
        super().__init__(reason)
        self.delay = delay


class NodeClient:
    """Serves one node's tasks until :meth:`stop`; see the module docstring for the lifecycle.

    ``datasets`` and ``capabilities`` are announced at every Register, with one random ``instance_id``
    (128 bits, hex) drawn per client: the server tells a reconnect of this client (same id: its tasks go
    on) from a restarted node (another id: the tasks sent to the earlier client end at once).
    ``executor`` runs the handler (default: the loop's default executor); ``rng`` drives the backoff
    jitter (seed it in tests). A Register over the node's own limit on one gRPC message (``upload_chunk_size``
    + 64 KiB) is a NodeConfigError here, naming its size; one over the server's limit ends :meth:`run` with a
    ServerRefusedError saying so (:func:`fednode.transport.too_large`).
    """

    def __init__(self, config: NodeConfig, handler: TaskHandler, datasets: Iterable[DatasetInfo] = (),
                 capabilities: Iterable[str] = (), *, executor: Executor | None = None,
                 rng: random.Random | None = None) -> None:
        self.config = config
        self.registration = NodeRegistration(config.node_name, tuple(datasets), tuple(capabilities),
                                             CLIENT_VERSION, instance_id=secrets.token_hex(16))
        # a Register this node cannot send fails now, naming its size, not at every connection
        check_request_size(convert.registration_to_pb(self.registration), "Register", send_limit(config),
                           REGISTER_HINT)
        self._token = config.resolve_token()  # a missing token file fails now, not at the first call
        self._rng = rng if rng is not None else random.Random()
        self._execution = TaskExecution(config, handler, executor, lambda: self.stopping)
        self._delivery = ResultDelivery(config, self._stoppable, self._rng)
        self.state = ClientState.CREATED
        self.node_id: str | None = None
        self.settings: ServerSettings | None = None
        self.sessions = 0  # successful registrations
        self._stop = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._upload: PendingUpload | None = None
        self._attempt = 0  # consecutive failed sessions, for the backoff
        self._poll_aborted = False  # the last poll ended ABORTED (polled again at once; a second one reconnects)
        #: PollTasks this client (one node process, one instance id) has sent, over all its connections: the
        #: next one carries this + 1 (PollTaskRequest.poll_sequence), so the server refuses a late poll of an
        #: abandoned connection (ERROR_REASON_STALE_POLL) instead of acting on its older held_task_ids.
        self.polls_sent = 0
        #: Download buffers kept between tasks (see NodeConfig.receive_pool_bytes; 0: a fresh one every task).
        self.receive_pool = BufferPool(config.receive_pool_bytes)
        self._reception = TaskReception(config, self.receive_pool)
        #: Download window of the current channel (bytes fixed, None: probing) and, under "auto", the
        #: round-trip time it was chosen from (seconds; None before the first measurement).
        self.receive_window: int | None = config.initial_receive_window()
        self.link_rtt: float | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask :meth:`run` to return (safe from any thread and from signal handlers).

        A poll or a download is abandoned at once; a running task and then its result's upload have
        ``config.stop_grace_seconds`` in all; past them the handler sees ``reporter.stop_requested`` and is
        waited for (:mod:`fednode.task_execution`, "Stopping"), then the client returns.
        """
        self._execution.request_stop()
        loop = self._loop
        try:
            current = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        if loop is None or current is loop or not loop.is_running():
            self._stop.set()
        else:
            loop.call_soon_threadsafe(self._stop.set)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def results_delivered(self) -> int:
        """Results (and FAILED reports in their place) the server has acknowledged."""
        return self._delivery.delivered

    async def run(self) -> None:
        """Serve until :meth:`stop` (once per client). Raises ServerRefusedError or VersionMismatchError
        when the server refuses this node: retrying cannot fix a bad token or another protocol version, and
        a poll superseded by a newer process of this node (:func:`fednode.transport.superseded`) means that
        process serves the node now."""
        if self._loop is not None:
            raise NodeError("NodeClient.run() was already called; create one client per run")
        self._loop = asyncio.get_running_loop()
        # chunk-sized blocks reused, not trimmed and refaulted per chunk; handlers run under compute_memory,
        # thresholds high enough for torch's per-step tensors (fedcore.framing.memory)
        keep_chunk_memory(self.config.upload_chunk_size)
        name = self.config.node_name
        try:
            while True:
                try:
                    await self._session()
                except _StopRequested:
                    return
                except _Reconnect as notice:
                    delay = notice.delay
                    log.info("%s: server shutting down (%s); reconnecting in %.2f s", name, log_text(notice), delay)
                except (ConnectionLostError, MessageError, FramingError) as exc:
                    delay = self.config.backoff.delay(self._attempt, self._rng)
                    self._attempt += 1
                    if self._attempt == 1 and getattr(exc, "code", None) in _CONNECTION_ENDED:
                        # the usual sign of a server that restarted or stopped: worth a warning only if it lasts
                        log.info("%s: connection to the server ended (%s); reconnecting in %.2f s", name,
                                 log_text(exc), delay)
                    else:
                        log.warning("%s: %s; reconnecting in %.2f s (attempt %d)", name, log_text(exc), delay,
                                    self._attempt)
                self.state = ClientState.WAITING
                try:
                    await self._stoppable(asyncio.sleep(delay))
                except _StopRequested:
                    return
        finally:
            self.state = ClientState.STOPPED

    async def _stoppable(self, awaitable: Awaitable[T], grace: float = 0.0, *, reply: bool = False) -> T:
        """Await ``awaitable`` unless stop() comes first (then allow ``grace`` more seconds, then cancel). A task's
        ``reply`` (its upload) gets what is left of the stop grace instead, at least the stopped task's reply
        window (:data:`fednode.task_execution.STOPPED_REPORT_SECONDS`), even with a stop grace of 0."""
        task = asyncio.ensure_future(awaitable)
        stopper = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
            grace = self._execution.grace_left(grace) if grace > 0 or reply else 0.0  # one grace: task and upload
            if not task.done() and grace > 0:
                await asyncio.wait({task}, timeout=grace)
            if task.done():
                return task.result()
            raise _StopRequested
        finally:
            stopper.cancel()
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            # an exception re-raised here holds this frame, and the task holds the exception: without this
            # cycle it dies with its handler, and with it whatever its frames hold (a partial download)
            del task

    # -- one connection ------------------------------------------------------------------------
    async def _session(self) -> None:
        self.state = ClientState.CONNECTING
        conn = self._connect()
        try:
            settings = await self._stoppable(conn.register(self.registration))
            if self.config.receive_window_bytes == AUTO_WINDOW:
                conn = await self._fit_receive_window(conn, settings)
            await self._deliver(conn)
            while True:
                self.state = ClientState.POLLING
                polled = await self._stoppable(self._poll(conn))
                if not self._poll_aborted:
                    self._attempt = 0  # the server answered a poll: the connection works
                if polled is None:
                    continue
                self._upload = polled.early_reply or await self._execute(conn, polled)
                polled = None  # drop the payload buffer now: the next task may reuse it (receive_pool)
                await self._deliver(conn)
                return_free_heap()  # the task's freed chunks and tensors, kept by keep_chunk_memory, until next round
        finally:
            await conn.close(None)

    def _connect(self) -> NodeConnection:
        return NodeConnection(self.config, self._token, self.registration.instance_id,
                              receive_window=self.receive_window, registration=self.registration,
                              on_register=self._registered)

    def _registered(self, settings: ServerSettings, again: bool) -> None:
        """A Register of this process succeeded: the session's, or one its connection made by itself after a
        call was refused ERROR_REASON_UNKNOWN_NODE (``again``: the server restarted while a task ran, so no
        stream broke; the task's heartbeats and reports go on, and the restarted server, which knows no such
        task, answers them so that the handler stops and the node polls for its next task)."""
        self.settings, self.node_id = settings, settings.node_id
        self.sessions += 1
        if again:
            log.warning("%s: registered again as %s: the server no longer knew this node (it restarted?)",
                        self.config.node_name, settings.node_id)
        else:
            log.info("%s: registered as %s", self.config.node_name, settings.node_id)

    async def _fit_receive_window(self, conn: NodeConnection, settings: ServerSettings) -> NodeConnection:
        """Measure the round-trip time and, if "auto" wants another window than ``conn``'s, move to a fresh
        channel that has it (a channel's window is fixed when it is created; registration is per process,
        not per channel, so the new one needs no Register)."""
        self.link_rtt = await self._stoppable(measure_rtt(conn.heartbeat))
        window = auto_window(self.link_rtt, settings.task_chunk_size)
        if window == conn.receive_window:
            return conn
        log.info("%s: round trip %.2f ms, %s bytes per task chunk: download window %s (was %s)",
                 self.config.node_name, self.link_rtt * 1e3, settings.task_chunk_size or "unannounced",
                 describe_window(window), describe_window(conn.receive_window))
        self.receive_window = window
        await conn.close(None)  # first: cancelled here, the session's cleanup closes it again, nothing leaks
        return self._connect()

    def _poll_wait(self) -> float:
        cap = self.settings.max_poll_wait_seconds if self.settings else 0.0
        return min(self.config.poll_wait_seconds, cap) if cap > 0 else self.config.poll_wait_seconds

    async def _poll(self, conn: NodeConnection) -> PolledTask | None:
        """One long poll: a downloaded task (or a reply refusing it), or None to poll again: NoTask, a task
        the server refused (:meth:`_drop_refused_task`), or a poll it ended with ABORTED."""
        resume_id, resume_offset = self._reception.resume_point()
        wait = self._poll_wait()
        self.polls_sent += 1
        stream = conn.poll(wait, resume_id, resume_offset, held_task_ids=self._held_task_ids(resume_id),
                           poll_sequence=self.polls_sent)
        task_id = resume_id  # the task this poll is about, once known
        try:
            event = await stream.next(wait + self.config.call_timeout_seconds)
            if isinstance(event, ShutdownNotice):
                jitter = self._rng.uniform(0.0, self.config.backoff.initial)
                raise _Reconnect(event.retry_after_seconds + jitter, event.reason or "no reason given")
            if event is None:
                polled = None
            elif isinstance(event, TaskDescriptor):
                task_id = event.task_id
                self.state = ClientState.DOWNLOADING
                polled = await self._reception.receive(stream, event)
            elif isinstance(event, UnknownKindTask):  # refused at once (not downloaded), never a reconnect loop
                log.warning("%s: refusing task %s: %s", self.config.node_name, event.task_id, log_text(event.refusal))
                polled = PolledTask(None, early_reply=PendingUpload.refused(event.task_id, event.refusal))
            else:
                what = "end of stream" if event is EOF else f"a chunk at offset {event[0]}"
                raise MessageError(f"PollTask sent {what} before any task header")
        except ServerRefusedError as exc:
            if not self._drop_refused_task(exc, task_id):
                raise
            return None
        except ConnectionLostError as exc:
            # ABORTED: the server ended this poll and asks for another (e.g. ERROR_REASON_STALE_POLL: this call is
            # dead, never a reason to stop or drop a task); a partial download stays and resumes. A second one in
            # a row reconnects, with backoff.
            if exc.code != grpc.StatusCode.ABORTED or self._poll_aborted:
                raise
            self._poll_aborted = True
            log.info("%s: %s; polling again", self.config.node_name, log_text(exc))
            return None
        finally:
            stream.cancel()
        self._poll_aborted = False
        return polled

    def _held_task_ids(self, resume_id: str) -> list[str]:
        """What this process holds as it polls (PollTaskRequest.held_task_ids, docs/protocol.md §5 "Tasks lost
        in a dead connection"): the download it resumes, and a result not yet acknowledged (none in practice:
        the session delivers it before it polls). A partial download it does not resume is not held: the
        server may send that task again. The promise that goes with the list holds: a poll starts only after
        the previous poll stream was read to its end or cancelled (:meth:`_poll`), never during a download,
        and a completed download was read to the stream's end before its task runs."""
        held = [resume_id] if resume_id else []
        if self._upload is not None:
            held.append(self._upload.task_id)
        return held

    def _drop_refused_task(self, exc: ServerRefusedError, task_id: str) -> bool:
        """Whether a poll's refusal ends only the download of ``task_id`` (being resumed or downloaded; ""
        before any): the task is gone (:func:`fednode.transport.task_refusal`: closed, unknown, not ours) or
        the server cannot resume it there (INVALID_ARGUMENT: a bad offset, another payload). Then its
        partial download is dropped (its buffer goes back to the receive pool) and the node polls again. A
        refusal that ends the node (:func:`fednode.transport.fatal_refusal`: superseded, bad identity,
        protocol version), or any refusal of a fresh poll before a task header, does not."""
        if not task_id or fatal_refusal(exc):
            return False
        if not (task_refusal(exc) or exc.code == grpc.StatusCode.INVALID_ARGUMENT):
            return False
        self._reception.drop()
        log.info("%s: task %s dropped, the server refused it: %s; polling again", self.config.node_name, task_id,
                 log_text(exc.details or exc))
        return True

    # -- running a task -----------------------------------------------------------------------
    async def _execute(self, conn: NodeConnection, polled: PolledTask) -> PendingUpload | None:
        """Run a downloaded task (:class:`fednode.task_execution.TaskExecution`: the handler in a worker thread,
        its reports and heartbeats sent meanwhile); the result to deliver, or None when the server closed the
        task meanwhile (nothing is uploaded, the task is no longer held: the next poll does not name it)."""
        self.state = ClientState.RUNNING
        assert polled.buffer is not None  # a PolledTask without an early reply holds the verified payload
        return await self._execution.run(conn, polled.descriptor, polled.buffer, self.settings)

    # -- delivering a result --------------------------------------------------------------------
    async def _deliver(self, conn: NodeConnection) -> None:
        """Send the pending result, resuming where the server stands. A result the server refuses is dropped;
        when the refusal leaves its task open (:class:`fednode.result_delivery.ResultDelivery`: too large,
        malformed, misframed, busy past ``busy_upload_retry_seconds``), the node reports the task FAILED in
        its place, naming the refusal, so the round counts it at once (the server never sends the task
        again: it knows this process got it, docs/protocol.md §5)."""
        while self._upload is not None:
            self.state = ClientState.UPLOADING
            # on an exception (connection lost, stop) _upload stays: the next session delivers it
            self._upload = await self._delivery.deliver(conn, self._upload, self.settings)
