"""Node building blocks: config validation, backoff maths, reporter and pump, transfer state, call envelopes."""

from __future__ import annotations

import asyncio
import math
import random
import threading

import numpy as np
import pytest

from fedcore.errors import ChunkOrderError, MessageError, NodeConfigError, PayloadSizeError
from fedcore.framing import OutgoingPayload, PayloadInfo
from fedcore.plans import TrainingProgress as PlanProgress
from fedcore.wire import (
    LogLine,
    ReportEvent,
    ShutdownNotice,
    TaskDescriptor,
    TaskKind,
    TaskOutcome,
    TrainingProgress,
    convert,
)
from fednode.config import MESSAGE_OVERHEAD, BackoffPolicy, NodeConfig
from fednode.reporter import Reporter, ReportPump
from fednode.transfers import PendingUpload, TaskDownload
from fedstream.v1 import node_service_pb2 as pb

# -- config ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"server": "nohost"}, "server must be HOST:PORT"),
    ({"tls": "ssl"}, "tls must be one of insecure, tls, mtls; got 'ssl'"),
    ({"tls": "tls"}, "needs ca_cert"),
    ({"tls": "mtls", "ca_cert": "ca", "client_cert": "c"}, "needs both client_cert and client_key"),
    ({"tls": "insecure", "token": None}, "needs a token or token_file"),
    ({"tls": "insecure", "token_file": "f"}, "either token or token_file"),
    ({"tls": "insecure", "max_chunk_size": 0}, "max_chunk_size must be > 0 bytes, got 0"),
    ({"tls": "insecure", "poll_wait_seconds": 0}, "poll_wait_seconds must be > 0 seconds"),
])
def test_config_rejects_bad_values_naming_them(kwargs, message):
    values = {"server": "h:1", "token": "t", **kwargs}
    with pytest.raises(NodeConfigError, match=message):
        NodeConfig(**values)


def test_token_file_is_read_stripped_and_checked(tmp_path):
    path = tmp_path / "token"
    path.write_text("  fsn1_abc \n")
    assert NodeConfig("h:1", tls="insecure", token_file=path).resolve_token() == "fsn1_abc"
    path.write_text("two words")
    with pytest.raises(NodeConfigError, match="does not hold one token"):
        NodeConfig("h:1", tls="insecure", token_file=path).resolve_token()
    with pytest.raises(NodeConfigError, match="token_file: cannot read"):
        NodeConfig("h:1", tls="insecure", token_file=tmp_path / "missing").resolve_token()


def test_token_is_not_in_repr():
    assert "s3cret" not in repr(NodeConfig("h:1", tls="insecure", token="s3cret"))


def test_channel_options_keepalive_and_message_limit():
    options = dict(NodeConfig("h:1", tls="insecure", token="t", max_chunk_size=2 << 20).channel_options(None))
    assert options["grpc.max_receive_message_length"] == (2 << 20) + MESSAGE_OVERHEAD
    assert options["grpc.keepalive_time_ms"] == 20_000
    assert options["grpc.keepalive_permit_without_calls"] == 1
    assert options["grpc.http2.max_pings_without_data"] == 0
    assert options["grpc.use_local_subchannel_pool"] == 1


def test_backoff_ceiling_is_exponential_and_capped():
    policy = BackoffPolicy()
    ceilings = [policy.ceiling(n) for n in range(9)]
    assert ceilings == [min(30.0, 0.5 * 2.0 ** n) for n in range(9)]
    assert ceilings[-1] == 30.0 and policy.ceiling(10_000) == 30.0


def test_backoff_full_jitter_is_uniform_below_the_ceiling():
    policy, rng = BackoffPolicy(), random.Random(7)
    for attempt in (0, 3, 20):
        delays = np.array([policy.delay(attempt, rng) for _ in range(4000)])
        ceiling = policy.ceiling(attempt)
        assert delays.min() >= 0.0 and delays.max() <= ceiling
        # uniform on [0, c]: mean c/2, standard deviation c/sqrt(12); the sample mean is within 4 sigma
        assert abs(delays.mean() - ceiling / 2) < 4 * ceiling / math.sqrt(12) / math.sqrt(len(delays))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"initial": 0}, "initial must be > 0"), ({"initial": 2, "maximum": 1}, "maximum 1 must be >= initial 2"),
    ({"multiplier": 0.5}, "multiplier must be >= 1"),
])
def test_backoff_rejects_bad_values(kwargs, message):
    with pytest.raises(NodeConfigError, match=message):
        BackoffPolicy(**kwargs)


# -- reporter -----------------------------------------------------------------------------------------


def test_reporter_is_thread_safe_and_keeps_order_per_thread():
    reporter = Reporter("t1")

    def emit(thread: int) -> None:
        for i in range(500):
            reporter.log("INFO", f"{thread}:{i}")

    threads = [threading.Thread(target=emit, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    events = reporter.drain()
    assert len(events) == 2000 and reporter.drain() == []
    for k in range(4):
        mine = [int(e.event.message.split(":")[1]) for e in events if e.event.message.startswith(f"{k}:")]
        assert mine == list(range(500))


def test_reporter_converts_plan_progress_and_checks_levels():
    reporter = Reporter("t1")
    reporter.progress(PlanProgress(epoch=None, iteration=3, total_iterations=9, num_samples=30,
                                   num_samples_max=90, loss=0.5))
    reporter.log("warning", "y" * 5000)
    progress, line = (e.event for e in reporter.drain())
    assert progress == TrainingProgress(epoch=0, iteration=3, total_iterations=9, num_samples=30,
                                        num_samples_max=90, loss=0.5)
    assert line == LogLine("WARNING", "y" * 4096)
    with pytest.raises(MessageError, match="log level must be one of DEBUG, INFO, WARNING, ERROR, got 'LOUD'"):
        reporter.log("loud", "x")


def test_reporter_drops_oldest_beyond_its_bound():
    reporter = Reporter("t1", max_pending=3)
    for i in range(5):
        reporter.log("INFO", str(i))
    assert [e.event.message for e in reporter.drain()] == ["2", "3", "4"] and reporter.dropped == 2


def test_pump_batches_reports_heartbeats_when_quiet_and_flushes_at_the_end():
    async def scenario():
        sent: list[tuple[str, list[ReportEvent]]] = []
        beats: list[str] = []

        async def send_report(task_id, events):
            sent.append((task_id, events))

        async def send_heartbeat(task_id):
            beats.append(task_id)

        reporter = Reporter("t9")
        pump = ReportPump(reporter, send_report=send_report, send_heartbeat=send_heartbeat,
                          interval=0.05, heartbeat_interval=0.2)
        task = asyncio.create_task(pump.run())
        for i in range(50):
            reporter.log("INFO", str(i))
        await asyncio.sleep(0.7)  # quiet: heartbeats
        reporter.log("INFO", "last")
        pump.finish()
        await asyncio.wait_for(task, 2)
        messages = [e.event.message for _, events in sent for e in events]
        assert messages == [str(i) for i in range(50)] + ["last"]
        assert len(sent) == 2 and {tid for tid, _ in sent} == {"t9"}
        assert 2 <= len(beats) <= 4 and set(beats) == {"t9"}

    asyncio.run(asyncio.wait_for(scenario(), 10))


# -- transfers -----------------------------------------------------------------------------------------


def _descriptor(payload: OutgoingPayload, task_id: str = "t", start: int = 0) -> TaskDescriptor:
    return TaskDescriptor(task_id, "e", 1, TaskKind.TRAIN, payload.info(start))


def test_download_resume_point_is_the_last_whole_chunk():
    payload = OutgoingPayload.from_bytes(bytes(range(256)) * 40, chunk_size=1000)  # 10240 bytes
    download = TaskDownload.start(_descriptor(payload), max_payload_size=1 << 20, max_chunk_size=1000)
    assert download.resume_point() == ("", 0)
    chunks = list(payload.iter_chunks())
    for offset, data in chunks[:3]:
        download.assembler.add(offset, data)
    assert download.resume_point() == ("t", 3000)
    assert download.accepts_resume(_descriptor(payload, start=3000))
    assert not download.accepts_resume(_descriptor(payload, start=2000))
    assert not download.accepts_resume(_descriptor(payload, task_id="other", start=3000))
    for offset, data in chunks[3:]:
        download.assembler.add(offset, data)
    assert download.resume_point() == ("", 0)  # complete: nothing to resume


def test_download_limits_checked_and_resume_needs_our_bytes():
    payload = OutgoingPayload.from_bytes(b"x" * 5000, chunk_size=1000)
    with pytest.raises(PayloadSizeError, match="payload of 5000 bytes exceeds the limit of 4999 bytes"):
        TaskDownload.start(_descriptor(payload), max_payload_size=4999, max_chunk_size=1000)
    with pytest.raises(MessageError, match="holds no partial download"):
        TaskDownload.start(_descriptor(payload, start=2000), max_payload_size=1 << 20, max_chunk_size=1000)
    download = TaskDownload.start(_descriptor(payload), max_payload_size=1 << 20, max_chunk_size=1000)
    other = OutgoingPayload.from_bytes(b"y" * 5000, chunk_size=1000)
    with pytest.raises(ChunkOrderError, match="different payload"):
        download.assembler.resume(other.info(0))


def test_pending_upload_offsets_and_descriptor():
    payload = OutgoingPayload.from_bytes(b"z" * 2500, chunk_size=1000)
    upload = PendingUpload("t", TaskOutcome.SUCCEEDED, "", payload)
    assert [upload.valid_offset(o) for o in (0, 1000, 2500, 1500, 3000, -1)] == [True] * 3 + [False] * 3
    desc = upload.descriptor(2000)
    assert desc.payload == PayloadInfo(2500, payload.sha256, 1000, 2000)
    assert [o for o, _ in upload.chunks(2000)] == [2000]
    failed = PendingUpload.failed("t", "boom")
    assert failed.descriptor().payload is None and list(failed.chunks()) == [] and failed.valid_offset(0)


# -- node call envelopes (fedcore.wire.convert) ---------------------------------------------------------


def test_poll_events_from_pb():
    payload = OutgoingPayload.from_bytes(b"abc" * 100, chunk_size=64)
    header = convert.task_descriptor_to_pb(_descriptor(payload))
    assert convert.poll_event_from_pb(pb.PollTaskResponse(task=header)) == _descriptor(payload)
    assert convert.poll_event_from_pb(pb.PollTaskResponse(chunk={"offset": 64, "data": b"q"})) == (64, b"q")
    assert convert.poll_event_from_pb(pb.PollTaskResponse(no_task=pb.NoTask())) is None
    notice = pb.PollTaskResponse(shutdown=pb.ServerShutdown(reason="bye", retry_after_seconds=2.5))
    assert convert.poll_event_from_pb(notice) == ShutdownNotice("bye", 2.5)
    with pytest.raises(MessageError, match="carries no event"):
        convert.poll_event_from_pb(pb.PollTaskResponse())


def test_node_requests_to_pb():
    poll = convert.poll_request_to_pb(12.5, "t1", 4096)
    assert (poll.version.major, poll.wait_seconds, poll.resume_task_id, poll.resume_offset) == (1, 12.5, "t1", 4096)
    payload = OutgoingPayload.from_bytes(b"r" * 100, chunk_size=64)
    upload = PendingUpload("t1", TaskOutcome.SUCCEEDED, "", payload)
    head = convert.upload_header_request_to_pb(upload.descriptor(64))
    assert convert.result_descriptor_from_pb(head.header) == upload.descriptor(64)
    chunk = convert.upload_chunk_request_to_pb(64, memoryview(b"r" * 36))
    assert (chunk.chunk.offset, chunk.chunk.data) == (64, b"r" * 36)
    assert convert.upload_status_request_to_pb("t1").task_id == "t1"
    assert convert.upload_status_from_pb(pb.GetUploadStatusResponse(acknowledged_offset=64, complete=False)) == (64, False)
    events = [ReportEvent(1.5, LogLine("INFO", "hi")), ReportEvent(2.0, TrainingProgress(iteration=3, loss=0.1))]
    report = convert.report_request_to_pb("t1", events)
    assert report.task_id == "t1" and [convert.report_event_from_pb(e) for e in report.events] == events
    assert convert.heartbeat_request_to_pb("t1").task_id == "t1"
