"""Scale: uploads wait in line instead of being refused, and 200 real node clients complete a FedAvg round.

The full figure (1000 nodes in 4 processes, ≤ 30 s per round) is ``scripts/bench_scale.py``; here the same
script runs with 200 clients in one worker process.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedcore.errors import LimitExceededError, UploadsBusyError
from fedcore.framing import PayloadInfo
from fedserver.uploads import UploadSessions
from tests.server_testkit import async_test

ROOT = Path(__file__).resolve().parents[1]


def info(size: int) -> PayloadInfo:
    return PayloadInfo(size, hashlib.sha256(bytes(size)).digest(), 1 << 20)


def sessions(max_sessions: int = 2, max_buffered_bytes: int | None = None) -> UploadSessions:
    return UploadSessions(max_payload_size=1 << 30, max_chunk_size=1 << 20, max_sessions=max_sessions,
                          max_buffered_bytes=max_buffered_bytes)


@async_test
async def test_an_upload_waits_for_a_running_one_and_then_gets_its_slot() -> None:
    uploads = sessions(max_sessions=2)
    first = uploads.begin("t1", "a", info(10))
    uploads.begin("t2", "b", info(10))
    waiting = asyncio.ensure_future(uploads.wait_for_room("t3", 10, timeout=5))
    await asyncio.sleep(0.05)
    assert not waiting.done(), "two running uploads hold both slots: the third waits"
    uploads.end(first)
    uploads.discard("t1")
    assert await asyncio.wait_for(waiting, 1) is True
    assert uploads.begin("t3", "c", info(10)).received == 0


@async_test
async def test_waiters_are_admitted_oldest_first() -> None:
    uploads = sessions(max_sessions=1)
    uploads.begin("t0", "a", info(10))
    admitted: list[str] = []

    async def upload(task_id: str) -> None:
        assert await uploads.wait_for_room(task_id, 10, timeout=5)
        uploads.begin(task_id, task_id, info(10))
        admitted.append(task_id)

    waiters = [asyncio.ensure_future(upload(f"t{i}")) for i in range(1, 5)]
    await asyncio.sleep(0.02)
    for i in range(4):
        uploads.discard(f"t{i}")
        await asyncio.sleep(0.01)
    await asyncio.wait_for(asyncio.gather(*waiters), 1)
    assert admitted == ["t1", "t2", "t3", "t4"]


@async_test
async def test_waiting_stops_at_once_when_only_parked_sessions_hold_the_slots() -> None:
    uploads = sessions(max_sessions=1)
    running = uploads.begin("t1", "a", info(10))
    waiting = asyncio.ensure_future(uploads.wait_for_room("t2", 10, timeout=5))
    await asyncio.sleep(0.02)
    uploads.end(running)  # the stream broke: the session is parked for a resume, it will not end soon
    assert await asyncio.wait_for(waiting, 1) is False
    with pytest.raises(UploadsBusyError, match=r"too many concurrent uploads \(1, limit 1\)"):
        uploads.begin("t2", "b", info(10))


@async_test
async def test_a_byte_budget_receives_big_uploads_one_after_the_other() -> None:
    uploads = sessions(max_sessions=16, max_buffered_bytes=1000)
    big = uploads.begin("big1", "a", info(900))  # alone, an upload always fits (even over the budget)
    uploads.begin("small", "s", info(100))  # fits next to it
    assert await uploads.wait_for_room("big2", 900, timeout=0.05) is False  # timed out: 1000 bytes held
    with pytest.raises(UploadsBusyError, match="hold 1000 bytes; 900 more exceed this server's upload buffer"):
        uploads.begin("big2", "b", info(900))
    waiting = asyncio.ensure_future(uploads.wait_for_room("big2", 900, timeout=5))
    uploads.end(big)
    uploads.discard("big1")
    assert await asyncio.wait_for(waiting, 1) is True
    uploads.begin("big2", "b", info(900))
    assert len(uploads) == 2


def test_an_upload_over_a_limit_is_refused_as_too_large_even_when_no_buffer_is_free() -> None:
    uploads = sessions(max_sessions=1)
    uploads.begin("t1", "a", info(10))
    with pytest.raises(LimitExceededError, match="exceeds this server's limit") as refused:
        uploads.begin("t2", "b", PayloadInfo(1 << 31, bytes(32), 1 << 20))
    assert not isinstance(refused.value, UploadsBusyError), "too large, not busy: retrying cannot help"


@async_test
async def test_a_finished_upload_counts_against_the_byte_budget_until_its_buffer_is_freed() -> None:
    uploads = sessions(max_sessions=16, max_buffered_bytes=1000)
    first = uploads.begin("t1", "a", info(900))
    assembled = np.empty(900, np.uint8)  # what finish() returned: decoded arrays are views of it
    uploads.end(first)
    uploads.discard("t1", held_until_freed=assembled)
    waiting = asyncio.ensure_future(uploads.wait_for_room("t2", 900, timeout=5))
    await asyncio.sleep(0.05)
    assert not waiting.done(), "the first result is still being aggregated: its 900 bytes are still in use"
    del assembled
    assert await asyncio.wait_for(waiting, 1) is True
    uploads.begin("t2", "b", info(900))


def test_two_hundred_node_clients_complete_a_fedavg_round(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_scale.py"), "--nodes", "200", "--procs", "1",
           "--rounds", "1", "--timeout", "60", "--json", str(out)]
    proc = subprocess.run(cmd, check=False, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["aggregated"] == [200], "every reply is in the average (the script also checks the values)"
    assert result["round_s"][0] < 20, result
    assert sum(w["delivered"] for w in result["workers"]) == 200
