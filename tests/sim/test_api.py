"""The OpenAI-compatible surface: bodies, SSE framing, validation errors, headers, chunked uploads."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from llmepp_sim.config import PodConfig
from llmepp_sim.tokenizer import shared_tokenizer

from .simkit import complete, pod, running, words


def assert_vllm_error(body: dict[str, object], status: int, err_type: str) -> None:
    error = body["error"]
    assert isinstance(error, dict)
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status
    assert error["type"] == err_type
    assert isinstance(error["message"], str) and error["message"]


@pytest.mark.parametrize(("path", "prefix"), [("/v1/completions", "cmpl-"), ("/v1/chat/completions", "chatcmpl-")])
async def test_x_request_id_names_the_response_with_the_api_prefix(
    http: aiohttp.ClientSession, path: str, prefix: str
) -> None:
    # vLLM's serving_completion / serving_chat: request_id = f"cmpl-{base}" / f"chatcmpl-{base}", where base is
    # the X-Request-Id header when the client sent one.
    async with running([pod()]) as cluster:
        body: dict[str, Any] = {"model": "sim-model", "max_tokens": 2}
        body.update({"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "hi"})
        async with http.post(cluster.urls[0] + path, json=body, headers={"X-Request-Id": "job-1"}) as resp:
            answer = await resp.json()
        assert answer["id"] == prefix + "job-1"


async def test_completion_body_usage_and_identity_headers(http: aiohttp.ClientSession) -> None:
    async with running([pod(name="alpha")]) as cluster:
        url, port = cluster.urls[0], cluster.pods[0].port
        result = await complete(http, url, "The model serves requests", 5)
        assert result.status == 200
        assert result.headers["x-inference-pod"] == "alpha"
        assert result.headers["x-inference-port"] == str(port)
        body = result.body
        assert body["object"] == "text_completion"
        assert body["id"].startswith("cmpl-")
        assert body["choices"][0]["finish_reason"] == "length"
        prompt_tokens = len(shared_tokenizer().encode("The model serves requests"))
        assert body["usage"] == {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": 5,
            "total_tokens": prompt_tokens + 5,
            "prompt_tokens_details": {"cached_tokens": 0},
        }
        # The text is exactly the 5 generated tokens.
        assert len(shared_tokenizer().encode(body["choices"][0]["text"])) == 5
        # Identity headers ride on every response, errors and unknown routes included.
        async with http.get(url + "/nope") as response:
            assert response.status == 404
            assert response.headers["x-inference-pod"] == "alpha"
        async with http.get(url + "/health") as response:
            assert response.status == 200
            assert response.headers["x-inference-pod"] == "alpha"


async def test_max_tokens_variants_and_deterministic_text(http: aiohttp.ClientSession) -> None:
    async with running([pod(), pod(host="127.0.0.3", seed=0), pod(host="127.0.0.4", seed=7)]) as cluster:
        a, b, c = cluster.urls
        default = await complete(http, a, "hello", None)
        assert default.body["usage"]["completion_tokens"] == 16
        eos = await complete(http, a, "hello", 9, ignore_eos=True)
        assert eos.body["usage"]["completion_tokens"] == 9
        chat = await complete(http, a, [{"role": "user", "content": "hi"}], None, chat=True, max_completion_tokens=3)
        assert chat.body["usage"]["completion_tokens"] == 3
        assert chat.body["object"] == "chat.completion"
        assert chat.body["choices"][0]["message"]["role"] == "assistant"
        # Same seed and prompt: same text on another pod; another seed: other text.
        same = await complete(http, b, "hello", 9)
        other = await complete(http, c, "hello", 9)
        assert same.body["choices"][0]["text"] == eos.body["choices"][0]["text"]
        assert other.body["choices"][0]["text"] != eos.body["choices"][0]["text"]


async def test_scalars_are_read_as_vllms_pydantic_models_read_them(http: aiohttp.ClientSession) -> None:
    # vLLM validates in lax mode: "stream": "true" streams, "max_tokens": 3.0 / "3" is 3; "maybe" is a 400.
    async with running([pod()]) as cluster:
        url = cluster.urls[0] + "/v1/completions"
        for max_tokens in (3.0, "3", " 3 "):
            async with http.post(url, json={"prompt": "hi", "max_tokens": max_tokens}) as response:
                assert response.status == 200, await response.text()
                assert (await response.json())["usage"]["completion_tokens"] == 3
        async with http.post(url, json={"prompt": "hi", "max_tokens": 2, "stream": "true"}) as response:
            assert response.status == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            assert (await response.text()).rstrip().endswith("data: [DONE]")
        for bad in ({"stream": "maybe"}, {"max_tokens": 2.5}):
            async with http.post(url, json={"prompt": "hi", **bad}) as response:
                assert response.status == 400
                assert (await response.json())["error"]["param"] == next(iter(bad))


async def test_default_max_tokens_is_capped_by_remaining_context(http: aiohttp.ClientSession) -> None:
    async with running([pod(max_model_len=64)]) as cluster:
        prompt = [5] * 60
        result = await complete(http, cluster.urls[0], prompt, None)
        assert result.status == 200
        assert result.body["usage"]["prompt_tokens"] == 60
        assert result.body["usage"]["completion_tokens"] == 4


async def test_streaming_completion_sse_framing(http: aiohttp.ClientSession) -> None:
    async with running([pod()]) as cluster:
        result = await complete(http, cluster.urls[0], "stream me", 4, stream=True)
        assert result.status == 200
        assert result.headers["Content-Type"].startswith("text/event-stream")
        lines = result.lines
        events = [line for line in lines if line]
        assert all(line.startswith("data: ") for line in events)
        assert lines.count("") == len(events)  # every event is followed by a blank line
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(line[6:]) for line in events[:-1]]
        token_chunks, usage_chunk = chunks[:-1], chunks[-1]
        assert len(token_chunks) == 4
        assert [c["choices"][0]["finish_reason"] for c in token_chunks] == [None, None, None, "length"]
        assert all(c["object"] == "text_completion" for c in chunks)
        assert len({c["id"] for c in chunks}) == 1
        assert usage_chunk["choices"] == []
        assert usage_chunk["usage"]["completion_tokens"] == 4
        assert usage_chunk["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
        text = "".join(c["choices"][0]["text"] for c in token_chunks)
        unary = await complete(http, cluster.urls[0], "stream me", 4)
        assert text == unary.body["choices"][0]["text"]


async def test_streaming_chat_role_chunk_and_no_usage_without_include_usage(http: aiohttp.ClientSession) -> None:
    async with running([pod()]) as cluster:
        messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
        result = await complete(http, cluster.urls[0], messages, 3, stream=True, chat=True, stream_options=None)
        events = [line for line in result.lines if line]
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(line[6:]) for line in events[:-1]]
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        assert len(chunks) == 1 + 3  # role chunk + one per token, no usage chunk
        assert all("usage" not in c for c in chunks)
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_a_chat_streams_its_role_chunk_with_the_first_token_after_the_prefill(
    http: aiohttp.ClientSession,
) -> None:
    """vLLM sends the role chunk on the engine's first output, so a gateway timing a chat stream's first body
    byte (the EPP's TTFT, the latency predictor's training) measures the prefill. Before: the role chunk went
    out at once, and every streamed chat read TTFT ~ 0."""
    # 2 s simulated prefill overhead at 10x: >= 200 ms wall before the first token.
    async with running([pod(prefill_overhead=2000.0)], time_scale=10) as cluster:
        body = {"model": "sim-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True}
        loop = asyncio.get_running_loop()
        start = loop.time()
        async with http.post(cluster.urls[0] + "/v1/chat/completions", json=body) as response:
            assert response.status == 200
            first = await response.content.readline()
            first_byte = loop.time() - start
            rest = await response.read()
        assert b'"role":"assistant"' in first and rest.endswith(b"data: [DONE]\n\n")
        assert first_byte >= 0.19


@pytest.mark.parametrize("chat", [False, True])
async def test_continuous_usage_stats_put_the_usage_so_far_in_every_chunk(
    http: aiohttp.ClientSession, chat: bool
) -> None:
    """vLLM: with include_usage and continuous_usage_stats every chunk carries the usage so far (a chat's role
    chunk 0 completion tokens), then the final usage chunk; without include_usage it adds nothing."""
    async with running([pod()]) as cluster:
        prompt: Any = [{"role": "user", "content": "hello"}] if chat else "hello there"
        options = {"include_usage": True, "continuous_usage_stats": True}
        result = await complete(http, cluster.urls[0], prompt, 3, stream=True, chat=chat, stream_options=options)
        chunks = [json.loads(line[6:]) for line in result.lines if line and line != "data: [DONE]"]
        prompt_tokens = chunks[-1]["usage"]["prompt_tokens"]
        running_counts = [c["usage"]["completion_tokens"] for c in chunks[:-1]]
        assert running_counts == ([0] if chat else []) + [1, 2, 3]
        assert all(c["usage"]["total_tokens"] == prompt_tokens + c["usage"]["completion_tokens"] for c in chunks)
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
        options = {"include_usage": False, "continuous_usage_stats": True}
        alone = await complete(http, cluster.urls[0], prompt, 3, stream=True, chat=chat, stream_options=options)
        lines = [line for line in alone.lines if line and line != "data: [DONE]"]
        assert len(lines) == len(chunks) - 1 and all("usage" not in json.loads(line[6:]) for line in lines)


async def test_chunked_request_body_is_accepted(http: aiohttp.ClientSession) -> None:
    async with running([pod()]) as cluster:
        payload = json.dumps({"model": "sim-model", "prompt": words(50), "max_tokens": 2}).encode()

        async def body() -> AsyncIterator[bytes]:
            for i in range(0, len(payload), 37):
                yield payload[i : i + 37]

        async with http.post(cluster.urls[0] + "/v1/completions", data=body()) as response:
            assert response.request_info.headers.get("Transfer-Encoding") == "chunked"
            assert response.status == 200
            assert (await response.json())["usage"]["completion_tokens"] == 2


async def test_malformed_requests_get_vllm_style_400(http: aiohttp.ClientSession) -> None:
    async with running([pod(max_model_len=64)]) as cluster:
        url = cluster.urls[0] + "/v1/completions"
        chat_url = cluster.urls[0] + "/v1/chat/completions"
        cases = [
            (url, b"{not json", None),
            (url, b"[1, 2]", None),
            (url, json.dumps({"model": "sim-model"}).encode(), "prompt"),
            (url, json.dumps({"prompt": "x", "max_tokens": 0}).encode(), "max_tokens"),
            (url, json.dumps({"prompt": "x", "max_tokens": "ten"}).encode(), "max_tokens"),
            (url, json.dumps({"prompt": "x", "n": 2}).encode(), "n"),
            (url, json.dumps({"prompt": "x", "stream_options": {"include_usage": True}}).encode(), "stream_options"),
            (url, json.dumps({"prompt": ["a", "b"]}).encode(), "prompt"),
            (url, json.dumps({"prompt": [1, 999999]}).encode(), "prompt"),
            (chat_url, json.dumps({"messages": []}).encode(), "messages"),
            (
                chat_url,
                json.dumps({"messages": [{"role": "user"}], "max_completion_tokens": 0}).encode(),
                "max_completion_tokens",
            ),
            (chat_url, json.dumps({"messages": [{"content": "no role"}]}).encode(), "messages"),
            (url, json.dumps({"prompt": [3] * 70}).encode(), "input_tokens"),  # longer than max_model_len
            (url, json.dumps({"prompt": [3] * 50, "max_tokens": 20}).encode(), "input_tokens"),
        ]
        for target, raw, param in cases:
            async with http.post(target, data=raw, headers={"Content-Type": "application/json"}) as response:
                body = await response.json()
                assert response.status == 400, (raw, body)
                assert_vllm_error(body, 400, "BadRequestError")
                assert body["error"]["param"] == param, (raw, body)
        # Unknown model: 404 like vLLM.
        async with http.post(url, json={"model": "gpt-nope", "prompt": "x"}) as response:
            assert response.status == 404
            body = await response.json()
            assert_vllm_error(body, 404, "NotFoundError")
            assert "gpt-nope" in body["error"]["message"]


async def test_models_tokenize_and_served_names(http: aiohttp.ClientSession) -> None:
    async with running([pod(model="org/base", served_model_name=["base", "alias"], max_model_len=512)]) as cluster:
        url = cluster.urls[0]
        async with http.get(url + "/v1/models") as response:
            models = await response.json()
        assert models["object"] == "list"
        assert [m["id"] for m in models["data"]] == ["base", "alias"]
        assert all(m["max_model_len"] == 512 and m["root"] == "org/base" for m in models["data"])
        result = await complete(http, url, "x", 1, model="alias")
        assert result.status == 200 and result.body["model"] == "alias"
        assert (await complete(http, url, "x", 1, model="org/base")).status == 404  # not a served name
        result = await complete(http, url, "x", 1, model="")  # vLLM: an empty name is the first served name
        assert result.status == 200 and result.body["model"] == "base"
        image = {"type": "image_url", "image_url": {"url": "http://x/i.png"}}  # not rendered
        messages = [{"role": "user", "content": [{"type": "text", "text": "hi"}, image]}]
        async with http.post(url + "/tokenize", json={"messages": messages}) as response:
            tokens = await response.json()
        expected = shared_tokenizer().encode("<|user|>\nhi\n<|assistant|>\n")
        assert tokens == {"count": len(expected), "max_model_len": 512, "tokens": expected}
        async with http.post(url + "/tokenize", json={"prompt": "hello world"}) as response:
            assert (await response.json())["tokens"] == shared_tokenizer().encode("hello world")


async def test_token_id_prompt_is_used_verbatim_and_cached(http: aiohttp.ClientSession) -> None:
    async with running([pod()]) as cluster:
        ids = list(range(100, 164))
        first = await complete(http, cluster.urls[0], ids, 1)
        second = await complete(http, cluster.urls[0], [ids], 1)  # a batch of one
        assert first.body["usage"]["prompt_tokens"] == 64
        assert second.cached_tokens == 48  # 3 of 4 full blocks: the last token is always recomputed


async def test_long_prompts_are_tokenized_off_the_loop_identically(http: aiohttp.ClientSession) -> None:
    async with running([pod(max_model_len=4096)]) as cluster:
        url = cluster.urls[0]
        text = words(1500, salt="long ")
        assert len(text) > 4096  # above the worker-thread threshold
        async with http.post(url + "/tokenize", json={"prompt": text}) as response:
            assert (await response.json())["tokens"] == shared_tokenizer().encode(text)
        result = await complete(http, url, text, 2)
        assert result.body["usage"]["prompt_tokens"] == len(shared_tokenizer().encode(text))


CHATML = Path(__file__).parent.parent / "tokenization" / "templates" / "chatml" / "tokenizer_config.json"


async def test_a_pod_with_a_jinja_chat_template_renders_chats_with_it(http: aiohttp.ClientSession) -> None:
    async with running([pod(chat_template=str(CHATML))]) as cluster:
        url = cluster.urls[0]
        body = {"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"enable_thinking": False}}
        async with http.post(url + "/tokenize", json=body) as response:
            tokens = (await response.json())["tokens"]
        expected = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                    "<|im_start|>assistant\n<think>\n\n</think>\n\n")  # fmt: skip
        assert tokens == shared_tokenizer().encode(expected)
        # The template's raise_exception is the client's error (400), as in vLLM.
        bad = [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]
        async with http.post(url + "/v1/chat/completions", json={"messages": bad, "max_tokens": 1}) as response:
            assert response.status == 400
            assert "system message must come first" in (await response.json())["error"]["message"]


def test_an_unreadable_chat_template_is_a_config_error(tmp_path: Path) -> None:
    broken = tmp_path / "t.jinja"
    broken.write_text("{% if %}")
    for path, error in ((tmp_path / "missing.jinja", "missing.jinja"), (broken, "line 1")):
        with pytest.raises(ValueError, match=error):
            PodConfig(chat_template=str(path)).validate()
