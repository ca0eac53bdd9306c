"""`no-hit-lru-scorer`: spread cold (no prefix hit anywhere) requests least-recently-used first."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from itertools import count

from llmepp.datalayer.endpoint import Endpoint
from llmepp.framework.datakeys import IN_FLIGHT_LOAD, PREFIX_CACHE_MATCH_INFO, PrefixMatchInfo, prompt_tokens
from llmepp.framework.plugin import Plugin, PluginContext, PluginParams, reference_default
from llmepp.framework.requestcontrol import PreRequest
from llmepp.framework.scheduling import SchedulingResult, Scorer
from llmepp.plugins.producers.inflight_load import token_counts
from llmepp.request.types import InferenceRequest

log = logging.getLogger(__name__)


class NoHitLRUScorer(Scorer, PreRequest):
    """For cold requests — no candidate has a prefix-cache hit — ranks endpoints by when they
    last received a cold request; warm requests get a neutral 0.5 everywhere.

        cold:  score(e) = max(0, 1 − rank(e) / (N − 1)),  N = candidates (1 candidate → 1.0)
               never-used endpoints: rank = their order among the never-used candidates
               used endpoints:       rank = #never-used candidates + position in the LRU
                                     (0 = least recently used, over the whole LRU as the reference)
        cold, and the producer names the candidate that last held the prompt's first block
        (`PrefixMatchInfo.last_holder`, the precise producer) and `preferLastHolder`, and the last
        holder keeps up: backlog(last holder) − min over candidates backlog(e) ≤ lastHolderBacklogLimit · P
               score(last holder) = 1,  score(other e) = 0.5 · the cold score above
               backlog(e) = uncached prompt tokens this EPP has in flight to e without a first token yet
               (InFlightLoad tokens), P = the prompt's tokens (its indexed blocks · block size)
        cold, and `spreadByBacklog` (this build; off by default, on in the built-in default profile):
               each cold score above, except the last holder's, × P / (P + max(0, backlog(e) − min backlog − P)),
               P = the prompt's tokens here (a candidate more than one prompt of prefill behind the least-loaded
               one is discounted by how far behind it is, in prompts: 2 prompts behind → × 1/2)
        warm:  score(e) = 0.5

    PreRequest (cold requests only) moves the primary profile's target, and the prefill
    profile's target if a remote prefill runs, to the most-recent end of the LRU (bounded by `lruSize`).

    Why: a cold request creates new KV blocks wherever it lands; sending successive cold
    requests to different endpoints spreads cache growth instead of evicting one endpoint's
    warm prefixes, while the prefix scorer keeps deciding warm requests. A prefix the pods report
    evicted goes back to the endpoint that held it (this build; the reference spreads it like a new
    one): that endpoint made room for it, while another would push out its own warm prefixes to
    take it — with the pool's working set near its KV capacity, a cascade of misses (measured in
    benchmarks/README.md, precise prefix). Unless the home is far behind (a restarted pod gets all its
    prefixes back at once): queueing many prompts behind one pod's prefill costs more than the misses
    spreading them causes. The limit is high because each spread prefix evicts warm ones elsewhere; with
    2 prompts the eviction benchmark lost about a point of hit rate to approximate routing, with 8 it
    gains one (benchmarks/DES.md, eviction). The backlog gate uses the router's own
    in-flight counters, which see a prefill queue the moment it forms; scraped queues show it only once
    the pod's KV is full. spreadByBacklog: rotation balances how many cold requests each endpoint gets,
    not their prefill work; with prompts of varied length near saturation, one endpoint's queue of long
    prompts grows while the rotation keeps sending it its share (no-sharing workload at 7.5 QPS: TTFT p90
    4-15% lower in simulated time, benchmarks/README.md). Backlog gaps up to one prompt are ignored, so
    light load and equal prompts keep the plain rotation that spreads cache growth evenly.

    Parameters: `lruSize` (1024, > 0), `preferLastHolder` (true), `lastHolderBacklogLimit` (8.0 prompts;
    < 0 = no limit), `spreadByBacklog` (false), `inFlightLoadProducerName` (the inflight-load-producer to
    read, default the only one, auto-created), `prefixMatchInfoProducerName` (which
    PrefixCacheMatchInfo producer decides "cold"; default: the only one, approx producer
    auto-created). When that is empty, `prefixPluginName` (a PrefixCacheMatchInfo producer or
    a prefix-cache-scorer) or else the only plugin of type `prefixPluginType`
    (prefix-cache-scorer) selects the producer, so the LRU agrees with the prefix scorer of
    the profile (the reference accepts these two but no longer reads them).
    """

    type = "no-hit-lru-scorer"
    consumes = frozenset({PREFIX_CACHE_MATCH_INFO, IN_FLIGHT_LOAD})

    class Params(PluginParams):
        lru_size: int = 1024
        prefer_last_holder: bool = True
        last_holder_backlog_limit: float = 8.0
        spread_by_backlog: bool = False
        in_flight_load_producer_name: str = ""
        prefix_match_info_producer_name: str = ""
        prefix_plugin_type: str = "prefix-cache-scorer"
        prefix_plugin_name: str = ""

        def __post_init__(self) -> None:
            if self.lru_size <= 0:
                self.lru_size = reference_default("no-hit-lru-scorer", "lruSize", self.lru_size, 1024, "not > 0")

    def __init__(self, name: str, params: Params) -> None:
        super().__init__(name, params)
        self.lru_size = params.lru_size
        self.prefer_last_holder = params.prefer_last_holder
        self.backlog_limit = params.last_holder_backlog_limit
        self.by_backlog = params.spread_by_backlog
        self.inflight_key = ""
        # Oldest first. Keyed by the Endpoint object (hashable by identity): a removed and
        # re-added endpoint starts as never used. A removed endpoint leaves it (DatastoreListener):
        # left in, dead pods would fill the LRU and push every live one's rank past N − 1 (score 0).
        self.lru: OrderedDict[Endpoint, None] = OrderedDict()
        self.key = ""
        self._cold_key = f"{self.name}/cold"

    def setup(self, ctx: PluginContext) -> None:
        self.key, self.inflight_key = self.wiring(ctx)
        if ctx.datastore is not None:
            ctx.datastore.add_listener(self)

    def wiring(self, ctx: PluginContext) -> tuple[str, str]:
        """The data keys read: the prefix one may follow another plugin (prefixPluginName / Type)."""
        prefix = ctx.producer_key(
            self, PREFIX_CACHE_MATCH_INFO, self._producer_name(ctx), "prefixMatchInfoProducerName"
        )
        inflight = ctx.producer_key(
            self, IN_FLIGHT_LOAD, self.params.in_flight_load_producer_name, "inFlightLoadProducerName"
        )
        return prefix, inflight

    # -- DatastoreListener ---------------------------------------------------------------
    def endpoint_added(self, endpoint: Endpoint) -> None:
        pass

    def endpoint_removed(self, endpoint: Endpoint) -> None:
        self.lru.pop(endpoint, None)

    def _producer_name(self, ctx: PluginContext) -> str:
        """prefixMatchInfoProducerName, else the producer behind prefixPluginName, else the one
        behind the only plugin of type prefixPluginType, else "" (the only producer)."""
        p = self.params
        if p.prefix_match_info_producer_name:
            return str(p.prefix_match_info_producer_name)
        if p.prefix_plugin_name:
            named = ctx.plugin(p.prefix_plugin_name, Plugin, referrer=self, field="prefixPluginName")
        else:
            of_type = [q for q in ctx.plugins_of(Plugin) if q.type == p.prefix_plugin_type]
            if len(of_type) != 1:
                return ""
            named = of_type[0]
        if PREFIX_CACHE_MATCH_INFO in named.produces:
            return named.name
        # A prefix scorer: follow it to the producer it reads.
        producer = getattr(named.params, "prefix_match_info_producer_name", None)
        if producer is None:
            log.warning("plugin %s: prefix plugin %r reads no prefix match info; ignored", self.name, named.name)
            return ""
        return str(producer)

    def score(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        n = len(endpoints)
        info: PrefixMatchInfo | None = request.data.get(self.key)
        # Warm: some candidate matched at least one block (an endpoint listed with 0 blocks is no hit). The hits
        # are few, the candidates up to the pool: the set is of the hits, the candidates are scanned in C.
        matched = {ep for ep, blocks in info.hits.items() if blocks > 0} if info is not None else None
        cold = not matched or matched.isdisjoint(endpoints)
        # Read back in PreRequest: only cold requests move the LRU.
        request.data[self._cold_key] = cold
        if not cold:
            return [0.5] * n
        if n <= 1:
            return [1.0] * n
        scores = self._cold_scores(endpoints)
        at = self._last_holder_at(info, endpoints)
        limit = None  # the last holder's backlog gate, in tokens
        if at >= 0 and info is not None and self.backlog_limit >= 0:
            limit = self.backlog_limit * info.total_blocks * info.block_size
        if self.by_backlog or limit is not None:
            backlog = token_counts(request, self.inflight_key, endpoints)  # one read serves both
            if self.by_backlog:
                scores = _spread_by_backlog(scores, backlog, max(1, prompt_tokens(request)))
            if limit is not None and backlog[at] - min(backlog) > limit:
                return scores  # the last holder is too far behind: spread it like a new prefix
        if at < 0:
            return scores
        return [1.0 if i == at else 0.5 * s for i, s in enumerate(scores)]

    def _last_holder_at(self, info: PrefixMatchInfo | None, endpoints: Sequence[Endpoint]) -> int:
        """The candidate index of the endpoint that last held the prompt's first block, or -1 (none, not a
        candidate, or `preferLastHolder` off)."""
        home = info.last_holder if info is not None and self.prefer_last_holder else None
        if home is None:
            return -1
        try:
            return endpoints.index(home)  # by identity (Endpoint has no __eq__): one scan
        except ValueError:
            return -1

    def _cold_scores(self, endpoints: Sequence[Endpoint]) -> list[float]:
        n = len(endpoints)
        pos = {ep: i for i, ep in enumerate(self.lru)} if self.lru else {}
        inv = 1.0 / (n - 1)
        if not pos:
            return [1.0 - i * inv for i in range(n)]
        get = pos.get
        positions = [get(ep) for ep in endpoints]
        never = positions.count(None)
        if not never:
            return [s if (s := 1.0 - p * inv) > 0.0 else 0.0 for p in positions]  # type: ignore[operator]
        rank = count().__next__  # never-used endpoints rank first, in candidate order
        return [
            1.0 - rank() * inv if p is None else s if (s := 1.0 - (never + p) * inv) > 0.0 else 0.0 for p in positions
        ]

    def pre_request(self, request: InferenceRequest, result: SchedulingResult) -> None:
        if not request.data.pop(self._cold_key, False):
            return
        for ep in result.kv_targets():
            self._touch(ep)

    def _touch(self, ep: Endpoint) -> None:
        if ep.removed:  # removed while this request was scheduled: its removal was notified already
            return
        lru = self.lru
        if ep in lru:
            lru.move_to_end(ep)
            return
        lru[ep] = None
        if len(lru) > self.lru_size:
            lru.popitem(last=False)


def _spread_by_backlog(scores: list[float], backlog: list[int], p: int) -> list[float]:
    """Each score × P / (P + excess), excess = backlog − (least backlog + P): a candidate more than one
    prompt of prefill behind the least-loaded one is discounted by how far behind it is, in prompts."""
    floor = min(backlog) + p  # within one prompt of the least backlog: rotation decides alone
    if max(backlog) <= floor:
        return scores
    return [s if b <= floor else s * p / (p + b - floor) for s, b in zip(scores, backlog, strict=True)]
