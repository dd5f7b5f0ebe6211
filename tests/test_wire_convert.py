"""fedcore.wire: every domain message survives dataclass -> protobuf -> bytes -> protobuf -> dataclass."""

from __future__ import annotations

import hashlib
import math
import sys

import pytest

from fedcore.errors import FramingError, MessageError, VersionMismatchError
from fedcore.framing import PayloadInfo
from fedcore.wire import (
    PROTOCOL_VERSION,
    DatasetInfo,
    HeartbeatAnswer,
    HeartbeatTaskState,
    LogLine,
    NodeRegistration,
    ReportEvent,
    ResultDescriptor,
    ServerSettings,
    ShutdownNotice,
    TaskDescriptor,
    TaskKind,
    TaskOutcome,
    TrainingProgress,
    check_version,
    convert,
)
from fedstream.v1 import common_pb2, node_service_pb2

DIGEST = hashlib.sha256(b"hello").digest()


def _through_bytes(msg):
    return type(msg).FromString(msg.SerializeToString())


def test_wire_package_does_not_import_grpc() -> None:
    import subprocess

    code = "import sys, fedcore.wire.convert; print('grpc' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("info", [
    PayloadInfo(0, hashlib.sha256(b"").digest(), 1 << 20),
    PayloadInfo(5, DIGEST, 2),
    PayloadInfo(5, DIGEST, 2, start_offset=4),
    PayloadInfo(3 << 30, DIGEST, 1 << 20, start_offset=5 << 20),
])
def test_payload_info_round_trip(info: PayloadInfo) -> None:
    pb = _through_bytes(convert.payload_info_to_pb(info))
    assert pb.chunk_count == info.chunk_count
    assert convert.payload_info_from_pb(pb) == info


def test_payload_header_with_wrong_chunk_count_is_refused() -> None:
    pb = common_pb2.PayloadHeader(total_size=5, sha256=DIGEST, chunk_size=2, chunk_count=2)
    with pytest.raises(FramingError, match="announces 2 chunks .* make 3"):
        convert.payload_info_from_pb(pb)


def test_payload_header_with_short_digest_is_refused() -> None:
    pb = common_pb2.PayloadHeader(total_size=5, sha256=b"abc", chunk_size=2, chunk_count=3)
    with pytest.raises(FramingError, match="32 bytes, got 3"):
        convert.payload_info_from_pb(pb)


def test_registration_round_trip() -> None:
    reg = NodeRegistration(
        node_name="site A",
        datasets=(DatasetInfo("mnist", ("images", "digits"), 60000, (60000, 28, 28), "<f4", "npz"),
                  DatasetInfo("tab", (), 3, (3, 2), "<f8", "csv")),
        capabilities=("numpy", "torch"), client_version="fednode/0.1.0", instance_id="0f" * 16)
    pb = _through_bytes(convert.registration_to_pb(reg))
    assert (pb.version.major, pb.version.minor) == PROTOCOL_VERSION
    assert pb.instance_id == "0f" * 16
    assert convert.registration_from_pb(pb) == reg
    assert convert.registration_from_pb(node_service_pb2.RegisterRequest()).instance_id == ""  # an older node


@pytest.mark.parametrize(("instance_id", "got"), [
    ("x" * 65, "got 65 characters"),
    ("é" * 10, "got 'é' at position 0"),
    ("abc def", "got ' ' at position 3"),
    ("ab\ncd", "got '\\n' at position 2"),
    ("a/b", "got '/' at position 1"),
])
def test_registration_with_a_bad_instance_id_is_refused(instance_id: str, got: str) -> None:
    pb = node_service_pb2.RegisterRequest(instance_id=instance_id)
    with pytest.raises(MessageError) as err:
        convert.registration_from_pb(pb)
    assert str(err.value) == ("RegisterRequest.instance_id must be at most 64 characters of [0-9A-Za-z_.-], "
                              + got)


def test_registration_accepts_instance_ids_up_to_the_limit() -> None:
    for instance_id in ("", "0f" * 16, "A-z_0.9", "x" * 64):
        assert convert.registration_from_pb(node_service_pb2.RegisterRequest(instance_id=instance_id)
                                            ).instance_id == instance_id


def test_duplicate_dataset_names_are_refused() -> None:
    with pytest.raises(MessageError, match="unique"):
        NodeRegistration(datasets=(DatasetInfo("a"), DatasetInfo("a")))


def test_server_settings_round_trip() -> None:
    s = ServerSettings("node-1", (1, 0), 30.0, 4 << 20, 4 << 30, 10.0)
    assert convert.server_settings_from_pb(_through_bytes(convert.server_settings_to_pb(s))) == s


@pytest.mark.parametrize("kind", list(TaskKind))
def test_task_descriptor_round_trip(kind: TaskKind) -> None:
    task = TaskDescriptor("t-1", "exp", 3, kind, PayloadInfo(5, DIGEST, 2), 12.5)
    assert convert.task_descriptor_from_pb(_through_bytes(convert.task_descriptor_to_pb(task))) == task


def test_task_header_with_unspecified_kind_is_refused() -> None:
    pb = convert.task_descriptor_to_pb(TaskDescriptor("t", "e", 1, TaskKind.TRAIN, PayloadInfo(5, DIGEST, 2)))
    pb.kind = common_pb2.TASK_KIND_UNSPECIFIED
    with pytest.raises(MessageError, match="TASK_KIND_UNSPECIFIED is not valid; expected TASK_KIND_TRAIN"):
        convert.task_descriptor_from_pb(pb)


def test_task_header_without_payload_or_round_is_refused() -> None:
    with pytest.raises(MessageError, match="no payload header"):
        convert.task_descriptor_from_pb(node_service_pb2.TaskHeader(task_id="t", round=1, kind=1))
    pb = node_service_pb2.TaskHeader(task_id="t", round=0, kind=1, payload=convert.payload_info_to_pb(
        PayloadInfo(5, DIGEST, 2)))
    with pytest.raises(MessageError, match="round of task 't' must be an int >= 1, got 0"):
        convert.task_descriptor_from_pb(pb)


@pytest.mark.parametrize("result", [
    ResultDescriptor("t", TaskOutcome.SUCCEEDED, "", PayloadInfo(5, DIGEST, 2)),
    ResultDescriptor("t", TaskOutcome.FAILED, "NaN loss at step 3"),
    ResultDescriptor("t", TaskOutcome.REFUSED, "plan not approved"),
])
def test_result_descriptor_round_trip(result: ResultDescriptor) -> None:
    pb = _through_bytes(convert.result_descriptor_to_pb(result))
    assert pb.version.major == PROTOCOL_VERSION[0]
    assert convert.result_descriptor_from_pb(pb) == result


def test_result_descriptor_rules() -> None:
    with pytest.raises(MessageError, match="SUCCEEDED but announces no payload"):
        convert.result_descriptor_from_pb(node_service_pb2.UploadHeader(task_id="t", outcome=1))
    with pytest.raises(MessageError, match="FAILED but announces a payload of 5 bytes"):
        ResultDescriptor("t", TaskOutcome.FAILED, "x", PayloadInfo(5, DIGEST, 2))
    with pytest.raises(MessageError, match="TASK_OUTCOME_UNSPECIFIED is not valid"):
        convert.result_descriptor_from_pb(node_service_pb2.UploadHeader(task_id="t"))
    with pytest.raises(MessageError, match="outcome 7 is not valid"):
        convert.task_outcome_from_pb(7)


@pytest.mark.parametrize("event", [
    ReportEvent(1.7e9, TrainingProgress(2, 150, 400, 640, 1000, 0.25)),
    ReportEvent(1.7e9 + 0.5, LogLine("WARNING", "learning rate capped")),
])
def test_report_event_round_trip(event: ReportEvent) -> None:
    assert convert.report_event_from_pb(_through_bytes(convert.report_event_to_pb(event))) == event


def test_report_event_nan_loss_round_trips_and_bad_events_are_refused() -> None:
    back = convert.report_event_from_pb(convert.report_event_to_pb(ReportEvent(0.0, TrainingProgress())))
    assert math.isnan(back.event.loss)
    with pytest.raises(MessageError, match="neither progress nor log"):
        convert.report_event_from_pb(node_service_pb2.ReportEvent(timestamp=1.0))
    with pytest.raises(MessageError, match="DEBUG, INFO, WARNING, ERROR, got 'TRACE'"):
        LogLine("TRACE", "x")
    assert len(LogLine("INFO", "x" * 10000).message) == 4096


def test_shutdown_round_trip() -> None:
    notice = ShutdownNotice("maintenance", 5.0)
    assert convert.shutdown_from_pb(_through_bytes(convert.shutdown_to_pb(notice))) == notice


@pytest.mark.parametrize("state", list(HeartbeatTaskState))
@pytest.mark.parametrize("stopping", [False, True])
def test_heartbeat_answer_round_trip(state: HeartbeatTaskState, stopping: bool) -> None:
    answer = HeartbeatAnswer(stopping, state)
    assert convert.heartbeat_response_from_pb(_through_bytes(convert.heartbeat_response_to_pb(answer))) == answer
    assert state.gone is (state in (HeartbeatTaskState.CLOSED, HeartbeatTaskState.UNKNOWN))


def test_heartbeat_answer_of_an_older_or_newer_server_asks_nothing() -> None:
    """An older server sends no task_state (0), a newer one may send a value this side does not know (here 9, as
    raw bytes: field 2, varint): both read as UNSPECIFIED, i.e. carry on."""
    older = node_service_pb2.HeartbeatResponse(shutting_down=True)
    assert convert.heartbeat_response_from_pb(_through_bytes(older)) == HeartbeatAnswer(True)
    newer = node_service_pb2.HeartbeatResponse.FromString(b"\x10\x09")
    assert convert.heartbeat_response_from_pb(newer).task_state is HeartbeatTaskState.UNSPECIFIED
    with pytest.raises(MessageError, match="task_state must be a HeartbeatTaskState, got 'closed'"):
        HeartbeatAnswer(False, "closed")


def test_chunk_to_pb_copies_a_memoryview() -> None:
    data = bytearray(b"abcdef")
    pb = convert.chunk_to_pb(4, memoryview(data)[2:5])
    data[2] = ord("z")
    assert (pb.offset, pb.data) == (4, b"cde")


def test_check_version_accepts_same_major_and_names_both_on_mismatch() -> None:
    check_version(common_pb2.ProtocolVersion(major=1, minor=7))
    with pytest.raises(VersionMismatchError, match=r"protocol version 2\.3 is not supported by this server "
                                                   r"\(server speaks 1\.x, exactly 1\.0\)"):
        check_version(common_pb2.ProtocolVersion(major=2, minor=3))
    with pytest.raises(VersionMismatchError, match=r"version 0\.0 .* this node"):
        check_version(common_pb2.ProtocolVersion(), side="node")


@pytest.mark.parametrize(("offset", "size"), [(0, 1), (0, 1 << 20), (5 << 30, 1000), (127, 128), (1 << 40, 3)])
def test_encoded_chunk_event_is_the_protobuf_serialization(offset: int, size: int) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    expected = node_service_pb2.PollTaskResponse(chunk=common_pb2.Chunk(offset=offset, data=data))
    raw = convert.encode_chunk_event(offset, memoryview(data))
    assert raw == expected.SerializeToString()
    parsed = node_service_pb2.UploadResultRequest.FromString(raw)
    assert (parsed.chunk.offset, parsed.chunk.data) == (offset, data)
