"""msgpack serialization of parameters and state; the format is written down in docs/serialization.md."""

from fedcore.serialization.encoder import EncodedDocument
from fedcore.serialization.serializer import DEFAULT_LIMITS, Serializer, SerializerLimits

__all__ = ["DEFAULT_LIMITS", "EncodedDocument", "Serializer", "SerializerLimits"]
