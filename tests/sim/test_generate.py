"""The simulator's vLLM tokens-in / tokens-out API: the same engine and prefix cache, token ids both ways."""

from __future__ import annotations

import json
from typing import Any

import aiohttp

from .simkit import pod, running

PROMPT = list(range(100, 400))


async def generate(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with http.post(url + "/inference/v1/generate", json={"model": "sim-model", **body}) as resp:
        if body.get("stream") and resp.status == 200:
            return resp.status, (await resp.read()).decode()
        return resp.status, await resp.json(content_type=None)


async def test_token_ids_in_token_ids_out_with_usage_and_cache_hits(http: aiohttp.ClientSession) -> None:
    async with running([pod()]) as cluster:
        url = cluster.urls[0]
        status, first = await generate(http, url, {"token_ids": PROMPT, "sampling_params": {"max_tokens": 5}})
        assert status == 200, first
        [choice] = first["choices"]
        assert len(choice["token_ids"]) == 5 and all(isinstance(t, int) for t in choice["token_ids"])
        assert choice["finish_reason"] == "length"
        assert first["usage"]["prompt_tokens"] == len(PROMPT) and first["usage"]["completion_tokens"] == 5
        _, again = await generate(http, url, {"token_ids": [*PROMPT, 7], "sampling_params": {"max_tokens": 2}})
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] >= 256


async def test_a_stream_sends_the_new_ids_then_usage_then_done(http: aiohttp.ClientSession) -> None:
    async with running([pod()]) as cluster:
        body = {"token_ids": PROMPT, "sampling_params": {"max_tokens": 4}, "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
        status, text = await generate(http, cluster.urls[0], body)
        assert status == 200
        data = [ln[len("data: ") :] for ln in text.splitlines() if ln.startswith("data: ")]
        assert data[-1] == "[DONE]"
        events = [json.loads(d) for d in data[:-1]]
        ids = [t for e in events[:-1] for t in e["choices"][0]["token_ids"]]
        assert len(ids) == 4 and events[-2]["choices"][0]["finish_reason"] == "length"
        assert events[-1]["usage"]["completion_tokens"] == 4


async def test_bad_generate_bodies_are_400(http: aiohttp.ClientSession) -> None:
    async with running([pod()]) as cluster:
        bad: tuple[dict[str, Any], ...] = (
            {"sampling_params": {"max_tokens": 1}},
            {"token_ids": []},
            {"token_ids": [1], "sampling_params": 3},
            # vLLM's token_ids is list[int]: not text, not a batch of one, not booleans.
            {"token_ids": ["hello world"]},
            {"token_ids": [[1, 2, 3]]},
            {"token_ids": [True, 2]},
        )
        for body in bad:
            status, answer = await generate(http, cluster.urls[0], body)
            assert status == 400 and answer["error"]["message"], (body, answer)
