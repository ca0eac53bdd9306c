"""token-producer's real backends reproduce the simulator's tokenization exactly (completions + chat)."""

from __future__ import annotations

import asyncio
import json
import random
import struct
import threading
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmepp.framework.datakeys import TOKENIZED_PROMPT, TokenizedPrompt
from llmepp.framework.plugin import ConfigError, registry
from llmepp.plugins.producers.token import HFTokenProducer, TokenProducer, VllmTokenProducer
from llmepp.request.parsers import parse_request
from llmepp.request.types import InferenceRequest
from llmepp_sim.cluster import SimProcess
from llmepp_sim.tokenizer import TOKENIZER_PATH, SimTokenizer

SIM = SimTokenizer()
HF_PARAMS = {"tokenizer": {"backend": "hf", "path": str(TOKENIZER_PATH)}}

text = st.text(st.characters(codec="utf-8"), max_size=300)
role = st.sampled_from(["system", "user", "assistant", "tool", "developer"])
content = st.one_of(
    st.none(),
    text,
    st.lists(st.one_of(text, st.fixed_dictionaries({"type": st.just("text"), "text": st.none() | text}),
                       st.fixed_dictionaries({"type": st.just("input_text"), "text": text}),
                       st.fixed_dictionaries({"type": st.just("refusal"), "refusal": text}),
                       st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.just({"url": "x"})})),
             max_size=3),
)  # fmt: skip


def ids(tokens: TokenizedPrompt) -> list[int]:
    return list(struct.unpack(f"<{tokens.count}I", tokens.token_bytes))


def parsed(path: str, body: dict[str, Any]) -> InferenceRequest:
    return parse_request({":path": path}, json.dumps(body).encode(), request_id="r")


async def produce(plugin: TokenProducer, req: InferenceRequest) -> TokenizedPrompt:
    out = plugin.produce(req, [])
    if asyncio.iscoroutine(out):
        await out
    tokens: TokenizedPrompt = req.data[TOKENIZED_PROMPT]
    return tokens


def hf() -> TokenProducer:
    plugin = registry.build("token-producer", "tok", HF_PARAMS)
    assert isinstance(plugin, HFTokenProducer)
    return plugin


def test_the_deprecated_tokenizer_type_builds_the_token_producer(caplog: pytest.LogCaptureFixture) -> None:
    plugin = registry.build("tokenizer", "tok", HF_PARAMS)
    assert isinstance(plugin, HFTokenProducer) and plugin.type == "token-producer"
    assert "type tokenizer is deprecated; use token-producer" in caplog.text
    assert "tokenizer" in registry.types()


@settings(max_examples=60, deadline=None)
@given(prompt=text)
async def test_hf_completions_equal_simulator(prompt: str) -> None:
    tokens = await produce(hf(), parsed("/v1/completions", {"model": "m", "prompt": prompt}))
    assert tokens.backend == "hf"
    assert ids(tokens) == SIM.encode(prompt)


@settings(max_examples=60, deadline=None)
@given(messages=st.lists(st.fixed_dictionaries({"role": role, "content": content}), min_size=1, max_size=4))
async def test_hf_chat_equals_simulator_template(messages: list[dict[str, Any]]) -> None:
    tokens = await produce(hf(), parsed("/v1/chat/completions", {"model": "m", "messages": messages}))
    assert ids(tokens) == SIM.encode_chat(messages)


async def test_long_prompts_are_tokenized_in_a_thread_with_the_same_result() -> None:
    rng = random.Random(3)
    prompt = "".join(rng.choice("abcdefghij klmnopqrstuvwxyz.,") for _ in range(200_000))  # ~40 ms to encode
    plugin = hf()
    loop = asyncio.get_running_loop()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.001)
            ticks += 1

    task = loop.create_task(ticker())
    tokens = await produce(plugin, parsed("/v1/completions", {"model": "m", "prompt": prompt}))
    task.cancel()
    assert ids(tokens) == SIM.encode(prompt)
    assert ticks > 0  # the loop kept running while the worker thread encoded


async def test_token_id_prompts_pass_through() -> None:
    tokens = await produce(hf(), parsed("/v1/completions", {"model": "m", "prompt": [5, 6, 4000000000]}))
    assert ids(tokens) == [5, 6, 4000000000]


async def test_a_batch_is_tokenized_prompt_by_prompt() -> None:
    """vLLM prepares each prompt of a completions batch as a request of its own: each gets its special tokens
    and its truncation (the last N tokens of each), and is cached on its own. Before, the batch's texts were
    joined and encoded once (one BOS, one truncation, tokens merged across the seam)."""
    prompts = ["hello there", "general kenobi"]
    tokens = await produce(hf(), parsed("/v1/completions", {"model": "m", "prompt": prompts}))
    each = [SIM.encode(p) for p in prompts]
    assert ids(tokens) == each[0] + each[1]
    assert tokens.ends == (4 * len(each[0]), 4 * (len(each[0]) + len(each[1])))
    body = {"model": "m", "prompt": prompts, "truncate_prompt_tokens": 2}
    truncated = await produce(hf(), parsed("/v1/completions", body))
    assert ids(truncated) == each[0][-2:] + each[1][-2:] and truncated.ends == (8, 16)
    body = {"model": "m", "prompt": [[1, 2, 3], [4, 5, 6]], "truncate_prompt_tokens": 2}
    id_batch = await produce(hf(), parsed("/v1/completions", body))
    assert ids(id_batch) == [2, 3, 5, 6] and id_batch.ends == (8, 16)


def test_estimate_stays_the_default_and_synchronous() -> None:
    # No backend configured (`modelName` alone would select vllm, as in the reference).
    plugin = registry.build("token-producer", "tok", None)
    assert type(plugin) is TokenProducer
    req = parsed("/v1/completions", {"model": "m", "prompt": "abcde"})
    assert plugin.produce(req, []) is None
    assert req.data[TOKENIZED_PROMPT].token_bytes == b"abcde\0\0\0"


@pytest.mark.parametrize(
    ("params", "error"),
    [
        ({"tokenizer": {"backend": "hf"}}, "tokenizer.path is required"),
        ({"tokenizer": {"backend": "sentencepiece", "path": "x"}}, "tokenizer.backend must be one of"),
        ({"tokenizer": {"backend": "hf", "path": "/nonexistent/tokenizer.json"}}, "does not exist"),
        (
            {"tokenizer": {"backend": "hf", "path": str(TOKENIZER_PATH), "chatTemplate": "jinja"}},
            "tokenizer.chatTemplate: .jinja. is neither a built-in",
        ),
        ({"tokenizer": {"backend": "hf", "path": str(TOKENIZER_PATH), "bogus": 1}}, "bogus"),
    ],
)
def test_bad_tokenizer_configs_are_rejected(params: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        registry.build("token-producer", "tok", params)


async def test_vllm_backend_asks_the_model_server() -> None:
    """The reference's `vllm: {url}` parameter, against the simulator's vLLM render API (its default)."""
    with SimProcess(["--hosts", "127.0.0.165", "--port", "0"]) as sim:
        plugin = registry.build("token-producer", "tok", {"modelName": "sim-model", "vllm": {"url": sim.urls[0]}})
        assert isinstance(plugin, VllmTokenProducer)
        try:
            messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
            chat = await produce(plugin, parsed("/v1/chat/completions", {"model": "sim-model", "messages": messages}))
            assert ids(chat) == SIM.encode_chat(messages)
            comp = await produce(plugin, parsed("/v1/completions", {"model": "sim-model", "prompt": "hello there"}))
            assert ids(comp) == SIM.encode("hello there")
        finally:
            await plugin.aclose()
        # A dead tokenizer server: no TokenizedPrompt, no exception.
        dead = registry.build("token-producer", "tok", {"vllm": {"url": "http://127.0.0.165:1", "timeout": "200ms"}})
        assert isinstance(dead, VllmTokenProducer)
        req = parsed("/v1/completions", {"model": "m", "prompt": "x"})
        out = dead.produce(req, [])
        assert asyncio.iscoroutine(out)
        await out
        assert TOKENIZED_PROMPT not in req.data
        await dead.aclose()


def test_parser_keeps_messages_and_token_id_flag() -> None:
    req = parsed("/v1/chat/completions", {"model": "m", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url"}, {"type": "text"}]},
        {"role": "assistant", "content": None}]})  # fmt: skip
    assert req.messages == [("user", "a"), ("assistant", "")]  # a text part without text is skipped, as vLLM
    assert not parsed("/v1/completions", {"model": "m", "prompt": "x"}).prompt_is_token_ids
    assert parsed("/v1/completions", {"model": "m", "prompt": [[1], [2]]}).prompt_is_token_ids
    assert msgspec.json.encode(req.messages) == b'[["user","a"],["assistant",""]]'


async def test_hf_a_long_batch_is_not_encoded_on_the_event_loop(monkeypatch: Any) -> None:
    """`encode_many` hands a text of `threadThresholdChars` (4096) or more to a worker thread, which encodes it
    with the GIL released, so that a long prompt never stalls the event loop (every other request's ext_proc
    stream). A batch is encoded prompt by prompt, and measured by its total length: a batch of many prompts each
    under the threshold (64 x 3.5 KB here, 224 KB in all) goes to a worker as one job, as one 224 KB prompt would
    (encoded one prompt at a time, it all ran inline, on the loop)."""
    plugin = registry.build("token-producer", "tok", {"tokenizer": {"backend": "hf", "path": str(TOKENIZER_PATH)}})
    assert isinstance(plugin, HFTokenProducer)
    tok = plugin.tokenizer
    loop_thread = threading.get_ident()
    on_loop: list[int] = []
    real_encode = type(tok).encode

    def spy(self: Any, text: str, special: Any = None, truncate: Any = None) -> bytes:
        if threading.get_ident() == loop_thread:
            on_loop.append(len(text))
        return real_encode(self, text, special, truncate)

    monkeypatch.setattr(type(tok), "encode", spy)
    prompts = [f"question {i}: " + "the quick brown fox jumps over the lazy dog " * 80 for i in range(64)]
    assert all(len(p) < tok.thread_threshold for p in prompts)

    single = parsed("/v1/completions", {"model": "m", "prompt": "".join(prompts)})
    await plugin.produce(single, [])
    assert single.data[TOKENIZED_PROMPT].count > 0 and on_loop == []  # the joined text: in a worker

    batch = parsed("/v1/completions", {"model": "m", "prompt": prompts})
    await plugin.produce(batch, [])
    assert batch.data[TOKENIZED_PROMPT].ends  # tokenized prompt by prompt
    assert sum(on_loop) < tok.thread_threshold, (
        f"{sum(on_loop)} characters ({len(on_loop)} prompts) encoded on the event loop for one request"
    )


async def test_a_long_prompt_dropped_before_its_wait_starts_leaves_no_unawaited_coroutine(
    recwarn: pytest.WarningsRecorder,
) -> None:
    """A long prompt's produce() submits the encode and returns what waits for it. When the routing step is
    cancelled before that wait starts (the client went away), the awaitable is closed unstarted: nothing inside it
    may be a coroutine left un-awaited (a RuntimeWarning on every such request)."""
    import gc
    import inspect

    from llmepp.tokenization import hf as hf_module

    for body in (
        {"model": "m", "prompt": "the quick brown fox " * 400},
        {"model": "m", "messages": [{"role": "user", "content": "the quick brown fox " * 400}]},
    ):
        req = parsed("/v1/chat/completions" if "messages" in body else "/v1/completions", body)
        later = hf().produce(req, [])
        assert inspect.iscoroutine(later)  # long: encoded in a worker
        later.close()
        del later
        gc.collect()
        for _ in range(500):  # the submitted job still runs; let it end before the next test
            if not hf_module._in_flight:
                break
            await asyncio.sleep(0.01)
    assert not [w for w in recwarn if "never awaited" in str(w.message)]
