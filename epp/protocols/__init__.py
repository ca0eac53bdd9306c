"""Protobuf / gRPC modules generated from protos/llmepp/protocols/*.proto at build time (setup.py).

- `vllm_engine_pb2` (+ `_grpc`): vLLM's gRPC API (vllmgrpc-parser; the simulator's gRPC face).
- `vertexai_prediction_pb2` (+ `_grpc`): Vertex AI PredictionService's HttpBody methods (vertexai-parser).

The generated files are not in git; `pip install` (and `make`) writes them.
"""
