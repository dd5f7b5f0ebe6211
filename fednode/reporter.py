"""Progress and log events of a running task: collected from the handler's thread, sent in batches.

The handler runs in a worker thread and calls :class:`Reporter` freely (it is thread-safe and never
blocks on the network). :class:`ReportPump`, a coroutine on the client's event loop, drains the reporter
at most every ``interval`` seconds into one Report call, sends a Heartbeat when nothing was sent for
``heartbeat_interval`` seconds, and flushes once more when the task ends. A failed send is logged and
dropped: losing a progress line must never fail the training it describes.

The pump also learns when the server has closed the task: a Heartbeat answering ``task_state`` CLOSED or
UNKNOWN, or a Report refused for its task (:func:`fednode.transport.task_refusal`: closed, unknown, not
ours). It then cancels the reporter (:meth:`Reporter.cancel`): the handler sees ``cancelled`` (training stops
at its next batch) and the node uploads nothing for the task. From then on it sends nothing more for it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from fedcore.errors import MessageError, NodeError, ServerRefusedError
from fedcore.event_wait import wait_event
from fedcore.wire import HeartbeatAnswer, LogLine, ReportEvent, TrainingProgress
from fednode.log_text import log_text
from fednode.transport import fatal_refusal, task_refusal

log = logging.getLogger(__name__)


class Reporter:
    """Thread-safe sink of one task's events; keeps at most ``max_pending`` (oldest dropped first)."""

    def __init__(self, task_id: str, *, max_pending: int = 10_000) -> None:
        self.task_id = task_id
        self._lock = threading.Lock()
        self._items: deque[ReportEvent] = deque(maxlen=max_pending)
        self._stop = threading.Event()
        self._cancel_reason: str | None = None  # set once, under the lock, by cancel()
        self._stop_reason: str | None = None  # set once, under the lock, by request_stop()
        self.dropped = 0  # events lost because the buffer was full
        self.refused = 0  # progress events not sent: the server would refuse them (progress())

    def progress(self, progress: Any) -> None:
        """Record training progress: a :class:`fedcore.wire.TrainingProgress` or anything with its fields
        (e.g. a plan's ``fedcore.plans.TrainingProgress``, so this method is a valid progress callback).
        ``epoch`` None (a ``num_updates`` run) is sent as 0, ``loss`` None as NaN (not known).

        Never raises: progress the server would refuse (a negative count, ``iteration`` over
        ``total_iterations``, an infinite loss: :class:`fedcore.wire.TrainingProgress`) is dropped and counted
        in :attr:`refused`, with one warning per task naming the problem. A plan's miscounting must not fail
        the training it describes, nor, sent, have its whole Report refused."""
        if not isinstance(progress, TrainingProgress):
            try:
                loss = getattr(progress, "loss", math.nan)
                progress = TrainingProgress(
                    epoch=int(getattr(progress, "epoch", None) or 0),
                    iteration=int(progress.iteration), total_iterations=int(progress.total_iterations),
                    num_samples=int(getattr(progress, "num_samples", 0)),
                    num_samples_max=int(getattr(progress, "num_samples_max", 0)),
                    loss=math.nan if loss is None else float(loss))
            except (MessageError, TypeError, ValueError, AttributeError, OverflowError) as exc:
                self._refuse(progress, exc)
                return
        self._append(ReportEvent(time.time(), progress))

    def log(self, level: str, message: str) -> None:
        """Record a log line; ``level`` is DEBUG, INFO, WARNING or ERROR (else MessageError); long lines are cut."""
        self._append(ReportEvent(time.time(), LogLine(str(level).upper(), str(message))))

    @property
    def stop_requested(self) -> bool:
        """True once the handler should stop: the node is stopping and the task's stop grace ran out
        (:attr:`stop_reason` says so; the handler's reply is still sent), or the task was cancelled
        (:attr:`cancelled`: its reply is dropped)."""
        return self._stop.is_set()

    def request_stop(self, reason: str = "") -> None:
        """Ask the handler to stop (safe from any thread); ``reason`` (the first one is kept) is for its reply."""
        with self._lock:
            if self._stop_reason is None:
                self._stop_reason = str(reason) or "the node is stopping"
        self._stop.set()

    @property
    def stop_reason(self) -> str:
        """Why :meth:`request_stop` was called ("" while it was not; see :attr:`cancel_reason` for a cancel)."""
        return self._stop_reason or ""

    def cancel(self, reason: str) -> None:
        """The server no longer accepts this task's result (``reason`` says why): the handler should give up,
        and whatever it returns is not uploaded. Safe from any thread; the first reason is kept."""
        with self._lock:
            if self._cancel_reason is None:
                self._cancel_reason = str(reason) or "no reason given"
        self._stop.set()

    @property
    def cancelled(self) -> bool:
        """True once :meth:`cancel` was called: the task is closed on the server."""
        return self._cancel_reason is not None

    @property
    def cancel_reason(self) -> str:
        """Why the task was cancelled ("" while it is not)."""
        return self._cancel_reason or ""

    def drain(self) -> list[ReportEvent]:
        """Take every pending event, oldest first."""
        with self._lock:
            items = list(self._items)
            self._items.clear()
        return items

    def _refuse(self, progress: Any, exc: Exception) -> None:
        with self._lock:
            self.refused += 1
            first = self.refused == 1
        if first:
            log.warning("task %s: progress not reported, the server would refuse it (%s: %s); later ones like "
                        "it are dropped quietly", self.task_id, type(exc).__name__, log_text(exc))
        else:
            log.debug("task %s: progress %r not reported: %s", self.task_id, progress, log_text(exc))

    def _append(self, item: ReportEvent) -> None:
        with self._lock:
            if len(self._items) == self._items.maxlen:
                self.dropped += 1
            self._items.append(item)


class ReportPump:
    """Sends a reporter's events while its task runs; :meth:`run` returns after the final flush.

    ``send_report(task_id, items)`` and ``send_heartbeat(task_id)`` are the transport's coroutines;
    they raise :class:`fedcore.errors.NodeError` on failure. ``send_heartbeat`` returns the server's
    :class:`~fedcore.wire.HeartbeatAnswer` (None: nothing known about the task). Either one telling that the
    task is gone cancels the reporter (module docstring).
    """

    def __init__(self, reporter: Reporter, *,
                 send_report: Callable[[str, list[ReportEvent]], Awaitable[None]],
                 send_heartbeat: Callable[[str], Awaitable[HeartbeatAnswer | None]],
                 interval: float, heartbeat_interval: float) -> None:
        self.reporter = reporter
        self._send_report = send_report
        self._send_heartbeat = send_heartbeat
        self.interval = interval
        self.heartbeat_interval = heartbeat_interval
        self.refusals = 0  # Reports the server refused for their events (the first one is logged as a warning)
        self._done = asyncio.Event()

    def finish(self) -> None:
        """Ask :meth:`run` to flush what is left and return."""
        self._done.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        last_contact = loop.time()
        task_id = self.reporter.task_id
        finished = False
        while not finished:
            finished = await wait_event(self._done, self.interval)
            items = self.reporter.drain()
            if self.reporter.cancelled:
                continue  # the server closed the task: nothing more to tell it (the events are dropped)
            call = "Report" if items else "Heartbeat"
            try:
                if items:
                    await self._send_report(task_id, items)
                    last_contact = loop.time()
                elif not finished and loop.time() - last_contact >= self.heartbeat_interval:
                    answer = await self._send_heartbeat(task_id)
                    last_contact = loop.time()
                    if answer is not None and answer.task_state.gone:
                        self._cancel(f"a heartbeat answered task_state {answer.task_state.name}")
            except ServerRefusedError as exc:
                if fatal_refusal(exc):
                    # this process was replaced (NODE_SUPERSEDED) or cannot talk to the server: whatever it
                    # computes would be refused, and the client stops at its next call
                    self._cancel(f"{call} refused, the node cannot go on: {exc.details or exc}")
                elif task_refusal(exc):
                    self._cancel(f"{call} refused for the task: {exc.details or exc}")
                else:  # refused for the events themselves (malformed, too large): this batch only
                    self.refusals += 1
                    log.log(logging.WARNING if self.refusals == 1 else logging.DEBUG,
                            "task %s: %s; %d events dropped", task_id, log_text(exc), len(items))
            except NodeError as exc:
                log.debug("task %s: report not delivered (%s); %d events dropped", task_id, log_text(exc), len(items))

    def _cancel(self, reason: str) -> None:
        log.info("task %s is over on the server (%s): asking its handler to stop", self.reporter.task_id,
                 log_text(reason))
        self.reporter.cancel(reason)
