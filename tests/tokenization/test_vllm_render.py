"""The token producer's `vllm` backend against vLLM's render API (`POST /v1/chat/completions/render`,
`POST /v1/completions/render`), as the reference's token-producer calls it, and the simulator's copy of it.

The render endpoints take the request body as the inference endpoint would (every field that shapes the
prompt: `add_special_tokens`, `truncate_prompt_tokens`, `reasoning_effort`, `tool_choice`, a request's
`chat_template`, media) and answer vLLM's GenerateRequest (`token_ids`; completions: a list, one per prompt).
`/tokenize` sees only its own subset of fields. `vllm.path: /tokenize` keeps the tokenize API.
"""

from __future__ import annotations

import asyncio
import json
import struct
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from llmepp.framework.datakeys import TOKENIZED_PROMPT, TokenizedPrompt
from llmepp.framework.plugin import ConfigError, registry
from llmepp.plugins.producers.token import TokenProducer, VllmTokenProducer
from llmepp.request.parsers import parse_request
from llmepp.request.types import InferenceRequest
from llmepp_sim import PodConfig, SimCluster
from llmepp_sim.tokenizer import SimTokenizer, jinja_renderer

CHATML = Path(__file__).parent / "templates" / "chatml" / "tokenizer_config.json"
SIM = SimTokenizer()
CHAT_RENDER = "/v1/chat/completions/render"
COMPLETIONS_RENDER = "/v1/completions/render"


def parsed(path: str, body: dict[str, Any]) -> InferenceRequest:
    return parse_request({":path": path}, json.dumps(body).encode(), request_id="r")


def ids(tokens: TokenizedPrompt) -> list[int]:
    return list(struct.unpack(f"<{tokens.count}I", tokens.token_bytes))


async def produce(plugin: TokenProducer, req: InferenceRequest) -> TokenizedPrompt | None:
    out = plugin.produce(req, [])
    if asyncio.iscoroutine(out):
        await out
    tokens: TokenizedPrompt | None = req.data.get(TOKENIZED_PROMPT)
    return tokens


class FakeRenderServer:
    """vLLM's render routes (and /tokenize), answering `replies[path]`, recording (path, body)."""

    def __init__(self) -> None:
        self.replies: dict[str, Any] = {
            CHAT_RENDER: {"request_id": "x", "token_ids": [7, 8, 9], "features": None, "sampling_params": {}},
            COMPLETIONS_RENDER: [{"request_id": "x", "token_ids": [4, 5], "features": None, "sampling_params": {}}],
            "/tokenize": {"count": 1, "max_model_len": 8, "tokens": [3]},
        }
        self.delay = 0.0
        self.calls: list[tuple[str, Any]] = []
        self.in_flight = self.peak = 0  # calls being answered now, and the most at once
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.calls.append((request.path, await request.json()))
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        if self.delay:
            await asyncio.sleep(self.delay)
        self.in_flight -= 1
        return web.json_response(self.replies[request.path])

    async def __aenter__(self) -> FakeRenderServer:
        app = web.Application()
        for path in self.replies:
            app.router.add_post(path, self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


def vllm(url: str, **cfg: Any) -> VllmTokenProducer:
    plugin = registry.build("token-producer", "tok", {"modelName": "served", "vllm": {"url": url, **cfg}})
    assert isinstance(plugin, VllmTokenProducer)
    return plugin


# -- configuration -------------------------------------------------------------------------------------
def test_the_reference_vllm_parameters_load_unchanged() -> None:
    """The reference's token-producer `vllm` block: `url`, `timeout`, `mmTimeout`. Before: `mmTimeout`
    was an unknown field, so a reference config failed to load."""
    params = {
        "modelName": "Qwen/Qwen3-8B",
        "vllm": {"url": "http://localhost:8000", "timeout": "5s", "mmTimeout": "30s"},
    }
    plugin = registry.build("token-producer", "tokenizer", params)
    assert isinstance(plugin, VllmTokenProducer)
    with pytest.raises(ConfigError, match="mmTimeout"):
        registry.build("token-producer", "t", {"vllm": {"mmTimeout": "soon"}})


# -- the render API ------------------------------------------------------------------------------------
async def test_a_chat_is_rendered_from_its_body_as_sent() -> None:
    """Before: the backend sent /tokenize a subset of the body (messages, tools, documents,
    chat_template_kwargs, add_generation_prompt, continue_final_message), so fields vLLM's chat endpoint
    renders with (reasoning_effort, tool_choice: none, a request's chat_template, add_special_tokens,
    truncate_prompt_tokens) were lost and the ids could differ from the ones vLLM serves."""
    body = {
        "model": "alias",
        "messages": [{"role": "user", "content": "hello"}],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        "tool_choice": "none",
        "reasoning_effort": "low",
        "chat_template_kwargs": {"enable_thinking": False},
        "add_special_tokens": True,
        "truncate_prompt_tokens": 100,
        "max_tokens": 5,
        "stream": True,
    }
    async with FakeRenderServer() as server:
        plugin = vllm(server.url)
        try:
            tokens = await produce(plugin, parsed("/v1/chat/completions", body))
        finally:
            await plugin.aclose()
    assert tokens is not None and ids(tokens) == [7, 8, 9] and tokens.backend == "vllm"
    assert server.calls == [(CHAT_RENDER, {**body, "model": "served"})]


async def test_a_completion_is_rendered_from_its_body_as_sent() -> None:
    body = {"model": "m", "prompt": ["hello", " there"], "add_special_tokens": False, "max_tokens": 5}
    async with FakeRenderServer() as server:
        server.replies[COMPLETIONS_RENDER] = [{"token_ids": [1, 2]}, {"token_ids": [3]}]
        plugin = vllm(server.url)
        try:
            tokens = await produce(plugin, parsed("/v1/completions", body))
        finally:
            await plugin.aclose()
    # One GenerateRequest per prompt: the prompts' ids in order, and where each prompt ends (bytes).
    assert tokens is not None and ids(tokens) == [1, 2, 3] and tokens.ends == (8, 12)
    assert server.calls == [(COMPLETIONS_RENDER, {**body, "model": "served"})]


async def test_apis_without_a_chat_body_are_rendered_from_their_messages() -> None:
    async with FakeRenderServer() as server:
        plugin = vllm(server.url)
        try:
            requests = [
                parsed("/v1/responses", {"model": "m", "instructions": "be brief", "input": "hello there"}),
                parsed("/v1/messages", {"model": "m", "max_tokens": 5, "system": "be brief",
                                        "messages": [{"role": "user", "content": "hello there"}]}),
                parsed("/v1/embeddings", {"model": "m", "input": "hello there"}),
            ]  # fmt: skip
            for req in requests:
                assert await produce(plugin, req) is not None
        finally:
            await plugin.aclose()
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    assert server.calls == [
        (CHAT_RENDER, {"model": "served", "messages": messages}),
        (CHAT_RENDER, {"model": "served", "messages": messages}),
        (COMPLETIONS_RENDER, {"model": "served", "prompt": "hello there"}),
    ]


async def test_embeddings_of_chat_messages_are_rendered_as_vllm_embeds_them() -> None:
    """vLLM's EmbeddingChatRequest renders its messages without tools or documents and without a
    generation prompt unless asked for; sent as a bare chat, the render added one (chat's default)."""
    messages = [{"role": "user", "content": "hello there"}]
    body = {"model": "m", "messages": messages, "tools": [{"type": "function"}], "encoding_format": "float"}
    asked = {"model": "m", "messages": messages, "add_generation_prompt": True, "chat_template_kwargs": {"a": 1}}
    for path in ("", "/tokenize"):
        async with FakeRenderServer() as server:
            plugin = vllm(server.url, path=path) if path else vllm(server.url)
            try:
                assert await produce(plugin, parsed("/v1/embeddings", body)) is not None
                assert await produce(plugin, parsed("/v1/embeddings", asked)) is not None
            finally:
                await plugin.aclose()
        route = path or CHAT_RENDER
        assert server.calls == [
            (route, {"model": "served", "messages": messages, "add_generation_prompt": False}),
            (route, {"model": "served", "messages": messages, "add_generation_prompt": True,
                     "chat_template_kwargs": {"a": 1}}),
        ], path  # fmt: skip


async def test_media_get_the_multimodal_timeout() -> None:
    """The reference's `mmTimeout` (30 s): a request with images may take the renderer that long to
    fetch and process them; text requests keep `timeout` (5 s)."""
    image = {"type": "image_url", "image_url": {"url": "http://example.invalid/cat.png"}}
    async with FakeRenderServer() as server:
        server.delay = 0.3
        plugin = vllm(server.url, timeout="100ms", mmTimeout="5s")
        try:
            text = parsed("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}]})
            media = parsed("/v1/chat/completions", {"model": "m", "messages": [
                {"role": "user", "content": [{"type": "text", "text": "hi"}, image]}]})  # fmt: skip
            assert await produce(plugin, text) is None
            assert await produce(plugin, media) is not None
        finally:
            await plugin.aclose()


@pytest.mark.parametrize(
    "reply",
    [
        {"token_ids": [1, -1]},
        {"token_ids": [2**40]},
        {"token_ids": None},
        {"token_ids": "abc"},
        {"token_ids": [1.5]},
        {"tokens": [1, 2]},  # /tokenize's answer
        [],
        [{"token_ids": [1]}, "x"],
        "abc",
    ],
)
async def test_a_garbage_render_reply_is_a_logged_miss_not_an_exception(
    reply: Any, caplog: pytest.LogCaptureFixture
) -> None:
    async with FakeRenderServer() as server:
        server.replies[CHAT_RENDER] = reply
        server.replies[COMPLETIONS_RENDER] = reply
        plugin = vllm(server.url)
        try:
            for req in (
                parsed("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
                parsed("/v1/completions", {"model": "m", "prompt": "hi"}),
            ):
                assert await produce(plugin, req) is None
        finally:
            await plugin.aclose()
    assert "rendering via" in caplog.text


async def test_path_keeps_the_tokenize_api() -> None:
    """`vllm.path` (this EPP's parameter): the tokenize API at that path, for model servers without the
    render routes (vLLM serves them with --enable-scale-out, or `vllm launch render`)."""
    async with FakeRenderServer() as server:
        plugin = vllm(server.url, path="/tokenize")
        try:
            chat = parsed("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                                   "reasoning_effort": "low"})  # fmt: skip
            tokens = await produce(plugin, chat)
        finally:
            await plugin.aclose()
    assert tokens is not None and ids(tokens) == [3]
    assert server.calls == [("/tokenize", {"model": "served", "messages": [{"role": "user", "content": "hi"}]})]


async def test_the_tokenize_api_gets_a_batch_prompt_by_prompt() -> None:
    """vLLM's tokenize API takes one prompt: a completions batch is one call per prompt, each prompt's ids
    kept apart (the engine caches each on its own). Before, the joined text was tokenized once."""
    async with FakeRenderServer() as server:
        plugin = vllm(server.url, path="/tokenize")
        try:
            tokens = await produce(plugin, parsed("/v1/completions", {"model": "m", "prompt": ["ab", "cd"]}))
        finally:
            await plugin.aclose()
    assert [body["prompt"] for _, body in server.calls] == ["ab", "cd"]
    assert tokens is not None and ids(tokens) == [3, 3] and tokens.ends == (4, 8)


async def test_a_batchs_tokenize_calls_are_made_at_once() -> None:
    """The tokenize API takes one prompt: a batch's calls go out together, not one round trip after another (40
    prompts against a 15 ms endpoint took > 600 ms in turn, past the director's 400 ms producer budget, and the
    request got no tokens)."""
    async with FakeRenderServer() as server:
        server.delay = 0.05
        plugin = vllm(server.url, path="/tokenize")
        try:
            prompts = [f"prompt number {i}" for i in range(10)]
            tokens = await produce(plugin, parsed("/v1/completions", {"model": "m", "prompt": prompts}))
        finally:
            await plugin.aclose()
    assert sorted(body["prompt"] for _, body in server.calls) == sorted(prompts)
    assert tokens is not None and ids(tokens) == [3] * 10 and len(tokens.prompts()) == 10
    assert server.peak > 1, "the batch's tokenize calls were made one after another"


# -- the simulator -------------------------------------------------------------------------------------
@pytest.fixture
async def sim() -> Any:
    cluster = SimCluster([PodConfig(host="127.0.0.2", port=0, chat_template=str(CHATML), max_model_len=256)])
    await cluster.start()
    try:
        yield cluster
    finally:
        await cluster.stop()


async def test_the_simulator_renders_as_it_serves(sim: SimCluster) -> None:
    """The simulator serves vLLM's render routes: the prompt ids it would serve the request with."""
    url = sim.urls[0]
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    body = {"model": "sim-model", "messages": messages, "chat_template_kwargs": {"enable_thinking": False}}
    expected = SIM.encode(jinja_renderer(str(CHATML))(body))
    async with aiohttp.ClientSession() as http:
        async with http.post(url + CHAT_RENDER, json={**body, "max_tokens": 3}) as response:
            assert response.status == 200
            rendered = await response.json()
        assert rendered["token_ids"] == expected
        assert rendered["model"] == "sim-model" and rendered["sampling_params"]["max_tokens"] == 3
        # What render gives is what /inference/v1/generate takes (vLLM's render → generate split).
        async with http.post(url + "/inference/v1/generate", json=rendered) as response:
            assert (await response.json())["usage"]["prompt_tokens"] == len(expected)
        async with http.post(
            url + COMPLETIONS_RENDER, json={"model": "sim-model", "prompt": "hello there"}
        ) as response:
            assert [r["token_ids"] for r in await response.json()] == [SIM.encode("hello there")]
        # As vLLM: the model must be served, and the prompt plus max_tokens must fit the context.
        async with http.post(url + COMPLETIONS_RENDER, json={"model": "nope", "prompt": "x"}) as response:
            assert response.status == 404
        async with http.post(url + COMPLETIONS_RENDER, json={"prompt": "x", "max_tokens": 1000}) as response:
            assert response.status == 400


async def test_the_vllm_backend_against_the_simulator(sim: SimCluster) -> None:
    """The reference's config shape (`modelName`, `vllm: {url}`) against the simulator: the ids equal
    the simulator's own, through the render API and (path: /tokenize) the tokenize API."""
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    body = {"model": "sim-model", "messages": messages, "chat_template_kwargs": {"enable_thinking": False}}
    expected = SIM.encode(jinja_renderer(str(CHATML))(body))
    for cfg in ({}, {"path": "/tokenize"}):
        plugin = registry.build("token-producer", "t", {"modelName": "sim-model", "vllm": {"url": sim.urls[0], **cfg}})
        assert isinstance(plugin, VllmTokenProducer)
        try:
            chat = await produce(plugin, parsed("/v1/chat/completions", body))
            comp = await produce(plugin, parsed("/v1/completions", {"model": "sim-model", "prompt": "hello there"}))
        finally:
            await plugin.aclose()
        assert chat is not None and ids(chat) == expected, cfg
        assert comp is not None and ids(comp) == SIM.encode("hello there"), cfg
