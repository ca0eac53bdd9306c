"""Jinja chat templates (the model's own, as vLLM renders them) and the built-in ones."""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer
from tokenizers.processors import TemplateProcessing

from llmepp.framework.datakeys import TOKENIZED_PROMPT, TokenizedPrompt
from llmepp.framework.plugin import ConfigError, registry
from llmepp.plugins.producers.token import TokenProducer
from llmepp.request.parsers import parse_request
from llmepp.request.types import InferenceRequest
from llmepp.tokenization.chat import BuiltinTemplate, JinjaTemplate, load_chat_template
from llmepp_sim.tokenizer import TOKENIZER_PATH, SimTokenizer, jinja_renderer

TEMPLATES = Path(__file__).parent / "templates"
CHATML = TEMPLATES / "chatml" / "tokenizer_config.json"
LLAMA = TEMPLATES / "llama" / "chat_template.jinja"
SIM = SimTokenizer()


def chat(body: dict[str, Any]) -> InferenceRequest:
    return parse_request({":path": "/v1/chat/completions"}, json.dumps({"model": "m", **body}).encode(), request_id="r")


def render(template: Any, **body: Any) -> str:
    return str(template.render(chat(body)))


def jinja(source: str, **special: str) -> JinjaTemplate:
    return JinjaTemplate(source, special_tokens=special, origin="test")


USER = {"role": "user", "content": "Hi <b>there</b>"}


def test_chatml_from_tokenizer_config() -> None:
    t = load_chat_template(str(CHATML), str(TOKENIZER_PATH))
    assert render(t, messages=[USER]) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi <b>there</b><|im_end|>\n<|im_start|>assistant\n"
    )
    assert render(t, messages=[USER], add_generation_prompt=False).endswith("there</b><|im_end|>\n")
    # chat_template_kwargs reach the template (Qwen3's switch); reserved names cannot be overridden.
    assert render(t, messages=[USER], chat_template_kwargs={"enable_thinking": False, "messages": []}).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )


def test_tools_and_tool_calls_are_rendered_as_vllm_hands_them_over() -> None:
    t = load_chat_template(str(CHATML), str(TOKENIZER_PATH))
    call = {"id": "c1", "type": "function", "function": {"name": "get", "arguments": '{"city": "Zürich"}'}}
    text = render(
        t,
        messages=[USER, {"role": "assistant", "content": None, "tool_calls": [call]},
                  {"role": "tool", "tool_call_id": "c1", "content": "12C"}],
        tools=[{"type": "function", "function": {"name": "get"}}],
    )  # fmt: skip
    # The tool as the model dump of vLLM's request type (absent fields null); tojson without HTML escaping.
    assert '<tools>\n{"type": "function", "function": {"name": "get", "description": null, "parameters": null}}' in text
    # Arguments parsed from their JSON string, non-ASCII kept.
    assert '<tool_call>\n{"name": "get", "arguments": {"city": "Zürich"}}\n</tool_call><|im_end|>' in text
    assert "<tool_response>\n12C\n</tool_response>" in text


def test_auto_prefers_chat_template_jinja_and_reads_added_token_records() -> None:
    t = load_chat_template("auto", str(LLAMA.parent / "tokenizer.json"))
    assert isinstance(t, JinjaTemplate) and t.name == str(LLAMA)
    text = render(
        t,
        messages=[{"role": "system", "content": " Be brief. "}, {"role": "user", "content": [
            {"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "x"}},
            {"type": "text", "text": "b"}]}],
        chat_template_kwargs={"date_string": "21 Nov 2026"},
    )  # fmt: skip
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nToday Date: 21 Nov 2026\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\na\nb<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_auto_without_a_template_falls_back_to_role_tags_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        t = load_chat_template("auto", str(TOKENIZER_PATH))
    assert isinstance(t, BuiltinTemplate) and t.name == "role-tags"
    assert "no chat template next to" in caplog.text
    assert render(t, messages=[USER]) == "<|user|>\nHi <b>there</b>\n<|assistant|>\n"


def test_a_template_looping_over_content_gets_parts() -> None:
    t = jinja("{% for m in messages %}[{% for p in m.content %}{{ p.type }}:{{ p.text }};{% endfor %}]{% endfor %}")
    assert t.content_as_parts()
    assert render(t, messages=[{"role": "user", "content": "x"}, {"role": "user", "content": None}]) == "[text:x;][]"
    assert not jinja("{% for m in messages %}{{ m.content }}{% endfor %}").content_as_parts()


@pytest.mark.parametrize(
    ("source", "parts"),
    [
        # Filters, tests and slices around the loop's iterable are seen through.
        ("{% for m in messages %}{% for p in m['content'] | list %}{% endfor %}{% endfor %}", True),
        ("{% for m in messages %}{% for p in m.content[1:] %}{% endfor %}{% endfor %}", True),
        ("{% for m in messages | reverse %}{% for p in m.content %}{% endfor %}{% endfor %}", True),
        ("{% for m in messages[1:] %}{% for p in m.content %}{% endfor %}{% endfor %}", True),
        # messages assigned to another variable (transitively) is still messages.
        ("{% set a = messages %}{% set b = a %}{% for m in b %}{% for p in m.content %}{% endfor %}{% endfor %}", True),
        # A variable assigned from content is not followed (vLLM: string format, parts joined with "\n") ...
        ("{% for m in messages %}{% set c = m['content'] %}{% for p in c %}{% endfor %}{% endfor %}", False),
        # ... nor is content of something that is no message loop variable.
        ("{% for p in messages[0].content %}{% endfor %}", False),
        ("{% for m in tools %}{% for p in m.content %}{% endfor %}{% endfor %}", False),
    ],
)
def test_content_format_is_detected_as_vllm_detects_it(source: str, parts: bool) -> None:
    """vLLM's _detect_content_format: a `for` over the `content` of a variable looping over `messages`. Before,
    a variable assigned from content counted, and sliced content or a non-message's content did not / did."""
    assert jinja(source).content_as_parts() is parts


def test_plain_string_content_parts_render_as_text_parts() -> None:
    # vLLM reads a plain string content part as a text part (joined by "\n", or wrapped as {type: text}).
    typed = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    for t in (load_chat_template(str(CHATML), str(TOKENIZER_PATH)), jinja("{% for m in messages %}"
              "[{% for p in m.content %}{{ p.type }}:{{ p.text }};{% endfor %}]{% endfor %}")):  # fmt: skip
        plain = render(t, messages=[{"role": "user", "content": ["a", "b"]}])
        assert plain == render(t, messages=[{"role": "user", "content": typed}])
        assert "a\nb" in plain or "text:a;text:b;" in plain


def test_a_text_part_without_text_is_skipped_as_vllm_skips_it() -> None:
    # vLLM (chat_utils.PART_TYPES_TO_SKIP_NONE_CONTENT) serves the request without the part; the render
    # raised TypeError, so the request was routed without prefix data.
    t = load_chat_template(str(CHATML), str(TOKENIZER_PATH))
    parts = [{"type": "text", "text": None}, {"type": "text", "text": "x"}]
    r = chat({"messages": [{"role": "user", "content": parts}]})
    assert t.render(r) == render(t, messages=[{"role": "user", "content": "x"}])
    assert r.messages == [("user", "x")]


def test_input_text_output_text_refusal_and_thinking_parts_render_as_text_parts() -> None:
    # vLLM's chat_utils reads them as text (a refusal's text is its `refusal`, a thinking part's its
    # `thinking`): joined by "\n", or each as {type: text} when the template loops over the parts.
    parts = [{"type": "input_text", "text": "a"}, {"type": "refusal", "refusal": "no"},
             {"type": "output_text", "text": "b"}, {"type": "thinking", "thinking": "hm"},
             {"type": "refusal", "refusal": None}]  # fmt: skip
    typed = [{"type": "text", "text": t} for t in ("a", "no", "b", "hm")]
    for t in (load_chat_template(str(CHATML), str(TOKENIZER_PATH)), jinja("{% for m in messages %}"
              "[{% for p in m.content %}{{ p.type }}:{{ p.text }};{% endfor %}]{% endfor %}")):  # fmt: skip
        text = render(t, messages=[{"role": "assistant", "content": parts}])
        assert text == render(t, messages=[{"role": "assistant", "content": typed}])
        assert "a\nno\nb\nhm" in text or "text:a;text:no;text:b;text:hm;" in text


def test_embeddings_of_chat_messages_render_as_vllm_renders_them() -> None:
    # vLLM's EmbeddingChatRequest: the chat template over the messages, without tools or documents, and
    # without the generation prompt unless asked for (add_generation_prompt defaults to false there).
    t = load_chat_template(str(CHATML), str(TOKENIZER_PATH))
    msgs = [USER, {"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]}]
    tools = [{"type": "function", "function": {"name": "get"}}]

    def embed(**body: Any) -> str:
        raw = json.dumps({"model": "m", "messages": msgs, **body}).encode()
        return str(t.render(parse_request({":path": "/v1/embeddings"}, raw, request_id="r")))

    assert embed(tools=tools) == render(t, messages=msgs, add_generation_prompt=False)
    assert embed(tools=tools).endswith("no<|im_end|>\n")
    kwargs = {"add_generation_prompt": True, "chat_template_kwargs": {"enable_thinking": False}}
    assert embed(**kwargs) == render(t, messages=msgs, **kwargs)
    assert embed(continue_final_message=True) == render(t, messages=msgs, add_generation_prompt=False,
                                                        continue_final_message=True)  # fmt: skip


def test_continue_final_message_cuts_after_it() -> None:
    t = load_chat_template(str(CHATML), str(TOKENIZER_PATH))
    msgs = [USER, {"role": "assistant", "content": "The answer is"}]
    text = render(t, messages=msgs, add_generation_prompt=False, continue_final_message=True)
    assert text.endswith("<|im_start|>assistant\nThe answer is")
    with pytest.raises(ValueError, match="cannot both be true"):
        render(t, messages=msgs, continue_final_message=True)


def test_named_templates_pick_tool_use_for_requests_with_tools() -> None:
    t = JinjaTemplate({"default": "D{{ messages | length }}", "tool_use": "T{{ tools | length }}"}, special_tokens={},
                      origin="test")  # fmt: skip
    assert render(t, messages=[USER]) == "D1"
    assert render(t, messages=[USER], tools=[{"type": "function", "function": {"name": "f"}}]) == "T1"
    with pytest.raises(ValueError, match="no template named 'default'"):
        JinjaTemplate({"tool_use": "x"}, special_tokens={}, origin="test")


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}, "system message must"),
        ({"messages": [{"role": "user", "content": 5}]}, "content must be a string"),
    ],
)
def test_a_failing_request_raises_value_error(body: dict[str, Any], error: str) -> None:
    t = load_chat_template(str(CHATML), str(TOKENIZER_PATH))
    req = chat({"messages": [USER]})
    req.body = json.dumps({"model": "m", **body}).encode()  # past the parser's own checks
    with pytest.raises(ValueError, match=error):
        t.render(req)


def test_bad_template_sources_are_start_up_errors(tmp_path: Path) -> None:
    bad = tmp_path / "t.jinja"
    bad.write_text("{% for m in messages %}")
    with pytest.raises(ValueError, match=r"t.jinja: chat template 'default', line 1"):
        load_chat_template(str(bad), str(TOKENIZER_PATH))
    empty = tmp_path / "tokenizer_config.json"
    empty.write_text("{}")
    with pytest.raises(ValueError, match="has no chat_template"):
        load_chat_template(str(empty), str(TOKENIZER_PATH))
    with pytest.raises(ConfigError, match=r"tokenizer.chatTemplate: .*/nope.jinja. is neither a built-in"):
        params = {"backend": "hf", "path": str(TOKENIZER_PATH), "chatTemplate": str(tmp_path / "nope.jinja")}
        registry.build("token-producer", "t", {"tokenizer": params})


async def test_hf_producer_adds_special_tokens_to_completions_only(tmp_path: Path) -> None:
    """As vLLM: a completion gets the tokenizer's BOS (addSpecialTokens), a chat does not (its template
    writes the special tokens itself)."""
    tok = Tokenizer.from_file(str(TOKENIZER_PATH))
    bos = "<|endoftext|>"
    tok.post_processor = TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    params = {"backend": "hf", "path": str(path), "chatTemplate": str(CHATML), "addSpecialTokens": True}
    plugin = registry.build("token-producer", "t", {"tokenizer": params})
    assert isinstance(plugin, TokenProducer)

    async def token_ids(req: InferenceRequest) -> list[int]:
        await plugin.produce(req, [])
        tokens: TokenizedPrompt = req.data[TOKENIZED_PROMPT]
        return list(struct.unpack(f"<{tokens.count}I", tokens.token_bytes))

    req = chat({"messages": [USER]})
    expected = load_chat_template(str(CHATML), str(TOKENIZER_PATH)).render(req)
    assert await token_ids(req) == SIM.encode(expected)
    completion = parse_request({":path": "/v1/completions"}, b'{"model": "m", "prompt": "hello"}', request_id="r")
    assert await token_ids(completion) == [tok.token_to_id(bos), *SIM.encode("hello")]


async def test_hf_producer_follows_vllms_tokenization_defaults_and_the_requests_own_fields(tmp_path: Path) -> None:
    """vLLM encodes a completion with special tokens unless told not to (CompletionRequest.add_special_tokens
    defaults to True), a chat without them (False), and either request may set `add_special_tokens`;
    `truncate_prompt_tokens: N` keeps the last N tokens. The producer's defaults are vLLM's."""
    tok = Tokenizer.from_file(str(TOKENIZER_PATH))
    bos = "<|endoftext|>"
    tok.post_processor = TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    bos_id = tok.token_to_id(bos)

    def producer(**extra: object) -> TokenProducer:
        plugin = registry.build(
            "token-producer",
            "t",
            {"tokenizer": {"backend": "hf", "path": str(path), "chatTemplate": str(CHATML), **extra}},
        )
        assert isinstance(plugin, TokenProducer)
        return plugin

    async def token_ids(plugin: TokenProducer, path_: str, body: dict[str, object]) -> list[int]:
        req = parse_request({":path": path_}, json.dumps({"model": "m", **body}).encode(), request_id="r")
        await plugin.produce(req, [])
        tokens: TokenizedPrompt = req.data[TOKENIZED_PROMPT]
        return list(struct.unpack(f"<{tokens.count}I", tokens.token_bytes))

    default, off = producer(), producer(addSpecialTokens=False)
    hello = SIM.encode("hello there")
    assert await token_ids(default, "/v1/completions", {"prompt": "hello there"}) == [bos_id, *hello]
    assert await token_ids(off, "/v1/completions", {"prompt": "hello there"}) == hello
    # The request's own field wins over the config, both ways, read as vLLM's pydantic model reads it ("yes": true).
    assert await token_ids(default, "/v1/completions", {"prompt": "hello there", "add_special_tokens": False}) == hello
    assert await token_ids(off, "/v1/completions", {"prompt": "hello there", "add_special_tokens": True}) == [
        bos_id,
        *hello,
    ]
    assert await token_ids(off, "/v1/completions", {"prompt": "hello there", "add_special_tokens": "yes"}) == [
        bos_id,
        *hello,
    ]
    assert await token_ids(off, "/v1/completions", {"prompt": "hello there", "add_special_tokens": "maybe"}) == hello
    chat_body: dict[str, object] = {"messages": [USER]}
    rendered = SIM.encode(load_chat_template(str(CHATML), str(TOKENIZER_PATH)).render(chat(chat_body)))
    assert await token_ids(default, "/v1/chat/completions", chat_body) == rendered
    assert await token_ids(default, "/v1/chat/completions", {**chat_body, "add_special_tokens": True}) == [
        bos_id,
        *rendered,
    ]
    # Left truncation as transformers truncates for vLLM: room kept for the BOS it adds, so N = 1 is the BOS;
    # a chat (no special tokens) keeps its last N tokens; 0 / -1: none; true and "2" read as pydantic reads them.
    assert await token_ids(default, "/v1/completions", {"prompt": "hello there", "truncate_prompt_tokens": 1}) == [
        bos_id
    ]
    assert await token_ids(off, "/v1/completions", {"prompt": "hello there", "truncate_prompt_tokens": 1}) == hello[-1:]
    assert await token_ids(default, "/v1/chat/completions", {**chat_body, "truncate_prompt_tokens": 3}) == rendered[-3:]
    assert await token_ids(default, "/v1/completions", {"prompt": "hello there", "truncate_prompt_tokens": True}) == [
        bos_id
    ]
    assert await token_ids(default, "/v1/completions", {"prompt": "hello there", "truncate_prompt_tokens": "2"}) == [
        bos_id,
        *hello[-1:],
    ]
    for n in (0, -1, "x"):
        body: dict[str, object] = {"prompt": "hello there", "truncate_prompt_tokens": n}
        assert await token_ids(default, "/v1/completions", body) == [bos_id, *hello]


text = st.text(st.characters(codec="utf-8", exclude_characters="\r"), max_size=80)
# Every kind of text part vLLM joins (plain strings; text / input_text / output_text / refusal / thinking, their
# text null or empty included: skipped) and a media part (no text).
part = st.one_of(
    text,
    st.sampled_from([("text", "text"), ("input_text", "text"), ("output_text", "text"), ("refusal", "refusal"),
                     ("thinking", "thinking")]).flatmap(
        lambda kind: st.fixed_dictionaries({"type": st.just(kind[0]), kind[1]: st.none() | text})),
    st.just({"type": "image_url", "image_url": {"url": "http://x/i.png"}}),
)  # fmt: skip
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "tool"]), "content": st.one_of(text, st.lists(part, max_size=3))}
)


@settings(max_examples=80, deadline=None)
@given(system=st.none() | text, messages=st.lists(message, min_size=1, max_size=4), think=st.none() | st.booleans())
def test_the_epp_and_the_simulator_render_the_same_prompt(
    system: str | None, messages: list[dict[str, Any]], think: bool | None
) -> None:
    """Two independent renderers of the same model template (the EPP's, the simulator's stand-in for vLLM)
    must agree, or precise routing of chat requests would never find a cached block."""
    msgs = ([{"role": "system", "content": system}] if system is not None else []) + messages
    body: dict[str, Any] = {"messages": msgs}
    if think is not None:
        body["chat_template_kwargs"] = {"enable_thinking": think}
    epp = render(load_chat_template(str(CHATML), str(TOKENIZER_PATH)), **body)
    assert epp == jinja_renderer(str(CHATML))(body)


def test_auto_prefers_a_processors_template_for_requests_without_tools(tmp_path: Path) -> None:
    """vLLM's resolve_chat_template: the AutoProcessor's template (a multimodal model's chat_template.json)
    before the tokenizer's, unless the request has tools. Before, `auto` never read chat_template.json."""
    (tmp_path / "tokenizer.json").write_bytes(Path(TOKENIZER_PATH).read_bytes())
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "P:{{ messages[0].content }}"}))
    t = load_chat_template("auto", str(tmp_path / "tokenizer.json"))
    user = [{"role": "user", "content": "hi"}]
    assert render(t, messages=user) == "P:hi"
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert render(t, messages=user, tools=tools) == "P:hi"  # no tokenizer template: the processor's still
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "T:{{ messages[0].content }}"}))
    t = load_chat_template("auto", str(tmp_path / "tokenizer.json"))
    assert render(t, messages=user) == "P:hi" and render(t, messages=user, tools=tools) == "T:hi"
    named = [{"name": "default", "template": "D"}, {"name": "tool_use", "template": "U"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    t = load_chat_template("auto", str(tmp_path / "tokenizer.json"))
    assert render(t, messages=user) == "P:hi" and render(t, messages=user, tools=tools) == "U"
    (tmp_path / "chat_template.jinja").write_text("J")  # the newer layout's one file wins, as before
    assert render(load_chat_template("auto", str(tmp_path / "tokenizer.json")), messages=user) == "J"


def test_special_tokens_map_json_gives_the_templates_special_tokens(tmp_path: Path) -> None:
    """transformers reads special_tokens_map.json after tokenizer_config.json and lets it override: a model
    whose config names no bos_token still renders the map's (it rendered none)."""
    (tmp_path / "tokenizer.json").write_bytes(Path(TOKENIZER_PATH).read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": "{{ bos_token }}|{{ eos_token }}|{{ messages[0].content }}", "eos_token": "A"})
    )
    (tmp_path / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": {"content": "<s>", "lstrip": False}, "eos_token": "</s>"})
    )
    t = load_chat_template("auto", str(tmp_path / "tokenizer.json"))
    assert render(t, messages=[{"role": "user", "content": "hi"}]) == "<s>|</s>|hi"
