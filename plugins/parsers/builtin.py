"""The built-in request parsers (the body formats are read in llmepp.request.parsers).

- `openai-parser`: chat/completions, completions, embeddings, responses (model, prompt or
  messages or input, stream, max tokens, cache_salt);
- `anthropic-parser`: messages, messages/count_tokens (model, system + messages, tools, stream,
  max_tokens; count_tokens stays raw);
- `vllmhttp-parser`: inference/v1/generate, vLLM's tokens-in / tokens-out API (token_ids,
  sampling_params.max_tokens, stream, cache_salt, features.mm_hashes as media items);
- `sglanghttp-parser`: generate, SGLang's native API (text or input_ids, sampling_params.max_new_tokens,
  stream, extra_key as cache salt); not in the default list, as in the reference;
- `vllmgrpc-parser`: vllm.grpc.engine.VllmEngine/Generate and /Embed, vLLM's gRPC API over h2c
  (tokenized.input_ids or text, sampling_params.max_tokens, stream; usage from the last response message);
  not in the default list, as in the reference;
- `vertexai-parser`: PredictionService/ChatCompletions, /RawPredict, /StreamRawPredict, Vertex AI's gRPC
  API over h2c: the OpenAI JSON in the request's HttpBody, read by the OpenAI rules; not in the default list;
- `passthrough-parser`: claims nothing, so it is the fallback; it never reads the body, so its requests
  are routed on their headers and the body streams through unbuffered (routed by load).

Protocols (the pool `appProtocol`s each reads; readiness checks them): `http` and `kubernetes.io/h2c`
for the HTTP parsers, `kubernetes.io/h2c` only for vllmgrpc-parser and vertexai-parser, any for
passthrough-parser.

Parameters: none.
"""

from __future__ import annotations

from llmepp.framework.requestcontrol import H2C_ONLY, HTTP_AND_H2C, Parser
from llmepp.request import parsers, vertexai, vllmgrpc
from llmepp.request.types import InferenceRequest


class OpenAIParser(Parser):
    type = "openai-parser"
    claims = tuple(parsers.OPENAI_CLAIMS)
    protocols = HTTP_AND_H2C

    def parse(self, request: InferenceRequest, suffix: str) -> None:
        parsers.parse_openai(request, suffix)


class AnthropicParser(Parser):
    type = "anthropic-parser"
    claims = parsers.ANTHROPIC_CLAIMS
    protocols = HTTP_AND_H2C

    def parse(self, request: InferenceRequest, suffix: str) -> None:
        parsers.parse_anthropic(request, suffix)


class SglangParser(Parser):
    type = "sglanghttp-parser"
    claims = parsers.SGLANG_CLAIMS
    protocols = HTTP_AND_H2C

    def parse(self, request: InferenceRequest, suffix: str) -> None:
        parsers.parse_sglang(request, suffix)


class VllmParser(Parser):
    type = "vllmhttp-parser"
    claims = parsers.VLLM_CLAIMS
    protocols = HTTP_AND_H2C

    def parse(self, request: InferenceRequest, suffix: str) -> None:
        parsers.parse_vllm_generate(request, suffix)


class PassthroughParser(Parser):
    type = "passthrough-parser"
    reads_body = False

    def parse(self, request: InferenceRequest, suffix: str) -> None:
        pass  # the body stays raw: no prompt, so prompt-based scorers skip it


class VllmGrpcParser(Parser):
    """vLLM's gRPC API (h2c): Generate (tokenized ids or text) and Embed. No model field."""

    type = "vllmgrpc-parser"
    claims = vllmgrpc.CLAIMS
    protocols = H2C_ONLY

    def parse(self, request: InferenceRequest, suffix: str) -> None:
        vllmgrpc.parse(request, suffix)


class VertexAIParser(Parser):
    """Vertex AI PredictionService (h2c): ChatCompletions, RawPredict, StreamRawPredict, whose HttpBody
    JSON the OpenAI rules read; a raw body of another shape is routed on load."""

    type = "vertexai-parser"
    claims = vertexai.CLAIMS
    protocols = H2C_ONLY

    def parse(self, request: InferenceRequest, suffix: str) -> None:
        vertexai.parse(request, suffix)
