"""`token-producer`: the prompt as tokens for prefix hashing and token-count signals.

One tokenization per request: it is stored unscoped under TOKENIZED_PROMPT.
"""

from __future__ import annotations

import builtins
import logging
from collections.abc import Sequence
from typing import Any

import aiohttp

from llmepp.datalayer.endpoint import Endpoint
from llmepp.framework.datakeys import TOKENIZED_PROMPT, TokenizedPrompt
from llmepp.framework.plugin import PluginParams
from llmepp.framework.requestcontrol import DataProducer
from llmepp.kvevents.keys import tokens_to_bytes
from llmepp.observability.logging import LogLimiter
from llmepp.request.types import InferenceRequest, RequestKind
from llmepp.tokenization.chat import AUTO, chat_messages, load_chat_template, template_fields
from llmepp.tokenization.hf import HFTokenizer
from llmepp.units import parse_duration

log = logging.getLogger(__name__)

BACKENDS = ("estimate", "hf")


def estimate_tokens(prompt: bytes) -> bytes:
    """The reference's `estimate` backend: 4 prompt bytes per pseudo-token, zero-padded."""
    pad = -len(prompt) % 4
    return prompt + b"\0" * pad if pad else prompt


class TokenizerConfig(PluginParams):
    backend: str = "estimate"
    path: str = ""
    chat_template: str = AUTO
    add_special_tokens: bool = False
    thread_threshold_chars: int = 4096


class VllmConfig(PluginParams):
    url: str = "http://localhost:8000"
    path: str = "/tokenize"
    timeout: str = "5s"


class TokenProducer(DataProducer):
    """Writes TokenizedPrompt (LE uint32 token ids) for requests that carry a prompt.

    Backends:

    * `estimate` (default, no model needed): packs the UTF-8 prompt (chat: tools JSON, then role +
      content of each message) into uint32 pseudo-tokens, 4 bytes per token. Count = ceil(bytes / 4).
      Good for approximate prefix routing; never equal to an engine's tokens.
    * `hf` — `tokenizer: {backend: hf, path: /models/x/tokenizer.json}`: the model's real tokenizer
      from a local file (never downloaded). Completions: the prompt text encoded as is (with special
      tokens when `addSpecialTokens`, as vLLM's completions endpoint adds them). Chat: the request
      rendered with `chatTemplate`, then encoded without special tokens (the template writes them, as
      in vLLM): `auto` (default) = the model's Jinja template from `chat_template.jinja` or
      `tokenizer_config.json` next to the tokenizer (else the built-in `role-tags`, logged); a path to
      either file; or a built-in name (`role-tags`, the simulator's; `plain`). Semantics in
      llmepp.tokenization.chat. Needed by `precise-prefix-cache-producer`.
      Prompts of more than `threadThresholdChars` (4096) characters are encoded in a worker thread.
    * `vllm` — `vllm: {url: http://render:8000}` (the reference's parameter): the model server
      tokenizes; POST `{url}{path}` (default `/tokenize`, vLLM's tokenize API) with the prompt, or the
      chat request's messages, tools, documents, chat_template_kwargs, add_generation_prompt and
      continue_final_message as sent (the server applies its own template; a Responses, Conversations
      or Anthropic Messages request: its parsed role + text messages), per request, bounded
      by `timeout` (and the director's 400 ms producer budget).
      Used when `vllm` is set and `tokenizer` is not.

    Token-id prompts pass through unchanged with every backend. On a tokenizer failure the request
    gets no TokenizedPrompt (prefix producers then skip it) and the failure is logged, rate-limited.

    Parameters: `modelName` (sent to the vllm backend; informational otherwise), `tokenizer`
    {`backend` estimate|hf, `path`, `chatTemplate` auto, `addSpecialTokens` false,
    `threadThresholdChars` 4096}, `vllm` {`url`, `path` /tokenize, `timeout` 5s}.
    """

    type = "token-producer"
    aliases = ("tokenizer",)  # the reference's deprecated name
    produces = frozenset({TOKENIZED_PROMPT})

    class Params(PluginParams):
        model_name: str = ""
        tokenizer: TokenizerConfig | None = None
        vllm: VllmConfig | None = None

        def __post_init__(self) -> None:
            t = self.tokenizer
            if t is not None:
                if t.backend not in BACKENDS:
                    raise ValueError(f"tokenizer.backend must be one of {', '.join(BACKENDS)}, got {t.backend!r}")
                if t.backend == "hf" and not t.path:
                    raise ValueError("tokenizer.path is required with backend hf (a local tokenizer.json)")
                if t.thread_threshold_chars < 0:
                    raise ValueError("tokenizer.threadThresholdChars must be >= 0")
            if self.vllm is not None:
                parse_duration(self.vllm.timeout)

    def __new__(cls, name: str = "", params: Any = None) -> TokenProducer:
        # The backend decides the class: `estimate` stays synchronous (no task per request).
        target: builtins.type[TokenProducer] = cls
        if cls is TokenProducer and params is not None:
            if params.tokenizer is not None and params.tokenizer.backend == "hf":
                target = HFTokenProducer
            elif params.tokenizer is None and params.vllm is not None:
                target = VllmTokenProducer
        return super().__new__(target)

    backend = "estimate"

    def produce(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> Any:
        if request.prompt is not None:
            request.data[TOKENIZED_PROMPT] = TokenizedPrompt(estimate_tokens(request.prompt))


class HFTokenProducer(TokenProducer):
    backend = "hf"

    def __init__(self, name: str, params: TokenProducer.Params) -> None:
        super().__init__(name, params)
        cfg = params.tokenizer
        assert cfg is not None
        self.tokenizer = HFTokenizer(
            cfg.path, add_special_tokens=cfg.add_special_tokens, thread_threshold=cfg.thread_threshold_chars
        )
        try:
            self.template = load_chat_template(cfg.chat_template, cfg.path)
        except ValueError as e:
            raise ValueError(f"tokenizer.chatTemplate: {e}") from None
        self._log = LogLimiter(log)

    async def produce(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> None:
        if request.prompt is None:
            return
        if request.prompt_is_token_ids:
            request.data[TOKENIZED_PROMPT] = TokenizedPrompt(request.prompt, self.backend)
            return
        try:
            if request.messages is not None:
                token_bytes = await self.tokenizer.encode_async(self.template.render(request), special=False)
            else:
                token_bytes = await self.tokenizer.encode_async(request.prompt.decode("utf-8", "replace"))
        except Exception as e:
            self._log.warning("hf", "%s: tokenization failed: %s", self.name, e)
            return
        request.data[TOKENIZED_PROMPT] = TokenizedPrompt(token_bytes, self.backend)


class VllmTokenProducer(TokenProducer):
    backend = "vllm"

    def __init__(self, name: str, params: TokenProducer.Params) -> None:
        super().__init__(name, params)
        cfg = params.vllm
        assert cfg is not None
        self.url = cfg.url.rstrip("/") + cfg.path
        self.timeout = aiohttp.ClientTimeout(total=parse_duration(cfg.timeout))
        self.model = params.model_name
        self._session: aiohttp.ClientSession | None = None
        self._log = LogLimiter(log)

    async def produce(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> None:
        if request.prompt is None:
            return
        if request.prompt_is_token_ids:
            request.data[TOKENIZED_PROMPT] = TokenizedPrompt(request.prompt, self.backend)
            return
        body: dict[str, Any] = {"model": self.model or request.target_model or request.model}
        if request.kind is not RequestKind.CHAT_COMPLETIONS and request.messages is not None:
            # Responses, Conversations, Anthropic Messages: no chat body to forward; their messages.
            body["messages"] = chat_messages(request.messages)
        elif request.messages is not None:
            # The server renders its own chat template: send what decides the rendering, verbatim.
            try:
                body.update(template_fields(request.body))
            except ValueError as e:
                self._log.warning("body", "%s: %s", self.name, e)
                return
        else:
            body["prompt"] = request.prompt.decode("utf-8", "replace")
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        try:
            async with self._session.post(self.url, json=body) as resp:
                if resp.status != 200:
                    self._log.warning("status", "%s: %s answered %d", self.name, self.url, resp.status)
                    return
                reply = await resp.json()
            token_bytes = tokens_to_bytes(reply["tokens"])  # not a uint32 list: TypeError / OverflowError
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError, OverflowError) as e:
            self._log.warning("error", "%s: tokenizing via %s failed: %r", self.name, self.url, e)
            return
        request.data[TOKENIZED_PROMPT] = TokenizedPrompt(token_bytes, self.backend)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
