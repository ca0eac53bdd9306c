"""A prompt too long to tokenize within the director's producer budget (400 ms) is given up on by the
director, but its encode keeps running in the tokenization worker until it ends: a request body may be up to
16 MiB (max_body_bytes), seconds of encoding. Two such requests hold both workers, and every other prompt
that needs a worker (over threadThresholdChars, 4,096 characters: most real prompts) meanwhile gets no
TokenizedPrompt, i.e. is routed without prefix data, although encoding it takes a few milliseconds.

Prompts of hf.LONG_CHARS or more therefore have a lane of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random

import pytest

from llmepp.director import PRODUCER_TIMEOUT
from llmepp.framework.datakeys import TOKENIZED_PROMPT
from llmepp.framework.plugin import registry
from llmepp.plugins.producers.token import TokenProducer
from llmepp.request.parsers import parse_request
from llmepp.request.types import InferenceRequest
from llmepp_sim.tokenizer import TOKENIZER_PATH

WORDS = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "iota", "kappa", "lambda", "mu", "sigma")


def text(chars: int, seed: int) -> str:
    rnd = random.Random(seed)
    return " ".join(rnd.choice(WORDS) + str(rnd.randint(0, 999)) for _ in range(chars // 10))


def completion(prompt: str) -> InferenceRequest:
    body = json.dumps({"model": "m", "prompt": prompt}).encode()
    return parse_request({":path": "/v1/completions"}, body, request_id="r")


async def produce_as_the_director_does(plugin: TokenProducer, req: InferenceRequest) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(plugin.produce(req, []), PRODUCER_TIMEOUT)


@pytest.mark.filterwarnings("ignore")
async def test_abandoned_huge_prompts_do_not_starve_ordinary_long_prompts() -> None:
    plugin = registry.build("token-producer", "t", {"tokenizer": {"backend": "hf", "path": str(TOKENIZER_PATH)}})
    assert isinstance(plugin, TokenProducer)
    # ~1.6 s each to encode here (3.2 MB of text; the body limit allows 16 MiB): far past the budget.
    huge = [completion(text(3_200_000, seed)) for seed in (1, 2)]
    await asyncio.gather(*(produce_as_the_director_does(plugin, r) for r in huge))
    assert all(TOKENIZED_PROMPT not in r.data for r in huge)  # the director gave up on both
    # An ordinary long prompt right after: ~2 ms of encoding.
    ordinary = completion(text(6_000, 3))
    await produce_as_the_director_does(plugin, ordinary)
    try:
        assert TOKENIZED_PROMPT in ordinary.data, "routed without prefix data: the workers encode abandoned prompts"
    finally:
        await asyncio.sleep(2.5)  # let the abandoned encodes end before other tests use the pool
