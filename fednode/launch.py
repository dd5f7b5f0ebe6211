"""``run_node``: run one :class:`NodeClient` as a process's main job, stopped cleanly by SIGINT/SIGTERM.

The first signal asks the client to stop: a poll or download is abandoned, a running task is let finish
(its handler sees ``reporter.stop_requested``) and its result gets ``stop_grace_seconds`` to upload, then
the channel closes. A second signal does not wait for the handler's thread (Python cannot interrupt it):
the process exits at once with status 128 + signal number.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Iterable

from fedcore.wire import DatasetInfo
from fednode.client import NodeClient
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
        if len(received) == 1:
            log.warning("%s received: stopping (finishing the current step; send it again to force)",
                        signum.name)
            client.stop()
        else:
            log.error("%s received again: exiting now", signum.name)
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
