"""Inputs of the chat template and of truncation that vLLM takes from places besides the obvious field.

vLLM (renderers/params.py merge_kwargs, chat_completion/protocol.py build_chat_params, engine/serving.py
_preprocess_chat): a request's `documents` field wins over `chat_template_kwargs["documents"]` unless it is
None; `chat_template_kwargs["tools"]` wins over the `tools` field (which is only a default). transformers loads
`additional_chat_templates/<name>.jinja` beside `chat_template.jinja` as named templates; a request with tools
uses `tool_use`. A token-id prompt is truncated to its last `truncate_prompt_tokens` ids by every backend.
"""

from __future__ import annotations

import asyncio
import json
import struct
from pathlib import Path
from typing import Any

from llmepp.framework.datakeys import TOKENIZED_PROMPT, TokenizedPrompt
from llmepp.framework.plugin import registry
from llmepp.plugins.producers.token import VllmTokenProducer
from llmepp.request.parsers import parse_request
from llmepp.request.types import InferenceRequest
from llmepp.tokenization.chat import JinjaTemplate, load_chat_template

USER = {"role": "user", "content": "hi"}


def chat(**body: Any) -> InferenceRequest:
    return parse_request({":path": "/v1/chat/completions"}, json.dumps({"model": "m", **body}).encode(), request_id="r")


def jinja(source: str) -> JinjaTemplate:
    return JinjaTemplate(source, special_tokens={}, origin="test")


# -- 1. chat_template_kwargs.documents / .tools --------------------------------------------------------------
# vLLM (current): ChatCompletionRequest.build_chat_params =
#     merge_kwargs(self.chat_template_kwargs, dict(add_generation_prompt=..., continue_final_message=...,
#                                               documents=self.documents, reasoning_effort=...))
# where merge_kwargs drops override values that are None: without a top-level `documents`, the request's
# chat_template_kwargs["documents"] is what the template gets. `tools`: _preprocess_chat puts the top-level
# tools in the *defaults* (`with_defaults(dict(tools=tool_dicts, ...))`), which the request's kwargs override,
# and safe_apply_chat_template hands `tools` to transformers. (Older vLLM, `_chat_template_kwargs.update(
# chat_template_kwargs)`, did the same for both keys.)


def test_documents_given_in_chat_template_kwargs_reach_the_template_as_vllm_passes_them() -> None:
    t = jinja(
        "{% for d in documents or [] %}<doc {{ d.title }}>{{ d.text }}</doc>{% endfor %}{{ messages[0].content }}"
    )
    docs = [{"title": "a", "text": "alpha"}, {"title": "b", "text": "beta"}]
    req = chat(messages=[USER], chat_template_kwargs={"documents": docs})
    assert t.render(req) == "<doc a>alpha</doc><doc b>beta</doc>hi"


def test_tools_given_in_chat_template_kwargs_reach_the_template_as_vllm_passes_them() -> None:
    t = jinja(
        "{% if tools %}{% for x in tools %}[{{ x.function.name }}]{% endfor %}{% endif %}{{ messages[0].content }}"
    )
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    req = chat(messages=[USER], chat_template_kwargs={"tools": tools})
    assert t.render(req) == "[get_weather]hi"


# -- 2. additional_chat_templates/ ---------------------------------------------------------------------------
# transformers (>= 4.52) saves a tokenizer's named templates as chat_template.jinja (default) plus
# additional_chat_templates/<name>.jinja, and loads them back as {"default": ..., "<name>": ...}; vLLM's
# tokenizer.get_chat_template(None, tools=...) then picks "tool_use" for a request with tools (Command-R / A,
# Hermes-style models ship a tool_use template).


def _model_folder(tmp_path: Path) -> Path:
    (tmp_path / "chat_template.jinja").write_text("DEFAULT:{{ messages[0].content }}")
    extra = tmp_path / "additional_chat_templates"
    extra.mkdir()
    (extra / "tool_use.jinja").write_text(
        "TOOLS:{% for x in tools %}{{ x.function.name }};{% endfor %}{{ messages[0].content }}"
    )
    return tmp_path / "tokenizer.json"


def test_auto_uses_the_tool_use_template_of_additional_chat_templates_for_requests_with_tools(tmp_path: Path) -> None:
    t = load_chat_template("auto", str(_model_folder(tmp_path)))
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert t.render(chat(messages=[USER])) == "DEFAULT:hi"
    assert t.render(chat(messages=[USER], tools=tools)) == "TOOLS:f;hi"


# -- 3. the vllm backend and truncate_prompt_tokens of a token-id prompt -------------------------------------
# vLLM truncates a prompt given as token ids too (TokenizeParams._token_truncation: tokens[-N:]); the hf
# backend does so (test_truncation_vs_vllm.py); the vllm backend short-cuts token-id prompts, so it
# must cut them itself: it does not send token-id prompts to the render endpoint.


def test_the_vllm_backend_truncates_a_token_id_prompt_as_vllm_does() -> None:
    plugin = registry.build("token-producer", "t", {"modelName": "m", "vllm": {"url": "http://127.0.0.1:9"}})
    assert isinstance(plugin, VllmTokenProducer)
    ids = list(range(100, 164))
    req = parse_request(
        {":path": "/v1/completions"},
        json.dumps({"model": "m", "prompt": ids, "truncate_prompt_tokens": 16}).encode(),
        request_id="r",
    )

    async def run() -> TokenizedPrompt:
        await plugin.produce(req, [])
        await plugin.aclose()
        return req.data[TOKENIZED_PROMPT]

    tokens = asyncio.run(run())
    assert list(struct.unpack(f"<{tokens.count}I", tokens.token_bytes)) == ids[-16:]
