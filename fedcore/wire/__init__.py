"""The wire, shared by fedserver and fednode: protocol version, metadata keys, domain messages, protobuf
conversion.

Imports protobuf and fedcore only (never grpc). ``fedcore.wire.convert`` is the only module that touches
protobuf messages; everything else works with the dataclasses of ``fedcore.wire.messages``.
"""

from fedcore.wire.messages import (
    LOG_LEVELS,
    DatasetInfo,
    HeartbeatAnswer,
    HeartbeatTaskState,
    LogLine,
    NodeRegistration,
    ReportEvent,
    ResultDescriptor,
    ServerSettings,
    ShutdownNotice,
    TaskDescriptor,
    TaskKind,
    TaskOutcome,
    TrainingProgress,
)
from fedcore.wire.metadata_keys import INSTANCE_METADATA_KEY, REASON_METADATA_KEY
from fedcore.wire.versions import PROTOCOL_VERSION, check_version, format_version

__all__ = [
    "INSTANCE_METADATA_KEY",
    "LOG_LEVELS",
    "PROTOCOL_VERSION",
    "REASON_METADATA_KEY",
    "DatasetInfo",
    "HeartbeatAnswer",
    "HeartbeatTaskState",
    "LogLine",
    "NodeRegistration",
    "ReportEvent",
    "ResultDescriptor",
    "ServerSettings",
    "ShutdownNotice",
    "TaskDescriptor",
    "TaskKind",
    "TaskOutcome",
    "TrainingProgress",
    "check_version",
    "format_version",
]
