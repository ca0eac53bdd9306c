"""`token-producer`: the prompt as tokens for prefix hashing and token-count signals.

One tokenization per request: it is stored unscoped under TOKENIZED_PROMPT.
"""

from __future__ import annotations

from collections.abc import Sequence

from llmepp.datalayer.endpoint import Endpoint
from llmepp.framework.datakeys import TOKENIZED_PROMPT, TokenizedPrompt
from llmepp.framework.plugin import PluginParams
from llmepp.framework.requestcontrol import DataProducer
from llmepp.request.types import InferenceRequest


def estimate_tokens(prompt: bytes) -> bytes:
    """The reference's `estimate` backend: 4 prompt bytes per pseudo-token, zero-padded."""
    pad = -len(prompt) % 4
    return prompt + b"\0" * pad if pad else prompt


class TokenProducer(DataProducer):
    """Writes TokenizedPrompt for requests that carry a prompt.

    Backend `estimate` (default, no model needed): packs the UTF-8 prompt (chat: tools JSON,
    then role + content of each message) into uint32 pseudo-tokens, 4 bytes per token.
    Token count = ceil(bytes / 4). Parameters: `modelName` (informational for estimate).
    """

    type = "token-producer"
    produces = frozenset({TOKENIZED_PROMPT})

    class Params(PluginParams):
        model_name: str = ""

    def produce(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> None:
        if request.prompt is not None:
            request.data[TOKENIZED_PROMPT] = TokenizedPrompt(estimate_tokens(request.prompt))
