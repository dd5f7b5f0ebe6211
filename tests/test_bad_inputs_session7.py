"""Bad inputs found in session 7 that fedstream did not yet answer with a clear error (or that lost data).

Grouped by area: result and task payloads, the wire, stored state, the command lines. Real parts only
(real gRPC on loopback, real SQLite files, real processes for the CLIs).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from experiment_harness import federation, least_squares_sites
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from plans_lsq import LinearPlan
from server_testkit import async_test, running_server, version

from fedcore.aggregators import FedAverage
from fedcore.errors import (
    CheckpointError,
    DatasetFileError,
    ExperimentError,
    HistoryError,
    MessageError,
    NodeConfigError,
    ServerConfigError,
    ServerStateError,
    TaskPayloadError,
)
from fedcore.tasks import PlanSource, TrainResult, TrainTask
from fedcore.wire import DatasetInfo, NodeRegistration
from fedcore.wire.metadata_keys import REASON_METADATA_KEY
from fednode.approvals import PlanApprovals
from fednode.cli import build_parser as fednode_parser
from fednode.client import NodeClient
from fednode.config import NodeConfig
from fednode.datasets import DatasetRegistry
from fednode.handler import ReceivedTask, TaskReply
from fednode.home import HOME_ENV_VAR, db_path
from fednode.reporter import Reporter
from fednode.runner import TrainingTaskHandler
from fedserver.auth import NodeStore
from fedserver.certs import create_ca, create_server_certificate
from fedserver.checkpoints import CheckpointStore
from fedserver.cli import build_parser as fedserver_parser
from fedserver.config import ServerConfig
from fedserver.errors import MAX_DETAILS_BYTES
from fedserver.experiment import Experiment
from fedserver.history import HistoryStore
from fedserver.history_records import NodeResultRecord
from fedserver.server import FedServer
from fedstream.v1 import node_service_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]

# -- 1. result and task payloads ---------------------------------------------------------------------------

GOOD_RESULT: dict[str, Any] = {
    "format": 1, "params": {"w": np.zeros(3, np.float32)}, "num_samples": 5, "num_steps": 3, "lr": 0.1,
    "metrics": {"loss": 1.0}, "validation": {"after": {"acc": 0.5}}, "duration_s": 1.0,
}


@pytest.mark.parametrize(("field", "value", "names"), [
    ("format", np.zeros(2), "payload format"),  # was a bare ValueError (array truth value)
    ("format", True, "payload format"),  # True == 1 passed the format check
    ("num_samples", 2**63, "result.num_samples"),  # crashed the history insert with OverflowError
    ("num_steps", 2**64 - 1, "result.num_steps"),
    ("metrics", {"loss": float("inf")}, "metrics['loss']"),
    ("metrics", {"loss": -float("inf")}, "metrics['loss']"),
    ("validation", {"after": {"acc": float("inf")}}, "validation['after']['acc']"),
    ("validation", {"during": {"acc": 0.5}}, "validation key 'during'"),  # became a round metric val_during_acc
    ("duration_s", float("nan"), "result.duration_s"),  # NaN, negative and non-numbers became 0.0 silently
    ("duration_s", -1.0, "result.duration_s"),
    ("duration_s", float("inf"), "result.duration_s"),
    ("duration_s", "1.5", "result.duration_s"),
    ("duration_s", None, "result.duration_s"),
])
def test_result_payload_field_out_of_range_is_a_task_payload_error(field: str, value: Any, names: str) -> None:
    payload = {**GOOD_RESULT, field: value}
    with pytest.raises(TaskPayloadError) as info:
        TrainResult.from_payload(payload)
    assert names in str(info.value)


def test_result_payload_without_duration_is_still_accepted() -> None:
    payload = {k: v for k, v in GOOD_RESULT.items() if k != "duration_s"}
    assert TrainResult.from_payload(payload).duration_s == 0.0


@pytest.mark.parametrize(("field", "value", "names"), [
    ("format", np.zeros(2), "payload format"),
    ("round", 2**64 - 1, "task.round"),
])
def test_task_payload_field_out_of_range_is_a_task_payload_error(field: str, value: Any, names: str) -> None:
    task = TrainTask("exp", 1, PlanSource.from_source("P", "x = 1"), {"num_updates": 1}, {"w": np.zeros(2)})
    with pytest.raises(TaskPayloadError, match=names.replace(".", r"\.")):
        TrainTask.from_payload({**task.to_payload(), field: value})


# what a decoded document can hold (fedcore.serialization): every scalar msgpack carries, arrays, containers
_LEAVES = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=8)
           | st.binary(max_size=8) | hnp.arrays(st.sampled_from(["<f4", "<i8", "|b1"]), hnp.array_shapes(max_dims=2,
                                                                                                   max_side=3)))
_VALUES = _LEAVES | st.recursive(_LEAVES, lambda inner: st.lists(inner, max_size=3) | st.tuples(inner)
                                 | st.dictionaries(st.text(max_size=4) | st.integers(-3, 3), inner, max_size=3),
                                 max_leaves=8)  # leaves on their own too: recursive() favours containers


@settings(max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(field=st.sampled_from([*GOOD_RESULT, "metrics.loss", "validation.after", "params.w"]), value=_VALUES)
def test_any_decoded_value_in_any_result_field_is_accepted_or_a_task_payload_error(field: str, value: Any) -> None:
    """The server decodes results from any node: whatever a field holds, from_payload answers with a
    TrainResult or a TaskPayloadError (before: an array as 'format' raised a bare ValueError, which
    escaped the round's error handling and aborted the experiment)."""
    payload = {**GOOD_RESULT, "metrics": dict(GOOD_RESULT["metrics"]), "validation": dict(GOOD_RESULT["validation"]),
               "params": dict(GOOD_RESULT["params"])}
    outer, _, inner = field.partition(".")
    if inner:
        payload[outer][inner] = value
    else:
        payload[outer] = value
    try:
        result = TrainResult.from_payload(payload)
    except TaskPayloadError:
        return
    assert all(np.isfinite(v) for v in result.metrics.values())
    assert 0 <= result.num_samples <= 2**63 - 1 and 0 <= result.num_steps <= 2**63 - 1
    assert np.isfinite(result.duration_s) and result.duration_s >= 0


def test_history_refuses_counts_beyond_sqlite_integer_with_a_history_error(tmp_path: Path) -> None:
    with HistoryStore(tmp_path / "history.db") as history:
        exp = history.start_experiment("e", {})
        history.start_round(exp, 1, ["a"])
        with pytest.raises(HistoryError, match="num_samples must be at most 2\\*\\*63-1"):
            history.record_node_result(NodeResultRecord(exp, 1, "a", "succeeded", num_samples=2**63))
        assert history.node_results(exp) == []


class TamperingHandler:
    """The real training handler, whose successful reply is then edited (a buggy or hostile node)."""

    def __init__(self, inner: TrainingTaskHandler, edit: Callable[[dict[str, Any]], None]) -> None:
        self.inner = inner
        self.edit = edit

    def handle(self, task: ReceivedTask, reporter: Reporter) -> TaskReply:
        reply = self.inner.handle(task, reporter)
        payload = dict(reply.payload)
        self.edit(payload)
        return TaskReply.succeeded(payload)


@pytest.mark.parametrize(("edit", "names"), [
    (lambda p: p.update(num_samples=2**63), "result.num_samples"),
    (lambda p: p.update(format=np.zeros(2)), "payload format"),
], ids=["num_samples_2**63", "format_array"])
def test_one_hostile_reply_fails_that_node_not_the_experiment(tmp_path: Path, edit: Callable, names: str) -> None:
    """Before: the first aborted the run with OverflowError (history insert), the second with ValueError."""
    sites = least_squares_sites(2)

    async def main() -> tuple[list, list]:
        async with federation(tmp_path, sites) as (server, _nodes, _):
            home = tmp_path / "hostile"
            home.mkdir()
            np.savez(home / "data.npz", X=sites[0][0], y=sites[0][1])
            registry = DatasetRegistry(home / "node.db")
            registry.add(name="data", path=home / "data.npz", tags=["lsq"])
            approvals = PlanApprovals(home / "node.db", auto_approve=True)
            config = NodeConfig(server=f"127.0.0.1:{server.port}", tls="insecure",
                                token=server.node_store.enroll("hostile"), node_name="hostile",
                                poll_wait_seconds=1.0)
            handler = TamperingHandler(TrainingTaskHandler(registry, approvals), edit)
            client = NodeClient(config, handler, registry.metadata(), ["numpy"])
            task = asyncio.get_running_loop().create_task(client.run())
            try:
                await server.wait_for_nodes(3, timeout=30)
                exp = Experiment(LinearPlan, {"num_updates": 2, "lr": 0.02, "batch_size": 16, "seed": 7},
                                 aggregator=FedAverage(), rounds=1, dataset_tags=["lsq"], min_nodes=2,
                                 round_timeout=30, history_db=tmp_path / "h.db", server=server, progress=False)
                reports = await exp.run_async()
            finally:
                client.stop()
                await asyncio.wait([task], timeout=15)
            with HistoryStore(tmp_path / "h.db") as history:
                stored = history.node_results(exp.history_id)
            return reports[0].outcomes, stored

    outcomes, stored = asyncio.run(asyncio.wait_for(main(), timeout=120))
    by_node = {o.node_id: o for o in outcomes}
    assert {n: o.outcome for n, o in by_node.items()} == {
        "hostile": "failed", "site-0": "succeeded", "site-1": "succeeded"}
    assert "unusable reply" in by_node["hostile"].error and names in by_node["hostile"].error
    assert {r.node_id: r.outcome for r in stored}["hostile"] == "failed"


# -- 2. the wire -------------------------------------------------------------------------------------------


async def refusal(call: Any) -> tuple[grpc.StatusCode, str, str]:
    """Status code, ErrorReason name and details of a call the server refuses."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    reason = dict(err.value.trailing_metadata() or ()).get(REASON_METADATA_KEY, "")
    return err.value.code(), reason, err.value.details() or ""


@async_test
async def test_poll_with_nan_wait_is_invalid_argument_not_a_spinning_poll(tmp_path: Path) -> None:
    """Before: NaN never reached the deadline and its timers fired at once: the poll spun a core until the
    client gave up (6 s of CPU in a 6 s call), then ended DEADLINE_EXCEEDED."""
    async with running_server(tmp_path, max_poll_wait_seconds=2.0) as kit:
        node = await kit.registered_node("a")
        request = pb.PollTaskRequest(version=version(), wait_seconds=float("nan"))
        started = time.monotonic()
        call = node.stub.PollTask(request, metadata=node.metadata, timeout=8)
        code, reason, details = await refusal(call.read())
        assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "ERROR_REASON_MALFORMED_MESSAGE")
        assert "wait_seconds" in details and "nan" in details
        assert time.monotonic() - started < 4
        assert (await node.poll(wait=0.1)).no_task, "the node polls normally afterwards"


@async_test
async def test_refusals_quoting_a_20kb_task_id_keep_their_status(tmp_path: Path) -> None:
    """Before: the status message quoted the whole id; trailers over the client's metadata limit turned
    NOT_FOUND into RESOURCE_EXHAUSTED ("received metadata size exceeds ... limit")."""
    async with running_server(tmp_path) as kit:
        node = await kit.registered_node("a")
        task_id = "x" * 20_000
        calls = {
            "GetUploadStatus": node.stub.GetUploadStatus(
                pb.GetUploadStatusRequest(version=version(), task_id=task_id), metadata=node.metadata, timeout=10),
            "Report": node.stub.Report(pb.ReportRequest(version=version(), task_id=task_id),
                                       metadata=node.metadata, timeout=10),
            "PollTask(resume)": node.poll(wait=0.1, resume_task_id=task_id),
        }
        for name, call in calls.items():
            code, reason, details = await refusal(call)
            assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "ERROR_REASON_UNKNOWN_TASK"), name
            assert details.startswith("no task with id 'xxx") and "message cut: 20" in details, name
            assert len(details.encode()) <= MAX_DETAILS_BYTES, name
        await node.heartbeat()  # the server is fine


@pytest.mark.parametrize(("build", "field"), [
    (lambda: DatasetInfo(name="d" * 257), "DatasetInfo.name has 257 characters: at most 256"),
    (lambda: DatasetInfo(name="d\tx"), "DatasetInfo.name must be printable text"),
    (lambda: DatasetInfo(name="d", tags=("ok", "t\n")), "a tag of dataset 'd' must be printable"),
    (lambda: DatasetInfo(name="d", tags=tuple(f"t{i}" for i in range(1025))),
     "the tags of dataset 'd' has 1025 entries: at most 1024"),
    (lambda: DatasetInfo(name="d", dtype="<f4\x1b[0m"), "dtype of dataset 'd' must be printable"),
    (lambda: NodeRegistration(capabilities=("torch", "x" * 300)), "a capability has 300 characters"),
    (lambda: NodeRegistration(client_version="v\r\n"), "client_version must be printable"),
    (lambda: NodeRegistration(datasets=tuple(DatasetInfo(name=f"d{i}") for i in range(1025))),
     "datasets has 1025 entries: at most 1024"),
])
def test_registration_labels_are_bounded_printable_text(build: Callable[[], object], field: str) -> None:
    """What a node announces is stored, listed and logged by the server: no unbounded or control text."""
    with pytest.raises(MessageError, match=re.escape(field)):
        build()
    assert NodeRegistration(node_name="n" * 256, capabilities=("numpy",), client_version="fednode/0.1",
                            datasets=(DatasetInfo(name="é" * 10, tags=("a b",), dtype="<f4", format="csv"),))


@pytest.mark.parametrize("node_name", ["n" * 100_000, "site\n\x1b[31mfake log line"], ids=["100kB", "control"])
@async_test
async def test_register_with_an_absurd_node_name_is_malformed(tmp_path: Path, node_name: str) -> None:
    async with running_server(tmp_path) as kit:
        node = kit.node("a")
        request = pb.RegisterRequest(version=version(), node_name=node_name)
        code, reason, details = await refusal(node.stub.Register(request, metadata=node.metadata, timeout=10))
        assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "ERROR_REASON_MALFORMED_MESSAGE")
        assert "node_name" in details


# -- 3. stored state ---------------------------------------------------------------------------------------


def saved_round(store: CheckpointStore, round: int = 1) -> Path:
    return store.save(round, {"w": np.arange(3, dtype=np.float32)}, "fedavg", {}, {}, {"seed": 1})


def test_latest_json_nested_too_deeply_is_a_checkpoint_error(tmp_path: Path) -> None:
    """Before: json.loads raised a bare RecursionError."""
    store = CheckpointStore(tmp_path / "ckpt")
    saved_round(store)
    (tmp_path / "ckpt" / "latest.json").write_text("[" * 100_000)
    with pytest.raises(CheckpointError, match=r"latest\.json: invalid JSON: nested too deeply"):
        store.load_latest()


def test_save_that_cannot_write_is_a_checkpoint_error_and_keeps_the_earlier_round(tmp_path: Path) -> None:
    """Before: a bare IsADirectoryError (any OSError: read-only, disk full) escaped save()."""
    store = CheckpointStore(tmp_path / "ckpt")
    saved_round(store, 1)
    latest = tmp_path / "ckpt" / "latest.json"
    latest.unlink()
    latest.mkdir()  # a directory where latest.json goes
    with pytest.raises(CheckpointError, match=r"cannot write the checkpoint of round 2 under .*latest\.json"):
        saved_round(store, 2)
    latest.rmdir()
    assert store.load(1).params["w"].tolist() == [0.0, 1.0, 2.0]
    assert not [p for p in (tmp_path / "ckpt").iterdir() if p.name.startswith(".")], "no temporary file left"


def test_removed_checkpoint_directory_is_a_checkpoint_error_on_load_and_made_again_on_save(tmp_path: Path) -> None:
    """Before: load_params raised a bare FileNotFoundError, which the low-memory reload path (it catches
    CheckpointError to fail the task) let through as INTERNAL, leaving the task open; save failed too."""
    store = CheckpointStore(tmp_path / "ckpt")
    saved_round(store, 1)
    shutil.rmtree(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="round-0001 is missing"):
        store.load_params(1)
    assert store.rounds() == []
    saved_round(store, 2)
    assert store.latest_round() == 2


@pytest.mark.parametrize(("edit", "names"), [
    (lambda s: s.pop("known_nodes"), "lacks ['known_nodes']"),
    (lambda s: s.pop("plan"), "lacks ['plan']"),
    (lambda s: s.update(plan="LinearPlan"), "'plan' must be a map"),
    (lambda s: s.update(plan={"name": "P", "source": None}), "'plan' must be a map"),
    (lambda s: s.update(known_nodes=5), "'known_nodes' must be a list of strings"),
    (lambda s: s.update(model_args=[1]), "'model_args' must be a map"),
], ids=["no_known_nodes", "no_plan", "plan_str", "plan_source_null", "known_nodes_int", "model_args_list"])
def test_resume_from_an_experiment_state_of_the_wrong_shape_names_file_and_key(tmp_path: Path, edit: Callable,
                                                                               names: str) -> None:
    """A digest-consistent experiment.json (another version, a hand edit) that lacks a key or holds the wrong
    type. Before: KeyError, TypeError or AttributeError from inside Experiment.resume."""
    exp = Experiment(LinearPlan, {"num_updates": 1, "lr": 0.02}, rounds=2, checkpoint_dir=tmp_path / "ckpt",
                     progress=False)
    exp.params = exp.initial_params()
    exp._checkpoint_params()  # round 0, as a run writes it before its first round
    checkpoint = exp.checkpoints.load(0)
    state = dict(checkpoint.experiment_state)
    edit(state)
    exp.checkpoints.save(0, checkpoint.params, checkpoint.aggregator_name, checkpoint.aggregator_config,
                         checkpoint.aggregator_state, state)
    with pytest.raises(CheckpointError) as info:
        Experiment.resume(tmp_path / "ckpt", progress=False)
    assert "experiment.json" in str(info.value) and names in str(info.value)


def filled_history(path: Path, rounds: int = 150) -> None:
    with HistoryStore(path) as history:
        exp = history.start_experiment("e", {})
        for r in range(1, rounds + 1):
            history.start_round(exp, r, ["a"])
            history.record_node_result(NodeResultRecord(exp, r, "a", "succeeded",
                                                        training_metrics={"loss": 1.0, "note": "x" * 500}))
            history.finish_round(exp, r, "completed", metrics={"loss": 1.0})


def test_history_with_a_damaged_page_is_a_history_error_naming_the_file(tmp_path: Path) -> None:
    """Before: the header and schema pages were fine, so the store opened, then every read raised a bare
    sqlite3.DatabaseError ("database disk image is malformed")."""
    path = tmp_path / "history.db"
    filled_history(path)
    with contextlib.closing(sqlite3.connect(path)) as conn:  # a page every read of node_results goes through
        (root,) = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'node_results'").fetchone()
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    data = bytearray(path.read_bytes())
    data[(root - 1) * page_size : root * page_size] = b"\xff" * page_size
    path.write_bytes(bytes(data))
    with pytest.raises(HistoryError, match=r"history\.db.*malformed"), HistoryStore(path) as history:
        history.node_results(1)


def test_history_column_that_is_not_json_is_a_history_error(tmp_path: Path) -> None:
    """Before: json.JSONDecodeError from reading a row edited by another tool."""
    path = tmp_path / "history.db"
    filled_history(path, rounds=2)
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("UPDATE rounds SET metrics = '{not json' WHERE round = 2")
    with HistoryStore(path) as history, pytest.raises(HistoryError, match="column 'metrics' does not hold JSON"):
        history.rounds(1)


def fednode_cli(home: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, HOME_ENV_VAR: str(home)}
    return subprocess.run([sys.executable, "-m", "fednode", *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120, check=False)


@pytest.mark.parametrize(("column", "value"), [("tags", "{"), ("shape", '["x"]'), ("dtype", "bogus")])
def test_damaged_dataset_row_is_a_node_store_error_and_removing_it_works(tmp_path: Path, column: str,
                                                                         value: str) -> None:
    """A row of node.db edited or damaged by another tool. Before: JSONDecodeError / TypeError tracebacks
    from `fednode dataset list` (and from node start, which announces the datasets), and `dataset remove`,
    the way out, failed the same way."""
    home = tmp_path / "home"
    np.savez(tmp_path / "a.npz", X=np.ones((4, 2)), y=np.ones(4))
    DatasetRegistry(db_path(home)).add("a", tmp_path / "a.npz", tags=["t"])
    with contextlib.closing(sqlite3.connect(db_path(home))) as conn, conn:
        conn.execute(f"UPDATE datasets SET {column} = ?", (value,))
    listed = fednode_cli(home, "dataset", "list")
    assert listed.returncode == 1 and "Traceback" not in listed.stderr, listed.stderr
    assert f"dataset 'a' has a damaged '{column}' column" in listed.stderr and "node.db" in listed.stderr
    removed = fednode_cli(home, "dataset", "remove", "a")
    assert removed.returncode == 0, removed.stderr
    assert DatasetRegistry(db_path(home)).list() == []


def test_dataset_file_replaced_by_a_directory_says_so(tmp_path: Path) -> None:
    """Before: "its file ... no longer exists" for a path that exists (as a directory)."""
    np.savez(tmp_path / "a.npz", X=np.ones((4, 2)), y=np.ones(4))
    registry = DatasetRegistry(tmp_path / "node.db")
    registry.add("a", tmp_path / "a.npz")
    (tmp_path / "a.npz").unlink()
    (tmp_path / "a.npz").mkdir()
    with pytest.raises(DatasetFileError, match=r"a\.npz is now a directory"):
        registry.load("a")


# -- 4. command lines --------------------------------------------------------------------------------------


def cli(program: str, *argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", program, *argv], cwd=ROOT, env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize("days", ["3000000", "99999999999999999999999"])
def test_certificate_validity_past_year_9999_is_an_error_not_a_traceback(tmp_path: Path, days: str) -> None:
    """Before: OverflowError tracebacks (datetime out of range, or too large for a C int)."""
    done = cli("fedserver", "--home", str(tmp_path / "home"), "certs", "init", "--days", days)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"certificate validity of {days} days ends after the year 9999" in done.stderr
    assert not (tmp_path / "home" / "certs" / "ca.key").exists()


@pytest.mark.parametrize("size", ["3GiB", "99999999999999999999999"])
def test_node_chunk_size_over_the_grpc_message_limit_is_an_error_not_a_traceback(tmp_path: Path, size: str) -> None:
    """Before: the node started, then died with an OverflowError from gRPC's channel arguments."""
    (tmp_path / "token").write_text("abc")
    done = cli("fednode", "start", "--insecure", "--server", "127.0.0.1:1", "--token-file", str(tmp_path / "token"),
               "--chunk-size", size, env={HOME_ENV_VAR: str(tmp_path / "home")})
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "upload_chunk_size must be below 2 GiB" in done.stderr


def test_server_max_payload_size_beyond_the_wire_is_refused_at_configuration(tmp_path: Path) -> None:
    """Before: the server started, then every Register failed INTERNAL ("Value out of range")."""
    with pytest.raises(ServerConfigError, match=r"max_payload_size must be at most 2\*\*63-1"):
        ServerConfig(port=0, tls="insecure", max_payload_size=2**64)


@pytest.mark.parametrize(("program", "argv", "option"), [
    ("fedserver", ["serve", "--grace", "nan"], "--grace"),  # accepted: NaN, inf and -1 graces
    ("fedserver", ["serve", "--grace", "-1"], "--grace"),
    ("fedserver", ["serve", "--max-poll-wait", "inf"], "--max-poll-wait"),  # exit 1 naming max_poll_wait_seconds
    ("fedserver", ["serve", "--upload-place-kept", "0"], "--upload-place-kept"),
    ("fedserver", ["run", "--node-wait", "inf"], "--node-wait"),  # accepted: waited for nodes forever
    ("fedserver", ["run", "--round-timeout", "inf"], "--round-timeout"),  # accepted: a round never timed out
    ("fednode", ["start", "--stop-grace", "nan"], "--stop-grace"),  # accepted
    ("fednode", ["start", "--poll-wait", "inf"], "--poll-wait"),  # accepted: a poll call without a deadline
], ids=lambda v: v if isinstance(v, str) else "-".join(v))
def test_bad_duration_options_are_usage_errors_naming_the_option(program: str, argv: list[str], option: str,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    parser = (fedserver_parser if program == "fedserver" else fednode_parser)()
    with pytest.raises(SystemExit) as info:
        parser.parse_args(argv)
    assert info.value.code == 2
    assert f"argument {option}: invalid duration" in capsys.readouterr().err


def test_experiment_and_node_refuse_infinite_waits() -> None:
    """The library behind the options: every wait is finite (NaN and inf got through these two)."""
    with pytest.raises(ExperimentError, match="node_wait_timeout must be a finite number of seconds > 0, got inf"):
        Experiment(LinearPlan, {"num_updates": 1}, rounds=1, node_wait_timeout=float("inf"), progress=False)
    with pytest.raises(NodeConfigError, match="stop_grace_seconds must be finite and >= 0, got nan"):
        NodeConfig(server="h:1", tls="insecure", token="t", stop_grace_seconds=float("nan"))
    with pytest.raises(NodeConfigError, match="poll_wait_seconds must be a finite number of seconds, got inf"):
        NodeConfig(server="h:1", tls="insecure", token="t", poll_wait_seconds=float("inf"))


@pytest.mark.parametrize("argv", [["nodes", "enroll", "site-a"], ["certs", "init"]], ids=["nodes", "certs"])
def test_a_home_that_is_a_file_is_an_error_not_a_traceback(tmp_path: Path, argv: list[str]) -> None:
    """Before: FileExistsError tracebacks from the node store's and the certificates' mkdir."""
    home = tmp_path / "home"
    home.write_text("not a directory")
    done = cli("fedserver", "--home", str(home), *argv)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("fedserver: error: cannot create the") and str(home) in done.stderr
    assert home.read_text() == "not a directory"


def test_node_store_of_another_schema_or_not_sqlite_is_a_server_config_error(tmp_path: Path) -> None:
    """Before: sqlite3.OperationalError ("table nodes has no column named node_id") on the first enroll, and
    DatabaseError for a file that is not SQLite."""
    other = tmp_path / "other.db"
    with contextlib.closing(sqlite3.connect(other)) as conn, conn:
        conn.execute("CREATE TABLE nodes (x)")
    with pytest.raises(ServerConfigError, match=r"node store .*other\.db is unusable .*no such column: node_id"):
        NodeStore(other)
    text = tmp_path / "text.db"
    text.write_text("not sqlite" * 100)
    with pytest.raises(ServerConfigError, match=r"text\.db is unusable .*file is not a database"):
        NodeStore(text)


def test_serve_with_a_certificate_that_is_not_pem_names_the_file(tmp_path: Path) -> None:
    """Before: RuntimeError "Failed to bind to address" traceback, naming no file."""
    home = tmp_path / "home"
    assert cli("fedserver", "--home", str(home), "nodes", "enroll", "site-a").returncode == 0
    junk = tmp_path / "server.crt"
    junk.write_text("not a certificate")
    done = cli("fedserver", "--home", str(home), "serve", "--port", "0", "--cert", str(junk), "--key", str(junk))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"key_file {junk} is not a PEM file" in done.stderr


@async_test
async def test_serve_with_a_key_of_another_certificate_is_a_clear_bind_error(tmp_path: Path) -> None:
    """A PEM certificate with the CA's key: gRPC only says "Failed to bind" (RuntimeError)."""
    ca = create_ca()
    server_cert = create_server_certificate(ca, ["localhost"])
    cert, _key = server_cert.write(tmp_path, "server")
    _ca_cert, ca_key = ca.write(tmp_path, "ca")
    server = FedServer(ServerConfig(port=0, tls="tls", cert_file=cert, key_file=ca_key), NodeStore(tmp_path / "n.db"))
    with pytest.raises(ServerStateError, match=r"could not bind .* check that .* key_file .*ca\.key is the key of"):
        await server.start()
    await server.stop(grace=0)


@pytest.mark.parametrize("target", ["127.0.0.1:99999", "fed.example.org:-5", "fed.example.org:0"])
def test_node_server_port_out_of_range_is_a_config_error(target: str) -> None:
    """Before: accepted; the node retried connecting forever."""
    with pytest.raises(NodeConfigError, match="server port must be 1..65535"):
        NodeConfig(server=target, tls="insecure", token="t")
