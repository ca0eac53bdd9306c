"""`approx-prefix-cache-producer`: guesses each endpoint's prefix cache from past routing."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from llmepp.datalayer.endpoint import Endpoint
from llmepp.framework.datakeys import (
    PREFIX_CACHE_MATCH_INFO,
    TOKENIZED_PROMPT,
    PrefixMatchInfo,
    TokenizedPrompt,
    scoped,
)
from llmepp.framework.plugin import PluginContext, PluginParams, reference_default
from llmepp.framework.requestcontrol import DataProducer, PreRequest
from llmepp.framework.scheduling import SchedulingResult
from llmepp.observability.metrics import EppMetrics
from llmepp.plugins.producers.prefix_index import PrefixIndex, prefix_seed, prompt_hashes
from llmepp.request.types import InferenceRequest

log = logging.getLogger(__name__)

# The reference's floor on the block size (#1158: each (endpoint, block) costs one LRU entry); here the
# default of `minBlockSizeTokens`.
MIN_BLOCK_TOKENS = 64


class ApproxPrefixCacheProducer(DataProducer, PreRequest):
    """Writes PrefixCacheMatchInfo: per endpoint, the consecutive prompt blocks it likely caches.

    Assumes an endpoint caches every block of every prompt routed to it (speculative, updated
    in PreRequest for the primary target and the prefill profile's target of a remote prefill), bounded per
    endpoint by an LRU of `lruCapacityPerServer` blocks (with `autoTune`: the endpoint's
    `vllm:cache_config_info` num_gpu_blocks).

    Parameters (reference defaults): `autoTune` true, `blockSizeTokens` 16 (floor `minBlockSizeTokens`; with
    autoTune the endpoint's reported block size, same floor), `maxPrefixTokensToMatch` 131072,
    `maxPrefixBlocksToMatch` 2048 (used when the token cap is 0), `lruCapacityPerServer` 31250 (≤ 0: the
    default), `blockSize` (deprecated: blockSizeTokens when that is left at 16). Not in the reference:
    `minBlockSizeTokens` 64 (≥ 1), the reference's fixed floor as a parameter, for prompts that are short in
    tokens (in the scaled benchmarks a token stands for 16). As the reference, `blockSizeTokens` ≤ 0 is an
    error only with autoTune off (with it, the endpoint's size or the floor).
    """

    type = "approx-prefix-cache-producer"
    produces = frozenset({PREFIX_CACHE_MATCH_INFO})
    consumes = frozenset({TOKENIZED_PROMPT})

    class Params(PluginParams):
        auto_tune: bool = True
        block_size_tokens: int = 16
        # Deprecated in the reference (a legacy size), still accepted: mapped onto blockSizeTokens when
        # that is left at its default.
        block_size: int = 0
        max_prefix_tokens_to_match: int = 131072
        max_prefix_blocks_to_match: int = 2048
        lru_capacity_per_server: int = 31250
        min_block_size_tokens: int = MIN_BLOCK_TOKENS

        def __post_init__(self) -> None:
            # The reference's factory checks (approximateprefix/plugin.go); its names in the messages.
            if self.block_size > 0:
                log.warning("approx-prefix-cache-producer: blockSize is deprecated; use blockSizeTokens")
                if self.block_size_tokens == 16:
                    self.block_size_tokens = self.block_size
                self.block_size = 0
            if self.block_size_tokens <= 0 and not self.auto_tune:
                raise ValueError("blockSizeTokens must be > 0 when autoTune is false")
            if self.lru_capacity_per_server <= 0:
                self.lru_capacity_per_server = reference_default(
                    "approx-prefix-cache-producer", "lruCapacityPerServer", self.lru_capacity_per_server, 31250,
                    "not > 0",
                )  # fmt: skip
            if self.min_block_size_tokens < 1:
                raise ValueError(f"minBlockSizeTokens must be >= 1, got {self.min_block_size_tokens}")
            if self.max_prefix_tokens_to_match < 0 or self.max_prefix_blocks_to_match < 0:
                raise ValueError("maxPrefixTokensToMatch / maxPrefixBlocksToMatch must be >= 0")

    def __init__(self, name: str, params: Params) -> None:
        super().__init__(name, params)
        self.auto_tune = params.auto_tune
        self.index = PrefixIndex(params.lru_capacity_per_server)
        self.key = scoped(PREFIX_CACHE_MATCH_INFO, self.name)
        self._metrics: EppMetrics | None = None

    def setup(self, ctx: PluginContext) -> None:
        self._metrics = ctx.metrics
        if ctx.datastore is not None:
            ctx.datastore.add_listener(self)

    # -- DatastoreListener ---------------------------------------------------------------
    def endpoint_added(self, endpoint: Endpoint) -> None:
        pass

    def endpoint_removed(self, endpoint: Endpoint) -> None:
        self.index.remove_endpoint(endpoint)

    # -- DataProducer ----------------------------------------------------------------------
    def block_tokens(self, endpoints: Sequence[Endpoint]) -> int:
        size = self.params.block_size_tokens
        if self.auto_tune:
            for ep in endpoints:
                if ep.metrics.cache_block_size:
                    size = ep.metrics.cache_block_size
                    break
        return max(size, self.params.min_block_size_tokens)

    def max_blocks(self, block_tokens: int) -> int:
        p = self.params
        if p.max_prefix_tokens_to_match:
            return max(1, p.max_prefix_tokens_to_match // block_tokens)
        return p.max_prefix_blocks_to_match

    def produce(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> None:
        tokens: TokenizedPrompt | None = request.data.get(TOKENIZED_PROMPT)
        if tokens is None or not tokens.token_bytes:
            return
        bt = self.block_tokens(endpoints)
        seed = prefix_seed(request.target_model or request.model, request.cache_salt)
        hashes, ends = prompt_hashes(tokens, bt, seed, self.max_blocks(bt))
        info = PrefixMatchInfo(block_size=bt, total_blocks=len(hashes), hits={}, hashes=hashes, chain_ends=ends)
        info.hits = hits = self.index.match_chains(info.chains()) if ends else self.index.match(hashes)
        request.data[self.key] = info
        if self._metrics is not None and hashes:
            best = max(hits.values(), default=0)
            self._metrics.prefix_indexer_hit_ratio.observe(best / len(hashes))
            self._metrics.prefix_indexer_hit_bytes.observe(best * bt * 4)

    def _capacity(self, endpoint: Endpoint) -> int:
        """LRU size in our blocks. With autoTune: the endpoint's num_gpu_blocks, unconverted, as the
        reference does. With 16-token engine blocks and our 64-token ones that is 4x the KV capacity
        in tokens, on purpose: the index is affinity memory, not a mirror of the cache. Its coarse
        blocks (and each prompt's trailing partial block, and estimated tokens) overcount a prompt's
        footprint, and forgetting a prefix the pod still holds re-homes it (a duplicate prefill and a
        second copy elsewhere), while remembering one the pod evicted only re-prefills it at home.
        Sizing the index exactly to the KV capacity split prefix groups over pods in the canonical
        shared-prefix benchmark (benchmarks/README.md); the unconverted size kept every group home."""
        m = endpoint.metrics
        if self.auto_tune and m.cache_num_blocks:
            return m.cache_num_blocks
        return 0  # the index default: lruCapacityPerServer

    # -- PreRequest ------------------------------------------------------------------------
    def pre_request(self, request: InferenceRequest, result: SchedulingResult) -> None:
        info: PrefixMatchInfo | None = request.data.get(self.key)
        if info is None:
            return
        targets = result.kv_targets()
        # Index after the routing answer has gone out: it is bookkeeping, not on the critical path.
        try:
            asyncio.get_running_loop().call_soon(self._record, targets, info)
        except RuntimeError:  # no loop (in-process benchmarks, unit tests)
            self._record(targets, info)

    def _record(self, targets: list[Endpoint], info: PrefixMatchInfo) -> None:
        chains = info.chains()
        for ep in targets:
            for chain in chains:
                self.index.add(ep, chain, self._capacity(ep))
        if self._metrics is not None:
            self._metrics.prefix_indexer_size.set(len(self.index))
