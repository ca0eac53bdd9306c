"""`p2p-source-producer`: names a peer the computing pod can pull the prompt's cached prefix from."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from llmepp.datalayer.endpoint import Endpoint
from llmepp.framework.datakeys import PREFIX_CACHE_MATCH_INFO, PrefixMatchInfo, scoped
from llmepp.framework.plugin import PluginContext, PluginParams
from llmepp.framework.requestcontrol import DataProducer, PreRequest
from llmepp.framework.scheduling import SchedulingResult
from llmepp.request import parsers
from llmepp.request.types import InferenceRequest

# Header the decode-side sidecar reads to pull KV blocks over the P2P connector instead of
# recomputing them (reference pkg/common/routing/common.go).
KV_CACHE_SOURCE_HEADER = parsers.H_KV_CACHE_SOURCE
# request.data key (scoped by plugin name) of the source sampled in produce, read in pre_request.
P2P_SOURCE = "P2PSource"


@dataclass(frozen=True, slots=True)
class Source:
    """The sampled peer and the prompt tokens it holds."""

    endpoint: Endpoint
    cached_tokens: int


class P2PSourceProducer(DataProducer, PreRequest):
    """Sets `x-kv-cache-source-host-port: <ip:port>` to a peer holding more of the prompt's prefix
    than the pod that will compute it, so that pod's sidecar pulls those blocks over the P2P
    connector instead of recomputing them.

    Why: load-aware routing often places a request away from the pod that caches its prefix (that
    pod is busy, or the working set exceeds one pod's cache); a pull is cheaper than a long prefill.

    Rule, with PrefixCacheMatchInfo hits h(e) (blocks of B tokens), cached(e) = h(e)·B:
      produce (before scheduling), over the request's candidates with cached(e) > 0:
        best = max cached(e);  band = {e : cached(e) + B ≥ best}   (within one block of the best)
        source = one of band, drawn with P(e) ∝ 1 / (1 + waiting queue(e))
      pre_request, computing pod c = the first target of profile `prefillProfileName` when that
      profile ran and picked one, else the primary target:
        set the header iff source ≠ c and cached(source) − cached(c) ≥ minCachedTokenDelta
    The band and the weights spread pulls of a widely cached prefix over its holders, favouring short
    queues, instead of herding them onto one source (a peer one block short costs one block of
    recompute). Nothing is set when no candidate caches a block; a client-sent value of the header
    is overwritten with an empty value then (the sidecar treats empty as absent), so a client
    cannot steer the pull. With the precise producer, h(e) is its tier-weighted block count.

    Parameters: `minCachedTokenDelta` (1, ≥ 1), `prefillProfileName` ("prefill"; empty: the
    default), `prefixMatchInfoProducerName` (which PrefixCacheMatchInfo producer to read; default
    the only one, `approx-prefix-cache-producer` auto-created when none is configured).
    """

    type = "p2p-source-producer"
    consumes = frozenset({PREFIX_CACHE_MATCH_INFO})

    class Params(PluginParams):
        min_cached_token_delta: int = 1
        prefill_profile_name: str = "prefill"
        prefix_match_info_producer_name: str = ""

        def __post_init__(self) -> None:
            if self.min_cached_token_delta < 1:
                raise ValueError(f"minCachedTokenDelta must be >= 1, got {self.min_cached_token_delta}")

    def __init__(self, name: str, params: Params) -> None:
        super().__init__(name, params)
        self.min_delta = params.min_cached_token_delta
        self.prefill_profile = params.prefill_profile_name or "prefill"  # the reference's default for ""
        self.key = scoped(P2P_SOURCE, self.name)
        self.data_key = ""
        self._rng = random.Random()

    def setup(self, ctx: PluginContext) -> None:
        self.data_key = ctx.producer_key(
            self, PREFIX_CACHE_MATCH_INFO, self.params.prefix_match_info_producer_name, "prefixMatchInfoProducerName"
        )

    # -- DataProducer ----------------------------------------------------------------------
    def produce(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> None:
        info: PrefixMatchInfo | None = request.data.get(self.data_key)
        if info is None or not info.hits:
            return
        # Only candidates: the match may name endpoints the subset hint or a screener excluded.
        held = [(ep, h) for ep in endpoints if (h := info.cached_blocks(ep)) > 0]
        if not held:
            return
        best = max(h for _, h in held)
        band = [(ep, h) for ep, h in held if h >= best - 1]  # in blocks: cached + B ≥ best·B
        if len(band) == 1:
            ep, h = band[0]
        else:
            weights = [1.0 / (1 + ep.metrics.waiting_queue_size) for ep, _ in band]
            ep, h = self._rng.choices(band, weights)[0]
        request.data[self.key] = Source(ep, h * info.block_size)

    # -- PreRequest ------------------------------------------------------------------------
    def pre_request(self, request: InferenceRequest, result: SchedulingResult) -> None:
        source: Source | None = request.data.get(self.key)
        computing = self._computing(result)
        if source is not None and computing is not None and source.endpoint is not computing:
            info: PrefixMatchInfo = request.data[self.data_key]
            if source.cached_tokens - info.cached_blocks(computing) * info.block_size >= self.min_delta:
                request.upstream_headers[KV_CACHE_SOURCE_HEADER] = source.endpoint.hostport
                return
        if KV_CACHE_SOURCE_HEADER in request.headers:
            # Overwrite (Envoy's ext_proc replaces the value) rather than pass the client's on.
            request.upstream_headers[KV_CACHE_SOURCE_HEADER] = ""

    def _computing(self, result: SchedulingResult) -> Endpoint | None:
        """The pod that computes the prompt: the remote prefill's pick, else the primary pick."""
        prefill = result.profiles.get(self.prefill_profile)
        if prefill is not None and prefill.targets:
            return prefill.targets[0]
        targets = result.targets
        return targets[0] if targets else None
