"""OpenAI-compatible request parsing/validation and response rendering (vLLM's field set and framing).

Deliberate simplifications, all answered with a vLLM-style 400 rather than silently ignored:
``n`` must be 1, batched prompts (more than one prompt in a list) are refused. Sampling parameters
(temperature, top_p, stop, ...) are accepted and ignored: output is the deterministic filler of
``llmepp_sim.textgen``.

``max_tokens`` (or chat's ``max_completion_tokens``) defaults to ``min(16, max_model_len - prompt_tokens)``.

Chat content parts are typed as vLLM's chat parser types them: a part of a type vLLM does not parse
(``file``, ``image``, ...) is a 400 with ``param: "type"``, naming the type and the part. A typed media part
vLLM validates (``image_url``, ``audio_url``, ``video_url``, ``input_image``) missing a required field, or a
``prompt_embeds`` part without ``data``, is a 400 with ``param: null``; a text-like part without its text is
skipped, as vLLM skips it.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

import msgspec

from llmepp_sim.errors import ApiError, bad_request
from llmepp_sim.tokenizer import TEXT_PART_FIELDS, ChatRenderer, render_body

DEFAULT_MAX_TOKENS = 16
_json_encode = msgspec.json.Encoder().encode
_json_decode = msgspec.json.Decoder().decode


@dataclass
class InferenceRequest:
    chat: bool
    model: str | None
    prompt: str | list[int]  # text to tokenise (chat already rendered with the template) or token ids
    max_tokens: int | None
    stream: bool
    include_usage: bool
    kv_transfer_params: dict[str, Any] | None
    continuous_usage: bool = False  # stream_options.continuous_usage_stats (with include_usage)


def decode_json_body(raw: bytes) -> dict[str, Any]:
    try:
        body = _json_decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # strings are decoded as UTF-8 by msgspec
        raise bad_request(f"Invalid JSON body: {exc}") from exc
    except RecursionError:  # msgspec recurses per nesting level
        raise bad_request("Invalid JSON body: nested too deeply.") from None
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    return body


def _optional(body: dict[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = body.get(key)
    if value is None:
        return None
    # vLLM validates with pydantic in lax mode: "true" / 1 is a boolean, 10.0 / "10" an integer.
    if kind is bool:
        flag = _LAX_BOOLS.get(value.lower()) if isinstance(value, str) else value if isinstance(value, bool) else None
        if flag is None and isinstance(value, int | float) and value in (0, 1):
            flag = bool(value)
        if flag is None:
            raise bad_request(f"`{key}` must be {what}, got {value!r}.", param=key)
        return flag
    if kind is int:
        count = lax_int(value)
        if count is None:
            raise bad_request(f"`{key}` must be {what}, got {value!r}.", param=key)
        return count
    if not isinstance(value, kind):
        raise bad_request(f"`{key}` must be {what}, got {value!r}.", param=key)
    return value


_LAX_BOOLS = {"true": True, "t": True, "y": True, "yes": True, "on": True, "1": True,
              "false": False, "f": False, "n": False, "no": False, "off": False, "0": False}  # fmt: skip


def lax_int(value: Any) -> int | None:
    """pydantic's lax int, the common cases: an int, a bool, an integral float, a string of an integer."""
    if isinstance(value, bool | int):
        return int(value)
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    if isinstance(value, str):
        text = value.strip()
        if text.endswith(".0"):
            text = text[:-2]
        try:
            return int(text)
        except ValueError:
            return None
    return None


def _max_tokens(body: dict[str, Any], chat: bool) -> int | None:
    value = _optional(body, "max_tokens", int, "an integer")
    if chat:
        completion = _optional(body, "max_completion_tokens", int, "an integer")
        value = completion if completion is not None else value
    if value is not None and value < 1:
        key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
        raise bad_request(f"max_tokens must be at least 1, got {value}.", param=key)
    return int(value) if value is not None else None


def _prompt(prompt: Any, vocab_size: int) -> str | list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise bad_request("The prompt cannot be empty.", param="prompt")
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if any(t < 0 or t >= vocab_size for t in prompt):
            raise bad_request(f"Token id out of vocabulary range [0, {vocab_size}).", param="prompt")
        return list(prompt)
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, str | list) for p in prompt):
        raise bad_request("Batched prompts are not supported by the simulator; send one prompt.", param="prompt")
    raise bad_request("`prompt` must be a string, a list of token ids, or a list with one of those.", param="prompt")


# vllm/entrypoints/chat_utils.py: the part types vLLM parses (MM_PARSER_MAP).
CONTENT_PART_TYPES = frozenset(
    {"text", "thinking", "input_text", "output_text", "input_image", "image_url", "image_embeds", "audio_embeds",
     "prompt_embeds", "image_pil", "audio_url", "input_audio", "refusal", "video_url", "tool_reference"}
)  # fmt: skip
# _parse_chat_message_content_mm_part: the fields that stand for the type of a part without one (or with a
# `uuid`), in the order it tries them (input_audio only when not null).
_UNTYPED_PART_FIELDS = ("image_url", "image_pil", "image_embeds", "audio_embeds", "prompt_embeds", "audio_url",
                        "input_audio", "video_url", "tool_reference")  # fmt: skip
# MM_PARSER_MAP validates these with TypeAdapter(<TypedDict>): {"<field>": {"url": str, ...}}, all required.
_URL_PARTS = {"image_url": "ChatCompletionContentPartImageParam", "audio_url": "ChatCompletionContentPartAudioParam",
              "video_url": "ChatCompletionContentPartVideoParam"}  # fmt: skip
_PROMPT_EMBEDS_MISSING_DATA = (
    "prompt_embeds content part requires a non-empty `data` field with base64-encoded tensor bytes"
)

_Error = tuple[str, str, str, Any]  # pydantic's (loc, message, error type, input value)


def _missing(loc: str, parent: Any) -> _Error:
    return loc, "Field required", "missing", parent


def _not_a(loc: str, kind: str, value: Any) -> _Error:
    message = "Input should be a valid dictionary" if kind == "dict" else "Input should be a valid string"
    return loc, message, f"{kind}_type", value


def _validation_error(model: str, errors: list[_Error], where: str) -> ApiError:
    """pydantic's ValidationError text; vLLM's create_error_response answers it (a ValueError) with param None."""
    lines = [f"{len(errors)} validation error{'s' if len(errors) > 1 else ''} for {model}"]
    for loc, message, kind, value in errors:
        shown = repr(value)
        shown = shown if len(shown) <= 100 else f"{shown[:49]}...{shown[-48:]}"
        lines += [loc, f"  {message} [type={kind}, input_value={shown}, input_type={type(value).__name__}]"]
    return bad_request("\n".join([*lines, f"  at {where}"]))


def _url_part_errors(part: dict[str, Any], field: str) -> list[_Error]:
    # openai's ChatCompletionContentPartImageParam (ImageURL: url required, detail a Literal) and vLLM's
    # ChatCompletionContentPartAudioParam / ...VideoParam (AudioURL / VideoURL: url required).
    if field not in part:
        return [_missing(field, part)]
    value = part[field]
    if not isinstance(value, dict):
        return [_not_a(field, "dict", value)]
    errors = []
    if "url" not in value:
        errors.append(_missing(f"{field}.url", value))
    elif not isinstance(value["url"], str):
        errors.append(_not_a(f"{field}.url", "string", value["url"]))
    if field == "image_url" and "detail" in value and value["detail"] not in ("auto", "low", "high"):
        errors.append((f"{field}.detail", "Input should be 'auto', 'low' or 'high'", "literal_error", value["detail"]))
    return errors


def _input_image_errors(part: dict[str, Any]) -> list[_Error]:
    # openai's ResponseInputImageParam: detail required (a Literal; newer SDKs add "original", accepted here since
    # the SDK version vLLM pins is not known), file_id / image_url optional strings.
    errors = []
    if "detail" not in part:
        errors.append(_missing("detail", part))
    elif part["detail"] not in ("high", "low", "auto", "original"):
        errors.append(("detail", "Input should be 'high', 'low' or 'auto'", "literal_error", part["detail"]))
    errors += [_not_a(key, "string", part[key]) for key in ("file_id", "image_url")
               if part.get(key) is not None and not isinstance(part[key], str)]  # fmt: skip
    return errors


def _check_typed_part(part: dict[str, Any], part_type: str, where: str) -> None:
    """What _parse_chat_message_content_part makes of a part of a known type (and no uuid)."""
    if part_type in _URL_PARTS or part_type == "input_image":
        model = _URL_PARTS.get(part_type, "ResponseInputImageParam")
        errors = _url_part_errors(part, part_type) if part_type in _URL_PARTS else _input_image_errors(part)
        if errors:
            raise _validation_error(model, errors, where)
    field = TEXT_PART_FIELDS.get(part_type)  # read with a plain .get, no validation
    # Falsy content (missing, null, "", 0, ...) is skipped (PART_TYPES_TO_SKIP_NONE_CONTENT, then `if parse_res`
    # in _parse_chat_message_content_parts); other non-strings reach "\n".join, whose TypeError is a 400.
    if field is not None and part.get(field) and not isinstance(part[field], str):
        raise bad_request(f"{where}: a {part_type} part's `{field}` must be a string.", param="messages")


def _check_part(part: dict[str, Any], where: str) -> None:
    """A content part as vLLM's chat parser judges it (_parse_chat_message_content_mm_part, then
    _parse_chat_message_content_part): a known type is checked as MM_PARSER_MAP reads it; else (no type, or a
    ``uuid``) a direct media field names the type; else a 400. An unknown type is vLLM's VLLMValidationError
    with ``parameter="type"``."""
    part_type = part.get("type")
    if isinstance(part_type, str) and part_type in CONTENT_PART_TYPES and part.get("uuid") is None:
        resolved = part_type
        _check_typed_part(part, part_type, where)
    elif part_type is None or part.get("uuid") is not None:
        present = (k for k in _UNTYPED_PART_FIELDS if (k in part if k != "input_audio" else part.get(k) is not None))
        found = next(present, None)
        if found is None:
            raise bad_request(f"Missing 'type' field in multimodal part {where}.", param="messages")
        resolved = found
    elif not isinstance(part_type, str):
        raise bad_request(f"Invalid 'type' field in multimodal part {where}: {part_type!r:.100}.", param="messages")
    else:
        raise bad_request(
            f"Unsupported chat content part type: {part_type[:100]!r} at {where}. "
            f"Supported types: {', '.join(sorted(CONTENT_PART_TYPES))}.",
            param="type",
        )
    # Both paths read a prompt_embeds part's `data`; empty, it is refused before --enable-prompt-embeds is.
    if resolved == "prompt_embeds" and not part.get("data"):
        raise bad_request(f"{_PROMPT_EMBEDS_MISSING_DATA} ({where}).")


def _messages_text(body: dict[str, Any], render: ChatRenderer) -> str:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("`messages` must be a non-empty list.", param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise bad_request(f"messages[{i}] must be an object with a string `role`.", param="messages")
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise bad_request(f"messages[{i}].content must be a string or a list of parts.", param="messages")
        # vLLM's content part union admits objects and strings only.
        for j, part in enumerate(content if isinstance(content, list) else ()):
            if not isinstance(part, dict | str):
                raise bad_request(f"messages[{i}].content parts must be objects, got {part!r}.", param="messages")
            if isinstance(part, dict):
                _check_part(part, f"messages[{i}].content[{j}]")
    try:
        return render(body)
    except ValueError as e:
        raise bad_request(str(e), param="messages") from None


def parse_inference_request(
    body: dict[str, Any], chat: bool, vocab_size: int, render: ChatRenderer = render_body
) -> InferenceRequest:
    """Validate a completions/chat body; tokenisation is left to the caller (it may be slow)."""
    model = _optional(body, "model", str, "a string")
    # vLLM's validate_stream_options runs before field validation, on the raw values: an empty (falsy)
    # object needs no stream; a raw falsy stream (false, 0, missing) refuses a non-empty one.
    if body.get("stream_options") and not body.get("stream"):
        raise bad_request("Stream options can only be defined when `stream=True`.", param="stream_options")
    stream = bool(_optional(body, "stream", bool, "a boolean") or False)
    options = _optional(body, "stream_options", dict, "an object")
    # vLLM's StreamOptions: `include_usage: bool | None = True` (lax: "false" is false; null is no usage).
    usage_key = "stream_options.include_usage"
    usage_flag = {usage_key: options.get("include_usage", True)} if options is not None else {}
    include_usage = bool(_optional(usage_flag, usage_key, bool, "a boolean"))
    # vLLM: a running usage in every chunk when both include_usage and continuous_usage_stats are set.
    continuous_key = "stream_options.continuous_usage_stats"
    continuous_flag = {continuous_key: options.get("continuous_usage_stats")} if options is not None else {}
    continuous = include_usage and bool(_optional(continuous_flag, continuous_key, bool, "a boolean"))
    n = _optional(body, "n", int, "an integer")
    if n is not None and n != 1:
        raise bad_request("The simulator only supports n=1.", param="n")
    _optional(body, "ignore_eos", bool, "a boolean")  # accepted; output always runs to max_tokens
    kv_params = _optional(body, "kv_transfer_params", dict, "an object")
    max_tokens = _max_tokens(body, chat)
    prompt: str | list[int]
    if chat:
        _optional(body, "chat_template_kwargs", dict, "an object")  # a Jinja template reads both
        _optional(body, "tools", list, "a list")
        prompt = _messages_text(body, render)
    else:
        if "prompt" not in body:
            raise bad_request("`prompt` is required.", param="prompt")
        prompt = _prompt(body["prompt"], vocab_size)
    return InferenceRequest(chat, model, prompt, max_tokens, stream, include_usage, kv_params, continuous)


# ---------------------------------------------------------------------------- responses
def new_request_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def full_response(
    chat: bool,
    request_id: str,
    model: str,
    text: str,
    finish_reason: str,
    usage_body: dict[str, Any],
    kv_transfer_params: dict[str, Any] | None,
) -> bytes:
    if chat:
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text, "tool_calls": []},
            "logprobs": None,
            "finish_reason": finish_reason,
            "stop_reason": None,
        }
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason, "stop_reason": None}
    body = {
        "id": request_id,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": usage_body,
        "kv_transfer_params": kv_transfer_params,
    }
    return bytes(_json_encode(body))


class StreamRenderer:
    """SSE framing of one streamed response, vLLM-style.

    Chat streams open with a role chunk (``delta: {"role": "assistant", "content": ""}``); every token is
    one chunk; the last token's chunk carries ``finish_reason``; with ``include_usage`` a final chunk with
    ``choices: []`` and ``usage`` follows; the stream ends with ``data: [DONE]``. With continuous usage
    stats every chunk also carries the usage so far (``usage=``). The JSON around the token text is
    pre-rendered once per request, so a token costs one small string encode.
    """

    def __init__(self, chat: bool, request_id: str, model: str) -> None:
        self.chat = chat
        self._head = {
            "id": request_id,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": model,
        }
        prefix = _json_encode(self._head)[:-1]  # drop the closing brace
        if chat:
            self._before = b"data: " + prefix + b',"choices":[{"index":0,"delta":{"content":'
            self._after_open = b'},"logprobs":null,"finish_reason":null}]}\n\n'
        else:
            self._before = b"data: " + prefix + b',"choices":[{"index":0,"text":'
            self._after_open = b',"logprobs":null,"finish_reason":null,"stop_reason":null}]}\n\n'

    def role_chunk(self, usage: dict[str, int] | None = None) -> bytes:
        chunk: dict[str, Any] = {
            **self._head,
            "choices": [
                {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            ],
        }
        if usage is not None:
            chunk["usage"] = usage
        return b"data: " + _json_encode(chunk) + b"\n\n"

    def token_chunk(self, text: str, usage: dict[str, int] | None = None) -> bytes:
        if usage is None:
            return self._before + _json_encode(text) + self._after_open
        return self._before + _json_encode(text) + self._after_open[:-3] + b',"usage":' + _json_encode(usage) + b"}\n\n"

    def final_token_chunk(
        self,
        text: str,
        finish_reason: str,
        kv_transfer_params: dict[str, Any] | None,
        usage: dict[str, int] | None = None,
    ) -> bytes:
        if self.chat:
            choice: dict[str, Any] = {
                "index": 0,
                "delta": {"content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
                "stop_reason": None,
            }
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason, "stop_reason": None}
        chunk: dict[str, Any] = {**self._head, "choices": [choice]}
        if usage is not None:
            chunk["usage"] = usage
        if kv_transfer_params is not None:
            chunk["kv_transfer_params"] = kv_transfer_params
        return b"data: " + _json_encode(chunk) + b"\n\n"

    def usage_chunk(self, usage_body: dict[str, Any]) -> bytes:
        return b"data: " + _json_encode({**self._head, "choices": [], "usage": usage_body}) + b"\n\n"

    @staticmethod
    def done() -> bytes:
        return b"data: [DONE]\n\n"


def encode_json(value: Any) -> bytes:
    return bytes(_json_encode(value))
