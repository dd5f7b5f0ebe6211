"""Every exception fedcore raises, in one tree.

    FedstreamError
    ├── SerializationError
    │   ├── EncodeError (also TypeError)        an object the wire format cannot carry; names type and path
    │   └── DecodeError (also ValueError)       truncated, corrupted, hostile or over-limit bytes
    ├── TrainingArgsError (also ValueError)     unknown keys, wrong types or values in TrainingArgs
    ├── ModelError
    │   └── WeightsMismatchError (also ValueError)  set_weights with unknown/missing names, bad shape/dtype
    ├── PlanError                               a training plan misbehaves (bad loss, missing data loader)
    │   └── TrainingStoppedError                train(should_stop=...) was told to stop; names the steps done
    ├── DatasetError (also ValueError)          arrays that do not form a dataset (length mismatch, bad split)
    ├── AggregationError (also ValueError)      a reply an aggregator cannot use (missing Scaffold fields, shapes)
    ├── StrategyError (also ValueError)         node selection impossible (no eligible node, bad fraction)
    ├── TaskPayloadError (also ValueError)      a decoded task or result map lacks a field or has a bad one
    ├── FramingError (also ValueError)          chunk stream problems
    │   ├── ChunkOrderError                     out-of-order, duplicated or missing chunk
    │   │   └── UploadIncompleteError           an upload stream ended before its last byte (bytes kept: resume)
    │   ├── PayloadSizeError                    payload or chunk beyond the announced or allowed size
    │   └── DigestMismatchError                 SHA-256 of the assembled payload differs from the header
    ├── VersionMismatchError (also ValueError)  the peer speaks another protocol major version; names both (fedcore.wire)
    ├── MessageError (also ValueError)          a protobuf message breaks fedstream.v1 rules: unspecified enum,
    │                                           missing header, chunk before header (fedcore.wire, both sides)
    ├── ServerError                             the researcher's server refuses a request or an operation (fedserver)
    │   ├── ServerConfigError (also ValueError) bad server configuration: TLS mode, cert paths, limits, node ids
    │   ├── AuthenticationError                 no valid identity: missing/unknown/revoked token, no client cert
    │   ├── PermissionDeniedError               a known node acting on a task that was not sent to it
    │   ├── UnknownTaskError (also LookupError) no task with this id
    │   ├── TaskClosedError                     the task's round is over (cancelled, timed out, done): refused
    │   ├── UnknownNodeError (also LookupError) no node with this id (not enrolled, not registered)
    │   ├── LimitExceededError                  over a configured limit: payload, chunk, concurrent uploads
    │   │   ├── UploadsBusyError                no upload buffer free now and none running to free one: retry later
    │   │   └── UploadQueuedError               waited the longest in a moving upload line: place kept, call again now
    │   ├── UploadConflictError                 a second upload stream for a task whose upload is running
    │   ├── NodeSupersededError                 a call of a node process that a newer process of the node replaced
    │   ├── StalePollError                      a PollTask of a node process older than one of its polls seen already
    │   ├── ServerStateError                    the server is not running (dispatch before start or after stop)
    │   ├── HistoryError (also ValueError)      history.db: unknown experiment/round, bad record, not our schema
    │   ├── CheckpointError                     checkpoint unwritable or damaged: missing file, size/digest
    │   │                                       mismatch, corrupt msgpack, bad JSON, unknown format version
    │   └── ExperimentError (also ValueError)   an experiment is misconfigured or cannot go on
    │       ├── RoundFailedError                a round ended below quorum; names the missing nodes
    │       └── LowMemoryAggregatorError        low_memory=True with an aggregator that keeps x during a round
    └── NodeError                               a node cannot serve its server (fednode)
        ├── NodeConfigError (also ValueError)   bad node configuration: TLS mode, CA/cert/key, token, limits
        ├── ConnectionLostError                 server unreachable or a call broke mid-stream (retried, backoff)
        ├── ServerRefusedError                  the server answered with a non-retryable status (.code, .details,
        │                                       .reason: the ErrorReason name of its fedstream-error-reason trailer)
        ├── NodeStoreError                      node.db unusable: not SQLite, schema newer than this fednode
        ├── DatasetRegistryError (also ValueError)  unknown or duplicate dataset name, bad name/tags/options
        │   └── DatasetFileError                dataset file missing, unreadable or changed since registration
        │       └── DatasetFormatError          content is not a dataset: bad CSV/NPZ, non-numeric, NaN/inf
        └── PlanApprovalError (also ValueError) unknown, ambiguous or malformed plan id; bad status filter
            └── PlanNotApprovedError            a task's training plan is pending or rejected on this node

    UserWarning
    └── TrainingArgsWarning                     a given training argument is ignored or capped (precedence)

Library code raises these; gRPC and msgpack errors are translated into them at the edge, so callers
catch one family per concern.
"""

from __future__ import annotations


class FedstreamError(Exception):
    """Root of every error raised by fedstream code."""


class SerializationError(FedstreamError):
    """Base class of encode and decode failures."""


class EncodeError(SerializationError, TypeError):
    """An object cannot be encoded; the message names its type and where it sits in the document."""


class DecodeError(SerializationError, ValueError):
    """Bytes are not a valid fedstream msgpack document (truncated, corrupted, hostile or over a limit)."""


class TrainingArgsError(FedstreamError, ValueError):
    """Training arguments are unknown, of the wrong type, or out of range."""


class ModelError(FedstreamError):
    """A model cannot do what was asked of it."""


class WeightsMismatchError(ModelError, ValueError):
    """Weights given to ``set_weights`` do not match the model (names, shapes or dtypes)."""


class PlanError(FedstreamError):
    """A training plan is misconfigured or produced an unusable result (e.g. a NaN loss)."""


class TrainingStoppedError(PlanError):
    """``TrainingPlan.train`` stopped before a batch because ``should_stop()`` said so (e.g. the server closed
    the task); the message names the steps done and why. ``steps_done``: optimizer steps taken before it."""

    def __init__(self, message: str, steps_done: int = 0) -> None:
        super().__init__(message)
        self.steps_done = steps_done


class DatasetError(FedstreamError, ValueError):
    """Arrays that do not form a dataset (not arrays, X/y length mismatch, bad split ratio, bad batch size)."""


class AggregationError(FedstreamError, ValueError):
    """A node reply cannot be aggregated (missing fields, mismatched shapes, wrong round)."""


class StrategyError(FedstreamError, ValueError):
    """Node selection cannot be satisfied."""


class TaskPayloadError(FedstreamError, ValueError):
    """A decoded task or result payload is missing a field or has one of the wrong type."""


class FramingError(FedstreamError, ValueError):
    """A chunked payload stream is malformed."""


class ChunkOrderError(FramingError):
    """A chunk arrived out of order, twice, or a chunk is missing."""


class UploadIncompleteError(ChunkOrderError):
    """An upload stream ended before its last byte; the server keeps the bytes and the node resumes at the
    acknowledged offset (docs/protocol.md §5, "Resuming an upload")."""


class PayloadSizeError(FramingError):
    """A payload or chunk is larger than announced or allowed."""


class DigestMismatchError(FramingError):
    """The SHA-256 of an assembled payload does not match the header's."""


class VersionMismatchError(FedstreamError, ValueError):
    """The peer speaks an incompatible protocol major version; the message names both versions."""


class MessageError(FedstreamError, ValueError):
    """A protobuf message breaks the fedstream.v1 rules (unspecified enum, missing field, wrong order)."""


class ServerError(FedstreamError):
    """The researcher's server refuses a request or an operation (fedserver)."""


class ServerConfigError(ServerError, ValueError):
    """A server configuration value is invalid; the message names the field, the value and the choices."""


class AuthenticationError(ServerError):
    """The caller has no valid identity: missing, unknown or revoked token, or no client certificate."""


class PermissionDeniedError(ServerError):
    """The caller is known but may not act on this object (a result for a task sent to another node)."""


class UnknownTaskError(ServerError, LookupError):
    """No task with this id exists (or it was forgotten long ago)."""


class TaskClosedError(ServerError):
    """The task no longer accepts results or reports: its round finished, it was cancelled or timed out."""


class UnknownNodeError(ServerError, LookupError):
    """No node with this id is enrolled or registered."""


class LimitExceededError(ServerError):
    """A request goes over a configured limit: payload size, chunk size or number of concurrent uploads."""


class UploadsBusyError(LimitExceededError):
    """No upload buffer is free and no running upload could free one (too many concurrent uploads, or their
    bytes over the budget): the upload is refused now and may be retried later, unlike a payload over a limit."""


class UploadQueuedError(LimitExceededError):
    """An upload waited in line for a buffer the longest a call may wait while the line moved (an upload began
    or finished, or a running one received bytes): its place is kept; unlike busy, call again at once."""


class UploadConflictError(ServerError):
    """Another upload stream for the same task is still running; retry once it has ended."""


class NodeSupersededError(ServerError):
    """A call of a node process that a newer process of the same node replaced (it registered with another
    instance id, sent in every call's ``fedstream-instance-id`` metadata): an open PollTask stream takes no
    task and ends, any later call of the old process is refused; another process now serves the node."""


class StalePollError(ServerError):
    """A PollTask whose ``poll_sequence`` is not greater than one the server has already seen from the same
    node process: a poll of an earlier, abandoned connection that arrived late. Refused before it takes a
    task or changes anything; for the node only that call is dead."""


class ServerStateError(ServerError):
    """The operation needs a running server (e.g. dispatch before ``start`` or after ``stop``)."""


class HistoryError(ServerError, ValueError):
    """The history database cannot do what was asked (unknown experiment or round, bad record, bad file)."""


class CheckpointError(ServerError):
    """A checkpoint cannot be written or read back; the message names the file and what is wrong with it."""


class ExperimentError(ServerError, ValueError):
    """An experiment is misconfigured (plan, args, quorum) or cannot go on."""


class RoundFailedError(ExperimentError):
    """A round ended with fewer successful replies than the quorum; the last checkpoint stays intact."""


class LowMemoryAggregatorError(ExperimentError):
    """``low_memory=True`` with an aggregator that needs the global model during a round (Scaffold)."""


class TrainingArgsWarning(UserWarning):
    """A training argument that was given is ignored or capped (e.g. ``epochs`` when ``num_updates`` is set)."""


class NodeError(FedstreamError):
    """A node cannot serve its server (fednode's connection and protocol problems)."""


class NodeConfigError(NodeError, ValueError):
    """A node configuration is invalid (unknown TLS mode, missing CA/cert/key file, no token, bad limit)."""


class ConnectionLostError(NodeError):
    """The server is unreachable or a call broke mid-stream; the node retries with backoff."""

    def __init__(self, message: str, code: object = None, reason: str = "") -> None:
        super().__init__(message)
        self.code = code  # the grpc.StatusCode when the failure came from a call, else None
        self.reason = reason  # the server's ErrorReason name (fedstream-error-reason trailer); "" if none or unknown


class ServerRefusedError(NodeError):
    """The server answered with a status retrying cannot fix (bad token, incompatible protocol version)."""

    def __init__(self, message: str, code: object = None, details: str = "", reason: str = "") -> None:
        super().__init__(message)
        self.code = code  # the grpc.StatusCode
        self.details = details  # the server's status message, for humans
        self.reason = reason  # the server's ErrorReason name (fedstream-error-reason trailer); "" if none or unknown


class NodeStoreError(NodeError):
    """The node database cannot be used (not an SQLite file, schema newer than this fednode, I/O error)."""


class DatasetRegistryError(NodeError, ValueError):
    """The dataset registry refuses a request (unknown or duplicate name, bad name, tags or options)."""


class DatasetFileError(DatasetRegistryError):
    """A dataset file is missing, unreadable, or changed since it was registered."""


class DatasetFormatError(DatasetFileError):
    """A dataset file's content is not a dataset (no CSV header, non-numeric cell, NaN/inf, bad NPZ arrays)."""


class PlanApprovalError(NodeError, ValueError):
    """A plan approval request is invalid (unknown or ambiguous plan id, bad prefix, unknown status)."""


class PlanNotApprovedError(PlanApprovalError):
    """A task's training plan is not approved on this node; the message says how the operator approves it."""
