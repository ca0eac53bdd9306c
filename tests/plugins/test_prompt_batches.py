"""A batch of prompts (`/v1/completions` with `prompt: [..]`, embeddings `input: [..]`):
the engine computes and caches each prompt as a request of its own, and the reference hashes "each prompt in a
batch independently" (prefixhash GetBlockHashesWithPromptTokens; estimate backend: each string packed and padded
on its own). So the parser keeps where each prompt ends, the token producer keeps it in TokenizedPrompt, and
the prefix producers hash, match and index each prompt's chain on its own, adding up the matches."""

from __future__ import annotations

import json
import struct
from typing import Any

from helpers import endpoint
from hypothesis import given
from hypothesis import strategies as st

from llmepp.framework.datakeys import PREFIX_CACHE_MATCH_INFO, TOKENIZED_PROMPT, TokenizedPrompt, scoped
from llmepp.framework.plugin import PluginContext, registry
from llmepp.framework.scheduling import ProfileResult, SchedulingResult
from llmepp.plugins.producers.prefix_index import block_hashes, prefix_seed
from llmepp.plugins.producers.token import estimate_tokens
from llmepp.request.parsers import parse_request
from llmepp.request.types import InferenceRequest

A, B = "a" * 700, "b" * 700  # 175 pseudo-tokens each: 3 blocks of 64 per prompt (the last partial)


def make(type_: str, name: str = "", params: dict[str, Any] | None = None) -> Any:
    plugin = registry.build(type_, name or type_, params)
    plugin.setup(PluginContext({plugin.name: plugin}, None, None, None))
    return plugin


def parsed(body: dict[str, Any], path: str = "/v1/completions") -> InferenceRequest:
    return parse_request({":path": path}, json.dumps(body).encode(), request_id="r")


def routed_to(ep: Any) -> SchedulingResult:
    return SchedulingResult("default", {"default": ProfileResult([ep])})


def packed(ids: list[int]) -> bytes:
    return struct.pack(f"<{len(ids)}I", *ids)


# -- the parser keeps each prompt's end ----------------------------------------------------------------
def test_the_parser_keeps_where_each_prompt_of_a_batch_ends() -> None:
    texts = parsed({"model": "m", "prompt": ["ab", "cde", "f"]})
    assert texts.prompt == b"abcdef" and texts.prompt_ends == (2, 5, 6)
    assert texts.prompts() == [b"ab", b"cde", b"f"]
    ids = parsed({"model": "m", "prompt": [[1, 2], [3]]})
    assert ids.prompt_is_token_ids and ids.prompt_ends == (8, 12) and ids.prompts() == [packed([1, 2]), packed([3])]
    embeddings = parsed({"model": "m", "input": ["x", "yz"]}, "/v1/embeddings")
    assert embeddings.prompts() == [b"x", b"yz"]
    # A single prompt, and a batch of one, are one prompt.
    for prompt in ("abc", ["abc"], [1, 2, 3], [[1, 2, 3]]):
        req = parsed({"model": "m", "prompt": prompt})
        assert req.prompt_ends == () and req.prompts() == [req.prompt]


@given(st.lists(st.text(min_size=1, max_size=40), min_size=1, max_size=6))
def test_a_text_batch_splits_back_into_its_prompts(prompts: list[str]) -> None:
    req = parsed({"model": "m", "prompt": prompts})
    assert req.prompts() == [p.encode() for p in prompts]


# -- the estimate backend pads each prompt on its own ----------------------------------------------------
def test_the_estimate_backend_packs_each_prompt_of_a_batch_on_its_own() -> None:
    req = parsed({"model": "m", "prompt": ["abcde", "fg"]})
    make("token-producer").produce(req, [])
    tokens: TokenizedPrompt = req.data[TOKENIZED_PROMPT]
    # The reference's estimateMultiStringCompletions: "abcde" → 2 tokens (padded), "fg" → 1.
    assert tokens.token_bytes == b"abcde\0\0\0fg\0\0" and tokens.ends == (8, 12) and tokens.count == 3
    assert tokens.prompts() == [estimate_tokens(b"abcde"), estimate_tokens(b"fg")]


# -- approx-prefix-cache-producer ------------------------------------------------------------------------
def _approx_run(approx: Any, tokens: Any, body: dict[str, Any], eps: list[Any], routed: Any = None) -> Any:
    req = parsed(body)
    tokens.produce(req, eps)
    approx.produce(req, eps)
    if routed is not None:
        approx.pre_request(req, routed_to(routed))
    return req.data[scoped(PREFIX_CACHE_MATCH_INFO, approx.name)]


def test_approx_prefix_hashes_each_prompt_of_a_batch_independently() -> None:
    """After the batch [A, B] went to pod-0, a request for B alone finds B's blocks there (the batch's
    second sample, an RL rollout's next turn). Hashed as one joined prompt, B's blocks were never indexed
    (A's trailing partial block merged with B's head) and B matched nothing."""
    tokens, approx = make("token-producer"), make("approx-prefix-cache-producer", "approx")
    pod0, pod1 = endpoint(0), endpoint(1)
    batch = _approx_run(approx, tokens, {"model": "m", "prompt": [A, B]}, [pod0, pod1], routed=pod0)
    seed = prefix_seed("m", "")
    chain_a, chain_b = (block_hashes(estimate_tokens(p.encode()), 64, seed) for p in (A, B))
    assert batch.total_blocks == 6 and batch.hashes == chain_a + chain_b and batch.chains() == [chain_a, chain_b]

    single = _approx_run(approx, tokens, {"model": "m", "prompt": B}, [pod0, pod1])
    assert single.total_blocks == 3 and single.hits == {pod0: 3}
    # The same batch again: every prompt's match adds up.
    again = _approx_run(approx, tokens, {"model": "m", "prompt": [A, B]}, [pod0, pod1])
    assert again.hits == {pod0: 6}
    # A batch whose second prompt is cached elsewhere: each endpoint's matches add up.
    _approx_run(approx, tokens, {"model": "m", "prompt": "c" * 700}, [pod0, pod1], routed=pod1)
    mixed = _approx_run(approx, tokens, {"model": "m", "prompt": [A, "c" * 700]}, [pod0, pod1])
    assert mixed.total_blocks == 6 and mixed.hits == {pod0: 3, pod1: 3}


def test_a_single_prompt_hashes_as_before() -> None:
    tokens, approx = make("token-producer"), make("approx-prefix-cache-producer", "approx")
    info = _approx_run(approx, tokens, {"model": "m", "prompt": A + B}, [endpoint(0)])
    joined = block_hashes(estimate_tokens((A + B).encode()), 64, prefix_seed("m", ""))
    assert info.chain_ends == () and info.hashes == joined and info.chains() == [joined]


# -- burst-prefix-cache-producer --------------------------------------------------------------------------
async def test_burst_prefix_hashes_each_prompt_of_a_batch_as_the_approx_producer_does() -> None:
    tokens = make("token-producer")
    burst = make("burst-prefix-cache-producer", "burst", {"windowDurationMs": 1, "blockSizeTokens": 64})
    req = parsed({"model": "m", "prompt": [A, B]})
    tokens.produce(req, [endpoint(0)])
    await burst.produce(req, [endpoint(0)])
    info = req.data[scoped(PREFIX_CACHE_MATCH_INFO, "burst")]
    seed = prefix_seed("m", "")
    assert info.chains() == [block_hashes(estimate_tokens(p.encode()), 64, seed) for p in (A, B)]
