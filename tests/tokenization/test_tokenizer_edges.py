"""token-producer edge cases: the event loop during long encodes, odd tokenizer files, misbehaving vLLM
tokenize servers, non-chat APIs with a model template, and where the EPP's template inputs could differ
from what vLLM hands the template."""

from __future__ import annotations

import asyncio
import json
import random
import struct
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from llmepp.framework.datakeys import TOKENIZED_PROMPT, TokenizedPrompt
from llmepp.framework.plugin import registry
from llmepp.plugins.producers.prefix_index import block_hashes, prefix_seed
from llmepp.plugins.producers.token import TokenProducer
from llmepp.request.parsers import parse_request
from llmepp.request.types import InferenceRequest
from llmepp.tokenization.chat import JinjaTemplate, load_chat_template
from llmepp.tokenization.hf import HFTokenizer
from llmepp_sim.tokenizer import TOKENIZER_PATH, SimTokenizer

TEMPLATES = Path(__file__).parent / "templates"
CHATML = TEMPLATES / "chatml" / "tokenizer_config.json"
SIM = SimTokenizer()


def parsed(path: str, body: dict[str, Any]) -> InferenceRequest:
    return parse_request({":path": path}, json.dumps(body).encode(), request_id="r")


def chat(**body: Any) -> InferenceRequest:
    return parsed("/v1/chat/completions", {"model": "m", **body})


def ids(tokens: TokenizedPrompt) -> list[int]:
    return list(struct.unpack(f"<{tokens.count}I", tokens.token_bytes))


async def produce(plugin: TokenProducer, req: InferenceRequest) -> TokenizedPrompt | None:
    out = plugin.produce(req, [])
    if asyncio.iscoroutine(out):
        await out
    tokens: TokenizedPrompt | None = req.data.get(TOKENIZED_PROMPT)
    return tokens


def jinja(source: str) -> JinjaTemplate:
    return JinjaTemplate(source, special_tokens={}, origin="test")


# -- the event loop ------------------------------------------------------------------------------------
async def test_a_long_encode_leaves_the_event_loop_running() -> None:
    """`Tokenizer.encode` holds the GIL for the whole call: handing it to a thread alone kept the loop
    (and the director's producer timeout) stalled for the full encode (~0.4 s here: 1-2 ticks)."""
    rng = random.Random(5)
    text = "".join(rng.choice("abcdefghij klmnopqrstuvwxyz.,") for _ in range(800_000))
    tok = HFTokenizer(TOKENIZER_PATH)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.001)
            ticks += 1

    task = asyncio.get_running_loop().create_task(ticker())
    await asyncio.sleep(0)
    deferred = tok.encode_many([text])
    assert not isinstance(deferred, list)  # too long to encode on the loop
    out = await deferred
    task.cancel()
    assert out == [tok.encode(text)]
    assert ticks >= 20


# -- tokenizer files -----------------------------------------------------------------------------------
async def test_truncation_and_padding_in_tokenizer_json_are_ignored(tmp_path: Path) -> None:
    """A tokenizer.json may carry truncation / padding settings (exported or embedding tokenizers);
    transformers, hence vLLM, switches both off per call unless asked. Kept, every prompt became the same
    16 ids (8 tokens, zero-padded) and all prompts shared their blocks."""
    tok = Tokenizer.from_file(str(TOKENIZER_PATH))
    tok.enable_truncation(max_length=8)
    tok.enable_padding(length=16, pad_id=0, pad_token="<|endoftext|>")
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    plugin = registry.build("token-producer", "t", {"tokenizer": {"backend": "hf", "path": str(path)}})
    assert isinstance(plugin, TokenProducer)
    prompt = "the quick brown fox jumps over the lazy dog " * 4
    tokens = await produce(plugin, parsed("/v1/completions", {"model": "m", "prompt": prompt}))
    assert tokens is not None and ids(tokens) == SIM.encode(prompt)
    short = await produce(plugin, parsed("/v1/completions", {"model": "m", "prompt": "hi"}))
    assert short is not None and ids(short) == SIM.encode("hi")


# -- the vllm backend's tokenize API (`vllm.path: /tokenize`; the render API: test_vllm_render.py) ------
class FakeTokenizeServer:
    """A /tokenize server answering what `reply` says, recording the bodies it got."""

    def __init__(self) -> None:
        self.reply: Any = {"tokens": [1]}
        self.bodies: list[dict[str, Any]] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def _tokenize(self, request: web.Request) -> web.StreamResponse:
        self.bodies.append(await request.json())
        if isinstance(self.reply, web.StreamResponse):
            return self.reply
        return web.json_response(self.reply)

    async def __aenter__(self) -> FakeTokenizeServer:
        app = web.Application()
        app.router.add_post("/tokenize", self._tokenize)
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


@pytest.mark.parametrize(
    "reply",
    [
        {"tokens": [1, -1]},
        {"tokens": [2**40]},
        {"tokens": None},
        {"tokens": "abc"},
        {"tokens": ["1"]},
        {"tokens": [1.5]},
        {"tokens": [[1, 2]]},
        [1, 2],
        {"count": 2},
    ],
)
async def test_a_garbage_tokenize_reply_is_a_logged_miss_not_an_exception(
    reply: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: replies whose `tokens` were no uint32 list raised out of produce (the director then
    logged a traceback per request instead of the producer's rate-limited warning)."""
    async with FakeTokenizeServer() as server:
        server.reply = reply
        plugin = registry.build("token-producer", "tok", {"vllm": {"url": server.url, "path": "/tokenize"}})
        assert isinstance(plugin, TokenProducer)
        req = parsed("/v1/completions", {"model": "m", "prompt": "hello"})
        try:
            assert await produce(plugin, req) is None
        finally:
            await plugin.aclose()
    assert "tokenizing via" in caplog.text


async def test_the_vllm_backend_sends_non_chat_apis_as_chat_messages() -> None:
    """Responses, Conversations and Anthropic Messages requests carry (role, text) messages but no
    OpenAI `messages` field: the body's fields alone made /tokenize a request without messages (a 400)
    or, for Anthropic, messages without the `system` prompt."""
    async with FakeTokenizeServer() as server:
        params = {"modelName": "m", "vllm": {"url": server.url, "path": "/tokenize"}}
        plugin = registry.build("token-producer", "tok", params)
        assert isinstance(plugin, TokenProducer)
        try:
            requests = [
                parsed("/v1/responses", {"model": "m", "instructions": "be brief", "input": "hello there"}),
                parsed("/v1/messages", {"model": "m", "max_tokens": 5, "system": "be brief",
                                        "messages": [{"role": "user", "content": "hello there"}]}),
            ]  # fmt: skip
            for req in requests:
                assert await produce(plugin, req) is not None
        finally:
            await plugin.aclose()
    expected = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    assert [b["messages"] for b in server.bodies] == [expected, expected]
    assert all(b["model"] == "m" and "system" not in b for b in server.bodies)


# -- model templates on non-chat APIs ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/responses", {"model": "m", "instructions": "be brief", "input": "hello there"}),
        ("/v1/responses", {"model": "m", "instructions": "be brief",
                           "input": [{"role": "user", "content": [{"type": "input_text", "text": "hello there"}]}]}),
        ("/v1/messages", {"model": "m", "max_tokens": 5, "system": "be brief",
                          "messages": [{"role": "user", "content": [{"type": "text", "text": "hello there"}]}]}),
        ("/v1/conversations", {"items": [{"role": "system", "content": "be brief"},
                                         {"role": "user", "content": "hello there"}]}),
    ],
)  # fmt: skip
def test_a_model_template_renders_non_chat_apis_from_their_messages(path: str, body: dict[str, Any]) -> None:
    """Before: the template read the body as a chat body: Responses / Conversations have no `messages`
    (the template failed on an empty conversation, or rendered just the generation prompt, the same for
    every request), an Anthropic request lost its `system` prompt."""
    t = load_chat_template(str(CHATML), str(TOKENIZER_PATH))
    as_chat = chat(messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}])
    assert t.render(parsed(path, body)) == t.render(as_chat)


# -- template inputs as vLLM builds them ---------------------------------------------------------------
ARGS = (
    "{% for m in messages %}{% for c in m.tool_calls or [] %}"
    "{{ c.function.arguments | tojson }};{% endfor %}{% endfor %}"
)


@pytest.mark.parametrize(
    ("arguments", "rendered"),
    [('{"a": 1}', '{"a": 1};'), ("", "{};"), (None, "{};"), ("null", "null;"), ("not json", "{};"), ("[1]", "[1];"),
     ("7", "7;"), ({"b": 2}, '{"b": 2};'), ([2], "[2];"),
     ("[" * 2000 + "]" * 2000, "{};")],  # nested too deeply: json's RecursionError escaped the render
)  # fmt: skip
def test_tool_call_arguments_reach_the_template_as_vllm_passes_them(arguments: Any, rendered: str) -> None:
    """vLLM hands the template the arguments decoded (chat_utils._postprocess_messages): a JSON string
    parsed, whatever value it holds; empty / null arguments become {} (invalid JSON, which vLLM refuses, too).
    Before: "" and null were rendered as they came, invalid JSON as the raw string; later a JSON value that
    was not an object became {}."""
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": arguments}}
    assistant = {"role": "assistant", "content": None, "tool_calls": [call]}
    req = chat(messages=[{"role": "user", "content": "x"}, assistant])
    assert jinja(ARGS).render(req) == rendered


def test_a_tools_strict_and_defer_loading_reach_the_template_only_when_set() -> None:
    """vLLM dumps each tool's FunctionDefinition: description / parameters null when absent, `strict` and
    `defer_loading` only when set (OpenAI's Agents SDK sends strict: true). Before: both were dropped."""
    probe = jinja("{% for t in tools %}{{ t | tojson }};{% endfor %}")
    plain = {"type": "function", "function": {"name": "f"}}
    strict = {"type": "function", "function": {"name": "g", "parameters": {}, "strict": True, "defer_loading": False}}
    unset = {"type": "function", "function": {"name": "h", "strict": None}}
    rendered = probe.render(chat(messages=[{"role": "user", "content": "x"}], tools=[plain, strict, unset]))
    assert [json.loads(t) for t in rendered.split(";")[:-1]] == [
        {"type": "function", "function": {"name": "f", "description": None, "parameters": None}},
        {"type": "function", "function": {"name": "g", "description": None, "parameters": {}, "strict": True,
                                          "defer_loading": False}},
        {"type": "function", "function": {"name": "h", "description": None, "parameters": None}},
    ]  # fmt: skip


def test_reasoning_effort_reaches_the_template_and_sets_thinking_as_vllm_does() -> None:
    """vLLM's build_chat_params passes `reasoning_effort` to the template and, unless chat_template_kwargs set
    enable_thinking, sets it to effort != "none" (a Qwen3 template then closes an empty <think> block)."""
    probe = jinja("{{ reasoning_effort }}|{{ enable_thinking }}")
    user = [{"role": "user", "content": "x"}]
    assert probe.render(chat(messages=user, reasoning_effort="none")) == "none|False"
    assert probe.render(chat(messages=user, reasoning_effort="low")) == "low|True"
    kwargs = {"enable_thinking": True}
    assert probe.render(chat(messages=user, reasoning_effort="none", chat_template_kwargs=kwargs)) == "none|True"
    assert probe.render(chat(messages=user)) == "|"


def test_an_empty_text_part_is_kept_in_the_parts_format_and_skipped_in_the_string_format() -> None:
    """vLLM keeps a part when its parse result is truthy: in the parts ("openai") format that is the part itself,
    {"type": "text", "text": ""}, so it stays (and a tool message's parts are joined with it); in the string
    format it is "", skipped. Before: skipped in both."""
    parts_format = jinja(
        "{% for m in messages %}{% if m.content is string %}{{ m.content | tojson }}{% else %}"
        "{% for p in m.content %}[{{ p.text }}]{% endfor %}{% endif %};{% endfor %}"
    )
    string_format = jinja("{% for m in messages %}{{ m.content | tojson }};{% endfor %}")
    assert parts_format.content_as_parts() and not string_format.content_as_parts()
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": ""}, "", {"type": "text", "text": "b"}]
    req = chat(messages=[{"role": "user", "content": parts}, {"role": "tool", "tool_call_id": "c", "content": parts}])
    assert parts_format.render(req) == '[a][][][b];"a\\n\\n\\nb";'
    assert string_format.render(req) == '"a\\nb";"a\\nb";'


def test_an_empty_tools_list_reaches_the_template_as_a_list() -> None:
    """vLLM passes `tools: []` as [] (only an absent / null tools is None), and transformers picks a
    config's `tool_use` template whenever tools is not None. Templates such as Llama 3.1's test
    `tools is not none`: before, [] became None and the rendering lost its tools preamble."""
    probe = jinja("{{ tools is none }}|{{ tools | length if tools is not none else '-' }}")
    assert probe.render(chat(messages=[{"role": "user", "content": "x"}], tools=[])) == "False|0"
    assert probe.render(chat(messages=[{"role": "user", "content": "x"}])) == "True|-"
    named = JinjaTemplate({"default": "default", "tool_use": "tool_use"}, special_tokens={}, origin="test")
    assert named.render(chat(messages=[{"role": "user", "content": "x"}], tools=[])) == "tool_use"


def test_reasoning_reaches_the_template_as_vllm_passes_it() -> None:
    """vLLM reads an assistant message's `reasoning` and hands it over as both `reasoning` and
    `reasoning_content` (Qwen3's template reads the latter); a `reasoning_content` the client sends is
    not read. Before: both were passed through as sent."""
    probe = jinja("{% for m in messages %}[{{ m.reasoning }}|{{ m.reasoning_content }}]{% endfor %}")
    req = chat(messages=[
        {"role": "user", "content": "q", "reasoning": "u"},
        {"role": "assistant", "content": "a", "reasoning": "r"},
        {"role": "assistant", "content": "b", "reasoning_content": "rc"},
    ])  # fmt: skip
    assert probe.render(req) == "[|][r|r][|]"


def test_a_tool_message_reaches_a_parts_template_as_a_string() -> None:
    """vLLM joins a tool message's text parts into a string even for templates that take content as a list
    of parts (most render a tool result with `{{ message.content }}`). Before: the list went in, rendered
    as its Python repr."""
    t = jinja("{% for m in messages %}{% if m.content is string %}{{ m.content }}{% else %}"
              "{% for p in m.content %}<{{ p.text }}>{% endfor %}{% endif %};{% endfor %}")  # fmt: skip
    assert t.content_as_parts()
    req = chat(messages=[
        {"role": "user", "content": "q"},
        {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": t} for t in "ab"]},
        {"role": "tool", "tool_call_id": "c2", "content": "c"},
    ])  # fmt: skip
    assert t.render(req) == "<q>;a\nb;c;"


# -- consistency ---------------------------------------------------------------------------------------
prompt_text = st.text(st.characters(codec="utf-8"), max_size=400)


@settings(max_examples=60, deadline=None)
@given(prompt=prompt_text, block=st.sampled_from([1, 2, 16, 64]))
async def test_the_same_prompt_always_gives_the_same_ids_and_hashes(prompt: str, block: int) -> None:
    plugins = [
        registry.build("token-producer", "e", None),
        registry.build("token-producer", "h", {"tokenizer": {"backend": "hf", "path": str(TOKENIZER_PATH),
                                                             "threadThresholdChars": 64}}),
    ]  # fmt: skip
    seed = prefix_seed("m", "")
    for plugin in plugins:
        assert isinstance(plugin, TokenProducer)
        runs = []
        for _ in range(2):
            tokens = await produce(plugin, parsed("/v1/completions", {"model": "m", "prompt": prompt}))
            assert tokens is not None and len(tokens.token_bytes) % 4 == 0
            runs.append((tokens.token_bytes, block_hashes(tokens.token_bytes, block, seed)))
        assert runs[0] == runs[1]
        token_bytes, hashes = runs[0]
        assert len(hashes) == -(-len(token_bytes) // (4 * block))
        if plugin.backend == "estimate":
            raw = prompt.encode()
            assert token_bytes == raw + b"\0" * (-len(raw) % 4)
