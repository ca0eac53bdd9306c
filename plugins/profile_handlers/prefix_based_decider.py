"""`prefix-based-pd-decider`: disaggregate when the decode pod would have to prefill many tokens."""

from __future__ import annotations

import logging

from llmepp.datalayer.endpoint import Endpoint
from llmepp.framework.datakeys import (
    PREFIX_CACHE_MATCH_INFO,
    TOKENIZED_PROMPT,
    PrefixMatchInfo,
    prompt_tokens,
)
from llmepp.framework.plugin import PluginContext, PluginParams
from llmepp.framework.scheduling import Decider
from llmepp.observability.logging import LogLimiter
from llmepp.request.types import InferenceRequest

log = logging.getLogger(__name__)


class PrefixBasedPDDecider(Decider):
    """Runs the prefill stage only when the chosen decode pod lacks enough of the prompt.

    Why: a remote prefill costs a KV transfer and a second hop, which pays off only when the
    decode pod would otherwise compute many uncached tokens; a short prompt or one the decode
    pod already caches is cheaper to prefill in place.

    Decision rule (reference `prefix_based_pd_decider.go`), with `in` = prompt tokens (the
    TokenizedPrompt count; without one, prompt bytes / 4):

        if nonCachedTokens == 0                       → no  (disaggregation disabled)
        if promptTokens > 0 and in < promptTokens     → no
        if in < nonCachedTokens                       → no
        hit = PrefixMatchInfo.cached_blocks(decode pod) × block size   (tokens it caches, any tier)
        disaggregate  iff  in − hit ≥ nonCachedTokens

    No decode endpoint, or no prefix match info for the request → no (logged as an error: the
    prefix producer should always have run for a prompt).

    Parameters: `nonCachedTokens` (0 = never disaggregate), `promptTokens` (0 = no prompt-length
    gate), `prefixMatchInfoProducerName` (which PrefixCacheMatchInfo producer to read; default the
    only one, `approx-prefix-cache-producer` auto-created when none is configured).
    """

    type = "prefix-based-pd-decider"
    consumes = frozenset({TOKENIZED_PROMPT, PREFIX_CACHE_MATCH_INFO})

    class Params(PluginParams):
        non_cached_tokens: int = 0
        prompt_tokens: int = 0
        prefix_match_info_producer_name: str = ""

        def __post_init__(self) -> None:
            if self.non_cached_tokens < 0:
                raise ValueError("nonCachedTokens must be >= 0")
            if self.prompt_tokens < 0:
                raise ValueError("promptTokens must be >= 0")

    def __init__(self, name: str, params: Params) -> None:
        super().__init__(name, params)
        self.non_cached_tokens = params.non_cached_tokens
        self._missing_log = LogLimiter(log, 30.0)
        self.prompt_tokens = params.prompt_tokens
        self.data_key = ""
        if self.non_cached_tokens == 0:
            log.info("%s: nonCachedTokens is 0, P/D disaggregation is disabled", name)

    def setup(self, ctx: PluginContext) -> None:
        self.data_key = ctx.producer_key(
            self, PREFIX_CACHE_MATCH_INFO, self.params.prefix_match_info_producer_name, "prefixMatchInfoProducerName"
        )

    def disaggregate(self, request: InferenceRequest, endpoint: Endpoint | None) -> bool:
        threshold = self.non_cached_tokens
        if threshold == 0:
            return False
        if endpoint is None:
            self._missing_log.error("no-decode", "%s: no decode endpoint to compare against", self.name)
            return False
        n = prompt_tokens(request)
        if (self.prompt_tokens and n < self.prompt_tokens) or n < threshold:
            return False
        info: PrefixMatchInfo | None = request.data.get(self.data_key)
        if info is None:
            # Every request, while e.g. a tokenizer backend fails: rate-limited.
            self._missing_log.error(
                "no-match", "%s: no prefix cache match info for the request; not disaggregating", self.name
            )
            return False
        hit = info.cached_blocks(endpoint) * info.block_size
        return n - hit >= threshold
