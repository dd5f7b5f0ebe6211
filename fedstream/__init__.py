"""Generated protobuf and gRPC code of protos/fedstream (do not edit; see scripts/gen_protos.py)."""
