"""Bad requests and aborted requests answered as vLLM answers them (each case cites the vLLM source it follows)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import grpc

from llmepp.protocols import vllm_engine_pb2 as pb
from llmepp.protocols import vllm_engine_pb2_grpc as pb_grpc

from .simkit import pod, running, words


async def post(http: aiohttp.ClientSession, url: str, body: dict[str, Any], **headers: str) -> tuple[int, Any]:
    async with http.post(url, json=body, headers=headers) as resp:
        return resp.status, await resp.json(content_type=None)


# ---------------------------------------------------------------------------- /v1/messages error shapes
async def test_messages_handler_errors_are_anthropic_shaped_validation_errors_openai_shaped(
    http: aiohttp.ClientSession,
) -> None:
    # vllm/entrypoints/anthropic/api_router.py: an ErrorResponse of the handler goes through
    # translate_error_response -> {"type": "error", "error": {"type": <OpenAI type>, "message": ...}};
    # the request model's validation (FastAPI's RequestValidationError) is answered by the app-wide
    # handler (vllm/entrypoints/serve/utils/server_utils.py) in the OpenAI shape.
    async with running([pod(max_model_len=64)]) as cluster:
        url = cluster.urls[0] + "/v1/messages"
        status, err = await post(http, url, {"model": "nope", "messages": [{"role": "user", "content": "x"}],
                                             "max_tokens": 2})  # fmt: skip
        assert status == 404, err
        assert err["type"] == "error" and set(err["error"]) == {"type", "message"}, err
        assert err["error"]["type"] == "NotFoundError" and "nope" in err["error"]["message"]
        status, err = await post(http, url, {"model": "sim-model", "messages": [{"role": "user", "content": words(40)}],
                                             "max_tokens": 50})  # fmt: skip
        assert status == 400 and err["type"] == "error" and err["error"]["type"] == "BadRequestError", err
        assert "maximum context length" in err["error"]["message"]
        # Request-model validation: the OpenAI shape, as on every route.
        status, err = await post(http, url, {"model": "sim-model", "messages": [{"role": "user", "content": "x"}]})
        assert status == 400 and err["error"]["code"] == 400 and "type" not in err, err


# ---------------------------------------------------------------------------- chat content parts
async def test_content_parts_that_are_not_objects_or_whose_text_is_not_a_string_are_400(
    http: aiohttp.ClientSession,
) -> None:
    # vllm/entrypoints/chat_utils.py: ChatCompletionContentPartParam admits objects and strings only (an int
    # matches no member); a text part's text is joined as a string ("\n".join raises TypeError, a 400).
    async with running([pod()]) as cluster:
        base = cluster.urls[0]
        for content in ([1, 2], [None], [["x"]], [{"type": "text", "text": 5}], [{"type": "text", "text": ["a"]}],
                        [{"type": "text", "text": True}]):  # fmt: skip
            messages: list[dict[str, object]] = [{"role": "user", "content": content}]
            for path in ("/v1/chat/completions", "/tokenize", "/v1/chat/completions/render"):
                status, err = await post(http, base + path, {"model": "sim-model", "messages": messages})
                assert status == 400, (path, content, err)
                assert err["error"]["param"] == "messages", err
        # What vLLM serves stays served: typed text parts, a text part without text (skipped), other parts.
        parts = [{"type": "text", "text": "a"}, {"type": "text"}, {"type": "text", "text": None},
                 {"type": "image_url", "image_url": {"url": "http://x/i.png"}}]  # fmt: skip
        messages = [{"role": "user", "content": parts}]
        status, answer = await post(http, base + "/tokenize", {"model": "sim-model", "messages": messages})
        assert status == 200, answer


async def test_content_parts_of_an_unknown_type_are_400_naming_the_type_and_the_part(
    http: aiohttp.ClientSession,
) -> None:
    # vllm/entrypoints/chat_utils.py, _parse_chat_message_content_part: a type outside MM_PARSER_MAP is
    # VLLMValidationError("Unsupported chat content part type: ...", parameter="type"), answered by
    # create_error_response as a 400 BadRequestError whose param is "type". _parse_chat_message_content_mm_part:
    # no type (or a uuid) and none of the direct fields -> "Missing 'type' field"; a type that is not a
    # string -> "Invalid 'type' field" (ValueErrors: 400s).
    async with running([pod()]) as cluster:
        base = cluster.urls[0]
        for bad in ("file", "input_file", "image", "tool_use", "", "TEXT"):
            parts = [{"type": "text", "text": "a"}, {"type": bad, "x": 1}]
            messages = [{"role": "system", "content": "s"}, {"role": "user", "content": parts}]
            for path in ("/v1/chat/completions", "/tokenize", "/v1/chat/completions/render"):
                status, err = await post(http, base + path, {"model": "sim-model", "messages": messages})
                assert status == 400, (path, bad, err)
                assert set(err) == {"error"} and set(err["error"]) == {"message", "type", "param", "code"}, err
                assert err["error"]["type"] == "BadRequestError" and err["error"]["code"] == 400, err
                assert err["error"]["param"] == "type", err
                message = err["error"]["message"]
                assert f"Unsupported chat content part type: {bad!r}" in message, message
                assert "messages[1].content[1]" in message and "image_url" in message, message
        for part, reason in (({"text": "a"}, "Missing 'type'"), ({"type": None}, "Missing 'type'"),
                             ({"type": "nope", "uuid": "u"}, "Missing 'type'"), ({"type": 5}, "Invalid 'type'"),
                             ({"type": ["text"], "text": "a"}, "Invalid 'type'")):  # fmt: skip
            messages = [{"role": "user", "content": ["a", part]}]
            status, err = await post(http, base + "/tokenize", {"model": "sim-model", "messages": messages})
            assert status == 400 and err["error"]["type"] == "BadRequestError", (part, err)
            assert reason in err["error"]["message"] and "messages[0].content[1]" in err["error"]["message"], err
        # Every part vLLM parses stays served (the simulator renders `text` parts only), and so does an untyped
        # part (or one with a uuid) with a direct media field.
        parts = [{"type": "input_text", "text": "a"}, {"type": "output_text", "text": "b"},
                 {"type": "refusal", "refusal": "no"}, {"type": "thinking", "thinking": "hm"},
                 {"type": "image_url", "image_url": {"url": "http://x/i.png"}},
                 {"type": "input_image", "image_url": "http://x/i.png", "detail": "auto"},
                 {"type": "audio_url", "audio_url": {"url": "http://x/a.mp3"}},
                 {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
                 {"type": "video_url", "video_url": {"url": "http://x/v.mp4"}}, {"type": "tool_reference", "name": "t"},
                 {"image_url": "http://x/y.png"}, {"type": None, "video_url": "v"},
                 {"type": "nope", "uuid": "u", "image_url": "i"}]  # fmt: skip
        messages = [{"role": "user", "content": [{"type": "text", "text": "hi"}, *parts]}]
        status, answer = await post(http, base + "/tokenize", {"model": "sim-model", "messages": messages})
        assert status == 200, answer


async def test_media_parts_missing_their_required_fields_are_400_as_vllms_typeadapter_says(
    http: aiohttp.ClientSession,
) -> None:
    # vllm/entrypoints/chat_utils.py, MM_PARSER_MAP: "image_url" / "audio_url" / "video_url" / "input_image" parts
    # (typed, no uuid) go through TypeAdapter(<OpenAI TypedDict>).validate_python; a missing or mistyped required
    # field raises pydantic's ValidationError, a ValueError, which create_error_response answers as a 400
    # BadRequestError with param None.
    async with running([pod()]) as cluster:
        base = cluster.urls[0]
        cases = [
            ({"type": "image_url"}, "ChatCompletionContentPartImageParam", "image_url", "Field required"),
            ({"type": "image_url", "image_url": {}}, "ChatCompletionContentPartImageParam", "image_url.url",
             "Field required"),
            ({"type": "image_url", "image_url": None}, "ChatCompletionContentPartImageParam", "image_url",
             "Input should be a valid dictionary"),
            ({"type": "image_url", "image_url": "http://x/i.png"}, "ChatCompletionContentPartImageParam",
             "image_url", "Input should be a valid dictionary"),
            ({"type": "image_url", "image_url": {"url": 5}}, "ChatCompletionContentPartImageParam", "image_url.url",
             "Input should be a valid string"),
            ({"type": "image_url", "image_url": {"url": "u", "detail": "max"}}, "ChatCompletionContentPartImageParam",
             "image_url.detail", "Input should be 'auto', 'low' or 'high'"),
            ({"type": "audio_url"}, "ChatCompletionContentPartAudioParam", "audio_url", "Field required"),
            ({"type": "audio_url", "audio_url": {}}, "ChatCompletionContentPartAudioParam", "audio_url.url",
             "Field required"),
            ({"type": "video_url", "video_url": {}}, "ChatCompletionContentPartVideoParam", "video_url.url",
             "Field required"),
            ({"type": "input_image"}, "ResponseInputImageParam", "detail", "Field required"),
            ({"type": "input_image", "image_url": "http://x/i.png"}, "ResponseInputImageParam", "detail",
             "Field required"),
            ({"type": "input_image", "detail": "auto", "image_url": 3}, "ResponseInputImageParam", "image_url",
             "Input should be a valid string"),
        ]  # fmt: skip
        for part, model, loc, reason in cases:
            messages = [{"role": "user", "content": [{"type": "text", "text": "a"}, part]}]
            for path in ("/v1/chat/completions", "/tokenize", "/v1/chat/completions/render"):
                status, err = await post(http, base + path, {"model": "sim-model", "messages": messages})
                assert status == 400, (path, part, err)
                assert err["error"]["type"] == "BadRequestError" and err["error"]["param"] is None, (part, err)
                message = err["error"]["message"]
                assert message.startswith(f"1 validation error for {model}\n{loc}\n  {reason} ["), (part, message)
                assert "messages[0].content[1]" in message, message
        # _parse_chat_message_content_part: a prompt_embeds part (typed, or resolved from its field) whose `data`
        # is empty is a ValueError before --enable-prompt-embeds is even looked at.
        for part in ({"type": "prompt_embeds"}, {"type": "prompt_embeds", "data": ""}, {"prompt_embeds": "x"},
                     {"type": "prompt_embeds", "uuid": "u", "prompt_embeds": None, "data": None}):  # fmt: skip
            messages = [{"role": "user", "content": ["a", part]}]
            status, err = await post(http, base + "/tokenize", {"model": "sim-model", "messages": messages})
            assert status == 400 and err["error"]["param"] is None, (part, err)
            assert "prompt_embeds content part requires a non-empty `data` field" in err["error"]["message"], err


async def test_text_like_parts_without_their_text_are_skipped_and_non_string_ones_are_400(
    http: aiohttp.ClientSession,
) -> None:
    # vllm/entrypoints/chat_utils.py, _parse_chat_message_content_part: text/input_text/output_text/refusal/thinking
    # read their field with .get (no validation); None content of "text"/"refusal" is skipped
    # (PART_TYPES_TO_SKIP_NONE_CONTENT) and any falsy content is dropped by `if parse_res:` in
    # _parse_chat_message_content_parts; a truthy non-string reaches "\n".join (TypeError, a 400). A media part
    # with a uuid is not validated (the untyped path), so an empty one is served too.
    async with running([pod()]) as cluster:
        base = cluster.urls[0]
        plain = [{"role": "user", "content": [{"type": "text", "text": "a"}]}]
        status, expected = await post(http, base + "/tokenize", {"model": "sim-model", "messages": plain})
        assert status == 200, expected
        skipped = [{"type": "text"}, {"type": "text", "text": None}, {"type": "text", "text": ""},
                   {"type": "text", "text": 0}, {"type": "input_text"}, {"type": "output_text", "text": None},
                   {"type": "thinking"}, {"type": "refusal"}, {"type": "refusal", "refusal": None},
                   {"type": "tool_reference"}, {"type": "image_url", "uuid": "u", "image_url": {}}]  # fmt: skip
        messages = [{"role": "user", "content": [{"type": "text", "text": "a"}, *skipped]}]
        status, answer = await post(http, base + "/tokenize", {"model": "sim-model", "messages": messages})
        assert status == 200, answer
        assert answer["tokens"] == expected["tokens"], "skipped parts must not reach the rendered prompt"
        for part in ({"type": "input_text", "text": 5}, {"type": "output_text", "text": ["a"]},
                     {"type": "thinking", "thinking": {"x": 1}}, {"type": "refusal", "refusal": True}):  # fmt: skip
            messages = [{"role": "user", "content": [part]}]
            status, err = await post(http, base + "/tokenize", {"model": "sim-model", "messages": messages})
            assert status == 400 and err["error"]["param"] == "messages", (part, err)


# ---------------------------------------------------------------------------- stream_options
async def test_empty_stream_options_without_stream_are_accepted(http: aiohttp.ClientSession) -> None:
    # vllm/entrypoints/openai/protocol.py, validate_stream_options (mode="before"):
    #     if data.get("stream_options") and not data.get("stream"): raise ...
    async with running([pod()]) as cluster:
        base = cluster.urls[0]
        status, answer = await post(http, base + "/v1/completions", {"prompt": "x", "max_tokens": 1,
                                                                     "stream_options": {}})  # fmt: skip
        assert status == 200 and answer["choices"][0]["text"], answer
        chat = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1, "stream": False, "stream_options": {}}
        status, answer = await post(http, base + "/v1/chat/completions", chat)
        assert status == 200 and "usage" in answer, answer
        # A non-empty object still needs stream (a raw falsy one: false, 0, missing).
        for stream in (False, 0, None):
            body = {"prompt": "x", "max_tokens": 1, "stream": stream, "stream_options": {"include_usage": False}}
            status, err = await post(http, base + "/v1/completions", body)
            assert status == 400 and err["error"]["param"] == "stream_options", (stream, err)


# ---------------------------------------------------------------------------- out-of-band Abort
async def _abort_when_running(cluster: Any, request_id: str) -> None:
    engine = cluster.pods[0].engine
    for _ in range(200):
        if any(r.request_id == request_id and r.output_ids for r in engine.running):
            break
        await asyncio.sleep(0.01)
    async with grpc.aio.insecure_channel(cluster.pods[0].grpc_address) as channel:
        await pb_grpc.VllmEngineStub(channel).Abort(pb.AbortRequest(request_ids=[request_id]))


async def test_a_request_aborted_through_abort_finishes_with_finish_reason_abort(http: aiohttp.ClientSession) -> None:
    # vllm/v1/engine/output_processor.py, abort_requests: an aborted request's stream gets a final output with
    # FinishReason.ABORT; the serving layer only raises for finish_reason "error" (_raise_if_error), so the
    # answer is a 200 whose choice says "abort" (a stream: that chunk, the usage, then [DONE]).
    async with running([pod(grpc_port=0, inter_token_latency=100.0)]) as cluster:
        base = cluster.urls[0]
        chat = {"model": "sim-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 500}
        task = asyncio.ensure_future(post(http, base + "/v1/chat/completions", chat, **{"X-Request-Id": "job-1"}))
        await _abort_when_running(cluster, "chatcmpl-job-1")
        status, answer = await asyncio.wait_for(task, 10)
        assert status == 200, answer
        assert answer["choices"][0]["finish_reason"] == "abort" and 0 < answer["usage"]["completion_tokens"] < 500

        streamed = {**chat, "stream": True, "stream_options": {"include_usage": True}}

        async def stream() -> list[str]:
            async with http.post(base + "/v1/chat/completions", json=streamed, headers={"X-Request-Id": "job-2"}) as r:
                assert r.status == 200
                return [ln.decode().strip() for ln in (await r.read()).splitlines() if ln.strip()]

        task2 = asyncio.ensure_future(stream())
        await _abort_when_running(cluster, "chatcmpl-job-2")
        lines = await asyncio.wait_for(task2, 10)
        assert lines[-1] == "data: [DONE]", lines[-3:]
        chunks = [json.loads(ln[len("data: ") :]) for ln in lines[:-1]]
        assert chunks[-2]["choices"][0]["finish_reason"] == "abort" and chunks[-1]["usage"]["completion_tokens"] > 0

        messages = {"model": "sim-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 500}
        task3 = asyncio.ensure_future(post(http, base + "/v1/messages", messages, **{"X-Request-Id": "job-3"}))
        await _abort_when_running(cluster, "chatcmpl-job-3")
        status, answer = await asyncio.wait_for(task3, 10)
        # vllm/entrypoints/anthropic/serving.py maps stop/length/tool_calls only: "abort" has no stop_reason.
        assert status == 200 and answer["stop_reason"] is None, answer
