"""The upload line is strictly oldest first (review R3): an upload is admitted only when it fits AND no upload
in line holds an older ticket, and a woken head keeps its claim until it begins or leaves.

Before, a wait admitted any upload that fitted: with mixed sizes under ``max_buffered_bytes`` younger small
uploads kept taking the room, a big upload at the head never fitted, every wait of it saw the line move and
ended ERROR_REASON_UPLOAD_QUEUED, and its node uploaded again at once, without end. A newcomer handled in the
loop step between the head's wake-up and its look at the room took the room too. And a resume alone (a parked
upload that resumes and breaks at once) counted as the line moving, so every waiter got QUEUED.
"""

from __future__ import annotations

import asyncio
import hashlib

from e2e_support import eventually
from server_testkit import async_test

from fedcore.errors import UploadQueuedError, UploadsBusyError
from fedcore.framing import PayloadInfo
from fedserver.uploads import UploadSessions

CHUNK = 4096


def _info(size: int, start: int = 0) -> PayloadInfo:
    return PayloadInfo(size, hashlib.sha256(bytes(size)).digest(), CHUNK, start)


async def _small_upload(uploads: UploadSessions, task_id: str, began: list[str], seconds: float) -> None:
    """A small upload: waits in line, begins, receives for ``seconds``, completes (its buffer freed)."""
    async with uploads.line(task_id, 4 * CHUNK, timeout=5) as turn:
        session = turn.begin("n", _info(4 * CHUNK))
    began.append(task_id)
    await asyncio.sleep(seconds)
    for offset in range(0, 4 * CHUNK, CHUNK):
        session.assembler.add(offset, bytes(CHUNK))
    uploads.end(session)
    uploads.discard(task_id)


@async_test
async def test_a_big_upload_at_the_head_is_not_overtaken_by_younger_small_ones() -> None:
    """10 chunks of budget, small uploads of 4 overlapping without pause, a big one of 8: before, each of its
    waits ended queued while younger small ones began (the line "moved") and it was never admitted."""
    uploads = UploadSessions(max_payload_size=1 << 30, max_chunk_size=1 << 20, max_sessions=10,
                             max_buffered_bytes=10 * CHUNK, line_wait_seconds=0.5)
    began: list[str] = []
    smalls: list[asyncio.Task[None]] = []

    async def feed() -> None:  # a new small upload every 50 ms, each receiving for 100 ms: two always overlap
        for n in range(60):
            smalls.append(asyncio.ensure_future(_small_upload(uploads, f"s{n}", began, 0.1)))
            await asyncio.sleep(0.05)

    feeder = asyncio.ensure_future(feed())
    await eventually(lambda: len(began) >= 2, 2, "two small uploads running")
    outcomes: list[str] = []
    try:
        for _ in range(6):  # the big upload's node: queued -> upload again at once, keeping its place
            try:
                async with uploads.line("big", 8 * CHUNK) as turn:
                    turn.begin("n", _info(8 * CHUNK))
            except UploadQueuedError:
                outcomes.append("queued")
            else:
                outcomes.append("admitted")
                break
        before_big = len(began)
    finally:
        feeder.cancel()
        for task in smalls:
            task.cancel()
        await asyncio.gather(feeder, *smalls, return_exceptions=True)
    assert outcomes == ["admitted"], f"oldest-first broken: {outcomes}, {before_big} small uploads began"
    assert before_big <= 4, f"{before_big} small uploads began before the big one: younger ones overtook it"


@async_test
async def test_a_newcomer_cannot_take_the_slot_handed_to_the_head() -> None:
    """One slot: t1 waits (the head); the slot frees and a newcomer t2 is handled in the same loop step, before
    t1 looks at the room. Before, t1 had been popped from the line on its wake-up, t2 saw room and nobody
    ahead, and took the slot."""
    uploads = UploadSessions(max_payload_size=1 << 30, max_chunk_size=1 << 20, max_sessions=1)
    uploads.begin("t0", "n", _info(10))
    admitted: list[str] = []

    async def upload(task_id: str) -> None:
        async with uploads.line(task_id, 10, timeout=5) as turn:
            turn.begin("n", _info(10))
        admitted.append(task_id)

    head = asyncio.ensure_future(upload("t1"))
    await eventually(lambda: uploads.waiting == 1, 1, "t1 in line")
    newcomer = asyncio.ensure_future(upload("t2"))  # runs first on the next loop step...
    uploads.discard("t0")  # ...then t1, woken here
    await eventually(lambda: admitted, 1, "an upload admitted")
    assert admitted == ["t1"]
    assert uploads.waiting == 1  # t2 waits behind it
    uploads.discard("t1")
    await asyncio.wait_for(asyncio.gather(head, newcomer), 2)
    assert admitted == ["t1", "t2"]


@async_test
async def test_a_kept_place_goes_ahead_of_uploads_that_came_after_it() -> None:
    """t1 waited and left (its call ended); t2 came meanwhile; t1's retry within place_kept_seconds takes its
    place back: when the slot frees, t1 goes first."""
    uploads = UploadSessions(max_payload_size=1 << 30, max_chunk_size=1 << 20, max_sessions=1)
    uploads.begin("t0", "n", _info(10))
    assert not await uploads.wait_for_room("t1", 10, timeout=0.05)  # its ticket is kept
    admitted: list[str] = []

    async def upload(task_id: str) -> None:
        async with uploads.line(task_id, 10, timeout=5) as turn:
            turn.begin("n", _info(10))
        admitted.append(task_id)

    later = asyncio.ensure_future(upload("t2"))
    await eventually(lambda: uploads.waiting == 1, 1, "t2 in line")
    retry = asyncio.ensure_future(upload("t1"))
    await eventually(lambda: uploads.waiting == 2, 1, "t1 back in line")
    uploads.discard("t0")
    await eventually(lambda: admitted, 1, "an upload admitted")
    assert admitted == ["t1"]
    uploads.discard("t1")
    await asyncio.wait_for(asyncio.gather(later, retry), 2)
    assert admitted == ["t1", "t2"]


@async_test
async def test_room_behind_an_older_waiter_is_refused_naming_the_line() -> None:
    """t2 fits the byte budget but t1, older and bigger, waits: t2's wait runs out refused, its message saying
    older uploads are ahead of it (not a begin that would overtake t1)."""
    uploads = UploadSessions(max_payload_size=1 << 30, max_chunk_size=1 << 20, max_sessions=10,
                             max_buffered_bytes=10 * CHUNK)
    uploads.begin("t0", "n", _info(4 * CHUNK))
    big = asyncio.ensure_future(uploads.wait_for_room("t1", 8 * CHUNK, timeout=5))
    await eventually(lambda: uploads.waiting == 1, 1, "t1 in line")
    try:
        async with uploads.line("t2", 4 * CHUNK, timeout=0.1) as turn:
            turn.begin("n", _info(4 * CHUNK))
    except UploadsBusyError as exc:
        assert "1 older upload wait in line ahead of it" in str(exc)
    else:
        raise AssertionError("a younger upload overtook an older one in line")
    uploads.discard("t0")
    assert await asyncio.wait_for(big, 2)


@async_test
async def test_a_resume_alone_does_not_make_a_wait_queued() -> None:
    """Two slots: t0 runs (silent), p is parked. While t1 waits, p resumes and breaks at once: nothing got
    nearer to freeing room, so t1's wait ends busy, not queued (before, the resume counted as the line moving,
    and a parked upload resuming over and over kept every waiter getting QUEUED)."""
    uploads = UploadSessions(max_payload_size=1 << 30, max_chunk_size=1 << 20, max_sessions=2)
    uploads.begin("t0", "n", _info(2 * CHUNK))
    parked = uploads.begin("p", "n", _info(2 * CHUNK))
    parked.assembler.add(0, bytes(CHUNK))
    uploads.end(parked)

    async def resume_and_break() -> None:
        await asyncio.sleep(0.05)
        session = uploads.begin("p", "n", _info(2 * CHUNK, start=CHUNK))
        uploads.end(session)

    resumer = asyncio.ensure_future(resume_and_break())
    try:
        async with uploads.line("t1", 10, timeout=0.3) as turn:
            turn.begin("n", _info(10))
    except UploadQueuedError as exc:
        raise AssertionError(f"a resume alone made the wait queued: {exc}") from None
    except UploadsBusyError as exc:
        assert "waited 0.3 s in line" in str(exc)
    else:
        raise AssertionError("admitted without room")
    await resumer


@async_test
async def test_a_restart_from_zero_alone_does_not_make_a_wait_queued() -> None:
    """A parked upload started again from offset 0 (its bytes replaced) frees nothing for the line."""
    uploads = UploadSessions(max_payload_size=1 << 30, max_chunk_size=1 << 20, max_sessions=2)
    uploads.begin("t0", "n", _info(2 * CHUNK))
    parked = uploads.begin("p", "n", _info(2 * CHUNK))
    parked.assembler.add(0, bytes(CHUNK))
    uploads.end(parked)
    before = uploads.progress()
    del parked
    uploads.end(uploads.begin("p", "n", _info(2 * CHUNK)))
    assert uploads.progress() == before
