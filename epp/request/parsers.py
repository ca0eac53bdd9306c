"""Request parsing: HTTP path + headers + body bytes → `InferenceRequest` (reference §1.2).

Path resolution: `:path`, else `x-original-path`, else `x-forwarded-path`, else
`/v1/completions`; the query string is dropped; the longest claimed suffix wins, matched
on a path-segment boundary (`/v1/chat/completions` is chat, `/x/foocompletions` is not).
Unclaimed paths are PASSTHROUGH: the body is kept raw and never interpreted.

The canonical prompt (`InferenceRequest.prompt`, UTF-8 bytes) mirrors the reference's
estimate tokenizer input:

- completions: the prompt string; a list of prompts is concatenated without separator
  (vLLM serves a list as a batch; concatenation keeps the first prompt as the shared
  prefix, which is what prefix-affinity scoring cares about). Token-id prompts (a list
  of ints, or a list of such lists) are packed as little-endian uint32, 4 bytes per
  token, so `len(prompt) / 4` is the exact token count, like the estimate backend's
  4-bytes-per-pseudo-token packing.
- chat: the raw `tools` JSON exactly as the client sent it (if any), then for each
  message its role followed by its text (string content, or the `text` of each text
  content part; non-text parts such as `image_url` contribute nothing).
- embeddings: the input, with the same rules as a completions prompt.

Decoding uses typed msgspec Structs: only the fields the router needs are materialised
(a 2 MB body decodes in well under a millisecond). The full payload is decoded as a dict
only when the model name must be rewritten upstream.
"""

from __future__ import annotations

import re
import struct
import uuid
from collections.abc import Mapping
from typing import Any

import msgspec

from llmepp.errors import BadRequest
from llmepp.request.types import InferenceRequest, RequestKind

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

DEFAULT_PATH = "/v1/completions"
DEFAULT_FAIRNESS_ID = "default-flow"

# Claimed path suffixes, longest first so the first match is the longest.
_CLAIMS: tuple[tuple[str, RequestKind], ...] = (
    ("chat/completions", RequestKind.CHAT_COMPLETIONS),
    ("completions", RequestKind.COMPLETIONS),
    ("embeddings", RequestKind.EMBEDDINGS),
)

_UINT32_MAX = 0xFFFFFFFF


# -- typed bodies: only what routing needs; unknown fields are skipped by msgspec ----------
class _CompletionsBody(msgspec.Struct):
    model: Any = None
    prompt: Any = msgspec.UNSET
    stream: bool | None = None
    max_tokens: int | None = None
    cache_salt: str | None = None


class _ContentPart(msgspec.Struct):
    type: str = ""
    text: str | None = None


class _Message(msgspec.Struct):
    role: str = ""
    content: str | list[_ContentPart] | None = None


class _ChatBody(msgspec.Struct):
    model: Any = None
    messages: list[_Message] | msgspec.UnsetType = msgspec.UNSET
    # Raw keeps the client's bytes: the prompt includes the tools JSON verbatim.
    tools: msgspec.Raw = msgspec.Raw(b"")
    stream: bool | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    cache_salt: str | None = None


class _EmbeddingsBody(msgspec.Struct):
    model: Any = None
    input: Any = msgspec.UNSET
    cache_salt: str | None = None


_COMPLETIONS_DECODER = msgspec.json.Decoder(_CompletionsBody)
_CHAT_DECODER = msgspec.json.Decoder(_ChatBody)
_EMBEDDINGS_DECODER = msgspec.json.Decoder(_EmbeddingsBody)
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


def classify(path: str) -> RequestKind:
    """Longest claimed suffix on a segment boundary; anything else is PASSTHROUGH."""
    p = path.rstrip("/")
    for suffix, kind in _CLAIMS:
        if p.endswith(suffix):
            start = len(p) - len(suffix)
            if start == 0 or p[start - 1] == "/":
                return kind
    return RequestKind.PASSTHROUGH


# -- headers ---------------------------------------------------------------------------
def request_id(headers: Mapping[str, str]) -> tuple[str, bool]:
    """(x-request-id, generated?) — a uuid4 when the client sent none."""
    rid = headers.get(H_REQUEST_ID)
    if rid:
        return rid, False
    return str(uuid.uuid4()), True


def _header(headers: Mapping[str, str], name: str, alias: str) -> str:
    return headers.get(name) or headers.get(alias) or ""


def bodyless_request(headers: Mapping[str, str], *, request_id: str, received_at: float = 0.0) -> InferenceRequest:
    """A request without a body (GET /v1/models, ...): routed by load only."""
    return InferenceRequest(
        request_id=request_id,
        path=request_path(headers),
        headers=dict(headers),
        kind=RequestKind.BODYLESS,
        objective=_header(headers, H_OBJECTIVE, H_OBJECTIVE_ALIAS),
        fairness_id=_header(headers, H_FAIRNESS, H_FAIRNESS_ALIAS) or DEFAULT_FAIRNESS_ID,
        received_at=received_at,
    )


# -- body ------------------------------------------------------------------------------
def parse_request(
    headers: Mapping[str, str], body: bytes, *, request_id: str, received_at: float = 0.0
) -> InferenceRequest:
    """Parse one buffered request. Raises only `BadRequest` (with a precise message)."""
    path = request_path(headers)
    kind = classify(path)
    req = InferenceRequest(
        request_id=request_id,
        path=path,
        headers=dict(headers),
        kind=kind,
        body=body,
        objective=_header(headers, H_OBJECTIVE, H_OBJECTIVE_ALIAS),
        fairness_id=_header(headers, H_FAIRNESS, H_FAIRNESS_ALIAS) or DEFAULT_FAIRNESS_ID,
        received_at=received_at,
    )
    if kind is RequestKind.PASSTHROUGH:
        return req
    if kind is RequestKind.CHAT_COMPLETIONS:
        chat = _decode(_CHAT_DECODER, body)
        req.model = _model(chat.model)
        req.prompt = _chat_prompt(chat)
        req.messages = _chat_messages(chat)
        req.stream = bool(chat.stream)
        req.max_tokens = _max_tokens(
            chat.max_completion_tokens if chat.max_completion_tokens is not None else chat.max_tokens
        )
        req.cache_salt = chat.cache_salt or ""
    elif kind is RequestKind.COMPLETIONS:
        comp = _decode(_COMPLETIONS_DECODER, body)
        req.model = _model(comp.model)
        req.prompt = _text_or_tokens(comp.prompt, "prompt")
        req.prompt_is_token_ids = _is_token_prompt(comp.prompt)
        req.stream = bool(comp.stream)
        req.max_tokens = _max_tokens(comp.max_tokens)
        req.cache_salt = comp.cache_salt or ""
    else:
        emb = _decode(_EMBEDDINGS_DECODER, body)
        req.model = _model(emb.model)
        req.prompt = _text_or_tokens(emb.input, "input")
        req.prompt_is_token_ids = _is_token_prompt(emb.input)
        req.cache_salt = emb.cache_salt or ""
    rewrite = _header(headers, H_MODEL_REWRITE, H_MODEL_REWRITE_ALIAS)
    req.target_model = rewrite or req.model
    if req.target_model != req.model:
        # Only a rewrite needs the whole payload; decoding it twice is rarer than keeping it.
        req.payload = _decode(_ANY_DECODER, body)
    return req


def _decode(decoder: msgspec.json.Decoder[Any], body: bytes) -> Any:
    if not body:
        raise BadRequest("request body is empty; expected a JSON object")
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as e:
        raise BadRequest(_validation_message(str(e))) from None
    except msgspec.DecodeError as e:
        raise BadRequest(_decode_message(str(e), len(body))) from None


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


def _max_tokens(value: int | None) -> int | None:
    if value is not None and value < 0:
        raise BadRequest('"max_tokens" must not be negative')
    return value


def _chat_prompt(chat: _ChatBody) -> bytes:
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
            parts.extend(p.text for p in content if p.text is not None)
    text = "".join(parts).encode()
    tools = bytes(chat.tools)
    if tools and tools != b"null":
        return tools + text
    return text


def _chat_messages(chat: _ChatBody) -> list[tuple[str, str]]:
    """(role, text) per message (validated by _chat_prompt): string content, or the text of the
    `text` parts joined by "\n"; other parts and null content contribute nothing."""
    assert not isinstance(chat.messages, msgspec.UnsetType)
    out: list[tuple[str, str]] = []
    for msg in chat.messages:
        content = msg.content
        if isinstance(content, str):
            text = content
        elif content:
            text = "\n".join(p.text or "" for p in content if p.type == "text")
        else:
            text = ""
        out.append((msg.role, text))
    return out


def _is_token_prompt(value: Any) -> bool:
    """A validated prompt / input given as token ids (a list of ints or of int lists)."""
    return isinstance(value, list) and bool(value) and not isinstance(value[0], str)


def _text_or_tokens(value: Any, field: str) -> bytes:
    """A completions prompt / embeddings input: str, list[str], list[int] or list[list[int]]."""
    if value is msgspec.UNSET or value is None:
        raise BadRequest(f'missing required field "{field}"')
    if isinstance(value, str):
        return value.encode()
    if not isinstance(value, list):
        raise BadRequest(f'"{field}" must be a string or list')
    if not value:
        raise BadRequest(f'"{field}" must not be an empty list')
    first = value[0]
    if isinstance(first, str):
        if not all(isinstance(v, str) for v in value):
            raise BadRequest(f'"{field}" list must contain only strings')
        return "".join(value).encode()
    if _is_token(first):
        return _pack_tokens(value, field)
    if isinstance(first, list):
        out = bytearray()
        for item in value:
            if not isinstance(item, list) or not item:
                raise BadRequest(f'"{field}" must be a list of non-empty token-id lists')
            out += _pack_tokens(item, field)
        return bytes(out)
    raise BadRequest(f'"{field}" must be a string, a list of strings or a list of token ids')


def _is_token(v: Any) -> bool:
    # bool is an int subclass; JSON true/false are not token ids.
    return type(v) is int and 0 <= v <= _UINT32_MAX


def _pack_tokens(ids: list[Any], field: str) -> bytes:
    if not all(_is_token(v) for v in ids):
        raise BadRequest(f'"{field}" token ids must be integers in [0, 4294967295]')
    return struct.pack(f"<{len(ids)}I", *ids)
