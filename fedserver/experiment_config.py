"""The checks of ``Experiment``'s numeric configuration: each bad value refused with ExperimentError naming the
argument, the rule and the value given, before anything is sent or written."""

from __future__ import annotations

import math
from typing import Any

from fedcore.errors import ExperimentError

__all__ = ["check_experiment_config"]


def check_experiment_config(*, rounds: Any, min_nodes: Any, expected_nodes: Any, round_timeout: Any,
                            node_wait_timeout: Any, wait_after_quorum: Any) -> None:
    """ExperimentError unless ``rounds`` and ``min_nodes`` are ints >= 1, ``expected_nodes`` None or an int >=
    ``min_nodes``, the two timeouts finite seconds > 0 and ``wait_after_quorum`` None or finite seconds >= 0."""
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ExperimentError(f"rounds must be an int >= 1, got {rounds!r}")
    if isinstance(min_nodes, bool) or not isinstance(min_nodes, int) or min_nodes < 1:
        raise ExperimentError(f"min_nodes must be an int >= 1, got {min_nodes!r}")
    if expected_nodes is not None and (isinstance(expected_nodes, bool) or not isinstance(expected_nodes, int)
                                       or expected_nodes < min_nodes):
        raise ExperimentError(f"expected_nodes must be None or an int >= min_nodes ({min_nodes}), "
                              f"got {expected_nodes!r}")
    for label, value in (("round_timeout", round_timeout), ("node_wait_timeout", node_wait_timeout)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise ExperimentError(f"{label} must be a finite number of seconds > 0, got {value!r}")
    if wait_after_quorum is not None and (isinstance(wait_after_quorum, bool)
                                          or not isinstance(wait_after_quorum, (int, float))
                                          or not 0 <= wait_after_quorum < math.inf):
        raise ExperimentError(f"wait_after_quorum must be None or a finite number of seconds >= 0, "
                              f"got {wait_after_quorum!r}")
