"""Chat-template rendering and the event loop: a long conversation is rendered (and encoded) in a worker
thread that hands the GIL back to the loop every slice; a short one stays on the loop."""

from __future__ import annotations

import asyncio
import json
import struct
import time
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

import pytest

from llmepp.framework.datakeys import TOKENIZED_PROMPT, TokenizedPrompt
from llmepp.framework.plugin import registry
from llmepp.plugins.producers.token import TokenProducer
from llmepp.request.parsers import parse_request
from llmepp.request.types import InferenceRequest
from llmepp.tokenization import chat, hf
from llmepp.tokenization.chat import JinjaTemplate
from llmepp_sim.tokenizer import TOKENIZER_PATH, SimTokenizer

SIM = SimTokenizer()
# Qwen3's template scans the messages backwards before it writes any (for the last user query); this one
# scans each message 30 times (~0.1 ms per message, ~0.1 s for 1,000), attribute lookups but no output.
SLOW = (
    "{%- set ns = namespace(last=-1) %}"
    "{%- for message in messages[::-1] %}{%- for i in range(30) %}"
    "{%- if ns.last < 0 and message.role == 'user' and message.content is string %}{%- endif %}"
    "{%- endfor %}{%- endfor %}"
    "{%- for message in messages %}<|{{ message.role }}|>\n{{ message.content }}\n{%- endfor %}<|assistant|>\n"
)


def conversation(n: int) -> InferenceRequest:
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} of the talk"} for i in range(n)]
    body = json.dumps({"model": "m", "messages": messages}).encode()
    return parse_request({":path": "/v1/chat/completions"}, body, request_id="r")


def ids(tokens: TokenizedPrompt) -> list[int]:
    return list(struct.unpack(f"<{tokens.count}I", tokens.token_bytes))


def producer(tmp_path: Path, source: str) -> TokenProducer:
    template = tmp_path / "chat_template.jinja"
    template.write_text(source)
    params = {"tokenizer": {"backend": "hf", "path": str(TOKENIZER_PATH), "chatTemplate": str(template)}}
    plugin = registry.build("token-producer", "t", params)
    assert isinstance(plugin, TokenProducer)
    return plugin


async def produce(plugin: TokenProducer, req: InferenceRequest) -> TokenizedPrompt | None:
    out = plugin.produce(req, [])
    if asyncio.iscoroutine(out):
        await out
    tokens: TokenizedPrompt | None = req.data.get(TOKENIZED_PROMPT)
    return tokens


async def test_a_long_chat_render_leaves_the_event_loop_running(tmp_path: Path) -> None:
    """Before: the template was rendered on the event loop, stalling every other request for the whole
    render (2,000 messages: ~6 ms with a ChatML template, ~18 ms with Qwen3's; here ~0.1 s)."""
    plugin = producer(tmp_path, SLOW)
    req = conversation(1000)
    started = time.perf_counter()
    text = JinjaTemplate(SLOW, special_tokens={}, origin="t").render(req)
    inline = time.perf_counter() - started
    stall = 0.0

    async def ticker() -> None:
        nonlocal stall
        while True:
            before = time.perf_counter()
            await asyncio.sleep(0.001)
            stall = max(stall, time.perf_counter() - before - 0.001)

    task = asyncio.get_running_loop().create_task(ticker())
    await asyncio.sleep(0.005)
    stall = 0.0
    tokens = await produce(plugin, req)
    task.cancel()
    assert tokens is not None and ids(tokens) == SIM.encode(text)
    assert stall < inline / 4, f"the loop stalled {stall * 1e3:.1f} ms during a {inline * 1e3:.1f} ms render"


def test_a_paced_render_pauses_every_slice() -> None:
    """A worker thread holding the GIL still stalls the loop up to the interpreter's switch interval
    (5 ms, far longer on a busy CPU) at a time: a render given a `pause` calls it every RENDER_SLICE,
    with the same text, also in a stretch of the template that writes nothing (pacing on the written
    chunks missed those)."""
    pauses = 0

    def pause() -> None:
        nonlocal pauses
        pauses += 1

    template = JinjaTemplate(SLOW, special_tokens={}, origin="t")
    req = conversation(300)
    plain = template.render(req)
    started = time.thread_time()  # CPU time: each RENDER_SLICE of wall time holds at most a slice of it
    assert template.render(req, pause=pause) == plain
    took = time.thread_time() - started
    assert pauses >= took / chat.RENDER_SLICE / 3


async def test_the_loop_handoff_returns_once_the_loop_ran() -> None:
    loop = asyncio.get_running_loop()
    ran: list[int] = []
    loop.call_soon(ran.append, 1)  # ready before the handoff: run by then
    await asyncio.to_thread(chat.loop_handoff(loop))
    assert ran == [1]
    # A loop that does not run any more: no hang.
    stopped = asyncio.new_event_loop()
    started = time.perf_counter()
    chat.loop_handoff(stopped)()
    assert chat.HANDOFF_TIMEOUT <= time.perf_counter() - started < 1
    stopped.close()
    chat.loop_handoff(stopped)()  # closed: returns at once


class NoWorkers(Executor):
    def submit(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("handed to a worker thread")


async def test_short_chats_are_rendered_and_encoded_on_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A thread hop costs ~50 µs, more than rendering a short conversation (~10 µs for one message)."""
    source = SLOW.replace("range(30)", "range(1)")
    plugin = producer(tmp_path, source)
    monkeypatch.setattr(hf, "_EXECUTOR", NoWorkers())
    req = conversation(4)
    assert len(req.body) < 4096
    tokens = await produce(plugin, req)
    assert tokens is not None
    assert ids(tokens) == SIM.encode(JinjaTemplate(source, special_tokens={}, origin="t").render(req))


TEMPLATES = Path(__file__).parent / "templates"
CALL = {"id": "c1", "type": "function", "function": {"name": "get", "arguments": '{"city": "Zürich"}'}}
TOOL = {"type": "function", "function": {"name": "get", "description": "d", "parameters": {"type": "object"}}}


@pytest.mark.parametrize(
    "spec", [TEMPLATES / "chatml" / "tokenizer_config.json", TEMPLATES / "llama" / "chat_template.jinja"]
)
@pytest.mark.parametrize(
    "body",
    [
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [CALL]},
                      {"role": "tool", "content": "sunny", "tool_call_id": "c1"}], "tools": [TOOL]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure"}],
         "add_generation_prompt": False, "continue_final_message": True},
        {"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"enable_thinking": False}},
    ],
)  # fmt: skip
def test_a_paced_render_is_the_same_render(spec: Path, body: dict[str, Any]) -> None:
    template = chat.load_chat_template(str(spec), str(TOKENIZER_PATH))
    req = parse_request({":path": "/v1/chat/completions"}, json.dumps({"model": "m", **body}).encode(), request_id="r")
    assert template.render(req, pause=lambda: None) == template.render(req)


def test_a_failing_paced_render_fails_alike_and_leaves_the_thread_unpaced() -> None:
    template = chat.load_chat_template(str(TEMPLATES / "chatml" / "tokenizer_config.json"), str(TOKENIZER_PATH))
    bad = [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]  # the template raises
    req = parse_request({":path": "/v1/chat/completions"}, json.dumps({"model": "m", "messages": bad}).encode(),
                        request_id="r")  # fmt: skip
    with pytest.raises(ValueError, match="system message must come first") as plain:
        template.render(req)
    with pytest.raises(ValueError, match="system message must come first") as paced:
        template.render(req, pause=lambda: None)
    assert str(paced.value) == str(plain.value)
    assert getattr(chat._paced_render, "pacer", None) is None
