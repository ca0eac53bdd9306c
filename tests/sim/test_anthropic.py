"""The simulator's Anthropic Messages API: the same engine and prefix cache, Anthropic's shapes."""

from __future__ import annotations

import json
from typing import Any

import aiohttp

from .simkit import pod, running, words

SYSTEM = "You answer in one line. " + words(200)


async def messages(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with http.post(url + "/v1/messages", json={"model": "sim-model", **body}) as resp:
        if body.get("stream") and resp.status == 200:
            return resp.status, (await resp.read()).decode()
        return resp.status, await resp.json(content_type=None)


async def test_messages_answer_with_usage_and_hit_the_prefix_cache_on_repeat(http: aiohttp.ClientSession) -> None:
    async with running([pod()]) as cluster:
        url = cluster.urls[0]
        body = {"system": SYSTEM, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
        status, first = await messages(http, url, {**body, "max_tokens": 3})
        assert status == 200, first
        assert (first["type"], first["role"], first["stop_reason"]) == ("message", "assistant", "max_tokens")
        assert first["content"][0]["type"] == "text" and first["usage"]["output_tokens"] == 3
        assert first["usage"]["cache_read_input_tokens"] == 0 and first["usage"]["input_tokens"] > 200
        _, again = await messages(http, url, {**body, "max_tokens": 3})
        assert again["usage"]["cache_read_input_tokens"] >= 200


async def test_messages_stream_is_anthropic_events_with_split_usage(http: aiohttp.ClientSession) -> None:
    async with running([pod()]) as cluster:
        body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, "stream": True}
        status, text = await messages(http, cluster.urls[0], body)
        assert status == 200
        events = [ln[len("event: ") :] for ln in text.splitlines() if ln.startswith("event: ")]
        assert events == [
            "message_start",
            "content_block_start",
            *["content_block_delta"] * 4,
            "content_block_stop",
            "message_delta",
            "message_stop",
        ]
        data = [json.loads(ln[len("data: ") :]) for ln in text.splitlines() if ln.startswith("data: ")]
        assert data[0]["message"]["usage"]["input_tokens"] > 0
        assert data[-2]["usage"] == {"output_tokens": 4} and data[-2]["delta"]["stop_reason"] == "max_tokens"


async def test_messages_without_max_tokens_or_messages_are_400(http: aiohttp.ClientSession) -> None:
    async with running([pod()]) as cluster:
        url = cluster.urls[0]
        status, err = await messages(http, url, {"messages": [{"role": "user", "content": "x"}]})
        assert status == 400 and "max_tokens" in json.dumps(err)
        status, err = await messages(http, url, {"messages": [], "max_tokens": 2})
        assert status == 400 and "messages" in json.dumps(err)
