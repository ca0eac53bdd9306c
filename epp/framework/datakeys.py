"""Per-request data passed from producers to consumers through `request.data`.

Producers write under `scoped(KEY, producer_name)` so two instances of one producer type
(e.g. approximate and precise prefix) can coexist; consumers resolve the producer at setup.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from llmepp.datalayer.endpoint import Endpoint
from llmepp.request.types import InferenceRequest, split_prompts

TOKENIZED_PROMPT = "TokenizedPrompt"
PREFIX_CACHE_MATCH_INFO = "PrefixCacheMatchInfo"
IN_FLIGHT_LOAD = "InFlightLoad"
ENCODER_CACHE_MATCH_INFO = "EncoderCacheMatchInfo"
LATENCY_PREDICTION_INFO = "LatencyPredictionInfo"
# Keys written as they are, not scoped by producer: one tokenization per request (token-producer).
UNSCOPED: frozenset[str] = frozenset({TOKENIZED_PROMPT})


def scoped(key: str, producer_name: str) -> str:
    return f"{key}/{producer_name}"


@dataclass(frozen=True, slots=True)
class TokenizedPrompt:
    """Prompt tokens as raw little-endian uint32 bytes (4 bytes per token).

    The estimate backend's "tokens" are the prompt's UTF-8 bytes themselves, zero-padded to a
    multiple of 4, so `token_bytes` is the padded prompt and hashing needs no conversion.
    """

    token_bytes: bytes
    backend: str = "estimate"
    # A batch of prompts (InferenceRequest.prompt_ends): where each prompt ends in `token_bytes` (byte
    # offsets, multiples of 4); () for one prompt.
    ends: tuple[int, ...] = ()

    @property
    def count(self) -> int:
        return len(self.token_bytes) // 4

    def prompts(self) -> list[bytes]:
        """Each prompt's tokens (the engine caches a batch's prompts each on its own); [token_bytes] for one."""
        return split_prompts(self.token_bytes, self.ends)

    @classmethod
    def joined(cls, prompts: list[bytes], backend: str) -> TokenizedPrompt:
        """Several prompts' tokens (LE uint32 bytes each) as one TokenizedPrompt; one prompt has no ends."""
        if len(prompts) == 1:
            return cls(prompts[0], backend)
        return cls(b"".join(prompts), backend, tuple(itertools.accumulate(map(len, prompts))))


def prompt_tokens(request: InferenceRequest) -> int:
    """The prompt's tokens: the token producer's count, else the estimate backend's (4 prompt bytes a token)."""
    tokens: TokenizedPrompt | None = request.data.get(TOKENIZED_PROMPT)
    return tokens.count if tokens is not None else request.estimated_prompt_tokens


@dataclass(slots=True)
class PrefixMatchInfo:
    """Per-endpoint prefix hits: `hits[endpoint]` consecutive blocks from the prompt start, the score the
    prefix scorer reads (the precise producer weighs each block by the tier holding it: cpu 0.8)."""

    block_size: int  # tokens per block
    total_blocks: int
    hits: dict[Endpoint, int]
    # The block hashes of this prompt, kept so PreRequest can index them without rehashing. A batch's
    # prompts: each prompt's chain in turn, `chain_ends` says where each ends.
    hashes: list[int]
    # No endpoint holds the prompt's first block: the candidate that last held it, when the producer
    # knows (the precise producer, from the pods' removal events); None otherwise.
    last_holder: Endpoint | None = None
    # The blocks themselves, unweighted, when they differ from `hits` (tiers); None: `hits` counts them.
    cached: dict[Endpoint, int] | None = None
    chain_ends: tuple[int, ...] = ()  # a batch: the end of each prompt's chain in `hashes`; () for one prompt

    def chains(self) -> list[list[int]]:
        """The block hashes of each prompt: [hashes] for a single prompt."""
        if not self.chain_ends:
            return [self.hashes]
        starts = (0, *self.chain_ends[:-1])
        return [self.hashes[a:b] for a, b in zip(starts, self.chain_ends, strict=True) if b > a]

    def cached_blocks(self, endpoint: Endpoint) -> int:
        """Consecutive prompt blocks `endpoint` holds, in any tier: what it need not compute (reference
        `CachedBlockCount`), where `hits` is the tier-weighted score."""
        return (self.hits if self.cached is None else self.cached).get(endpoint, 0)


@dataclass(slots=True)
class EncoderCacheMatchInfo:
    """Per-endpoint encoder-cache hits: `matched[endpoint]` of the request's `total` media items
    are believed embedded (cached) there."""

    total: int
    matched: dict[Endpoint, int]


@dataclass(frozen=True, slots=True)
class LatencyPredictionInfo:
    """One endpoint's predicted latency for this request (`predicted-latency-producer`).

    `ttft_ms` / `tpot_ms` are the predictor's p90 TTFT / TPOT; headroom = SLO − predicted (ms; negative
    when the prediction misses the SLO, and for an absent SLO, which counts as 0); `ttft_valid` /
    `tpot_valid` are headroom > 0; `dispatched_requests` counts the requests this EPP has sent the
    endpoint and not seen finish (the scorer's and admitter's "idle").
    """

    ttft_ms: float
    tpot_ms: float
    ttft_headroom: float
    tpot_headroom: float
    ttft_valid: bool
    tpot_valid: bool
    dispatched_requests: int = 0

    @property
    def valid(self) -> bool:
        return self.ttft_valid and self.tpot_valid
