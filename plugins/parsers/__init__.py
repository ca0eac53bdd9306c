"""`requestHandler.parsers`: which API a request path speaks, and how its body is read."""

from llmepp.framework.plugin import Plugin
from llmepp.plugins.parsers.builtin import (
    AnthropicParser,
    OpenAIParser,
    PassthroughParser,
    SglangParser,
    VertexAIParser,
    VllmGrpcParser,
    VllmParser,
)

PLUGINS: list[type[Plugin]] = [
    OpenAIParser,
    AnthropicParser,
    VllmParser,
    SglangParser,
    VllmGrpcParser,
    VertexAIParser,
    PassthroughParser,
]
