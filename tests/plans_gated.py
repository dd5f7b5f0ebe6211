"""A numpy linear-regression plan whose training a test can hold at a gate (end-to-end tests).

This module's source is what nodes approve and run. A node process started with the environment variable
``FEDSTREAM_TEST_GATE=DIR`` holds its k-th task (k = 1, 2, ... counted per process) in the first
training step until the file ``DIR/k`` or ``DIR/all`` exists (at most ``MAX_WAIT`` seconds), so a test
knows the node is busy mid-round for as long as it wants: to kill it, to let a late node join, or to make
its reply arrive after the round ended. Without the variable it is the plain plan of ``plans_lsq``.
"""

import os
import threading
import time

import numpy as np

from fedcore.models import NumpyModel
from fedcore.plans import NumpyTrainingPlan

GATE_ENV = "FEDSTREAM_TEST_GATE"
MAX_WAIT = 30.0
_lock = threading.Lock()
_tasks_seen = 0


def _next_task_number() -> int:
    global _tasks_seen
    with _lock:
        _tasks_seen += 1
        return _tasks_seen


def wait_at_gate(directory: str, k: int) -> None:
    """Block until ``directory/k`` or ``directory/all`` exists, or ``MAX_WAIT`` seconds passed."""
    deadline = time.monotonic() + MAX_WAIT
    targets = (os.path.join(directory, str(k)), os.path.join(directory, "all"))
    while not any(os.path.exists(t) for t in targets) and time.monotonic() < deadline:
        time.sleep(0.02)


class GatedLinearPlan(NumpyTrainingPlan):
    def init_model(self) -> NumpyModel:
        return NumpyModel(n_features=3, n_outputs=1, task="linear", dtype=np.float32)

    def training_step(self, data, target):
        if not getattr(self, "_gate_passed", False):
            self._gate_passed = True
            gate = os.environ.get(GATE_ENV)
            if gate:
                wait_at_gate(gate, _next_task_number())
        return super().training_step(data, target)
