"""The parsed request as the rest of the pipeline sees it, and the response accounting record."""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from llmepp.framework.scheduling import SchedulingResult


class RequestKind(enum.Enum):
    COMPLETIONS = "completions"
    CHAT_COMPLETIONS = "chat_completions"
    EMBEDDINGS = "embeddings"
    RESPONSES = "responses"  # OpenAI Responses API
    CONVERSATIONS = "conversations"  # OpenAI Conversations API (items seed a conversation)
    IMAGES = "images"  # OpenAI image generation (a text prompt)
    MESSAGES = "messages"  # Anthropic Messages API
    GENERATE = "generate"  # SGLang native generate
    # Unknown path: routed by load only, the body is not interpreted.
    PASSTHROUGH = "passthrough"
    # No body (GET /v1/models etc.): routed to a random ready endpoint.
    BODYLESS = "bodyless"


class UsageReader(Protocol):
    """Reads a response's token usage from its body chunks (llmepp.request.usage.UsageCollector for the
    JSON / SSE APIs; gRPC APIs bring their own)."""

    def feed(self, chunk: bytes) -> None: ...

    def result(self) -> Usage | None: ...


@dataclass(slots=True)
class InferenceRequest:
    """One client request after parsing. Created by the ext_proc stream, read by every plugin.

    `prompt` is the canonical prompt text as UTF-8 bytes (completions: the prompt(s); chat:
    tools JSON then role+content of each message). It is what token producers tokenize; None
    for passthrough and body-less requests, so prompt-based scorers skip them.
    """

    request_id: str
    path: str
    headers: dict[str, str]  # lower-cased names
    kind: RequestKind
    body: bytes = b""
    model: str = ""  # the model the client asked for
    target_model: str = ""  # after rewrite (header / InferenceModelRewrite)
    prompt: bytes | None = None
    # Chat only: (role, text) per message, text as the simulator's / a chat template sees it (string
    # content, or the `text` parts joined by "\n"); real tokenizers render a template from it.
    messages: list[tuple[str, str]] | None = None
    # Completions / embeddings: the prompt was given as token ids (`prompt` holds them as LE uint32).
    prompt_is_token_ids: bool = False
    # A batch (completions / embeddings / generate with several prompts): where each prompt ends in
    # `prompt` (byte offsets, the last = len(prompt)); () for a single prompt. The engine caches each
    # prompt on its own, so prefix producers hash each on its own (TokenizedPrompt.ends).
    prompt_ends: tuple[int, ...] = ()
    # The conversation's images, video, audio and documents, each identified by a hash of how it was
    # sent (its vLLM `uuid`, else its URL, data or file id): what an encoder would embed
    # (mm-embeddings-cache-producer).
    mm_items: tuple[int, ...] = ()
    stream: bool = False
    max_tokens: int | None = None
    cache_salt: str = ""
    # vLLM's per-request tokenization fields (completions and chat), read by the hf token producer:
    # None where the request does not set them (or sets them to what vLLM would refuse).
    add_special_tokens: bool | None = None
    truncate_prompt_tokens: int | None = None  # keep the prompt's last N tokens (vLLM's left truncation)
    # Flow-control identity.
    objective: str = ""
    priority: int = 0
    fairness_id: str = "default-flow"
    # Parsed JSON body, kept only when something must rewrite it (model name).
    payload: dict[str, Any] | None = None
    # Set by parsers of APIs that wrap their JSON (gRPC): the re-encoded JSON of a model rewrite →
    # the body to send upstream. None: the JSON is the body.
    wrap_body: Callable[[bytes], bytes] | None = None
    # Set by parsers of non-JSON responses (gRPC): the reader of the response's usage, given the
    # response headers. None: the JSON / SSE reader.
    usage_reader: Callable[[Mapping[str, str]], UsageReader] | None = None
    # Per-request data written by producers and read by scorers, keyed by data key.
    data: dict[str, Any] = field(default_factory=dict)
    # Request headers to add / overwrite upstream (e.g. x-prefiller-host-port).
    upstream_headers: dict[str, str] = field(default_factory=dict)
    # time.monotonic() when the request headers arrived.
    received_at: float = 0.0
    # The scheduling outcome, once scheduled (response-side plugins read it).
    scheduling: SchedulingResult | None = None
    # Set by the ext_proc stream once the request is routed, if its transport can answer on its own:
    # ends the request with 429 now (flow control's in-flight eviction); False if it had ended.
    evict: Callable[[], bool] | None = None
    # A body streamed through the EPP unread (its parser reads none): its declared Content-Length, 0 if none.
    unread_body_size: int = 0
    # The request's OpenTelemetry span while it is traced (llmepp.observability.tracing).
    span: Any = None
    # Flow control: the prompt tokens counted for it while it is pending (PendingLoad); None when it is not.
    pending_tokens: int | None = None

    @property
    def multimodal(self) -> bool:
        """The request carries media: an encoder runs before prefill (E/P/D)."""
        return bool(self.mm_items)

    @property
    def body_size(self) -> int:
        return len(self.body) or self.unread_body_size

    def prompts(self) -> list[bytes]:
        """Each prompt of a batch (`prompt_ends`), else [prompt]; [] without a prompt."""
        return [] if self.prompt is None else split_prompts(self.prompt, self.prompt_ends)

    @property
    def estimated_prompt_tokens(self) -> int:
        """Prompt tokens without a tokenizer: bytes/4 (exact for a prompt given as token ids). What the
        director charges to `inflight.tokens` when no token producer counted them, and what flow control
        counts for a request not yet charged (flowcontrol.interfaces.PendingLoad)."""
        prompt = self.prompt
        return (len(prompt) + 3) // 4 if prompt else 0


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    total_tokens: int = 0


class TerminationCause(enum.Enum):
    NATURAL = "natural"
    CLIENT_DISCONNECT = "client-disconnect"
    ERROR = "error"
    EVICTED = "evicted"


@dataclass(slots=True)
class ResponseInfo:
    """What the response side learned; handed to response plugins at the end of the stream."""

    status: int = 0
    streaming: bool = False
    # The body came in one message (Envoy's BUFFERED / BUFFERED_PARTIAL response mode): its arrival is no
    # first token, and there are no chunk gaps to time.
    whole_body: bool = False
    usage: Usage | None = None
    first_byte_at: float = 0.0  # monotonic time of the first response body byte (TTFT)
    finished_at: float = 0.0
    bytes: int = 0
    cause: TerminationCause = TerminationCause.NATURAL
    # gRPC APIs: the answer's grpc-status (from its trailers, or the headers of a trailers-only
    # answer); None for HTTP APIs or when none came. Non-zero is a model-server error.
    grpc_status: int | None = None


def split_prompts(data: bytes, ends: tuple[int, ...]) -> list[bytes]:
    """`data` cut at the end offsets of a batch's prompts (empty prompts left out); [data] when `ends` is ()."""
    if not ends:
        return [data]
    out: list[bytes] = []
    start = 0
    for end in ends:
        if end > start:
            out.append(data[start:end])
        start = end
    return out
