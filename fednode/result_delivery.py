"""``ResultDelivery``: how a node process hands one task's result to the server.

Resume where the server stands (``GetUploadStatus`` after an interrupted attempt), retry in place while the
server is busy with other uploads (ERROR_REASON_UPLOADS_BUSY) for up to ``NodeConfig.busy_upload_retry_seconds``,
and replace a result the server refuses for itself (too large, malformed, misframed, still busy after that
window) by a FAILED report naming the refusal, so the round counts the task at once instead of waiting for
its inactivity timeout (the server never sends such a task again: docs/protocol.md §4 step 4, §5).

A result refused ERROR_REASON_UPLOAD_QUEUED (it waited the server's longest in an upload line that moved
meanwhile; its place is kept) is uploaded again at once, after a jitter of at most
:data:`QUEUED_JITTER_SECONDS`: no backoff, no heartbeat (the server counts the task active while it waits in
line), and it does not count toward the busy window; it ends a run of busy refusals instead (the line moved,
so the window starts afresh at the next busy one). The line is oldest first and keeps the place, so each wait
brings the turn nearer; once the task ends the next upload is refused for the task (TASK_CLOSED, ...), which
drops the result, and stop() ends the retries too. As a defence against a server whose line never lets the
result in, queued retries are bounded by ``NodeConfig.queued_upload_retry_seconds`` (1800 s by default, from
the first queued refusal): past it the result is given up and reported FAILED naming the refusal, as after
the busy window.

Busy is time-bound, not count-bound: a busy server's buffers may be held by *parked* uploads (interrupted,
kept for their resume) that free only when their task ends, up to the server's reconnect grace after their
node went away. A fixed number of jittered attempts can end well before that and lose a good result; the
window outlasts it (see the field's docstring in :class:`fednode.config.NodeConfig`). A busy refusal is no
activity on the server, so while it waits the node says the task is alive: a ``Heartbeat`` naming it when the
wait starts and then at least every heartbeat interval the server announced (docs/protocol.md §4 step 3), the
wait cut into slices of that interval; otherwise a wait longer than the task's inactivity timeout (a backoff
ceiling is 30 s) would lose a good result although the node is alive and retrying. A heartbeat that fails is
no reason to stop waiting. The heartbeat's answer also says where the task stands (``task_state``): CLOSED
(its round is over, it timed out, it was cancelled) or UNKNOWN (the server knows no such task for this node)
ends the wait at once and drops the result, exactly as an upload refused for its task (TASK_CLOSED, ...)
does, instead of letting the wait run to its end for an upload the server would refuse. A heartbeat refused
for its task (no server of this protocol does: a heartbeat is never refused for its task; kept for servers
that did) ends the wait the same way; a server older than ``task_state`` (UNSPECIFIED) leaves the wait going,
and the next upload is refused for the task.

Every wait goes through the client's ``stoppable`` (its stop() ends it); connection failures propagate to
the client, which reconnects and delivers again in its next session.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from fedcore.errors import ConnectionLostError, NodeError, ServerRefusedError
from fedcore.wire import ServerSettings
from fednode.config import NodeConfig
from fednode.log_text import log_text
from fednode.transfers import PendingUpload
from fednode.transport import (
    BAD_RESULT_REASON,
    BUSY_REASON,
    QUEUED_REASON,
    NodeConnection,
    fatal_refusal,
    task_refusal,
)

#: A child of the client's logger: delivering results is part of the node's loop, and a level or filter set on
#: ``fednode.client`` (an operator's, a test's) covers it too.
log = logging.getLogger("fednode.client.delivery")

#: Longest pause before uploading again a result refused ERROR_REASON_UPLOAD_QUEUED, seconds (uniform jitter
#: from 0: the nodes refused together do not call back in the same instant).
QUEUED_JITTER_SECONDS = 0.1

#: Awaits an awaitable unless the client is asked to stop first (then allows ``grace`` more seconds).
Stoppable = Callable[..., Awaitable[Any]]


class ResultDelivery:
    """Delivers pending results over the client's connections; counts the ones the server acknowledged.

    ``stoppable(awaitable, grace=0.0, reply=False)`` is the client's wait that stop() interrupts (``reply``: an
    upload, which gets what is left of the stop grace); ``rng`` drives the backoff jitter; ``clock``
    (``time.monotonic``) measures the busy window.
    """

    def __init__(self, config: NodeConfig, stoppable: Stoppable, rng: random.Random,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._stoppable = stoppable
        self._rng = rng
        self._clock = clock
        self.delivered = 0  # results (and FAILED reports) the server acknowledged

    async def deliver(self, conn: NodeConnection, upload: PendingUpload,
                      settings: ServerSettings | None) -> PendingUpload | None:
        """Deliver ``upload``, retrying in place while the server is busy; what is left to deliver: None, or
        the FAILED report that replaces a refused result. Busy refusals are retried with the client's backoff
        (each wait cut to what is left of the window) while they have lasted less than
        ``busy_upload_retry_seconds`` since the first of a run; then the result is given up. A queued refusal
        is uploaded again at once (a jitter) and ends a run of busy refusals, while the queued refusals have
        lasted less than ``queued_upload_retry_seconds`` since the first; then the result is given up too."""
        cfg = self.config
        attempts, busy_since, queued, queued_since = 0, None, 0, None
        while True:
            try:
                await self._stoppable(self._send(conn, upload), grace=cfg.stop_grace_seconds, reply=True)
            except ServerRefusedError as exc:
                if fatal_refusal(exc):  # e.g. a newer process of this node registered: it serves the node now
                    raise
                if exc.reason == QUEUED_REASON:  # waited its longest in a moving line: the place is kept
                    queued += 1
                    attempts, busy_since = 0, None  # the line moved: not busy, a busy run starts afresh
                    now = self._clock()
                    queued_since = now if queued_since is None else queued_since
                    if now - queued_since >= cfg.queued_upload_retry_seconds:  # a line that never lets it in
                        return self._after_refusal(upload, exc, busy=(queued, now - queued_since))
                    delay = self._rng.uniform(0.0, QUEUED_JITTER_SECONDS)
                    log.info("%s: result of task %s still queued on the server after %d wait%s in line (%s); "
                             "uploading again in %.2f s", cfg.node_name, upload.task_id, queued,
                             "s" if queued != 1 else "", log_text(exc.details), delay)
                    await self._stoppable(asyncio.sleep(delay))
                    continue
                attempts += 1
                if not self._server_busy(exc, upload, settings):
                    return self._after_refusal(upload, exc)
                now = self._clock()
                busy_since = now if busy_since is None else busy_since
                left = cfg.busy_upload_retry_seconds - (now - busy_since)
                if left <= 0:
                    return self._after_refusal(upload, exc, busy=(attempts, now - busy_since))
                delay = min(cfg.backoff.delay(attempts - 1, self._rng), left)
                log.info("%s: server busy with other uploads (%s); retrying task %s in %.2f s (%.0f s left to "
                         "wait)", cfg.node_name, log_text(exc.details), upload.task_id, delay, left)
                gone = await self._wait_busy(conn, upload.task_id, delay, self.config.heartbeat_interval(settings))
                if gone is not None:  # the task is closed: its result would be refused, as after TASK_CLOSED
                    log.warning("%s: result of task %s dropped: %s", cfg.node_name, upload.task_id, log_text(gone))
                    return None
                continue
            self.delivered += 1
            return None

    async def _wait_busy(self, conn: NodeConnection, task_id: str, delay: float, interval: float) -> str | None:
        """Wait ``delay`` seconds before the next attempt of a busy upload, in slices of at most ``interval``
        seconds with a Heartbeat naming the task before each: waiting for room is not inactivity. Each slice
        goes through ``stoppable`` (stop() ends the wait at once). Returns why the task is gone as soon as a
        heartbeat says so (:meth:`_heartbeat`), else None once the delay is over."""
        left = delay
        while True:
            gone = await self._heartbeat(conn, task_id)
            if gone is not None or left <= 0:
                return gone
            step = min(interval, left)
            await self._stoppable(asyncio.sleep(step))
            left -= step
            if left <= 0:
                return None  # the upload attempt follows at once; the next wait starts with a heartbeat

    async def _heartbeat(self, conn: NodeConnection, task_id: str) -> str | None:
        """One Heartbeat naming ``task_id`` during a busy wait; why the task is gone when the answer's
        ``task_state`` is CLOSED or UNKNOWN, or the call was refused for the task
        (:func:`fednode.transport.task_refusal`), else None. A refusal of the node
        (:func:`fednode.transport.fatal_refusal`) propagates; any other failure is logged and the wait goes on
        (the next upload attempt meets a broken connection and reconnects)."""
        try:
            answer = await self._stoppable(conn.heartbeat(task_id))
            if answer.task_state.gone:
                return f"closed by the server (a heartbeat answered task_state {answer.task_state.name})"
        except ServerRefusedError as exc:
            if fatal_refusal(exc):
                raise
            if task_refusal(exc):
                return str(exc)
            log.info("%s: heartbeat for task %s refused (%s); still waiting for upload room", self.config.node_name,
                     task_id, log_text(exc))
        except NodeError as exc:
            log.info("%s: heartbeat for task %s failed (%s); still waiting for upload room", self.config.node_name,
                     task_id, log_text(exc))
        return None

    def _after_refusal(self, upload: PendingUpload, exc: ServerRefusedError,
                       busy: tuple[int, float] | None = None) -> PendingUpload | None:
        """Drop a refused result; return the FAILED report to send in its place when the refusal leaves the
        task open on the server: a result refused for itself (too large, malformed, misframed, or the server
        still busy or queued, ``busy`` = (attempts, seconds) spent retrying), as opposed to a task the refusal ends
        (closed, unknown, not ours: :func:`fednode.transport.task_refusal`; a result document that does not
        decode, which ends it FAILED). Left open, the task would wait for its inactivity timeout, since the
        server never sends it again. A refused FAILED or REFUSED report is only dropped (nothing smaller)."""
        name = self.config.node_name
        if upload.payload is None or task_refusal(exc) or exc.reason == BAD_RESULT_REASON:
            log.warning("%s: result of task %s dropped: %s", name, upload.task_id, log_text(exc))
            return None
        refusal = exc.reason or getattr(exc.code, "name", "no status code")
        after = ""
        if busy is not None:
            attempts, seconds = busy
            after = f" after {attempts} attempt{'s' if attempts != 1 else ''} over {seconds:.1f} s"
        log.warning("%s: result of task %s dropped%s: %s; reporting the task FAILED", name, upload.task_id, after,
                    log_text(exc))
        return PendingUpload.failed(upload.task_id, f"the server refused the result of {upload.total_size} bytes"
                                                    f"{after} ({refusal}): {exc.details}")

    @staticmethod
    def _server_busy(exc: ServerRefusedError, upload: PendingUpload, settings: ServerSettings | None) -> bool:
        """Whether the upload was refused for "no upload buffer free now" (ERROR_REASON_UPLOADS_BUSY): worth
        retrying later, unlike a payload over max_payload_size. From a server without reasons:
        RESOURCE_EXHAUSTED for a result within the announced limits (docs/protocol.md §7)."""
        if exc.reason:
            return exc.reason == BUSY_REASON
        if exc.code != grpc.StatusCode.RESOURCE_EXHAUSTED:
            return False
        limit = settings.max_payload_size if settings else 0
        return limit == 0 or upload.total_size <= limit

    async def _send(self, conn: NodeConnection, upload: PendingUpload) -> None:
        name = self.config.node_name
        start = 0
        if upload.attempted:
            status = await conn.upload_status(upload.task_id)
            if status.complete:
                return
            if upload.valid_offset(status.acknowledged_offset):
                start = status.acknowledged_offset
            log.info("%s: resuming the upload of task %s at byte %d of %d", name, upload.task_id, start,
                     upload.total_size)
        upload.attempted = True
        try:
            await conn.upload(upload.descriptor(start), upload.chunks(start), self.config.idle_stream_timeout_seconds)
        except ConnectionLostError as exc:
            if exc.code != grpc.StatusCode.INTERNAL or exc.reason:
                raise
            # INTERNAL without a reason is gRPC's own: grpc.aio reports a server that ends the upload while we
            # still write chunks (a refusal) as INTERNAL "Internal error from Core", losing the server's status
            # (grpc/grpc#36066). The task's state on the server tells a refused task (closed, superseded, ...:
            # GetUploadStatus raises that refusal), a result refused for itself (too large, busy, misframed,
            # malformed: GetUploadStatus names it in refused_reason, handled as if it came with its trailer)
            # and a broken stream (reconnect and resume, as before).
            log.info("%s: upload of task %s ended with %s; asking the server where it stands", name,
                     upload.task_id, log_text(exc))
            status = await conn.upload_status(upload.task_id)
            if status.complete:
                return
            if status.refused_reason:
                raise ServerRefusedError(
                    f"UploadResult refused by the server with {status.refused_reason} (told by GetUploadStatus; "
                    f"the call itself failed with {exc}): {status.refused_message}",
                    exc.code, status.refused_message, status.refused_reason) from None
            raise
