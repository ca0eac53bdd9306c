"""Envoy-facing servers: the ext_proc servicer, its message builders and gRPC health."""
