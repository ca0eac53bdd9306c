"""Request parsing: HTTP path + headers + body bytes → `InferenceRequest` (reference §1.2).

Path resolution: `:path`, else `x-original-path`, else `x-forwarded-path`, else
`/v1/completions`; the query string is dropped. `RequestParsers` picks the parser plugin
(`requestHandler.parsers`, by default openai-parser, anthropic-parser, passthrough-parser)
claiming the longest suffix, matched on a path-segment boundary (`/v1/chat/completions` is
chat, `/x/foocompletions` is not). Unclaimed paths go to the fallback parser (the first that
claims nothing: passthrough keeps the body raw and never interprets it), or are a 400 when
the configured list has no fallback. This module reads the JSON bodies (OpenAI, Anthropic Messages,
vLLM and SGLang generate); `vllmgrpc.py` and `vertexai.py` the gRPC APIs.

The canonical prompt (`InferenceRequest.prompt`, UTF-8 bytes) mirrors the reference's
estimate tokenizer input:

- completions: the prompt string; a list of prompts is concatenated without separator
  (vLLM serves a list as a batch; concatenation keeps the first prompt as the shared
  prefix, which is what prefix-affinity scoring cares about). Token-id prompts (a list
  of ints, or a list of such lists) are packed as little-endian uint32, 4 bytes per
  token, so `len(prompt) / 4` is the exact token count, like the estimate backend's
  4-bytes-per-pseudo-token packing.
- chat: the raw `tools` JSON exactly as the client sent it (if any), then for each
  message its role followed by its text (string content, or the text of each text
  content part: `text`, `input_text`, `output_text`, `refusal`, `thinking`, as vLLM reads
  them; other parts such as `image_url` contribute nothing).
- embeddings: the input, with the same rules as a completions prompt; a body of chat `messages`
  instead (vLLM's EmbeddingChatRequest, taken when `input` is absent or null) as a chat without tools.
- responses (OpenAI Responses API): `instructions` as a system message, then the `input`
  (a string is one user message; a list gives each item's role and text), like chat.
- messages (Anthropic Messages API, `/v1/messages`; vLLM serves it too): the `tools` JSON,
  the system prompt as vLLM's Anthropic endpoint builds it (`_anthropic_messages`: without
  Claude Code's per-request `x-anthropic-billing-header` blocks, which would give every request of
  a session a different prefix), then each message's role (Claude Code's `ctx` / `msg` are user turns,
  as vLLM normalizes them) and text (string content, or its `text` blocks and the text inside
  `tool_result` blocks; images and tool calls add nothing).
  `messages/count_tokens` generates nothing and is read as raw (routed by load).
- generate (SGLang's native `/generate`): `text` (a string or a batch of strings, with the
  completions rules) or `input_ids` (token ids, or a batch of them), `sampling_params.max_new_tokens`,
  `stream`, `extra_key` as the cache salt (of a batch: the first prompt's); `model` when the client
  sends one (a string; SGLang itself ignores the field).

Decoding uses typed msgspec Structs: only the fields the router needs are materialised
(a 2 MB body decodes in well under a millisecond). The full payload is decoded as a dict
only when the model name must be rewritten upstream.

Scalars are read as the model server reads them: vLLM's request models are pydantic models in
lax mode, so `"stream": "true"` streams and `"max_tokens": 10.0` or `"10"` is 10; what pydantic
refuses is a 400 naming the field (`lax_bool`, `lax_int`; token-id lists likewise). The stream flag,
the max-token fields and token ids are decoded as raw values and converted here; the usual values
(true, 10, a list of ints) cost one type check.
"""

from __future__ import annotations

import array
import itertools
import re
import sys
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import msgspec
import xxhash

from llmepp.errors import BadRequest
from llmepp.request.clientids import bounded_id
from llmepp.request.types import InferenceRequest, RequestKind

if TYPE_CHECKING:
    from llmepp.framework.requestcontrol import Parser

# Header names (lower case, as Envoy sends them).
H_PATH = ":path"
H_ORIGINAL_PATH = "x-original-path"
H_FORWARDED_PATH = "x-forwarded-path"
H_REQUEST_ID = "x-request-id"
H_OBJECTIVE = "x-llm-d-inference-objective"
H_OBJECTIVE_ALIAS = "x-gateway-inference-objective"
H_FAIRNESS = "x-llm-d-inference-fairness-id"
H_FAIRNESS_ALIAS = "x-gateway-inference-fairness-id"
H_MODEL_REWRITE = "x-llm-d-model-name-rewrite"
H_MODEL_REWRITE_ALIAS = "x-gateway-model-name-rewrite"
# What the EPP tells the decode pod's sidecar (reference pkg/common/routing/common.go). Only the EPP
# may set them: a client's copies are removed from every request, or a client could steer prefills
# and KV pulls to hosts of its choosing.
H_PREFILLER = "x-prefiller-host-port"
H_ENCODERS = "x-encoder-hosts-ports"
H_KV_CACHE_SOURCE = "x-kv-cache-source-host-port"
H_DATA_PARALLEL = "x-data-parallel-host-port"
SIDECAR_HEADERS = (H_PREFILLER, H_ENCODERS, H_KV_CACHE_SOURCE, H_DATA_PARALLEL)

DEFAULT_PATH = "/v1/completions"
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # vLLM's CompletionRequest.max_tokens default (OpenAI's legacy API too)
DEFAULT_FAIRNESS_ID = "default-flow"

# The OpenAI API paths openai-parser claims, and what each is.
OPENAI_CLAIMS: dict[str, RequestKind] = {
    "chat/completions": RequestKind.CHAT_COMPLETIONS,
    "completions": RequestKind.COMPLETIONS,
    "embeddings": RequestKind.EMBEDDINGS,
    "responses": RequestKind.RESPONSES,
    "conversations": RequestKind.CONVERSATIONS,
    # vLLM's render endpoints take the body of the API they render.
    "chat/completions/render": RequestKind.CHAT_COMPLETIONS,
    "completions/render": RequestKind.COMPLETIONS,
    "images/generations": RequestKind.IMAGES,
}
ANTHROPIC_CLAIMS = ("messages", "messages/count_tokens")
SGLANG_CLAIMS = ("generate",)
VLLM_CLAIMS = ("inference/v1/generate",)
# Content parts / blocks that make a request multimodal (OpenAI chat and Responses, Anthropic).
MULTIMODAL_PARTS = frozenset(
    {"image_url", "video_url", "input_audio", "audio_url", "input_image", "input_file", "image", "document"}
)
# Content parts vLLM reads as text (chat_utils' MM_PARSER_MAP), each with the field holding its text: a
# Responses-style input / output text, an assistant's refusal and a thinking part are text like `text`.
TEXT_PARTS: dict[str, str] = {
    "text": "text", "input_text": "text", "output_text": "text", "refusal": "refusal", "thinking": "thinking"
}  # fmt: skip
# requestHandler.parsers when the config lists none (the reference's list).
DEFAULT_PARSERS = ("openai-parser", "anthropic-parser", "vllmhttp-parser", "passthrough-parser")

_INT_ONLY = frozenset({int})
# Claude Code's attribution block: its text varies per request (cch=<hash>). vLLM's Anthropic endpoint
# drops system text blocks starting with it (so does this parser: the prompt is what vLLM prefills).
BILLING_HEADER = "x-anthropic-billing-header"
_xxh64 = xxhash.xxh64_intdigest


# -- typed bodies: only what routing needs; unknown fields are skipped by msgspec ----------
class _CompletionsBody(msgspec.Struct):
    model: Any = None
    prompt: Any = msgspec.UNSET
    # Lax scalars (read by _flag / _max_tokens as vLLM's pydantic models read them): Any.
    stream: Any = None
    max_tokens: Any = msgspec.UNSET  # absent: vLLM's default (16); null: none
    cache_salt: str | None = None
    add_special_tokens: Any = None
    truncate_prompt_tokens: Any = None


class _ContentPart(msgspec.Struct):
    type: str = ""
    text: str | None = None
    refusal: str | None = None
    thinking: str | None = None
    # Media references (decoded only when present): chat image_url / video_url / audio_url /
    # input_audio, Responses input_image (image_url or file_id) / input_file.
    image_url: Any = None
    video_url: Any = None
    audio_url: Any = None
    input_audio: Any = None
    file_id: Any = None
    file_data: Any = None
    uuid: Any = None  # vLLM's user-supplied media identity (any JSON value: vLLM reads str(uuid))


class _Message(msgspec.Struct):
    role: str = ""
    # vLLM also takes a plain string as a content part (chat_utils.ChatCompletionContentPartParam): a text part.
    content: str | list[_ContentPart | str] | None = None


class _ChatBody(msgspec.Struct):
    model: Any = None
    messages: list[_Message] | msgspec.UnsetType = msgspec.UNSET
    # Raw keeps the client's bytes: the prompt includes the tools JSON verbatim.
    tools: msgspec.Raw = msgspec.Raw(b"")
    stream: Any = None
    max_tokens: Any = None
    max_completion_tokens: Any = None
    cache_salt: str | None = None
    add_special_tokens: Any = None
    truncate_prompt_tokens: Any = None


class _EmbeddingsBody(msgspec.Struct):
    model: Any = None
    input: Any = msgspec.UNSET
    add_special_tokens: Any = None  # EmbeddingCompletionRequest / EmbeddingChatRequest (lax bool)
    # Read (as a chat body) only without `input`: vLLM's request union takes the `input` reading first.
    messages: msgspec.Raw = msgspec.Raw()
    cache_salt: str | None = None


class _InputItem(msgspec.Struct):
    role: str = "user"
    content: str | list[_ContentPart] | None = None
    # Responses API items other than messages (vLLM's construct_chat_message_with_tool_call): a
    # `function_call` is an assistant turn (its tool call), a `function_call_output` a `tool` message
    # whose content is `output` (a string, or a list of content parts).
    type: str = ""
    output: Any = None


class _ResponsesBody(msgspec.Struct):
    model: Any = None
    input: str | list[_InputItem] | msgspec.UnsetType = msgspec.UNSET
    instructions: str | None = None
    tools: msgspec.Raw = msgspec.Raw(b"")
    stream: Any = None
    max_output_tokens: Any = None
    cache_salt: str | None = None


class _SamplingParams(msgspec.Struct):
    max_new_tokens: int | None = None


class _ConversationsBody(msgspec.Struct):
    items: list[_InputItem] | msgspec.UnsetType = msgspec.UNSET


class _ImagesBody(msgspec.Struct):
    model: str | None = None
    prompt: str | msgspec.UnsetType = msgspec.UNSET


class _GenerateBody(msgspec.Struct):
    model: Any = None  # no GenerateReqInput field: SGLang ignores it; the router reads a string one
    text: Any = None  # null is absent, as in SGLang's GenerateReqInput (clients send the unused one so)
    input_ids: Any = None
    sampling_params: _SamplingParams | list[_SamplingParams] | None = None
    stream: Any = None  # GenerateReqInput.stream: pydantic-validated (FastAPI), so lax
    extra_key: str | list[str] | None = None  # a batch may salt each prompt


class _VllmSamplingParams(msgspec.Struct):
    max_tokens: Any = None


class _VllmFeatures(msgspec.Struct):
    mm_hashes: dict[str, list[str]] = {}


class _VllmGenerateBody(msgspec.Struct):
    token_ids: Any = msgspec.UNSET
    sampling_params: _VllmSamplingParams | None = None
    model: str | None = None
    stream: Any = None
    cache_salt: str | None = None
    features: _VllmFeatures | None = None


class _Block(msgspec.Struct):
    type: str = ""
    text: str | None = None
    content: Any = None  # tool_result: a string or a list of blocks
    source: Any = None  # image / document: {"type": "base64" | "url" | "file", ...}


class _AnthropicMessage(msgspec.Struct):
    role: str = ""
    content: str | list[_Block] | None = None


class _MessagesBody(msgspec.Struct):
    model: Any = None
    messages: list[_AnthropicMessage] | msgspec.UnsetType = msgspec.UNSET
    system: str | list[_Block] | None = None
    tools: msgspec.Raw = msgspec.Raw(b"")
    stream: Any = None
    max_tokens: Any = None


_COMPLETIONS_DECODER = msgspec.json.Decoder(_CompletionsBody)
_MESSAGES_DECODER = msgspec.json.Decoder(_MessagesBody)
_GENERATE_DECODER = msgspec.json.Decoder(_GenerateBody)
_VLLM_GENERATE_DECODER = msgspec.json.Decoder(_VllmGenerateBody)
_CHAT_DECODER = msgspec.json.Decoder(_ChatBody)
_EMBEDDINGS_DECODER = msgspec.json.Decoder(_EmbeddingsBody)
_RESPONSES_DECODER = msgspec.json.Decoder(_ResponsesBody)
_CONVERSATIONS_DECODER = msgspec.json.Decoder(_ConversationsBody)
_IMAGES_DECODER = msgspec.json.Decoder(_ImagesBody)
_ANY_DECODER = msgspec.json.Decoder()

_DECODE_ERROR_RE = re.compile(r"^JSON is malformed: (.*) \(byte (\d+)\)$")
_VALIDATION_RE = re.compile(r"^Expected `([^`]+)`, got `([^`]+)`(?: - at `\$\.?(.*)`)?$")


# -- path ------------------------------------------------------------------------------
def request_path(headers: Mapping[str, str]) -> str:
    """The request path without query string, from the first header that carries one."""
    path = headers.get(H_PATH) or headers.get(H_ORIGINAL_PATH) or headers.get(H_FORWARDED_PATH) or DEFAULT_PATH
    q = path.find("?")
    if q >= 0:
        path = path[:q]
    return path


def claimed_suffix(path: str, suffix: str) -> bool:
    """`path` ends with `suffix` on a path-segment boundary (a trailing slash is ignored). A gRPC
    method path, `/package.Service/Method`, also has a boundary after each dot of its service name,
    so `PredictionService/ChatCompletions` claims the method of any package (v1, v1beta1)."""
    p = path.rstrip("/")
    if not p.endswith(suffix):
        return False
    start = len(p) - len(suffix)
    if start == 0:
        return True
    before = p[start - 1]
    return before == "/" or (before == "." and p.count("/") == 2 and p.rfind("/", 0, start) == 0)


# -- headers ---------------------------------------------------------------------------
def request_id(headers: Mapping[str, str]) -> tuple[str, bool]:
    """(x-request-id, generated?) — a uuid4 when the client sent none."""
    rid = headers.get(H_REQUEST_ID)
    if rid:
        return rid, False
    return str(uuid.uuid4()), True


def _header(headers: Mapping[str, str], name: str, alias: str) -> str:
    return headers.get(name) or headers.get(alias) or ""


def _fairness_id(headers: Mapping[str, str]) -> str:
    """The flow's fairness id: it keys per-tenant state that outlives the request (flows; program-aware fairness
    records for up to an hour), so a long one is bounded (clientids.bounded_id)."""
    return bounded_id(_header(headers, H_FAIRNESS, H_FAIRNESS_ALIAS)) or DEFAULT_FAIRNESS_ID


def headers_request(
    headers: Mapping[str, str], *, request_id: str, received_at: float = 0.0, kind: RequestKind = RequestKind.BODYLESS
) -> InferenceRequest:
    """A request known by its headers only: without a body (BODYLESS: GET /v1/models, ...), or with one the
    EPP does not read (PASSTHROUGH). Routed by load, session and the like: there is no prompt."""
    return InferenceRequest(
        request_id=request_id,
        path=request_path(headers),
        headers=dict(headers),
        kind=kind,
        objective=_header(headers, H_OBJECTIVE, H_OBJECTIVE_ALIAS),
        fairness_id=_fairness_id(headers),
        received_at=received_at,
    )


# -- body ------------------------------------------------------------------------------
class RequestParsers:
    """Path → parser plugin (reference handlers/parsers.go): the longest claimed suffix wins; an
    unclaimed path goes to the fallback, the first parser that claims nothing (parsers listed after
    it are ignored, as are repeated types), or is a 400 when there is none."""

    def __init__(self, parsers: Sequence[Parser]) -> None:
        claims: dict[str, Parser] = {}
        self.fallback: Parser | None = None
        seen: set[str] = set()
        for parser in parsers:
            if parser.type in seen:
                continue
            seen.add(parser.type)
            if not parser.claims:
                self.fallback = parser
                break
            for suffix in parser.claims:
                claims.setdefault(suffix, parser)
        # Longest first, so the first match is the longest.
        self._claims = sorted(claims.items(), key=lambda item: -len(item[0]))
        self.parsers = [p for p in {id(p): p for p in [*claims.values(), self.fallback] if p}.values()]
        # A pool serves a handful of paths: remember each one's match (bounded against path scans).
        self._matched: dict[str, tuple[Parser | None, str]] = {}

    def match(self, path: str) -> tuple[Parser | None, str]:
        found = self._matched.get(path)
        if found is None:
            found = next(((p, sfx) for sfx, p in self._claims if claimed_suffix(path, sfx)), (self.fallback, ""))
            if len(self._matched) >= _MATCH_CACHE:
                self._matched.clear()
            self._matched[path] = found
        return found

    def unsupported(self, app_protocol: str) -> list[str]:
        """The names of the parsers that cannot read a pool of `app_protocol` ("": unset, none)."""
        if not app_protocol:
            return []
        return [p.name for p in self.parsers if not p.supports(app_protocol)]

    def reads_body(self, path: str) -> bool:
        """Whether the parser of `path` reads the body (an unclaimed path without fallback: True, so
        the 400 comes once the body is in, like any parse error)."""
        parser, _ = self.match(path)
        return parser is None or parser.reads_body

    def parse(
        self, headers: Mapping[str, str], body: bytes, *, request_id: str, received_at: float = 0.0
    ) -> InferenceRequest:
        """Parse one buffered request. Raises only `BadRequest` (with a precise message)."""
        path = request_path(headers)
        parser, suffix = self.match(path)
        if parser is None:
            raise BadRequest(f"no request parser claims the path {path!r}")
        req = InferenceRequest(
            request_id=request_id,
            path=path,
            headers=dict(headers),
            kind=RequestKind.PASSTHROUGH,
            body=body,
            objective=_header(headers, H_OBJECTIVE, H_OBJECTIVE_ALIAS),
            fairness_id=_fairness_id(headers),
            received_at=received_at,
        )
        try:
            parser.parse(req, suffix)
        except MalformedJSON:
            # Envoy hands over the body as the client sent it: a compressed one is not JSON.
            encoding = headers.get("content-encoding")
            if encoding and encoding.lower() != "identity":
                raise BadRequest(
                    f"request body has content-encoding {encoding!r}: the router reads JSON bodies uncompressed"
                ) from None
            raise
        if req.model:
            rewrite = _header(headers, H_MODEL_REWRITE, H_MODEL_REWRITE_ALIAS)
            req.target_model = rewrite or req.model
            if req.target_model != req.model:
                # Only a rewrite needs the whole payload; decoding it twice is rarer than keeping it.
                # (req.body: a parser of a wrapped API, e.g. vertexai-parser, leaves the JSON there.)
                req.payload = decode_body(_ANY_DECODER, req.body)
        return req


_MATCH_CACHE = 1024
_default: RequestParsers | None = None


def default_parsers() -> RequestParsers:
    """The table for a config without `requestHandler.parsers` (built-in plugins, built once)."""
    global _default
    if _default is None:
        from llmepp.framework.plugin import registry
        from llmepp.framework.requestcontrol import Parser

        built = [registry.build(t, t, None) for t in DEFAULT_PARSERS]
        _default = RequestParsers([p for p in built if isinstance(p, Parser)])
    return _default


def parse_request(
    headers: Mapping[str, str], body: bytes, *, request_id: str, received_at: float = 0.0
) -> InferenceRequest:
    """`default_parsers().parse(...)`: what the EPP does with the default requestHandler."""
    return default_parsers().parse(headers, body, request_id=request_id, received_at=received_at)


def _read_tokenize_params(req: InferenceRequest, body: _CompletionsBody | _ChatBody) -> None:
    """vLLM's `add_special_tokens` (a bool) and `truncate_prompt_tokens` (N > 0: the last N tokens), read as
    pydantic's lax mode reads them ("false", 0, "8", 8.0). Other values are left to the model server to refuse
    (-1, vLLM's "truncate to max_model_len", is unknown here)."""
    _read_add_special_tokens(req, body.add_special_tokens)
    n = body.truncate_prompt_tokens
    if n is not None and (n := lax_int(n)) is not None and n > 0:
        req.truncate_prompt_tokens = n


def _read_add_special_tokens(req: InferenceRequest, value: Any) -> None:
    if value is not None and (flag := lax_bool(value)) is not None:
        req.add_special_tokens = flag


def parse_openai(req: InferenceRequest, suffix: str) -> None:
    """openai-parser: one of OPENAI_CLAIMS' bodies."""
    body = req.body
    req.kind = kind = OPENAI_CLAIMS[suffix]
    if kind is RequestKind.CHAT_COMPLETIONS:
        chat = decode_body(_CHAT_DECODER, body, req)
        req.model = _model(chat.model)
        _read_chat(req, chat, bytes(chat.tools))
        req.stream = _flag(chat.stream)
        # vLLM (to_sampling_params): `max_completion_tokens or max_tokens`; both are validated.
        completion = _max_tokens(chat.max_completion_tokens, "max_completion_tokens")
        req.max_tokens = completion or _max_tokens(chat.max_tokens)
        req.cache_salt = chat.cache_salt or ""
        _read_tokenize_params(req, chat)
    elif kind is RequestKind.COMPLETIONS:
        comp = decode_body(_COMPLETIONS_DECODER, body, req)
        req.model = _model(comp.model)
        req.prompt, req.prompt_is_token_ids, req.prompt_ends = _text_or_tokens(comp.prompt, "prompt", lax=True)
        req.stream = _flag(comp.stream)
        # vLLM's CompletionRequest: `max_tokens: int | None = 16` (absent: 16; an explicit null: no limit).
        absent = comp.max_tokens is msgspec.UNSET
        req.max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS if absent else _max_tokens(comp.max_tokens)
        req.cache_salt = comp.cache_salt or ""
        _read_tokenize_params(req, comp)
    elif kind is RequestKind.EMBEDDINGS:
        emb = decode_body(_EMBEDDINGS_DECODER, body, req)
        req.model = _model(emb.model)
        if emb.input is not msgspec.UNSET and emb.input is not None:
            req.prompt, req.prompt_is_token_ids, req.prompt_ends = _text_or_tokens(emb.input, "input", lax=True)
        elif emb.messages:
            # vLLM's EmbeddingChatRequest: chat messages, rendered by the chat template (without tools).
            _read_chat(req, decode_body(_CHAT_DECODER, req.body), b"")
        else:
            raise BadRequest('missing required field "input" (or "messages")')
        req.cache_salt = emb.cache_salt or ""
        # (Not truncate_prompt_tokens: a pooling model's tokenizer truncates on the right, keeping the prompt's
        # start, which the unread prompt's hashes already match.)
        _read_add_special_tokens(req, emb.add_special_tokens)
    elif kind is RequestKind.CONVERSATIONS:
        # No model: a conversation is stored state; its items are the start of every later turn.
        conv = decode_body(_CONVERSATIONS_DECODER, body, req)
        if conv.items is msgspec.UNSET:
            raise BadRequest('missing required field "items"')
        req.messages = _responses_messages(_ResponsesBody(input=conv.items)) if conv.items else []
        req.prompt = conversation_prompt(req.messages)
    elif kind is RequestKind.IMAGES:
        images = decode_body(_IMAGES_DECODER, body, req)
        if images.prompt is msgspec.UNSET:
            raise BadRequest('missing required field "prompt"')
        req.model = images.model or ""
        req.prompt = images.prompt.encode()
    else:
        resp = decode_body(_RESPONSES_DECODER, body, req)
        req.model = _model(resp.model)
        req.messages = _responses_messages(resp)
        if not isinstance(resp.input, str | msgspec.UnsetType):
            req.mm_items = _media_items(resp.input)
        req.prompt = conversation_prompt(req.messages, bytes(resp.tools))
        req.stream = _flag(resp.stream)
        req.max_tokens = _max_tokens(resp.max_output_tokens, "max_output_tokens")
        req.cache_salt = resp.cache_salt or ""


def parse_anthropic(req: InferenceRequest, suffix: str) -> None:
    """anthropic-parser: a Messages API body (`count_tokens` stays raw)."""
    if suffix != "messages":
        return
    body = decode_body(_MESSAGES_DECODER, req.body, req)
    req.kind = RequestKind.MESSAGES
    req.model = _model(body.model)
    if body.messages is msgspec.UNSET:
        raise BadRequest('missing required field "messages"')
    if not body.messages:
        raise BadRequest('"messages" must contain at least one message')
    for message in body.messages:  # vLLM's AnthropicMessage.normalize_role: Claude Code's ctx / msg are user turns
        message.role = _ANTHROPIC_ROLES.get(message.role, message.role)
    req.messages = messages = _anthropic_messages(body)
    req.mm_items = _media_items(body.messages)
    req.prompt = conversation_prompt(messages, bytes(body.tools))
    req.stream = _flag(body.stream)
    req.max_tokens = _max_tokens(body.max_tokens)


_ANTHROPIC_ROLES = {"ctx": "user", "msg": "user"}


def _anthropic_messages(body: _MessagesBody) -> list[tuple[str, str]]:
    """(role, text) per message as vLLM's Anthropic endpoint converts them (inline_system.py, "preserve"
    placement): the system prompt is the top-level `system` (a string as sent; of a block list, the text
    blocks without Claude Code's billing header, joined without separator), then the text of the system
    messages leading `messages` ("\n\n" between them); a later system message stays in place (held past
    an assistant's tool_use until its tool results), without billing-header blocks, dropped when empty.
    (vLLM folds such later system text into a neighbouring user turn instead when the request has no
    system prompt, or when a probe of its chat template finds system turns unsafe there: either way only
    the end of the conversation changes, so prefix matching is unaffected.) User and assistant messages:
    their text (and tool-result text) blocks joined by "\n"."""
    system = body.system
    top = system if isinstance(system, str) else _system_blocks_text(system) if system else ""
    msgs = body.messages
    assert not isinstance(msgs, msgspec.UnsetType)
    lead = 0
    while lead < len(msgs) and msgs[lead].role == "system":
        lead += 1
    texts = [top, *(_system_message_text(m.content) for m in msgs[:lead])]
    system_text = "\n\n".join(t for t in texts if t)
    out: list[tuple[str, str]] = [("system", system_text)] if system_text else []
    held: list[tuple[str, str]] = []
    awaiting_results = False
    for m in msgs[lead:]:
        role = m.role
        if role == "system":
            text = _system_message_text(m.content)
            if text:
                (held if awaiting_results else out).append((role, text))
            continue
        if held and role == "assistant":
            out += held
            held.clear()
        out.append((role, _block_text(m.content)))
        if held and role == "user":
            out += held
            held.clear()
        content = m.content
        awaiting_results = (
            role == "assistant" and isinstance(content, list) and any(b.type == "tool_use" for b in content)
        )
    return out + held


def _system_blocks_text(blocks: list[_Block]) -> str:
    return "".join(b.text for b in blocks if b.type == "text" and b.text and not b.text.startswith(BILLING_HEADER))


def _system_message_text(content: str | list[_Block] | None) -> str:
    if isinstance(content, str):
        return "" if content.startswith(BILLING_HEADER) else content
    return _system_blocks_text(content) if content else ""


def _block_text(content: str | list[_Block] | None) -> str:
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for block in content or ():
        if block.type == "text" and block.text is not None:
            parts.append(block.text)
        elif block.type == "tool_result":
            inner = block.content
            if isinstance(inner, str):
                parts.append(inner)
            elif isinstance(inner, list):
                parts += [b["text"] for b in inner if isinstance(b, dict) and isinstance(b.get("text"), str)]
    return "\n".join(parts)


def parse_sglang(req: InferenceRequest, suffix: str) -> None:
    """sglanghttp-parser: SGLang's native generate body (no `model` is normal: one model per server)."""
    body = decode_body(_GENERATE_DECODER, req.body, req)
    has_text, has_ids = body.text is not None, body.input_ids is not None
    if has_text == has_ids:
        raise BadRequest('exactly one of "text" and "input_ids" is required')
    req.kind = RequestKind.GENERATE
    req.model = body.model if isinstance(body.model, str) else ""
    if has_text:
        if _is_token_prompt(body.text):
            raise BadRequest('"text" must be a string or a list of strings')
        req.prompt, _, req.prompt_ends = _text_or_tokens(body.text, "text")
    else:
        ids = body.input_ids
        if not isinstance(ids, list) or not ids or isinstance(ids[0], str):
            raise BadRequest('"input_ids" must be a list of token ids or a list of such lists')
        req.prompt, _, req.prompt_ends = _text_or_tokens(ids, "input_ids")
        req.prompt_is_token_ids = True
    params = body.sampling_params
    first = params[0] if isinstance(params, list) and params else params
    field = "sampling_params[0].max_new_tokens" if isinstance(params, list) else "sampling_params.max_new_tokens"
    req.max_tokens = _max_tokens(first.max_new_tokens, field) if isinstance(first, _SamplingParams) else None
    req.stream = _flag(body.stream)
    salt = body.extra_key
    req.cache_salt = (salt[0] if salt else "") if isinstance(salt, list) else salt or ""


def parse_vllm_generate(req: InferenceRequest, suffix: str) -> None:
    """vllmhttp-parser: vLLM's tokens-in / tokens-out `inference/v1/generate` (a rendered prompt:
    `token_ids`, multimodal items as `features.mm_hashes` per modality)."""
    body = decode_body(_VLLM_GENERATE_DECODER, req.body, req)
    ids = body.token_ids
    if ids is msgspec.UNSET:
        raise BadRequest('missing required field "token_ids"')
    if not isinstance(ids, list) or not ids:
        raise BadRequest('"token_ids" must be a non-empty list of token ids')
    req.kind = RequestKind.GENERATE
    req.model = body.model or ""
    req.prompt = pack_token_ids(ids, "token_ids", lax=True)
    req.prompt_is_token_ids = True
    params = body.sampling_params
    req.max_tokens = _max_tokens(params.max_tokens, "sampling_params.max_tokens") if params is not None else None
    req.stream = _flag(body.stream)
    req.cache_salt = body.cache_salt or ""
    if body.features is not None:
        hashes = body.features.mm_hashes
        req.mm_items = tuple(_xxh64(h.encode()) for modality in sorted(hashes) for h in hashes[modality])


def _media_items(messages: Any) -> tuple[int, ...]:
    """A hash per media part of the messages (each with a `content` of parts / blocks), in order."""
    items: list[int] = []
    for message in messages:
        content = message.content
        if isinstance(content, str) or not content:
            continue
        items.extend(_xxh64(_media_ref(part)) for part in content if _is_media(part))
    return tuple(items)


def _is_media(part: Any) -> bool:
    """A media part / block: its type says so, or (vLLM's "simple" forms, chat_utils'
    _parse_chat_message_content_mm_part) a chat part without "type" holds an image_url, audio_url,
    input_audio or video_url."""
    if isinstance(part, str):
        return False
    if part.type:
        return part.type in MULTIMODAL_PARTS
    return isinstance(part, _ContentPart) and (
        part.image_url is not None
        or part.audio_url is not None
        or part.input_audio is not None
        or part.video_url is not None
    )


def _media_ref(part: Any) -> bytes:
    """How the client identified the item: its `uuid`, which vLLM takes as the item's hash in its caches
    (the URL or data may then differ or be left out; as the generate API's mm_hashes are read), else its
    URL, data or file id as canonical JSON bytes."""
    if isinstance(part, _Block):
        return msgspec.json.encode(part.source)
    if part.uuid is not None:
        return str(part.uuid).encode()
    ref = part.image_url or part.video_url or part.audio_url or part.input_audio or part.file_id or part.file_data
    return msgspec.json.encode(ref)


def conversation_prompt(messages: Sequence[tuple[str, str]], tools: bytes = b"") -> bytes:
    """The canonical prompt of a conversation: the tools JSON as sent, then role + text per message."""
    text = "".join(role + content for role, content in messages).encode()
    if tools and tools != b"null":
        return tools + text
    return text


def _responses_messages(resp: _ResponsesBody) -> list[tuple[str, str]]:
    items = resp.input
    if items is msgspec.UNSET:
        raise BadRequest('missing required field "input"')
    out: list[tuple[str, str]] = [("system", resp.instructions)] if resp.instructions else []
    if isinstance(items, str):
        out.append(("user", items))
        return out
    if not items:
        raise BadRequest('"input" must not be an empty list')
    for item in items:
        kind = item.type
        if kind == "function_call_output":
            out.append(("tool", _output_text(item.output)))
            continue
        if kind in _ASSISTANT_ITEMS:  # a tool call or reasoning: an assistant turn without text (as in chat)
            out.append(("assistant", ""))
            continue
        content = item.content
        if isinstance(content, str):
            out.append((item.role, content))
        else:
            out.append((item.role, "\n".join(t for p in content or () if (t := _part_text(p)) is not None)))
    return out


_ASSISTANT_ITEMS = frozenset({"function_call", "reasoning"})


def _output_text(output: Any) -> str:
    """A function_call_output's `output`: a string, or the text of its text parts joined by "\n"."""
    if isinstance(output, str):
        return output
    if isinstance(output, list):
        return "\n".join(
            text
            for part in output
            if isinstance(part, dict)
            and isinstance(kind := part.get("type"), str)  # a client's list / object: no part type (unhashable)
            and kind in TEXT_PARTS
            and isinstance(text := part.get(TEXT_PARTS[kind]), str)
            and text
        )
    return ""


class MalformedJSON(BadRequest):
    """The body is not JSON (as opposed to JSON of the wrong shape)."""


def decode_body(decoder: msgspec.json.Decoder[Any], body: bytes, req: InferenceRequest | None = None) -> Any:
    """`body` decoded; `req`: the request whose body it is, whose `body` then becomes the bytes decoded (a lone
    surrogate escape read as \\ufffd: same length), so that its later readers (a model rewrite, the token
    producers' chat render) read the body as the parser did. What goes upstream stays the client's bytes."""
    if not body:
        raise BadRequest("request body is empty; expected a JSON object")
    try:
        try:
            return decoder.decode(body)
        except msgspec.DecodeError:
            # msgspec refuses a lone surrogate escape ("\ud83d": JSON's grammar allows it; JavaScript writes
            # it for a string cut inside a pair) as "Input data was truncated". Read it as Go's encoding/json
            # (the reference) and Python's json do: U+FFFD (same length: byte offsets in errors still hold).
            if b"\\u" not in body or _LONE_SURROGATE.search(body) is None:
                raise
            body = _LONE_SURROGATE.sub(_replace_surrogate, body)
            value = decoder.decode(body)
            if req is not None:
                req.body = body
            return value
    except msgspec.ValidationError as e:
        raise BadRequest(_validation_message(str(e))) from None
    except msgspec.DecodeError as e:
        raise MalformedJSON(_decode_message(str(e), len(body))) from None
    except UnicodeDecodeError as e:  # msgspec's error for a string's bytes; its offset is within the string
        raise MalformedJSON(f"invalid JSON: a string holds byte 0x{e.object[e.start]:02x}, not UTF-8") from None
    except RecursionError:  # msgspec stops at Python's recursion limit (less the caller's depth)
        raise BadRequest("request body nests JSON too deeply") from None


# A \uD800-\uDFFF escape (after an even number of backslashes, so a real escape): a high one with its low
# one (kept), a high one alone, or a low one alone.
_LONE_SURROGATE = re.compile(
    rb"(?<!\\)((?:\\\\)*)\\u(?:[dD][89abAB][0-9a-fA-F]{2}(\\u[dD][c-fC-F][0-9a-fA-F]{2})?|[dD][c-fC-F][0-9a-fA-F]{2})"
)


def _replace_surrogate(m: re.Match[bytes]) -> bytes:
    return m.group(0) if m.group(2) else m.group(1) + b"\\ufffd"


def _decode_message(msg: str, size: int) -> str:
    m = _DECODE_ERROR_RE.match(msg)
    if m:
        return f"invalid JSON at byte {m.group(2)}: {m.group(1)}"
    if msg == "Input data was truncated":
        return f"invalid JSON at byte {size}: unexpected end of input"
    return f"invalid JSON: {msg}"


def _validation_message(msg: str) -> str:
    m = _VALIDATION_RE.match(msg)
    if m:
        expected, got, where = m.groups()
        if not where:
            return f"request body must be a JSON {_TYPE_NAMES.get(expected, expected)}, got {got}"
        return f'"{where}" must be {_type_words(expected)}, got {_TYPE_NAMES.get(got, got)}'
    return f"invalid request: {msg}"


_TYPE_NAMES = {"str": "string", "int": "integer", "bool": "boolean", "float": "number", "object": "object"}


def _type_words(expected: str) -> str:
    """msgspec's "bool | null" → "a boolean"; "str | array | null" → "a string or array"."""
    names = [_TYPE_NAMES.get(t, t) for t in expected.split(" | ") if t != "null"] or ["null"]
    words = " or ".join(names)
    return ("an " if words[:1] in "aeiou" else "a ") + words


def _model(value: Any) -> str:
    if value is None:
        raise BadRequest('missing required field "model"')
    if not isinstance(value, str):
        raise BadRequest('"model" must be a string')
    if not value:
        raise BadRequest('"model" must not be empty')
    return value


def _max_tokens(value: Any, field: str = "max_tokens") -> int | None:
    """A vLLM `int | None` token count, read as pydantic's lax mode reads it (10.0, "10" → 10)."""
    if value is None:
        return None
    count = value if type(value) is int else lax_int(value)
    if count is None:
        raise BadRequest(f'"{field}" must be an integer, got {_json_type(value)}')
    if count < 0:
        raise BadRequest(f'"{field}" must not be negative')
    return count


def _flag(value: Any, field: str = "stream") -> bool:
    """A vLLM `bool | None` flag (null: false), read as pydantic's lax mode reads it ("true", 1 → true)."""
    if value is True or value is False:
        return value
    if value is None:
        return False
    flag = lax_bool(value)
    if flag is None:
        raise BadRequest(f'"{field}" must be a boolean, got {_json_type(value)}')
    return flag


# -- lax scalars ---------------------------------------------------------------------------------
# vLLM's request models are pydantic models validated in lax mode (FastAPI, from json.loads'
# objects), so vLLM serves `"stream": "true"` and `"max_tokens": 10.0`. These read a JSON value as
# pydantic-core's lax `int` and `bool` do (checked against pydantic in the tests); None: refused.
# Whitespace pydantic trims around an integer string: Rust's char::is_whitespace (Unicode White_Space;
# str.strip() would also strip \x1c-\x1f).
_LAX_WHITESPACE = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)
# Sign, ASCII digits with single underscores between them, an optional all-zero fraction.
# pydantic strips a leading run of zeros, underscores among them in any number ("0__0" and "0___1" read),
# then reads the rest as Python's int() does (one "_" between digits): "0__", "_0" and "1__0" are refused.
_LAX_INT = re.compile(r"[+-]?(?:0[0_]*[1-9](?:_?[0-9])*|0(?:[0_]*0)?|[1-9](?:_?[0-9])*)(?:\.0+)?")
_LAX_INT_DIGITS = 4300  # significant digits at most (Python's int-string limit; pydantic's too)
_LAX_I64 = 2.0**63  # a float must lie strictly within (-2⁶³, 2⁶³)
_LAX_BOOLS = {"true": True, "t": True, "y": True, "yes": True, "on": True, "1": True,
              "false": False, "f": False, "n": False, "no": False, "off": False, "0": False}  # fmt: skip
_JSON_TYPES = {type(None): "null", bool: "boolean", int: "integer", float: "number", str: "string",
               list: "array", dict: "object"}  # fmt: skip


def lax_int(value: Any) -> int | None:
    """pydantic's lax `int`: an integer; a boolean (1 / 0); a float without fraction, within int64; a
    string of an integer (surrounding whitespace, `_` between digits and a `.0…` fraction allowed)."""
    kind = type(value)
    if kind is int:
        return value
    if kind is bool:
        return int(value)
    if kind is float:
        return int(value) if value.is_integer() and -_LAX_I64 < value < _LAX_I64 else None
    if kind is not str:
        return None
    text = value.strip(_LAX_WHITESPACE)
    if not _LAX_INT.fullmatch(text):
        return None
    digits = text.partition(".")[0].lstrip("+-").replace("_", "").lstrip("0")
    if len(digits) > _LAX_INT_DIGITS:
        return None
    count = int(digits) if digits else 0
    return -count if text[0] == "-" else count


def lax_bool(value: Any) -> bool | None:
    """pydantic's lax `bool`: a boolean; 0 / 1 (integer or float); "0" / "1" and, in any ASCII case,
    "true" / "false", "t" / "f", "yes" / "no", "y" / "n", "on" / "off" (no surrounding whitespace)."""
    kind = type(value)
    if kind is bool:
        return bool(value)
    if kind is int or kind is float:
        return True if value == 1 else False if value == 0 else None
    if kind is str and value.isascii():
        return _LAX_BOOLS.get(value.lower())
    return None


def _json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _read_chat(req: InferenceRequest, chat: _ChatBody, tools: bytes) -> None:
    """A chat's messages → the request's prompt (after the `tools` JSON), (role, text) messages, media items."""
    req.prompt = _chat_prompt(chat, tools)
    req.messages = _chat_messages(chat)
    req.mm_items = _media_items(chat.messages)


def _chat_prompt(chat: _ChatBody, tools: bytes) -> bytes:
    messages = chat.messages
    if messages is msgspec.UNSET:
        raise BadRequest('missing required field "messages"')
    if not messages:
        raise BadRequest('"messages" must contain at least one message')
    parts: list[str] = []
    for msg in messages:
        parts.append(msg.role)
        content = msg.content
        if isinstance(content, str):
            parts.append(content)
        elif content:
            parts.extend(t for p in content if (t := _part_text(p)) is not None)
    text = "".join(parts).encode()
    if tools and tools != b"null":
        return tools + text
    return text


def _chat_messages(chat: _ChatBody) -> list[tuple[str, str]]:
    """(role, text) per message (validated by _chat_prompt): string content, or the text of the
    text parts (TEXT_PARTS) joined by "\n"; other parts and null content contribute nothing."""
    assert not isinstance(chat.messages, msgspec.UnsetType)
    out: list[tuple[str, str]] = []
    for msg in chat.messages:
        content = msg.content
        if isinstance(content, str):
            text = content
        elif content:
            text = "\n".join(t for p in content if (t := _part_text(p)) is not None)
        else:
            text = ""
        out.append((msg.role, text))
    return out


def _part_text(part: _ContentPart | str) -> str | None:
    """The text of a text part: a plain string, or a TEXT_PARTS part's text field; None for other parts
    and for a text part whose text is null or empty (vLLM skips it: `if parse_res`)."""
    if isinstance(part, str):
        return part or None
    field = TEXT_PARTS.get(part.type)
    return (getattr(part, field) or None) if field else None


def _is_token_prompt(value: Any) -> bool:
    """A validated prompt / input given as token ids (a list of ints or of int lists)."""
    return isinstance(value, list) and bool(value) and not isinstance(value[0], str)


def _text_or_tokens(value: Any, field: str, *, lax: bool = False) -> tuple[bytes, bool, tuple[int, ...]]:
    """A completions prompt / embeddings input: str, list[str], list[int] or list[list[int]] → (prompt,
    given as token ids?, where each prompt of a batch ends in it). A batch (a list of several strings or
    token-id lists) is several prompts that the engine computes and caches each on its own: their bytes are
    joined and the end offsets kept, so prefix hashing can take them apart (() for a single prompt).
    `lax`: token ids as vLLM's pydantic union reads them (smart mode: a list of strings is text; any other
    list whose items all read as integers, e.g. [1.0, "2"], is token ids)."""
    if value is msgspec.UNSET or value is None:
        raise BadRequest(f'missing required field "{field}"')
    if isinstance(value, str):
        return value.encode(), False, ()
    if not isinstance(value, list):
        raise BadRequest(f'"{field}" must be a string or list')
    if not value:
        raise BadRequest(f'"{field}" must not be an empty list')
    first = value[0]
    if isinstance(first, str) and all(isinstance(v, str) for v in value):
        parts = [v.encode() for v in value]
        return b"".join(parts), False, _ends(parts)
    if type(first) is int:  # the usual token-id prompt (bool is no int here: JSON true)
        return pack_token_ids(value, field, lax=lax), True, ()
    if isinstance(first, list):
        packed: list[bytes] = []
        for item in value:
            if not isinstance(item, list) or not item:
                raise BadRequest(f'"{field}" must be a list of non-empty token-id lists')
            packed.append(pack_token_ids(item, field, lax=lax))
        return b"".join(packed), True, _ends(packed)
    if lax:
        ids = [lax_int(v) for v in value]
        if None not in ids:
            return pack_token_ids(ids, field), True, ()
    if isinstance(first, str):
        raise BadRequest(f'"{field}" list must contain only strings')
    raise BadRequest(f'"{field}" must be a string, a list of strings or a list of token ids')


def _ends(parts: list[bytes]) -> tuple[int, ...]:
    """End offsets of the joined `parts` (() for one part: a batch of one is a single prompt)."""
    if len(parts) < 2:
        return ()
    return tuple(itertools.accumulate(map(len, parts)))


def pack_token_ids(ids: Iterable[Any], field: str, *, uint32: bool = False, lax: bool = False) -> bytes:
    """Token ids as little-endian uint32 (the token-id prompt layout); anything but integers in
    [0, 2³²−1] is a BadRequest. C loops only: 2,048 ids in ~30 µs (a Python check per id: ~80 µs).
    `uint32`: the ids are typed so already (a protobuf repeated uint32): no type check, no copy.
    `lax`: a list with other items (1.0, "2", true) is read as pydantic's lax list[int] reads it."""
    # bool is an int subclass: JSON true/false are no token ids, unless read laxly (as 1 / 0).
    if not uint32 and set(map(type, ids)) - _INT_ONLY:
        coerced = [lax_int(v) for v in ids] if lax else [None]
        if None in coerced:
            raise BadRequest(f'"{field}" token ids must be integers in [0, 4294967295]')
        ids = coerced
    try:
        packed = array.array("I", ids)  # "I" is 4 bytes on every platform CPython supports here
    except OverflowError:
        raise BadRequest(f'"{field}" token ids must be integers in [0, 4294967295]') from None
    if sys.byteorder == "big":
        packed.byteswap()
    return packed.tobytes()
