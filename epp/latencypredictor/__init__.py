"""A latency predictor service for `predicted-latency-producer`, HTTP-compatible with the llm-d latency
predictor sidecars as far as the EPP uses them (`epp-latency-predictor`; see model.py and server.py),
and the EPP's client of it (client.py)."""
