"""Test and benchmark support: the standalone Envoy harness and a scriptable fake director."""
