"""What fednode logs of text it did not write is capped and escaped (fednode.log_text).

A training plan's exception can quote megabytes (a whole array, a data file) and hold terminal escapes or line
breaks that forge log lines; the node logged it whole and raw ("task t failed: ValueError: <all of it>").
Now one log line keeps the first LOG_TEXT_LIMIT characters, says how many were cut, and escapes what cannot be
printed; the FAILED reply still carries the message (bounded by the wire's MAX_ERROR_MESSAGE).
Real FedServer, real NodeClient with the real TrainingTaskHandler (experiment_harness), logs via caplog.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import sys
from pathlib import Path

from experiment_harness import federation, least_squares_sites
from plans_lsq import LinearPlan

from fedcore.models import weights_to_numpy
from fedcore.tasks import PlanSource, TrainTask
from fedcore.text_output import escape_unprintable
from fedcore.wire import TaskKind
from fedcore.wire.messages import MAX_ERROR_MESSAGE
from fednode.log_text import LOG_TEXT_LIMIT, log_text
from fedserver.tasks import TaskState

ARGS = {"num_updates": 2, "lr": 0.01, "batch_size": 8}
LSQ_SOURCE = inspect.getsource(sys.modules[LinearPlan.__module__])
NOISE = "\x1b[2J\nFAKE fednode: all good\r" + "0123456789" * 50_000  # 500 kB after a screen clear and a fake line
RAISING = LSQ_SOURCE + (
    "\n    def training_step(self, data, target):\n"
    f"        raise ValueError({NOISE!r})\n")
EXITING = LSQ_SOURCE + (
    "\n    def training_step(self, data, target):\n"
    "        import sys\n"
    f"        sys.exit({NOISE!r})\n")


def test_log_text_keeps_the_start_says_what_was_cut_and_escapes() -> None:
    assert log_text("short\x1b[0m") == "short\\x1b[0m"
    text = "a\nb" + "x" * 5000
    shown = log_text(text, limit=100)
    assert shown == escape_unprintable(text[:100]) + f"... [{len(text) - 100} more characters cut]"
    assert shown.startswith("a\\nbxxx") and "\n" not in shown
    assert log_text(ValueError("x" * LOG_TEXT_LIMIT)) == "x" * LOG_TEXT_LIMIT  # at the limit: nothing cut


def _task(round: int, source: str) -> dict:
    plan = LinearPlan()
    plan.post_init(ARGS)
    return TrainTask("e", round, PlanSource.from_source("LinearPlan", source), ARGS,
                     weights_to_numpy(plan.get_model_params()), "fedavg", {}, ["lsq"]).to_payload()


def test_a_plan_failure_is_logged_capped_and_escaped(tmp_path: Path, caplog) -> None:
    async def scenario():
        async with federation(tmp_path, least_squares_sites(1)) as (server, _, _):
            await server.wait_for_nodes(1, timeout=10)
            results = []
            for round, source in ((1, RAISING), (2, EXITING)):
                handle = server.dispatch("site-0", TaskKind.TRAIN, server.encode_payload(_task(round, source)),
                                         experiment_id="e", round=round, inactivity_timeout=30)
                results.append(await handle.result(timeout=20))
        return results

    with caplog.at_level(logging.INFO, logger="fednode"):
        raised, exited = asyncio.run(asyncio.wait_for(scenario(), 60))
    # the reply: what ran where, then the plan's own text, cut by the wire's bound
    for result, prefix in ((raised, "training LinearPlan on dataset 'data-0' (round 1, step 1): ValueError"),
                           (exited, "SystemExit")):
        assert result.outcome is TaskState.FAILED
        assert result.error_message.startswith(f"{prefix}: {NOISE[:100]}"), result.error_message[:200]
        assert len(result.error_message) <= MAX_ERROR_MESSAGE
    failures = [r.getMessage() for r in caplog.records if r.name.startswith("fednode")
                and ("): ValueError" in r.getMessage() or "tried to exit" in r.getMessage())]
    assert len(failures) == 2, [r.getMessage()[:200] for r in caplog.records]
    cut = len(NOISE) - LOG_TEXT_LIMIT
    for message in failures:
        assert "\\x1b[2J\\nFAKE fednode: all good\\r0123456789" in message
        assert f"... [{cut} more characters cut]" in message
        assert message.isprintable() and len(message) < LOG_TEXT_LIMIT + 300
