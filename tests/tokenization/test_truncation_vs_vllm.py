"""`truncate_prompt_tokens` as vLLM applies it (vllm/renderers/params.py, TokenizeParams):

* a text prompt is encoded with `truncation=True, max_length=N, add_special_tokens=...` by the HF tokenizer,
  whose truncation side vLLM sets to "left" for generate models (vllm/tokenizers/registry.py). The Rust
  tokenizer reserves room for the special tokens it adds, so a completion with BOS becomes
  [BOS] + the last N-1 text tokens, not the last N tokens of [BOS, text...].
* a prompt given as token ids goes through `_token_truncation`: `tokens[-N:]`.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer
from tokenizers.processors import TemplateProcessing

from llmepp.framework.datakeys import TOKENIZED_PROMPT, TokenizedPrompt
from llmepp.framework.plugin import registry
from llmepp.plugins.producers.token import TokenProducer
from llmepp.request.parsers import parse_request
from llmepp_sim.tokenizer import TOKENIZER_PATH

BOS = "<|endoftext|>"


def bos_tokenizer(tmp_path: Path) -> tuple[Path, Tokenizer]:
    """The simulator's tokenizer with a Llama-style post-processor (BOS before every encoded text)."""
    tok = Tokenizer.from_file(str(TOKENIZER_PATH))
    tok.post_processor = TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, tok.token_to_id(BOS))])
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path, tok


def producer(path: Path) -> TokenProducer:
    plugin = registry.build("token-producer", "t", {"tokenizer": {"backend": "hf", "path": str(path)}})
    assert isinstance(plugin, TokenProducer)
    return plugin


async def token_ids(plugin: TokenProducer, body: dict[str, Any]) -> list[int]:
    req = parse_request({":path": "/v1/completions"}, json.dumps({"model": "m", **body}).encode(), request_id="r")
    await plugin.produce(req, [])
    tokens: TokenizedPrompt = req.data[TOKENIZED_PROMPT]
    return list(struct.unpack(f"<{tokens.count}I", tokens.token_bytes))


def vllm_encode(tok: Tokenizer, text: str, max_length: int) -> list[int]:
    """What transformers' `tokenizer.encode(text, truncation=True, max_length=N)` computes for vLLM (a fast
    tokenizer: it enables the Rust truncation with the tokenizer's truncation side, left for vLLM)."""
    t = Tokenizer.from_str(tok.to_str())
    t.enable_truncation(max_length=max_length, direction="left")
    return list(t.encode(text, add_special_tokens=True).ids)


async def test_a_truncated_completion_keeps_its_bos_as_vllm_does(tmp_path: Path) -> None:
    path, tok = bos_tokenizer(tmp_path)
    text = "the quick brown fox jumps over the lazy dog " * 20
    n = 40
    expected = vllm_encode(tok, text, n)
    assert expected[0] == tok.token_to_id(BOS) and len(expected) == n  # BOS kept, N tokens in all
    assert await token_ids(producer(path), {"prompt": text, "truncate_prompt_tokens": n}) == expected


async def test_a_token_id_prompt_is_truncated_as_vllm_truncates_it(tmp_path: Path) -> None:
    path, _ = bos_tokenizer(tmp_path)
    ids = list(range(100, 164))  # 64 token ids
    assert await token_ids(producer(path), {"prompt": ids, "truncate_prompt_tokens": 16}) == ids[-16:]
