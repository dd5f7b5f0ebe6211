"""fedstream.v1 wire messages and service stubs, generated from protos/fedstream/v1."""
