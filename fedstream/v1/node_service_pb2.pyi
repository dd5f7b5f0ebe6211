from fedstream.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TaskState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_STATE_UNSPECIFIED: _ClassVar[TaskState]
    TASK_STATE_ACTIVE: _ClassVar[TaskState]
    TASK_STATE_CLOSED: _ClassVar[TaskState]
    TASK_STATE_UNKNOWN: _ClassVar[TaskState]
TASK_STATE_UNSPECIFIED: TaskState
TASK_STATE_ACTIVE: TaskState
TASK_STATE_CLOSED: TaskState
TASK_STATE_UNKNOWN: TaskState

class RegisterRequest(_message.Message):
    __slots__ = ("version", "node_name", "datasets", "capabilities", "client_version", "instance_id")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    DATASETS_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    CLIENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    version: _common_pb2.ProtocolVersion
    node_name: str
    datasets: _containers.RepeatedCompositeFieldContainer[_common_pb2.DatasetInfo]
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    client_version: str
    instance_id: str
    def __init__(self, version: _Optional[_Union[_common_pb2.ProtocolVersion, _Mapping]] = ..., node_name: _Optional[str] = ..., datasets: _Optional[_Iterable[_Union[_common_pb2.DatasetInfo, _Mapping]]] = ..., capabilities: _Optional[_Iterable[str]] = ..., client_version: _Optional[str] = ..., instance_id: _Optional[str] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("node_id", "server_version", "max_poll_wait_seconds", "max_chunk_size", "max_payload_size", "heartbeat_interval_seconds", "task_chunk_size")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_POLL_WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_PAYLOAD_SIZE_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TASK_CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    server_version: _common_pb2.ProtocolVersion
    max_poll_wait_seconds: float
    max_chunk_size: int
    max_payload_size: int
    heartbeat_interval_seconds: float
    task_chunk_size: int
    def __init__(self, node_id: _Optional[str] = ..., server_version: _Optional[_Union[_common_pb2.ProtocolVersion, _Mapping]] = ..., max_poll_wait_seconds: _Optional[float] = ..., max_chunk_size: _Optional[int] = ..., max_payload_size: _Optional[int] = ..., heartbeat_interval_seconds: _Optional[float] = ..., task_chunk_size: _Optional[int] = ...) -> None: ...

class PollTaskRequest(_message.Message):
    __slots__ = ("version", "wait_seconds", "resume_task_id", "resume_offset", "held_task_ids", "reports_held_tasks", "poll_sequence")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RESUME_TASK_ID_FIELD_NUMBER: _ClassVar[int]
    RESUME_OFFSET_FIELD_NUMBER: _ClassVar[int]
    HELD_TASK_IDS_FIELD_NUMBER: _ClassVar[int]
    REPORTS_HELD_TASKS_FIELD_NUMBER: _ClassVar[int]
    POLL_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    version: _common_pb2.ProtocolVersion
    wait_seconds: float
    resume_task_id: str
    resume_offset: int
    held_task_ids: _containers.RepeatedScalarFieldContainer[str]
    reports_held_tasks: bool
    poll_sequence: int
    def __init__(self, version: _Optional[_Union[_common_pb2.ProtocolVersion, _Mapping]] = ..., wait_seconds: _Optional[float] = ..., resume_task_id: _Optional[str] = ..., resume_offset: _Optional[int] = ..., held_task_ids: _Optional[_Iterable[str]] = ..., reports_held_tasks: _Optional[bool] = ..., poll_sequence: _Optional[int] = ...) -> None: ...

class PollTaskResponse(_message.Message):
    __slots__ = ("task", "chunk", "no_task", "shutdown")
    TASK_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    NO_TASK_FIELD_NUMBER: _ClassVar[int]
    SHUTDOWN_FIELD_NUMBER: _ClassVar[int]
    task: TaskHeader
    chunk: _common_pb2.Chunk
    no_task: NoTask
    shutdown: ServerShutdown
    def __init__(self, task: _Optional[_Union[TaskHeader, _Mapping]] = ..., chunk: _Optional[_Union[_common_pb2.Chunk, _Mapping]] = ..., no_task: _Optional[_Union[NoTask, _Mapping]] = ..., shutdown: _Optional[_Union[ServerShutdown, _Mapping]] = ...) -> None: ...

class TaskHeader(_message.Message):
    __slots__ = ("task_id", "experiment_id", "round", "kind", "payload", "inactivity_timeout_seconds")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    EXPERIMENT_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    INACTIVITY_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    experiment_id: str
    round: int
    kind: _common_pb2.TaskKind
    payload: _common_pb2.PayloadHeader
    inactivity_timeout_seconds: float
    def __init__(self, task_id: _Optional[str] = ..., experiment_id: _Optional[str] = ..., round: _Optional[int] = ..., kind: _Optional[_Union[_common_pb2.TaskKind, str]] = ..., payload: _Optional[_Union[_common_pb2.PayloadHeader, _Mapping]] = ..., inactivity_timeout_seconds: _Optional[float] = ...) -> None: ...

class NoTask(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerShutdown(_message.Message):
    __slots__ = ("reason", "retry_after_seconds")
    REASON_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    reason: str
    retry_after_seconds: float
    def __init__(self, reason: _Optional[str] = ..., retry_after_seconds: _Optional[float] = ...) -> None: ...

class UploadResultRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: UploadHeader
    chunk: _common_pb2.Chunk
    def __init__(self, header: _Optional[_Union[UploadHeader, _Mapping]] = ..., chunk: _Optional[_Union[_common_pb2.Chunk, _Mapping]] = ...) -> None: ...

class UploadHeader(_message.Message):
    __slots__ = ("version", "task_id", "outcome", "error_message", "payload")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    version: _common_pb2.ProtocolVersion
    task_id: str
    outcome: _common_pb2.TaskOutcome
    error_message: str
    payload: _common_pb2.PayloadHeader
    def __init__(self, version: _Optional[_Union[_common_pb2.ProtocolVersion, _Mapping]] = ..., task_id: _Optional[str] = ..., outcome: _Optional[_Union[_common_pb2.TaskOutcome, str]] = ..., error_message: _Optional[str] = ..., payload: _Optional[_Union[_common_pb2.PayloadHeader, _Mapping]] = ...) -> None: ...

class UploadResultResponse(_message.Message):
    __slots__ = ("task_id", "received_bytes")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    received_bytes: int
    def __init__(self, task_id: _Optional[str] = ..., received_bytes: _Optional[int] = ...) -> None: ...

class GetUploadStatusRequest(_message.Message):
    __slots__ = ("version", "task_id")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    version: _common_pb2.ProtocolVersion
    task_id: str
    def __init__(self, version: _Optional[_Union[_common_pb2.ProtocolVersion, _Mapping]] = ..., task_id: _Optional[str] = ...) -> None: ...

class GetUploadStatusResponse(_message.Message):
    __slots__ = ("acknowledged_offset", "complete", "refused_reason", "refused_message")
    ACKNOWLEDGED_OFFSET_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    REFUSED_REASON_FIELD_NUMBER: _ClassVar[int]
    REFUSED_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    acknowledged_offset: int
    complete: bool
    refused_reason: _common_pb2.ErrorReason
    refused_message: str
    def __init__(self, acknowledged_offset: _Optional[int] = ..., complete: _Optional[bool] = ..., refused_reason: _Optional[_Union[_common_pb2.ErrorReason, str]] = ..., refused_message: _Optional[str] = ...) -> None: ...

class ReportRequest(_message.Message):
    __slots__ = ("version", "task_id", "events")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    version: _common_pb2.ProtocolVersion
    task_id: str
    events: _containers.RepeatedCompositeFieldContainer[ReportEvent]
    def __init__(self, version: _Optional[_Union[_common_pb2.ProtocolVersion, _Mapping]] = ..., task_id: _Optional[str] = ..., events: _Optional[_Iterable[_Union[ReportEvent, _Mapping]]] = ...) -> None: ...

class ReportEvent(_message.Message):
    __slots__ = ("timestamp", "progress", "log")
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    LOG_FIELD_NUMBER: _ClassVar[int]
    timestamp: float
    progress: TrainingProgress
    log: LogLine
    def __init__(self, timestamp: _Optional[float] = ..., progress: _Optional[_Union[TrainingProgress, _Mapping]] = ..., log: _Optional[_Union[LogLine, _Mapping]] = ...) -> None: ...

class TrainingProgress(_message.Message):
    __slots__ = ("epoch", "iteration", "total_iterations", "num_samples", "num_samples_max", "loss")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_MAX_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    iteration: int
    total_iterations: int
    num_samples: int
    num_samples_max: int
    loss: float
    def __init__(self, epoch: _Optional[int] = ..., iteration: _Optional[int] = ..., total_iterations: _Optional[int] = ..., num_samples: _Optional[int] = ..., num_samples_max: _Optional[int] = ..., loss: _Optional[float] = ...) -> None: ...

class LogLine(_message.Message):
    __slots__ = ("level", "message")
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    level: str
    message: str
    def __init__(self, level: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class ReportResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("version", "task_id")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    version: _common_pb2.ProtocolVersion
    task_id: str
    def __init__(self, version: _Optional[_Union[_common_pb2.ProtocolVersion, _Mapping]] = ..., task_id: _Optional[str] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("shutting_down", "task_state")
    SHUTTING_DOWN_FIELD_NUMBER: _ClassVar[int]
    TASK_STATE_FIELD_NUMBER: _ClassVar[int]
    shutting_down: bool
    task_state: TaskState
    def __init__(self, shutting_down: _Optional[bool] = ..., task_state: _Optional[_Union[TaskState, str]] = ...) -> None: ...
