"""fedserver: the researcher's side of fedstream (gRPC server, node identity, task transport, CLI).

Public entry points (imported lazily so ``import fedserver`` stays cheap):

- :class:`~fedserver.experiment.Experiment` — the researcher's API: rounds, quorum, checkpoints, history;

- :class:`~fedserver.server.FedServer` and :class:`~fedserver.config.ServerConfig` — the transport;
- :class:`~fedserver.auth.NodeStore` — enrolled nodes and their tokens;
- :class:`~fedserver.tasks.TaskHandle`, :class:`~fedserver.tasks.TaskResult`, :class:`~fedserver.tasks.TaskState`.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "Experiment": "fedserver.experiment",
    "RoundReport": "fedserver.rounds",
    "FedServer": "fedserver.server",
    "ServerState": "fedserver.server",
    "ServerConfig": "fedserver.config",
    "NodeStore": "fedserver.auth",
    "TaskHandle": "fedserver.tasks",
    "TaskResult": "fedserver.tasks",
    "TaskState": "fedserver.tasks",
}
__all__ = ["Experiment", "FedServer", "NodeStore", "RoundReport", "ServerConfig", "ServerState", "TaskHandle", "TaskResult", "TaskState"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fedserver' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
