"""Domain errors -> gRPC status codes and error reasons, in one place, and the wrappers that apply it to
every handler.

The exception classes live in :mod:`fedcore.errors` (the ``ServerError`` branch and the framing and
wire errors); this module only decides which status each one becomes: a code, a message for humans, and
the name of a ``fedstream.v1.ErrorReason`` in the trailing metadata entry ``fedstream-error-reason``, which
tells a node what to do without reading the message (stop, drop the task, retry). Handlers raise domain
errors and never call ``context.abort`` themselves. The table is also the error-code table of
docs/protocol.md §7.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from fedcore.errors import (
    AuthenticationError,
    DecodeError,
    DigestMismatchError,
    FramingError,
    LimitExceededError,
    MessageError,
    NodeSupersededError,
    PermissionDeniedError,
    ServerStateError,
    StalePollError,
    TaskClosedError,
    UnknownNodeError,
    UnknownTaskError,
    UploadConflictError,
    UploadIncompleteError,
    UploadQueuedError,
    UploadsBusyError,
    VersionMismatchError,
)
from fedcore.wire.metadata_keys import REASON_METADATA_KEY
from fedstream.v1 import common_pb2

log = logging.getLogger(__name__)

_Code = grpc.StatusCode
_R = common_pb2.ErrorReason

#: ``(error class, status code, ErrorReason)``; the first matching class wins, so subclasses come first.
STATUS_OF_ERROR: tuple[tuple[type[BaseException], grpc.StatusCode, int], ...] = (
    (AuthenticationError, _Code.UNAUTHENTICATED, _R.ERROR_REASON_UNAUTHENTICATED),
    (PermissionDeniedError, _Code.PERMISSION_DENIED, _R.ERROR_REASON_TASK_NOT_SENT_TO_NODE),
    (VersionMismatchError, _Code.FAILED_PRECONDITION, _R.ERROR_REASON_VERSION_MISMATCH),
    (TaskClosedError, _Code.FAILED_PRECONDITION, _R.ERROR_REASON_TASK_CLOSED),
    (NodeSupersededError, _Code.FAILED_PRECONDITION, _R.ERROR_REASON_NODE_SUPERSEDED),  # a newer process registered
    (UnknownTaskError, _Code.NOT_FOUND, _R.ERROR_REASON_UNKNOWN_TASK),
    (UnknownNodeError, _Code.NOT_FOUND, _R.ERROR_REASON_UNKNOWN_NODE),
    (UploadsBusyError, _Code.RESOURCE_EXHAUSTED, _R.ERROR_REASON_UPLOADS_BUSY),  # before its base class
    # RESOURCE_EXHAUSTED, not UNAVAILABLE: a node that does not know the reason takes it for busy (a payload
    # within the limits) and retries in place keeping its place; UNAVAILABLE would make fednode reconnect
    (UploadQueuedError, _Code.RESOURCE_EXHAUSTED, _R.ERROR_REASON_UPLOAD_QUEUED),  # before its base class
    (LimitExceededError, _Code.RESOURCE_EXHAUSTED, _R.ERROR_REASON_PAYLOAD_TOO_LARGE),
    (UploadConflictError, _Code.ABORTED, _R.ERROR_REASON_UPLOAD_IN_PROGRESS),
    (StalePollError, _Code.ABORTED, _R.ERROR_REASON_STALE_POLL),  # a late poll of an abandoned connection
    (ServerStateError, _Code.UNAVAILABLE, _R.ERROR_REASON_SERVER_STOPPING),
    (DigestMismatchError, _Code.DATA_LOSS, _R.ERROR_REASON_DIGEST_MISMATCH),
    (UploadIncompleteError, _Code.INVALID_ARGUMENT, _R.ERROR_REASON_UPLOAD_INCOMPLETE),  # before FramingError
    (FramingError, _Code.INVALID_ARGUMENT, _R.ERROR_REASON_FRAMING),  # chunk out of order, past the announced size
    (MessageError, _Code.INVALID_ARGUMENT, _R.ERROR_REASON_MALFORMED_MESSAGE),
    (DecodeError, _Code.INVALID_ARGUMENT, _R.ERROR_REASON_BAD_RESULT_DOCUMENT),  # a result document
)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code a domain error becomes and the name of its ErrorReason; ``(INTERNAL,
    "ERROR_REASON_INTERNAL")`` for anything not in :data:`STATUS_OF_ERROR`."""
    for cls, code, reason in STATUS_OF_ERROR:
        if isinstance(exc, cls):
            return code, _R.Name(reason)
    return _Code.INTERNAL, _R.Name(_R.ERROR_REASON_INTERNAL)


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException, method: str) -> None:
    code, reason = status_for(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.exception("%s failed unexpectedly", method, exc_info=exc)
        details = f"internal server error in {method}: {type(exc).__name__}"
    else:
        details = bounded_details(str(exc))
        log.info("%s refused with %s (%s): %s", method, code.name, reason, details)
    await context.abort(code, details, trailing_metadata=((REASON_METADATA_KEY, reason),))


#: Longest status message sent, in UTF-8 bytes. gRPC sends it percent-encoded in the trailers (up to 3 bytes
#: per byte), and a client refuses trailers over its metadata limit (8 KiB by default; between the soft and
#: the hard limit at random) with RESOURCE_EXHAUSTED in place of the real status: a message that quotes a
#: long value the node sent (a 10 KB task id, every dataset name) must not lose the status it explains.
MAX_DETAILS_BYTES = 2000


def bounded_details(details: str) -> str:
    """``details`` cut to at most :data:`MAX_DETAILS_BYTES` UTF-8 bytes, saying how long it was."""
    raw = details.encode("utf-8")
    if len(raw) <= MAX_DETAILS_BYTES:
        return details
    head = raw[: MAX_DETAILS_BYTES - 64].decode("utf-8", "ignore")
    return f"{head}... (message cut: {len(details)} characters)"


T = TypeVar("T")


def translate_unary(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Wrap a unary-response handler ``(self, request, context)`` so domain errors become statuses."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> T:
        try:
            return await fn(self, request, context)
        except Exception as exc:
            if isinstance(exc, grpc.aio.AbortError):
                raise
            await _abort(context, exc, fn.__name__)
            raise AssertionError("unreachable: context.abort raises") from exc

    return wrapper


def translate_stream(fn: Callable[..., AsyncIterator[T]]) -> Callable[..., AsyncIterator[T]]:
    """Same as :func:`translate_unary` for a server-streaming handler (an async generator)."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[T]:
        try:
            async for item in fn(self, request, context):
                yield item
        except Exception as exc:
            if isinstance(exc, grpc.aio.AbortError):
                raise
            await _abort(context, exc, fn.__name__)

    return wrapper
