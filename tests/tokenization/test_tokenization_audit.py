"""Tokenization failure modes an operator hits: bad / mismatched model files at start-up, chat templates
that never finish or blow up, garbage from the vLLM render server, a saturated worker pool. Each must be a
start-up ConfigError, or a bounded, counted, rate-limited miss (the request still routes)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from helpers import serving
from prometheus_client import CollectorRegistry

from llmepp.framework.datakeys import TOKENIZED_PROMPT, TokenizedPrompt
from llmepp.framework.plugin import ConfigError, PluginContext, registry
from llmepp.plugins.producers import token as token_mod
from llmepp.plugins.producers.token import HFTokenProducer, TokenProducer
from llmepp.request.parsers import parse_request
from llmepp.request.types import InferenceRequest
from llmepp.tokenization import hf
from llmepp.tokenization.chat import JinjaTemplate
from llmepp_sim.tokenizer import TOKENIZER_PATH

# 100,000 x 1,000 empty iterations: ~2.5 s of CPU (x 100,000 instead: ~40 minutes, same code path).
FOREVER = "{% for i in range(100000) %}{% for j in range(1000) %}{% endfor %}{% endfor %}ok"


def parsed(path: str, body: dict[str, Any]) -> InferenceRequest:
    return parse_request({":path": path}, json.dumps(body).encode(), request_id="r")


def chat(n: int = 1) -> InferenceRequest:
    return parsed("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}] * n})


async def produce(plugin: TokenProducer, req: InferenceRequest) -> TokenizedPrompt | None:
    out = plugin.produce(req, [])
    if asyncio.iscoroutine(out):
        await out
    tokens: TokenizedPrompt | None = req.data.get(TOKENIZED_PROMPT)
    return tokens


def model_dir(tmp_path: Path, config: Any = None, jinja: str | None = None) -> Path:
    """A model folder: the simulator's tokenizer.json, with the given tokenizer_config / template."""
    (tmp_path / "tokenizer.json").symlink_to(TOKENIZER_PATH)
    if config is not None:
        text = config if isinstance(config, str) else json.dumps(config)
        (tmp_path / "tokenizer_config.json").write_text(text)
    if jinja is not None:
        (tmp_path / "chat_template.jinja").write_text(jinja)
    return tmp_path / "tokenizer.json"


def hf_producer(path: Path, **cfg: Any) -> HFTokenProducer:
    plugin = registry.build("token-producer", "tok", {"tokenizer": {"backend": "hf", "path": str(path), **cfg}})
    assert isinstance(plugin, HFTokenProducer)
    metrics = type("M", (), {"registry": CollectorRegistry()})()
    plugin.setup(PluginContext({}, None, None, metrics))
    plugin._test_registry = metrics.registry  # type: ignore[attr-defined]
    return plugin


def failures(plugin: TokenProducer, reason: str) -> float:
    registry_ = plugin._test_registry  # type: ignore[attr-defined]
    value = registry_.get_sample_value(
        "llm_d_epp_tokenization_failures_total",
        {"plugin_name": plugin.name, "backend": plugin.backend, "reason": reason},
    )
    return value or 0.0


# -- start-up --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("files", "error"),
    [
        ({"config": "[" * 100_000}, "tokenizer_config.json"),
        ({"config": {"chat_template": "{{" + "(" * 5000 + "1" + ")" * 5000 + "}}"}}, "tokenizer_config.json"),
        ({"jinja": "{% if x %}" * 3000 + "{% endif %}" * 3000}, "chat_template.jinja"),
    ],
)
def test_a_pathological_model_file_is_a_config_error_not_a_traceback(
    tmp_path: Path, files: dict[str, Any], error: str
) -> None:
    """Before: a deeply nested tokenizer_config.json or template raised RecursionError out of the
    plugin's construction (a traceback at start-up instead of a ConfigError naming the file)."""
    path = model_dir(tmp_path, **files)
    with pytest.raises(ConfigError, match=error):
        hf_producer(path)


def test_a_tokenizer_config_of_another_model_next_to_the_tokenizer_is_a_config_error(tmp_path: Path) -> None:
    """Before: Llama's tokenizer_config.json next to another model's tokenizer.json was used silently: its
    template's special tokens are no tokens of this vocabulary, every chat tokenized unlike the engine."""
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": "{{ bos_token }}x"}
    path = model_dir(tmp_path, config)
    with pytest.raises(ConfigError, match=r"tokenizer_config.json.*eos_token.*tokenizer.path"):
        hf_producer(path)


def test_a_chosen_template_config_of_another_model_is_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"eos_token": "<|eot_id|>", "chat_template": "x"}))
    hf_producer(TOKENIZER_PATH, chatTemplate=str(other))
    assert "eos_token" in caplog.text and "not a token" in caplog.text


def test_a_chosen_jinja_template_with_another_models_tokens_beside_the_tokenizer_is_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The template fills {{ eos_token }} from the tokenizer_config.json next to the tokenizer: checked as
    when `auto` finds it, but the operator chose the template, so it loads with a warning."""
    path = model_dir(tmp_path, {"eos_token": "<|eot_id|>"})
    template = tmp_path / "chosen.jinja"
    template.write_text("{{ eos_token }}")
    hf_producer(path, chatTemplate=str(template))
    assert "eos_token" in caplog.text and "not a token" in caplog.text


def test_a_matching_tokenizer_config_loads(tmp_path: Path) -> None:
    config = {"eos_token": "<|endoftext|>", "bos_token": None, "chat_template": "{{ eos_token }}"}
    hf_producer(model_dir(tmp_path, config))


# -- templates at render time ----------------------------------------------------------------------------
async def test_a_template_that_never_ends_on_a_short_chat_is_a_bounded_counted_miss(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: rendered inline on the event loop for ~40 minutes (the whole EPP stalled)."""
    plugin = hf_producer(model_dir(tmp_path, jinja=FOREVER))
    t0 = time.perf_counter()
    assert await produce(plugin, chat()) is None
    assert time.perf_counter() - t0 < 0.5
    assert failures(plugin, "template") == 1
    assert "tokenization failed" in caplog.text and "budget" in caplog.text
    assert await produce(plugin, chat()) is None
    assert failures(plugin, "template") == 2


async def test_a_template_that_never_ends_on_a_long_chat_frees_its_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: the worker thread rendered for ~40 minutes (two such requests took the whole pool)."""
    monkeypatch.setattr(token_mod, "WORKER_RENDER_BUDGET", 0.2, raising=False)
    plugin = hf_producer(model_dir(tmp_path, jinja=FOREVER), threadThresholdChars=64)
    t0 = time.perf_counter()
    assert await asyncio.wait_for(produce(plugin, chat(20)), 5) is None
    assert time.perf_counter() - t0 < 1.5
    assert failures(plugin, "template") == 1


@pytest.mark.parametrize(
    "source",
    [
        "{{ 'x' * 10**8 }}",
        "{{ 10**8 * 'x' }}",
        "{{ [0] * 10**7 }}",
        "{{ 'x' | center(10**8) }}",
        "{{ 'x'.ljust(10**8) }}",
        "{{ lipsum(10**5) }}",
        "{% for i in range(100000) %}{{ messages }}{% endfor %}",
        "{{ 7 ** 10000000 }}",
    ],
)
def test_a_template_that_blows_up_is_refused_in_bounded_time(source: str) -> None:
    """Before: rendered to 100 MB (or computed a 10-million-digit number) per request. `*` and `**` are refused
    before they allocate; a call's or filter's huge result is refused by the output bound."""
    t = JinjaTemplate(source, special_tokens={}, origin="t")
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="chat template"):
        t.render(chat())
    assert time.perf_counter() - t0 < 1


@pytest.mark.parametrize("source", ["{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "{{ 1 / 0 }}", "{{ x.y.z }}"])
def test_template_errors_are_value_errors(source: str) -> None:
    """Before: recursion and arithmetic errors escaped as RecursionError / ZeroDivisionError."""
    with pytest.raises(ValueError, match="chat template"):
        JinjaTemplate(source, special_tokens={}, origin="t").render(chat())


def test_ordinary_templates_are_unaffected() -> None:
    t = JinjaTemplate(
        "{% for m in messages %}{{ m.role * 2 }}{{ '-' * 3 }}{{ m.content | center(10) }}{% endfor %}"
        "{{ 2 ** 10 }}{{ range(3) | list }}",
        special_tokens={},
        origin="t",
    )
    assert t.render(chat(2)) == ("useruser---    hi    " * 2) + "1024[0, 1, 2]"


# -- the worker pool ---------------------------------------------------------------------------------------
async def test_a_saturated_worker_pool_sheds_instead_of_queueing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: the executor's queue was unbounded: under a burst of long prompts every request queued
    behind the others (each past the producer's budget, each then still encoded)."""
    monkeypatch.setattr(hf, "MAX_QUEUED", 1, raising=False)
    release = asyncio.Event()
    loop = asyncio.get_running_loop()

    def blocker() -> None:
        asyncio.run_coroutine_threadsafe(release.wait(), loop).result(5)

    running = [asyncio.ensure_future(hf.in_worker(blocker)) for _ in range(2 + 1)]  # 2 workers + 1 queued
    await asyncio.sleep(0)
    with pytest.raises(hf.WorkersBusy):
        await hf.in_worker(lambda: None)
    release.set()
    await asyncio.gather(*running)
    assert await hf.in_worker(lambda: 5) == 5


# -- the vllm backend ----------------------------------------------------------------------------------
async def test_an_oversized_render_reply_is_a_bounded_miss(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: the reply was read whole, whatever its size (a broken or hostile sidecar: unbounded memory)."""
    monkeypatch.setattr(token_mod, "MAX_REPLY_BYTES", 4096, raising=False)

    async def render(_: web.Request) -> web.Response:
        return web.json_response({"token_ids": list(range(10_000))})

    async with serving(render, route=("POST", "/v1/completions/render")) as url:
        plugin = registry.build("token-producer", "tok", {"modelName": "m", "vllm": {"url": url}})
        assert isinstance(plugin, TokenProducer)
        metrics = type("M", (), {"registry": CollectorRegistry()})()
        plugin.setup(PluginContext({}, None, None, metrics))
        plugin._test_registry = metrics.registry  # type: ignore[attr-defined]
        try:
            assert await produce(plugin, parsed("/v1/completions", {"model": "m", "prompt": "hi"})) is None
            assert failures(plugin, "reply") == 1
        finally:
            await plugin.aclose()


def test_the_bounds_scale_with_a_huge_prompt() -> None:
    """A 6 MB message concatenated and passed to a macro, as ChatML-style templates do: not a bound's miss."""
    t = JinjaTemplate(
        "{% macro m(c) %}{{ c | length }}{% endmacro %}"
        "{% for x in messages %}{{ m('<|im_start|>' + x.content + '<|im_end|>') }}{% endfor %}",
        special_tokens={},
        origin="t",
    )
    big = "x" * 6_000_000
    req = parsed("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": big}]})
    assert t.render(req) == str(len(big) + 22)


# -- the Rust library panicking ----------------------------------------------------------------------------
# pyo3 raises a Rust panic as pyo3_runtime.PanicException, a BaseException (not importable by name).
PanicException = type("PanicException", (BaseException,), {"__module__": "pyo3_runtime"})


@pytest.mark.parametrize("chars", [10, 10_000], ids=["inline", "worker"])
async def test_a_tokenizer_panic_is_a_counted_miss_not_a_failed_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chars: int
) -> None:
    """Before: the panic (a BaseException) passed `except Exception` and ended the request's routing."""
    plugin = hf_producer(TOKENIZER_PATH)

    def panic(*_: object, **__: object) -> bytes:
        raise PanicException("called `Option::unwrap()` on a `None` value")

    monkeypatch.setattr(plugin.tokenizer, "encode", panic)
    monkeypatch.setattr(plugin.tokenizer, "encode_released", panic)
    monkeypatch.setattr(plugin.tokenizer, "encode_many_released", panic)
    req = parsed("/v1/completions", {"model": "m", "prompt": "x" * chars})
    assert await produce(plugin, req) is None
    assert failures(plugin, "encode") == 1


async def test_other_base_exceptions_still_propagate(monkeypatch: pytest.MonkeyPatch) -> None:
    plugin = hf_producer(TOKENIZER_PATH)

    def interrupted(*_: object, **__: object) -> bytes:
        raise KeyboardInterrupt

    monkeypatch.setattr(plugin.tokenizer, "encode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        await produce(plugin, parsed("/v1/completions", {"model": "m", "prompt": "hi"}))
