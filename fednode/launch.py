"""``run_node``: run one :class:`NodeClient` as a process's main job, stopped cleanly by SIGINT/SIGTERM.

The first signal asks the client to stop: a poll or download is abandoned; a running task has
``stop_grace_seconds`` to finish and upload its result, after which its handler is told to stop
(``reporter.stop_requested``: training stops at its next batch and the task is reported FAILED, naming why);
then the channel closes. A second signal does not wait for the handler's thread (Python cannot interrupt it):
the process exits at once with status 128 + signal number.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Iterable

from fedcore.wire import DatasetInfo
from fednode.client import ClientState, NodeClient
from fednode.config import NodeConfig
from fednode.handler import TaskHandler

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


async def run_node(config: NodeConfig, handler: TaskHandler, datasets: Iterable[DatasetInfo] = (),
                   capabilities: Iterable[str] = (), *,
                   stop_signals: Iterable[signal.Signals] = STOP_SIGNALS) -> NodeClient:
    """Serve until a stop signal (or a refusal by the server, which is raised); return the stopped client."""
    client = NodeClient(config, handler, datasets, capabilities)
    loop = asyncio.get_running_loop()
    received: list[signal.Signals] = []

    def on_signal(signum: signal.Signals) -> None:
        received.append(signum)
        again = "Ctrl-C again" if signum == signal.SIGINT else f"send {signum.name} again"
        if len(received) == 1:
            if client.state in (ClientState.RUNNING, ClientState.UPLOADING):
                log.warning("%s received: finishing the current task for up to %g s; %s to stop now",
                            signum.name, config.stop_grace_seconds, again)
            else:
                log.warning("%s received: stopping", signum.name)
            client.stop()
        else:
            busy = " (the current task is left unfinished)" \
                if client.state in (ClientState.RUNNING, ClientState.UPLOADING) else ""
            log.error("%s received again: exiting now%s", signum.name, busy)
            os._exit(128 + int(signum))

    installed = []
    for signum in stop_signals:
        loop.add_signal_handler(signum, on_signal, signum)
        installed.append(signum)
    try:
        await client.run()
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)
    return client
