"""Domain errors -> gRPC status codes, in one place, and the wrappers that apply it to every handler.

The exception classes live in :mod:`fedcore.errors` (the ``ServerError`` branch and the framing and
wire errors); this module only decides which status each one becomes. Handlers raise domain errors and
never call ``context.abort`` themselves. The table is also the error-code table of docs/protocol.md.
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
    TaskClosedError,
    UnknownNodeError,
    UnknownTaskError,
    UploadConflictError,
    VersionMismatchError,
)

log = logging.getLogger(__name__)

#: First matching class wins, so subclasses come before their bases.
STATUS_OF_ERROR: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (AuthenticationError, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (VersionMismatchError, grpc.StatusCode.FAILED_PRECONDITION),
    (TaskClosedError, grpc.StatusCode.FAILED_PRECONDITION),
    (NodeSupersededError, grpc.StatusCode.FAILED_PRECONDITION),  # a newer process of the node registered
    (UnknownTaskError, grpc.StatusCode.NOT_FOUND),
    (UnknownNodeError, grpc.StatusCode.NOT_FOUND),
    (LimitExceededError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (UploadConflictError, grpc.StatusCode.ABORTED),
    (ServerStateError, grpc.StatusCode.UNAVAILABLE),
    (DigestMismatchError, grpc.StatusCode.DATA_LOSS),
    (FramingError, grpc.StatusCode.INVALID_ARGUMENT),  # chunk out of order, past the announced size
    (MessageError, grpc.StatusCode.INVALID_ARGUMENT),
    (DecodeError, grpc.StatusCode.INVALID_ARGUMENT),
)


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The status a domain error becomes; INTERNAL for anything not in :data:`STATUS_OF_ERROR`."""
    for cls, code in STATUS_OF_ERROR:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException, method: str) -> None:
    code = status_for(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.exception("%s failed unexpectedly", method, exc_info=exc)
        details = f"internal server error in {method}: {type(exc).__name__}"
    else:
        log.info("%s refused with %s: %s", method, code.name, exc)
        details = str(exc)
    await context.abort(code, details)


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
