"""Chunk messages without protobuf copies: decode_chunk_event reads exactly what protobuf reads, or declines."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcore.wire import convert
from fedstream.v1 import common_pb2, node_service_pb2


@settings(max_examples=200, deadline=None)
@given(offset=st.integers(0, (1 << 64) - 1), data=st.binary(max_size=3000))
def test_decode_inverts_encode_and_the_data_is_a_view(offset: int, data: bytes) -> None:
    raw = convert.encode_chunk_event(offset, memoryview(data))
    decoded = convert.decode_chunk_event(raw)
    assert decoded is not None
    got_offset, view = decoded
    assert (got_offset, bytes(view)) == (offset, data)
    assert isinstance(view, memoryview) and view.obj is raw  # zero-copy: a window on the received bytes


def _protobuf_chunk(raw: bytes) -> tuple[int, bytes] | None:
    """What protobuf makes of ``raw`` as a PollTaskResponse: (offset, data) if it is a chunk event only."""
    try:
        msg = node_service_pb2.PollTaskResponse.FromString(raw)
    except Exception:  # noqa: BLE001 - protobuf's DecodeError class differs between implementations
        return None
    return (msg.chunk.offset, msg.chunk.data) if msg.WhichOneof("event") == "chunk" else None


@settings(max_examples=500, deadline=None)
@given(st.one_of(
    st.binary(max_size=40),
    st.builds(lambda o, d, cut: convert.encode_chunk_event(o, d)[:cut] if cut else convert.encode_chunk_event(o, d),
              st.integers(0, 1 << 40), st.binary(max_size=40), st.integers(0, 50)),
    st.builds(lambda o, d, tail: convert.encode_chunk_event(o, d) + tail,
              st.integers(0, 1 << 40), st.binary(max_size=40), st.binary(min_size=1, max_size=8)),
))
def test_decode_never_disagrees_with_protobuf(raw: bytes) -> None:
    decoded = convert.decode_chunk_event(raw)
    if decoded is not None:  # declining is always allowed (protobuf then parses); a reading must agree
        assert (decoded[0], bytes(decoded[1])) == _protobuf_chunk(raw)


@pytest.mark.parametrize("message", [
    node_service_pb2.PollTaskResponse(no_task=node_service_pb2.NoTask()),
    node_service_pb2.PollTaskResponse(shutdown=node_service_pb2.ServerShutdown(reason="bye")),
    node_service_pb2.PollTaskResponse(),
])
def test_other_poll_messages_are_parsed_by_protobuf(message: node_service_pb2.PollTaskResponse) -> None:
    raw = message.SerializeToString()
    assert convert.decode_chunk_event(raw) is None
    assert convert.poll_response_from_bytes(raw) == message


def test_deserializers_and_serializer_round_trip_through_the_wire_forms() -> None:
    data = bytes(range(256)) * 4096
    raw = node_service_pb2.UploadResultRequest(chunk=common_pb2.Chunk(offset=1 << 20, data=data)).SerializeToString()
    offset, view = convert.upload_request_from_bytes(raw)
    assert (offset, bytes(view)) == (1 << 20, data)
    assert convert.poll_event_from_pb(convert.poll_response_from_bytes(raw)) == (1 << 20, view)
    header = node_service_pb2.UploadResultRequest(header=node_service_pb2.UploadHeader(task_id="t1"))
    assert convert.upload_request_from_bytes(header.SerializeToString()) == header
    pre = convert.encode_chunk_event(7, data)
    assert convert.message_to_bytes(pre) is pre
    assert convert.message_to_bytes(header) == header.SerializeToString()


def test_a_zero_offset_written_explicitly_is_still_read() -> None:
    # protobuf omits offset 0, but another implementation may write it: the field is then present
    raw = b"\x12\x07\x08\x00\x12\x03abc"
    assert _protobuf_chunk(raw) == (0, b"abc")
    decoded = convert.decode_chunk_event(raw)
    assert decoded is not None and (decoded[0], bytes(decoded[1])) == (0, b"abc")
