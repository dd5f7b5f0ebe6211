"""Chunk framing: zero-copy chunking of encoded documents, ordered assembly, size and digest checks."""

from __future__ import annotations

import hashlib
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcore import Serializer
from fedcore.errors import ChunkOrderError, DigestMismatchError, FramingError, PayloadSizeError
from fedcore.framing import ChunkAssembler, OutgoingPayload, PayloadInfo, assemble

LIMITS = {"max_payload_size": 1 << 30, "max_chunk_size": 1 << 22}


def model(n: int = 300_000) -> dict:
    rng = np.random.default_rng(1)
    return {"fc.weight": rng.standard_normal((n // 100, 100)).astype(np.float32),
            "fc.bias": np.arange(7, dtype=np.float64), "meta": ("round", 3, {"k": b"\x00\x01"})}


def test_chunks_reassemble_to_the_serializer_document() -> None:
    obj = model()
    payload = OutgoingPayload.from_object(obj, chunk_size=65536)
    document = Serializer.dumps(obj)
    assert payload.total_size == len(document)
    assert payload.sha256 == hashlib.sha256(document).digest()
    chunks = list(payload.iter_chunks())
    assert len(chunks) == payload.info().chunk_count
    assert all(len(d) == 65536 for _, d in chunks[:-1]) and 0 < len(chunks[-1][1]) <= 65536
    assert b"".join(bytes(d) for _, d in chunks) == document


def test_big_array_chunks_are_views_of_the_array_memory() -> None:
    weights = np.ones(4 << 20, dtype=np.uint8)
    payload = OutgoingPayload.from_object({"w": weights}, chunk_size=1 << 20)
    views = [d for _, d in payload.iter_chunks() if isinstance(d, memoryview)]
    assert views, "expected zero-copy chunks"
    base = weights.ctypes.data
    inside = [np.frombuffer(v, np.uint8).ctypes.data for v in views]
    assert any(base <= p < base + weights.nbytes for p in inside)


def test_assembled_payload_decodes_zero_copy_and_writable() -> None:
    obj = model()
    payload = OutgoingPayload.from_object(obj, chunk_size=10_000)
    asm = ChunkAssembler(payload.info(), **LIMITS)
    for offset, data in payload.iter_chunks():
        asm.add(offset, bytes(data))
    out = asm.decode()
    buffer = asm.finish()
    assert np.array_equal(out["fc.weight"], obj["fc.weight"])
    assert np.shares_memory(out["fc.weight"], buffer)
    assert out["fc.weight"].flags.writeable
    assert out["meta"] == obj["meta"]


def test_empty_payload() -> None:
    payload = OutgoingPayload.from_bytes(b"", chunk_size=16)
    assert payload.total_size == 0 and list(payload.iter_chunks()) == []
    assert bytes(assemble(payload.info(), [], **LIMITS)) == b""


@settings(max_examples=60, deadline=None)
@given(data=st.binary(min_size=0, max_size=5000), chunk_size=st.integers(1, 700),
       cuts=st.lists(st.integers(0, 5000), max_size=6))
def test_any_segmentation_and_chunk_size_round_trips(data: bytes, chunk_size: int, cuts: list[int]) -> None:
    points = sorted({c for c in cuts if c < len(data)} | {0, len(data)})
    segments = [data[a:b] for a, b in itertools.pairwise(points)]
    payload = OutgoingPayload(segments, chunk_size=chunk_size)
    assert bytes(assemble(payload.info(), payload.iter_chunks(), **LIMITS)) == data


def test_resume_from_an_offset() -> None:
    data = bytes(range(256)) * 100
    payload = OutgoingPayload.from_bytes(data, chunk_size=1000)
    asm = ChunkAssembler(payload.info(), **LIMITS)
    for offset, chunk in list(payload.iter_chunks())[:7]:
        asm.add(offset, chunk)
    assert asm.received == 7000
    asm.resume(payload.info(start_offset=asm.received))
    for offset, chunk in payload.iter_chunks(start_offset=7000):
        asm.add(offset, chunk)
    assert bytes(asm.finish()) == data
    with pytest.raises(ChunkOrderError, match="starts at offset 7000, expected 0"):
        ChunkAssembler(payload.info(), **LIMITS).resume(payload.info(start_offset=7000))


def test_resume_rejects_another_payload() -> None:
    a = OutgoingPayload.from_bytes(b"a" * 5000, chunk_size=1000)
    b = OutgoingPayload.from_bytes(b"b" * 5000, chunk_size=1000)
    asm = ChunkAssembler(a.info(), **LIMITS)
    asm.add(0, b"a" * 1000)
    with pytest.raises(ChunkOrderError, match="different payload"):
        asm.resume(b.info(start_offset=1000))


def _asm(data: bytes = b"x" * 3000, chunk: int = 1000) -> tuple[ChunkAssembler, OutgoingPayload]:
    payload = OutgoingPayload.from_bytes(data, chunk_size=chunk)
    return ChunkAssembler(payload.info(), **LIMITS), payload


def test_out_of_order_duplicate_and_missing_chunks() -> None:
    asm, _ = _asm()
    with pytest.raises(ChunkOrderError, match="gap"):
        asm.add(1000, b"x" * 1000)
    asm.add(0, b"x" * 1000)
    with pytest.raises(ChunkOrderError, match="duplicated"):
        asm.add(0, b"x" * 1000)
    with pytest.raises(ChunkOrderError, match="incomplete: 1000 of 3000"):
        asm.finish()
    with pytest.raises(ChunkOrderError, match="empty chunk"):
        asm.add(1000, b"")


def test_oversized_chunk_and_chunk_past_the_end() -> None:
    asm, _ = _asm()
    with pytest.raises(PayloadSizeError, match="exceeds the chunk size"):
        asm.add(0, b"x" * 1001)
    asm, _ = _asm(b"x" * 2500)
    asm.add(0, b"x" * 1000)
    asm.add(1000, b"x" * 1000)
    with pytest.raises(PayloadSizeError, match="past the announced size 2500"):
        asm.add(2000, b"x" * 1000)


def test_corrupted_chunk_fails_the_digest_and_nothing_is_decoded() -> None:
    payload = OutgoingPayload.from_object(model(), chunk_size=50_000)
    asm = ChunkAssembler(payload.info(), **LIMITS)
    for i, (offset, data) in enumerate(payload.iter_chunks()):
        raw = bytearray(data)
        if i == 3:
            raw[17] ^= 0xFF
        asm.add(offset, raw)
    with pytest.raises(DigestMismatchError, match="SHA-256 mismatch"):
        asm.decode()


def test_limits_are_checked_before_allocation() -> None:
    huge = PayloadInfo(total_size=1 << 50, sha256=b"\0" * 32, chunk_size=1 << 20)
    with pytest.raises(PayloadSizeError, match="exceeds the limit"):
        ChunkAssembler(huge, max_payload_size=1 << 30, max_chunk_size=1 << 22)
    wide = PayloadInfo(total_size=10, sha256=b"\0" * 32, chunk_size=1 << 30)
    with pytest.raises(PayloadSizeError, match="chunk size"):
        ChunkAssembler(wide, max_payload_size=1 << 30, max_chunk_size=1 << 22)


@pytest.mark.parametrize("kwargs, match", [
    ({"total_size": -1, "sha256": b"\0" * 32, "chunk_size": 1}, "total_size"),
    ({"total_size": 1, "sha256": b"\0" * 31, "chunk_size": 1}, "sha256"),
    ({"total_size": 1, "sha256": b"\0" * 32, "chunk_size": 0}, "chunk_size"),
    ({"total_size": 10, "sha256": b"\0" * 32, "chunk_size": 4, "start_offset": 3}, "multiple"),
    ({"total_size": 10, "sha256": b"\0" * 32, "chunk_size": 4, "start_offset": 12}, "outside"),
])
def test_payload_info_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(FramingError, match=match):
        PayloadInfo(**kwargs)


def test_shared_map_payload_shares_model_memory_and_hashes_right() -> None:
    from fedcore.framing import SharedMapPayload

    params = {"w": np.arange(1 << 18, dtype=np.float32), "b": np.ones(3, np.float32)}
    shared = SharedMapPayload({"round": 2, "params": params}, own_keys=["aggregator"], chunk_size=1 << 16)
    a = shared.build({"aggregator": {"correction": {"w": np.full(4, 1.5)}}})
    b = shared.build({"aggregator": {}})
    for payload, own in ((a, {"correction": {"w": np.full(4, 1.5)}}), (b, {})):
        document = payload.tobytes()
        assert payload.sha256 == hashlib.sha256(document).digest()
        out = ChunkAssembler(payload.info(), **LIMITS)
        for offset, data in payload.iter_chunks():
            out.add(offset, data)
        decoded = out.decode()
        assert list(decoded) == ["round", "params", "aggregator"]
        assert np.array_equal(decoded["params"]["w"], params["w"])
        assert np.shares_memory(decoded["params"]["w"], out.finish()), "aligned zero-copy view expected"
        assert decoded["aggregator"].keys() == own.keys()
    with pytest.raises(FramingError, match="exactly"):
        shared.build({"other": 1})
    with pytest.raises(FramingError, match="both shared"):
        SharedMapPayload({"x": 1}, own_keys=["x"])
