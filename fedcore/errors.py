"""Every exception fedcore raises, in one tree.

    FedstreamError
    ├── SerializationError
    │   ├── EncodeError (also TypeError)        an object the wire format cannot carry; names type and path
    │   └── DecodeError (also ValueError)       truncated, corrupted, hostile or over-limit bytes
    ├── TrainingArgsError (also ValueError)     unknown keys, wrong types or values in TrainingArgs
    ├── ModelError
    │   └── WeightsMismatchError (also ValueError)  set_weights with unknown/missing names, bad shape/dtype
    ├── PlanError                               a training plan misbehaves (bad loss, missing data loader)
    ├── DatasetError (also ValueError)          arrays that do not form a dataset (length mismatch, bad split)
    ├── AggregationError (also ValueError)      a reply an aggregator cannot use (missing Scaffold fields, shapes)
    ├── StrategyError (also ValueError)         node selection impossible (no eligible node, bad fraction)
    └── FramingError (also ValueError)          chunk stream problems
        ├── ChunkOrderError                     out-of-order, duplicated or missing chunk
        ├── PayloadSizeError                    payload or chunk beyond the announced or allowed size
        └── DigestMismatchError                 SHA-256 of the assembled payload differs from the header

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


class DatasetError(FedstreamError, ValueError):
    """Arrays that do not form a dataset (not arrays, X/y length mismatch, bad split ratio, bad batch size)."""


class AggregationError(FedstreamError, ValueError):
    """A node reply cannot be aggregated (missing fields, mismatched shapes, wrong round)."""


class StrategyError(FedstreamError, ValueError):
    """Node selection cannot be satisfied."""


class FramingError(FedstreamError, ValueError):
    """A chunked payload stream is malformed."""


class ChunkOrderError(FramingError):
    """A chunk arrived out of order, twice, or a chunk is missing."""


class PayloadSizeError(FramingError):
    """A payload or chunk is larger than announced or allowed."""


class DigestMismatchError(FramingError):
    """The SHA-256 of an assembled payload does not match the header's."""


class TrainingArgsWarning(UserWarning):
    """A training argument that was given is ignored or capped (e.g. ``epochs`` when ``num_updates`` is set)."""
