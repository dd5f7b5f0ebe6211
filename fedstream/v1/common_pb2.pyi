from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class TaskKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_KIND_UNSPECIFIED: _ClassVar[TaskKind]
    TASK_KIND_TRAIN: _ClassVar[TaskKind]
    TASK_KIND_EVALUATE: _ClassVar[TaskKind]

class TaskOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_OUTCOME_UNSPECIFIED: _ClassVar[TaskOutcome]
    TASK_OUTCOME_SUCCEEDED: _ClassVar[TaskOutcome]
    TASK_OUTCOME_FAILED: _ClassVar[TaskOutcome]
    TASK_OUTCOME_REFUSED: _ClassVar[TaskOutcome]

class ErrorReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_REASON_UNSPECIFIED: _ClassVar[ErrorReason]
    ERROR_REASON_UNAUTHENTICATED: _ClassVar[ErrorReason]
    ERROR_REASON_VERSION_MISMATCH: _ClassVar[ErrorReason]
    ERROR_REASON_NODE_SUPERSEDED: _ClassVar[ErrorReason]
    ERROR_REASON_TASK_CLOSED: _ClassVar[ErrorReason]
    ERROR_REASON_UNKNOWN_TASK: _ClassVar[ErrorReason]
    ERROR_REASON_TASK_NOT_SENT_TO_NODE: _ClassVar[ErrorReason]
    ERROR_REASON_UNKNOWN_NODE: _ClassVar[ErrorReason]
    ERROR_REASON_MALFORMED_MESSAGE: _ClassVar[ErrorReason]
    ERROR_REASON_FRAMING: _ClassVar[ErrorReason]
    ERROR_REASON_UPLOAD_INCOMPLETE: _ClassVar[ErrorReason]
    ERROR_REASON_BAD_RESULT_DOCUMENT: _ClassVar[ErrorReason]
    ERROR_REASON_DIGEST_MISMATCH: _ClassVar[ErrorReason]
    ERROR_REASON_PAYLOAD_TOO_LARGE: _ClassVar[ErrorReason]
    ERROR_REASON_UPLOADS_BUSY: _ClassVar[ErrorReason]
    ERROR_REASON_UPLOAD_IN_PROGRESS: _ClassVar[ErrorReason]
    ERROR_REASON_SERVER_STOPPING: _ClassVar[ErrorReason]
    ERROR_REASON_INTERNAL: _ClassVar[ErrorReason]
    ERROR_REASON_STALE_POLL: _ClassVar[ErrorReason]
    ERROR_REASON_UPLOAD_QUEUED: _ClassVar[ErrorReason]
TASK_KIND_UNSPECIFIED: TaskKind
TASK_KIND_TRAIN: TaskKind
TASK_KIND_EVALUATE: TaskKind
TASK_OUTCOME_UNSPECIFIED: TaskOutcome
TASK_OUTCOME_SUCCEEDED: TaskOutcome
TASK_OUTCOME_FAILED: TaskOutcome
TASK_OUTCOME_REFUSED: TaskOutcome
ERROR_REASON_UNSPECIFIED: ErrorReason
ERROR_REASON_UNAUTHENTICATED: ErrorReason
ERROR_REASON_VERSION_MISMATCH: ErrorReason
ERROR_REASON_NODE_SUPERSEDED: ErrorReason
ERROR_REASON_TASK_CLOSED: ErrorReason
ERROR_REASON_UNKNOWN_TASK: ErrorReason
ERROR_REASON_TASK_NOT_SENT_TO_NODE: ErrorReason
ERROR_REASON_UNKNOWN_NODE: ErrorReason
ERROR_REASON_MALFORMED_MESSAGE: ErrorReason
ERROR_REASON_FRAMING: ErrorReason
ERROR_REASON_UPLOAD_INCOMPLETE: ErrorReason
ERROR_REASON_BAD_RESULT_DOCUMENT: ErrorReason
ERROR_REASON_DIGEST_MISMATCH: ErrorReason
ERROR_REASON_PAYLOAD_TOO_LARGE: ErrorReason
ERROR_REASON_UPLOADS_BUSY: ErrorReason
ERROR_REASON_UPLOAD_IN_PROGRESS: ErrorReason
ERROR_REASON_SERVER_STOPPING: ErrorReason
ERROR_REASON_INTERNAL: ErrorReason
ERROR_REASON_STALE_POLL: ErrorReason
ERROR_REASON_UPLOAD_QUEUED: ErrorReason

class ProtocolVersion(_message.Message):
    __slots__ = ("major", "minor")
    MAJOR_FIELD_NUMBER: _ClassVar[int]
    MINOR_FIELD_NUMBER: _ClassVar[int]
    major: int
    minor: int
    def __init__(self, major: _Optional[int] = ..., minor: _Optional[int] = ...) -> None: ...

class PayloadHeader(_message.Message):
    __slots__ = ("total_size", "sha256", "chunk_size", "chunk_count", "start_offset")
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_COUNT_FIELD_NUMBER: _ClassVar[int]
    START_OFFSET_FIELD_NUMBER: _ClassVar[int]
    total_size: int
    sha256: bytes
    chunk_size: int
    chunk_count: int
    start_offset: int
    def __init__(self, total_size: _Optional[int] = ..., sha256: _Optional[bytes] = ..., chunk_size: _Optional[int] = ..., chunk_count: _Optional[int] = ..., start_offset: _Optional[int] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("offset", "data")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class DatasetInfo(_message.Message):
    __slots__ = ("name", "tags", "num_samples", "shape", "dtype", "format")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    name: str
    tags: _containers.RepeatedScalarFieldContainer[str]
    num_samples: int
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    format: str
    def __init__(self, name: _Optional[str] = ..., tags: _Optional[_Iterable[str]] = ..., num_samples: _Optional[int] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., format: _Optional[str] = ...) -> None: ...
