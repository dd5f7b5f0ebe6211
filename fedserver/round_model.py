"""``RoundModel``: the global model x of one round, and the task payloads streamed from it.

x is encoded and hashed once (:class:`~fedcore.framing.SharedMapPayload`); every node's payload
(:class:`TaskPayload`) streams views of those same bytes, followed by its own small entries.

A releasable round model (``reload`` given, as ``Experiment(low_memory=True)`` does) can let go of x:
:meth:`RoundModel.release` drops every reference it and its payloads hold, so that, once every node has
its task, the server holds the running sum and one upload without x beside them. Whoever needs x after
that gets it back through ``reload`` (the last checkpoint), verified: the shared entries re-encoded from
the reloaded arrays must hash to the digest computed from x at the start of the round, so what comes
back is x bit for bit (names, order, dtypes, shapes, bytes), or :class:`CheckpointError` says it is not.
Two users of a reload: a node resuming a download after the release (:meth:`TaskPayload.iter_chunks`
streams from the reloaded x while any such stream runs), and a round that fails (``params()``). A reload
that fails (:class:`CheckpointError`) is remembered: every later request fails at once with the same error
(the server then fails that node's task instead of letting the node ask again and again).

A reload (read the checkpoint, encode, hash: 5.9 s at 2.4 GB) runs in a worker thread
(:meth:`RoundModel.params_async`, :meth:`TaskPayload.open_chunks`), so heartbeats and other nodes'
streams keep flowing meanwhile; concurrent requests share one reload. The synchronous
:meth:`RoundModel.params` and :meth:`TaskPayload.iter_chunks` reload on the calling thread (for code
outside the event loop and tests).

Hashing is the expensive part of building payloads too (0.55 CPU s/GB: 1.4 s for a 2.5 GB model, and
Scaffold's per-node correction is model-sized), so the event loop's way in does it in a worker thread
as well: :meth:`RoundModel.create` (x's shared entries) and :meth:`RoundModel.payload_async` (one node's
own entries); hashlib releases the GIL, so the loop keeps serving polls, heartbeats and streams.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from fedcore.errors import CheckpointError, EncodeError, ExperimentError, FramingError
from fedcore.framing import OutgoingPayload, PayloadInfo, SharedMapPayload
from fedcore.tasks import TrainTask

log = logging.getLogger(__name__)

Params = dict[str, np.ndarray]


class RoundModel:
    """x of round ``task.round`` and the payloads built from it (see the module docstring).

    ``reload``: returns x again (e.g. ``CheckpointStore.load_params`` of the checkpoint holding it);
    None makes the model non-releasable (x is held until the object goes). ``buffers``: the names in x that
    are persistent buffers (BatchNorm statistics), not parameters, for the aggregator's ``begin_round``.
    """

    def __init__(self, task: TrainTask, chunk_size: int, *, reload: Callable[[], Params] | None = None,
                 buffers: Sequence[str] = ()) -> None:
        self._task = replace(task, params={})  # every field but x, to re-encode the shared entries
        self.chunk_size = chunk_size
        self.buffers: tuple[str, ...] = tuple(buffers)
        self._reload = reload
        self._x: Params | None = task.params
        self._shared: SharedMapPayload | None = self._encode(task.params)
        self._reference = self._probe(self._shared)  # digest of the shared entries with x, + empty own entries
        # weak: a payload refers to its model (to reload x), so strong references both ways would make a
        # cycle that only the cyclic GC frees, keeping x of past rounds alive (and 40 MB each at 10M params)
        self._payloads: weakref.WeakSet[TaskPayload] = weakref.WeakSet()
        # while resumed downloads stream after the release: the reloaded x and its encoding, and how many streams
        self._reloaded: tuple[Params, SharedMapPayload] | None = None
        self._streams = 0
        self._loading: asyncio.Future[tuple[Params, SharedMapPayload]] | None = None  # the reload under way
        self._reload_error: CheckpointError | None = None  # a failed reload: every later one fails the same

    @classmethod
    async def create(cls, task: TrainTask, chunk_size: int, *, reload: Callable[[], Params] | None = None,
                     buffers: Sequence[str] = ()) -> RoundModel:
        """The constructor, run in a worker thread: encoding and hashing x stays off the event loop."""
        return await asyncio.to_thread(cls, task, chunk_size, reload=reload, buffers=buffers)

    @property
    def round(self) -> int:
        return self._task.round

    @property
    def releasable(self) -> bool:
        return self._reload is not None

    @property
    def released(self) -> bool:
        return self._x is None

    def params(self) -> Params:
        """x: the arrays given at construction, or (after :meth:`release`) x reloaded and verified."""
        if self._x is not None:
            return self._x
        if self._reloaded is not None:
            return self._reloaded[0]
        return self._load()[0]

    async def params_async(self) -> Params:
        """:meth:`params`, with a reload done in a worker thread (shared with concurrent reloads)."""
        if self._x is not None:
            return self._x
        if self._reloaded is not None:
            return self._reloaded[0]
        return (await self._load_async())[0]

    def payload(self, own: dict[str, Any]) -> TaskPayload:
        """The payload of one node whose own entries are ``own`` (exactly ``TrainTask.OWN_KEYS``)."""
        if self._shared is None:
            raise ExperimentError(f"round {self.round}: the global model was released; no new task can be built")
        built = TaskPayload(self, own, self._shared.build(own))
        self._payloads.add(built)
        return built

    async def payload_async(self, own: dict[str, Any]) -> TaskPayload:
        """:meth:`payload` with the own entries encoded and hashed in a worker thread."""
        shared = self._shared
        if shared is None:
            raise ExperimentError(f"round {self.round}: the global model was released; no new task can be built")
        built = TaskPayload(self, own, await asyncio.to_thread(shared.build, own))
        if self._shared is None:  # released while it was being built: stream it from a reload, like the others
            built._inner = None
        self._payloads.add(built)
        return built

    def release(self) -> None:
        """Drop x and its encoding here and in every payload built from it (reloaded when needed again)."""
        if self._reload is None:
            raise ExperimentError(f"round {self.round}: this round model cannot reload x, so it cannot release it")
        self._x = None
        self._shared = None
        for built in list(self._payloads):
            built._inner = None

    # -- reloading ---------------------------------------------------------------------------------
    def _encode(self, params: Params) -> SharedMapPayload:
        entries = replace(self._task, params=params).shared_entries()
        return SharedMapPayload(entries, list(TrainTask.OWN_KEYS), self.chunk_size)

    @staticmethod
    def _probe(shared: SharedMapPayload) -> bytes:
        return shared.build({key: {} for key in TrainTask.OWN_KEYS}).sha256

    def _load(self) -> tuple[Params, SharedMapPayload]:
        """x reloaded and verified. A CheckpointError is remembered and raised again at once by every
        later call: the checkpoint is the round's only copy of x, and reading it again (seconds for a big
        model) for each node that asks would only fail again."""
        assert self._reload is not None
        if self._reload_error is not None:
            raise CheckpointError(str(self._reload_error))
        try:
            return self._load_verified()
        except CheckpointError as exc:
            self._reload_error = exc
            raise

    def _load_verified(self) -> tuple[Params, SharedMapPayload]:
        assert self._reload is not None
        params = self._reload()
        try:
            shared = self._encode(params)
        except (EncodeError, FramingError) as exc:  # not this round's x either
            raise CheckpointError(f"round {self.round}: the reloaded global model cannot be encoded: {exc}") from None
        if self._probe(shared) != self._reference:
            raise CheckpointError(
                f"round {self.round}: the reloaded global model is not the one this round started from (its "
                "encoding's SHA-256 differs): the checkpoint was replaced, or x was changed in place during the round")
        log.info("round=%d global model reloaded and verified (%d bytes)", self.round, shared.shared_size)
        return params, shared

    async def _load_async(self) -> tuple[Params, SharedMapPayload]:
        """:meth:`_load` in a worker thread; callers arriving while it runs wait for the same one."""
        if self._loading is None:
            loading = self._loading = asyncio.ensure_future(asyncio.to_thread(self._load))

            def done(future: asyncio.Future[tuple[Params, SharedMapPayload]]) -> None:
                if self._loading is future:
                    self._loading = None
                if not future.cancelled():
                    future.exception()  # retrieved: every waiter may have gone

            loading.add_done_callback(done)
        return await asyncio.shield(self._loading)

    async def _stream_started_async(self) -> SharedMapPayload:
        """:meth:`_stream_started` with the reload (if one is needed) off the event loop."""
        if self._shared is None and self._reloaded is None:
            loaded = await self._load_async()
            if self._shared is None and self._reloaded is None:
                self._reloaded = loaded
        return self._stream_started()

    def _stream_started(self) -> SharedMapPayload:
        """The encoding to stream a released payload from (reloaded for the first of concurrent streams)."""
        if self._shared is not None:  # not released after all
            shared = self._shared
        elif self._reloaded is not None:
            shared = self._reloaded[1]
        else:
            self._reloaded = self._load()
            shared = self._reloaded[1]
        self._streams += 1
        return shared

    def _stream_ended(self) -> None:
        self._streams -= 1
        if self._streams == 0:
            self._reloaded = None


class TaskPayload:
    """One node's task payload (a :class:`fedserver.tasks.SendablePayload` and ``PreparedPayload``, like an
    :class:`~fedcore.framing.OutgoingPayload`) that survives its model's release.

    Size, digest and chunking never change; after the release, streaming it (a resumed download)
    rebuilds the bytes from the reloaded x and checks their digest before sending any.
    """

    def __init__(self, model: RoundModel, own: dict[str, Any], inner: OutgoingPayload) -> None:
        self._model = model
        self._own = own
        self._inner: OutgoingPayload | None = inner
        self.chunk_size = inner.chunk_size
        self.total_size = inner.total_size
        self.sha256 = inner.sha256

    def info(self, start_offset: int = 0) -> PayloadInfo:
        """The header describing this payload when sending from ``start_offset``."""
        return PayloadInfo(self.total_size, self.sha256, self.chunk_size, start_offset)

    def iter_chunks(self, start_offset: int = 0) -> Iterator[tuple[int, memoryview | bytes]]:
        """``(offset, data)`` pairs from ``start_offset`` to the end, as OutgoingPayload yields them."""
        if self._inner is not None:
            yield from self._inner.iter_chunks(start_offset)
            return
        self.info(start_offset)  # validates the offset before anything is reloaded
        shared = self._model._stream_started()
        try:
            yield from self._rebuild(shared).iter_chunks(start_offset)
        finally:
            self._model._stream_ended()

    async def open_chunks(self, start_offset: int = 0) -> Iterator[tuple[int, memoryview | bytes]]:
        """:meth:`iter_chunks` for the server's event loop: a reload it needs is done in a worker thread
        before this returns (:class:`fedserver.tasks.PreparedPayload`). Close the iterator when done."""
        if self._inner is not None:
            return self._inner.iter_chunks(start_offset)
        self.info(start_offset)  # validates the offset before anything is reloaded
        shared = await self._model._stream_started_async()
        try:
            rebuilt = await asyncio.to_thread(self._rebuild, shared)  # hashes the node's own entries
        except BaseException:
            self._model._stream_ended()
            raise
        return _StreamOfReloaded(rebuilt.iter_chunks(start_offset), self._model._stream_ended)

    def _rebuild(self, shared: SharedMapPayload) -> OutgoingPayload:
        rebuilt = shared.build(self._own)
        if rebuilt.sha256 != self.sha256 or rebuilt.total_size != self.total_size:
            raise CheckpointError(f"round {self._model.round}: the rebuilt task payload differs from the one "
                                  "announced to the node")
        return rebuilt

    def tobytes(self) -> bytes:
        """The whole document as one ``bytes`` (for small payloads and tests)."""
        return b"".join(data for _, data in self.iter_chunks())


class _StreamOfReloaded:
    """Chunks of a payload rebuilt from a reloaded x; ends its stream (the reload may go) once, when closed
    or collected, whether or not it was iterated."""

    def __init__(self, chunks: Iterator[tuple[int, memoryview | bytes]], on_end: Callable[[], None]) -> None:
        self._chunks = chunks
        self._on_end: Callable[[], None] | None = on_end

    def __iter__(self) -> _StreamOfReloaded:
        return self

    def __next__(self) -> tuple[int, memoryview | bytes]:
        return next(self._chunks)

    def close(self) -> None:
        on_end, self._on_end = self._on_end, None
        if on_end is not None:
            on_end()

    def __del__(self) -> None:
        self.close()
