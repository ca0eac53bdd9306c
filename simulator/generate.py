"""vLLM's tokens-in / tokens-out API (`POST /inference/v1/generate`), on the same engine.

The body carries a rendered prompt: `token_ids` (required), `sampling_params.max_tokens`,
`model`, `stream` and `stream_options.include_usage`; `cache_salt`, `features` and
`kv_transfer_params` are accepted and not used. It is served as a completions request with a
token-id prompt. The answer: `{"request_id", "choices": [{"index": 0, "token_ids": [...],
"finish_reason"}], "usage"}`; a stream sends one event per batch of new token ids (the last one
with the finish reason), then the usage when asked, then `[DONE]`.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from llmepp_sim.errors import bad_request
from llmepp_sim.protocol import encode_json


def to_completions_body(body: dict[str, Any]) -> dict[str, Any]:
    """The equivalent completions body (validated as one by the caller)."""
    ids = body.get("token_ids")
    # vLLM's GenerateRequest.token_ids is list[int]: text or nested lists are a 400, not a prompt.
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise bad_request("`token_ids` is required and must be a non-empty list of token ids.", param="token_ids")
    params = body.get("sampling_params")
    if params is not None and not isinstance(params, dict):
        raise bad_request("`sampling_params` must be an object.", param="sampling_params")
    out: dict[str, Any] = {"model": body.get("model"), "prompt": ids}
    if params and params.get("max_tokens") is not None:
        out["max_tokens"] = params["max_tokens"]
    for key in ("stream", "stream_options", "kv_transfer_params"):
        if body.get(key) is not None:
            out[key] = body[key]
    return out


def new_request_id() -> str:
    return "gen-" + uuid.uuid4().hex


def full_response(request_id: str, token_ids: Sequence[int], finish_reason: str, usage: dict[str, Any]) -> bytes:
    choice = {"index": 0, "token_ids": list(token_ids), "finish_reason": finish_reason, "logprobs": None}
    return encode_json({"request_id": request_id, "choices": [choice], "usage": usage})


def stream_event(request_id: str, token_ids: Sequence[int], finish_reason: str | None) -> bytes:
    choice = {"index": 0, "token_ids": list(token_ids), "finish_reason": finish_reason}
    return b"data: " + encode_json({"request_id": request_id, "choices": [choice]}) + b"\n\n"


def usage_event(request_id: str, usage: dict[str, Any]) -> bytes:
    return b"data: " + encode_json({"request_id": request_id, "choices": [], "usage": usage}) + b"\n\n"


DONE = b"data: [DONE]\n\n"
