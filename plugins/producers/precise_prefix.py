"""`precise-prefix-cache-producer` (+ the deprecated `precise-prefix-cache-scorer`): prefix hits from
what the pods report they hold, via vLLM KV events (reference §5.2)."""

from __future__ import annotations

import asyncio
import builtins
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from llmepp.datalayer.endpoint import Endpoint, split_hostport
from llmepp.framework.datakeys import (
    PREFIX_CACHE_MATCH_INFO,
    TOKENIZED_PROMPT,
    PrefixMatchInfo,
    TokenizedPrompt,
    scoped,
)
from llmepp.framework.plugin import ConfigError, PluginContext, PluginParams
from llmepp.framework.requestcontrol import (
    DataProducer,
    FirstResponseChunkProcessor,
    PreRequest,
    ResponseCompleteProcessor,
)
from llmepp.framework.scheduling import SchedulingResult, Scorer, ScorerCategory
from llmepp.kvevents.chain import ChainStats, SourceChains
from llmepp.kvevents.index import MemoryIndex
from llmepp.kvevents.ingest import IndexStore, MemoryStore, SourceIngest
from llmepp.kvevents.keys import block_keys, root_key, seed_of
from llmepp.kvevents.pool import PoolOptions, SubscriberPool
from llmepp.kvevents.stats import KVEventsCollector, KVEventStats, register
from llmepp.kvevents.subscriber import MAX_MESSAGE_BYTES, SubscriberOptions
from llmepp.kvevents.tiers import DEFAULT_TIERS, TierTable
from llmepp.observability.logging import LogLimiter
from llmepp.observability.metrics import EppMetrics
from llmepp.plugins.datasources.endpoint_notification import EndpointNotificationSource
from llmepp.plugins.scorers.prefix_cache import PrefixCacheScorer
from llmepp.request.types import InferenceRequest, ResponseInfo
from llmepp.units import parse_duration

if TYPE_CHECKING:  # redis is imported only when configured
    from llmepp.kvevents.redis_index import RedisMatch

log = logging.getLogger(__name__)


# -- parameters (llm-d's names: kvcache.Config, kvblock.*, kvevents.Config) --------------------------
class TokenProcessorConfig(PluginParams):
    block_size_tokens: int = 16
    block_size: int | None = None  # older configs' name for blockSizeTokens
    hash_seed: str = ""
    hash_algorithm: str = ""


class InMemoryConfig(PluginParams):
    size: int = 100_000_000
    pod_cache_size: int = 10


class RedisConfig(PluginParams):
    address: str = "redis://127.0.0.1:6379"
    backend_type: str = "redis"
    enable_rdma: bool = msgspec.field(default=False, name="enableRDMA")
    # This build's additions: where keys live, how long entries last, the lookup deadline.
    key_prefix: str = "epp:kv:"
    ttl: str = "1h"
    lookup_timeout: str = "50ms"


class KVBlockIndexConfig(PluginParams):
    in_memory_config: InMemoryConfig | None = None
    cost_aware_memory_config: dict[str, Any] | None = None
    redis_config: RedisConfig | None = None
    enable_metrics: bool = False
    # A Go time.Duration in the reference: integer nanoseconds in JSON/YAML (a duration string accepted too).
    # Not used: the index's counters are on /metrics.
    metrics_logging_interval: int | str = ""


class KVCacheBackendConfig(PluginParams):
    name: str
    weight: float


class IndexerConfig(PluginParams):
    kv_block_index_config: KVBlockIndexConfig | None = None
    kv_cache_backend_configs: list[KVCacheBackendConfig] | None = None
    # The reference's embedded-tokenizer settings: tokenization is token-producer's job here.
    prefix_store_config: dict[str, Any] | None = None
    tokenizers_pool_config: dict[str, Any] | None = None


class PodDiscoveryConfig(PluginParams):
    socket_port: int = 5557
    replay_socket_port: int = 0
    pod_label_selector: str = ""
    pod_namespace: str = ""


class KVEventsConfig(PluginParams):
    zmq_endpoint: str = ""
    topic_filter: str = "kv@"
    concurrency: int = 4
    discover_pods: bool = True
    pod_discovery_config: PodDiscoveryConfig | None = None
    engine_type: str = "vllm"
    tracing: bool = False
    # This build's replay knobs (reference values as defaults).
    replay_timeout: str = "2m"
    replay_idle_timeout: str = "2s"
    replay_cooldown: str = "30s"
    max_concurrent_replays: int = 8
    max_message_bytes: int = MAX_MESSAGE_BYTES


# What PreRequest needs to speculate a routed prompt's keys: its tokens and its root key.
_RoutedPrompt = tuple[TokenizedPrompt, int]


class PrecisePrefixCacheProducer(DataProducer, PreRequest, FirstResponseChunkProcessor, ResponseCompleteProcessor):
    """Writes PrefixCacheMatchInfo from the pods' own KV-cache reports (vLLM KV events).

    What: every discovered endpoint's KV-event publisher (``tcp://<address>:<socketPort + rank>``,
    rank = the endpoint's data-parallel rank, 0 unless a pod serves several) is subscribed to;
    stored / removed / cleared blocks keep an index of which pod holds which prompt block
    (llmepp.kvevents). Per request the prompt's block keys are looked up: per endpoint, the
    longest run of consecutive blocks from the start it holds, weighted by tier.
    Why: the approximate producer guesses from its own routing history; this one knows — including
    evictions, cache resets and traffic other routers (or other EPP replicas) sent.

        keys   = chained xxh64 over `blockSizeTokens`-token blocks of TokenizedPrompt, seeded by the
                 model (LoRA adapter) name and cache_salt (llmepp.kvevents.keys)
        m(e)   = consecutive keys from block 0 that endpoint e holds
        hits(e)= round(Σ_{i < m(e)} w(tier of key i on e)),  w: gpu 1.0, cpu 0.8 (kvCacheBackendConfigs)
        PrefixMatchInfo(block_size = blockSizeTokens, total_blocks = full prompt blocks, hits)
        last_holder = the candidate whose event last removed block 0's key, when no candidate holds it

    `last_holder` lets `no-hit-lru-scorer` send a prefix evicted at its home back there: the pod
    freed room for it, while placing it elsewhere would push out another pod's warm prefixes (with
    a working set at the edge of the pool's KV, a cascade). Both index backends keep it.

    `PrefixMatchInfo.hashes` (our keys) stays empty with the in-memory index: the lookup hashes
    lazily, only up to the first miss; PreRequest fills it when speculating.

    Consumers: `prefix-cache-scorer` with `prefixMatchInfoProducerName: <this plugin's name>`,
    `prefix-based-pd-decider` (same parameter), `inflight-load-producer` (uncached-token discount).

    Needs real token ids: a `token-producer` with the `hf` (or `vllm`) backend. With the default
    estimate backend the keys never equal the events' (a warning is logged once).

    Speculative indexing (`speculativeIndexing`, off): after routing, the request's keys are assumed
    held by the chosen endpoint (and by the prefill profile's pick of a remote prefill) until the
    request's first response bytes (the prefill is done and the pod is storing the blocks; at most
    `speculativeMaxHold`, 5m), then for `speculativeTTL` (2s) more for the pod's events to confirm
    them; unconfirmed entries lapse. So a burst of one new prompt sticks to one pod before its events
    arrive, however long the prefill takes. (The reference counts `speculativeTTL` from routing: under
    load a prefill outlasts it, and the prompt's next request finds no pod holding it and is placed
    as if new; measured in benchmarks/README.md.)

    Parameters (reference names, defaults): `tokenProcessorConfig` {`blockSizeTokens` 16 (`blockSize`
    accepted), `hashSeed` "", `hashAlgorithm` (accepted; keys are always this build's xxh64)},
    `indexerConfig` {`kvBlockIndexConfig` {`inMemoryConfig` {`size` 1e8 keys, `podCacheSize` 10},
    `redisConfig` {`address`, `keyPrefix` epp:kv: (followed by `<blockSizeTokens>.<seed>.<tiers>:`),
    `ttl` 1h, `lookupTimeout` 50ms} (shared index, llmepp.kvevents.redis_index), `enableMetrics`
    (metrics are always exported)},
    `kvCacheBackendConfigs` [{name, weight}] (gpu 1.0, cpu 0.8)}, `kvEventsConfig` {`topicFilter`
    "kv@", `discoverPods` true, `podDiscoveryConfig` {`socketPort` 5557, `replaySocketPort` 0 = no
    replay}, `replayTimeout` 2m, `replayIdleTimeout` 2s, `replayCooldown` 30s,
    `maxConcurrentReplays` 8, `maxMessageBytes` 64 MiB (a larger message is dropped with the connection that
    brought it, which is dialled again; 0 = no limit), `concurrency` (accepted: every source already has its own task),
    `engineType` vllm}, `speculativeIndexing` false, `speculativeTTL` 2s, `speculativeMaxHold` 5m.
    `kvEventsConfig.zmqEndpoint` (e.g. "tcp://*:5557") selects global-socket mode: the EPP binds it and
    the pods' vLLM connects to it (`"endpoint": "tcp://<epp-service>:5557"`, topic
    `kv@<pod IP>@<model>`); the pool's endpoints are then followed whatever `discoverPods` says, to
    match topics to them (llmepp.kvevents.pool). Not supported (ConfigError): `engineType` sglang, `sessionManager`.

    Endpoints are followed through an `endpoint-notification-source` if the config has one (the
    reference's wiring), else straight from the datastore. Subscribers key pods by `ip:port`; a
    pod's data-parallel rank r (its r-th target port) is read on `socketPort` + r, as vLLM offsets it.
    """

    type = "precise-prefix-cache-producer"
    pod_only = "indexes the KV-cache events each model server publishes (kvEventsConfig)"
    produces = frozenset({PREFIX_CACHE_MATCH_INFO})
    consumes = frozenset({TOKENIZED_PROMPT})

    class Params(PluginParams):
        token_processor_config: TokenProcessorConfig | None = None
        indexer_config: IndexerConfig | None = None
        kv_events_config: KVEventsConfig | None = None
        speculative_indexing: bool = False
        speculative_ttl: str = msgspec.field(default="2s", name="speculativeTTL")
        speculative_max_hold: str = "5m"
        session_manager: str = ""

    # Set per class below: the Redis-backed variant, whose produce() awaits a lookup.
    _redis_variant: builtins.type[PrecisePrefixCacheProducer] | None = None

    def __new__(cls, name: str = "", params: Any = None) -> PrecisePrefixCacheProducer:
        target: builtins.type[PrecisePrefixCacheProducer] = cls
        if cls._redis_variant is not None and _redis_config(params) is not None:
            target = cls._redis_variant
        return super().__new__(target)

    def __init__(self, name: str, params: Params | None = None) -> None:
        p = params if params is not None else self.Params()
        super().__init__(name, p)
        tp = p.token_processor_config or TokenProcessorConfig()
        ev = p.kv_events_config or KVEventsConfig()
        disc = ev.pod_discovery_config or PodDiscoveryConfig()
        ix = p.indexer_config or IndexerConfig()
        kb = ix.kv_block_index_config or KVBlockIndexConfig()
        mem = kb.in_memory_config or InMemoryConfig()
        if p.session_manager:
            raise ConfigError("sessionManager: session-manager lookup is not supported by this build")
        if ev.zmq_endpoint and not _zmq_bindable(ev.zmq_endpoint):
            raise ConfigError(
                f"kvEventsConfig.zmqEndpoint: a tcp://<host>:<port> or ipc://<path> endpoint to bind, "
                f"got {ev.zmq_endpoint!r}"
            )
        if ev.max_message_bytes < 0:
            raise ConfigError(f"kvEventsConfig.maxMessageBytes: 0 (no limit) or more, got {ev.max_message_bytes}")
        if ev.engine_type not in ("", "vllm"):
            raise ConfigError(f"kvEventsConfig.engineType: only vllm is supported, got {ev.engine_type!r}")
        self.block_tokens = tp.block_size_tokens if tp.block_size is None else tp.block_size
        if self.block_tokens <= 0:
            raise ValueError("tokenProcessorConfig.blockSizeTokens must be > 0")
        if tp.hash_algorithm not in ("", "xxh64", "cbor-fnv", "fnv64a"):
            raise ValueError(f"tokenProcessorConfig.hashAlgorithm: unknown {tp.hash_algorithm!r}")
        if not 0 < disc.socket_port < 65536 or not 0 <= disc.replay_socket_port < 65536:
            raise ValueError("podDiscoveryConfig: ports must be within 1..65535")
        tiers = [(b.name, b.weight) for b in ix.kv_cache_backend_configs] if ix.kv_cache_backend_configs else None
        self.tiers = TierTable(tiers or DEFAULT_TIERS)
        self.seed = seed_of(tp.hash_seed)
        self.speculative = p.speculative_indexing
        self.speculative_ttl = parse_duration(p.speculative_ttl)
        self.speculative_max_hold = parse_duration(p.speculative_max_hold)
        self.size = mem.size
        self.pod_cache_size = mem.pod_cache_size
        # Global-socket mode follows the pool's endpoints too: topics are matched against them.
        self.discover = ev.discover_pods or bool(ev.zmq_endpoint)
        self.key = scoped(PREFIX_CACHE_MATCH_INFO, self.name)
        self._ctx_key = f"{self.name}/prompt"
        self._held_key = f"{self.name}/held"
        self.stats = KVEventStats()
        # One running total for every source's chain counters: exported as Prometheus counters, they must
        # not drop when a pod leaves the pool or a subscriber starts over with fresh chains.
        self.chain_totals = ChainStats()
        self.pool_options = PoolOptions(
            socket_port=disc.socket_port,
            replay_socket_port=disc.replay_socket_port,
            max_concurrent_replays=ev.max_concurrent_replays,
            bind_endpoint=ev.zmq_endpoint,
            subscriber=SubscriberOptions(
                topic_filter=ev.topic_filter.encode(),
                replay_timeout=parse_duration(ev.replay_timeout),
                replay_idle_timeout=parse_duration(ev.replay_idle_timeout),
                replay_cooldown=parse_duration(ev.replay_cooldown),
                max_message_bytes=ev.max_message_bytes,
            ),
        )
        self.index = MemoryIndex(self.size, self.pod_cache_size, self.tiers)
        self.store: IndexStore = self._make_store()
        self.pool = SubscriberPool(self.pool_options, self.store, self._new_chains, self.stats)
        self._pods: dict[Endpoint, str] = {}
        # The pool's pods (hostport → its endpoints), once endpoints are followed: speculation for a pod
        # that left would bring it back into the index after the pool forgot it, for good.
        self._live: dict[str, int] = {}
        self._following = False
        self._metrics: EppMetrics | None = None
        self._warned_estimate = False
        self._log = LogLimiter(log)
        self._roots: dict[tuple[str, str], int] = {}
        if tp.hash_algorithm not in ("", "xxh64"):
            log.info("%s: hashAlgorithm %s accepted; keys use xxh64 (EPP-internal)", name, tp.hash_algorithm)
        if ix.prefix_store_config is not None or ix.tokenizers_pool_config is not None:
            log.info("%s: indexerConfig tokenizer settings ignored; configure token-producer instead", name)

    def _make_store(self) -> IndexStore:
        return MemoryStore(self.index)

    def _new_chains(self) -> SourceChains:
        return SourceChains(self.block_tokens, self.seed, self.tiers, max_blocks=self.size, stats=self.chain_totals)

    # -- lifecycle -------------------------------------------------------------------------------
    def setup(self, ctx: PluginContext) -> None:
        self._metrics = ctx.metrics
        registry = getattr(ctx.metrics, "registry", None)
        register(registry, KVEventsCollector(self.name, self.stats, lambda: self.chain_totals, self._gauges))
        if not self.discover:
            log.warning("%s: kvEventsConfig.discoverPods is false: no KV events are consumed", self.name)
            return
        sources = ctx.plugins_of(EndpointNotificationSource)
        if sources:
            sources[0].attach(self)
        elif ctx.datastore is not None:
            ctx.datastore.add_listener(self)

    async def aclose(self) -> None:
        await self.pool.aclose()

    def endpoint_added(self, endpoint: Endpoint) -> None:
        self._following = True
        if endpoint not in self._pods:
            pod = self._pods[endpoint] = endpoint.hostport
            self._live[pod] = self._live.get(pod, 0) + 1
        if self.discover:
            self.pool.endpoint_added(endpoint)

    def endpoint_removed(self, endpoint: Endpoint) -> None:
        pod = self._pods.pop(endpoint, None)
        if pod is not None:
            if self._live.get(pod, 1) > 1:
                self._live[pod] -= 1
            else:
                self._live.pop(pod, None)
        self.pool.endpoint_removed(endpoint)

    def in_process_source(self, endpoint: Endpoint) -> SourceIngest:
        """A sink for one endpoint's event batches delivered in-process rather than by a ZeroMQ subscriber
        (the simulated-time benchmark feeds its engines' events through it)."""
        return SourceIngest(self._pod(endpoint), self._new_chains(), self.store, self.stats)

    # -- DataProducer ----------------------------------------------------------------------------
    def _prompt(self, request: InferenceRequest) -> TokenizedPrompt | None:
        tokens: TokenizedPrompt | None = request.data.get(TOKENIZED_PROMPT)
        if tokens is None or not tokens.token_bytes:
            return None
        if tokens.backend == "estimate" and not self._warned_estimate:
            self._warned_estimate = True
            log.warning(
                "%s: TokenizedPrompt comes from the estimate backend; its pseudo-tokens never match the "
                "engines' token ids, so every lookup misses. Configure token-producer with a tokenizer.",
                self.name,
            )
        return tokens

    def _root(self, request: InferenceRequest) -> int:
        rk = (request.target_model or request.model, request.cache_salt)
        root = self._roots.get(rk)
        if root is None:
            if len(self._roots) > 4096:
                self._roots.clear()
            root = self._roots[rk] = root_key(rk[0], rk[1], self.seed)
        return root

    def _pod(self, ep: Endpoint) -> str:
        pod = self._pods.get(ep)
        return pod if pod is not None else ep.hostport

    def produce(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> Any:
        tokens = self._prompt(request)
        if tokens is None:
            return
        root = self._root(request)
        index = self.index
        bits = [index.bit_of(self._pod(ep)) for ep in endpoints]
        cand = 0
        for b in bits:
            cand |= b
        prompts = tokens.prompts()
        m = index.match(prompts[0], self.block_tokens, root, cand)
        for prompt in prompts[1:]:  # a batch: the engine caches each prompt on its own
            m.add(index.match(prompt, self.block_tokens, root, cand))
        hits: dict[Endpoint, int] = {}
        cached: dict[Endpoint, int] = {}
        last: Endpoint | None = None
        if m.weighted:
            for ep, b in zip(endpoints, bits):
                w = m.weighted.get(b)
                if w:
                    hits[ep] = int(w + 0.5)
                    cached[ep] = m.lengths[b]
        elif m.last:
            last = endpoints[bits.index(m.last)]
        self._publish(request, tokens, root, m.total_blocks, hits, [], last, cached)

    def _publish(
        self,
        request: InferenceRequest,
        tokens: TokenizedPrompt,
        root: int,
        total: int,
        hits: dict[Endpoint, int],
        keys: list[int],
        last: Endpoint | None = None,
        cached: dict[Endpoint, int] | None = None,
    ) -> None:
        # `cached` only when a lower tier made the weighted score differ from the block count.
        cached = cached if cached is not None and cached != hits else None
        request.data[self.key] = PrefixMatchInfo(self.block_tokens, total, hits, keys, last, cached)
        if self.speculative:
            request.data[self._ctx_key] = (tokens, root)
        if self._metrics is not None and total:
            best = max(hits.values(), default=0)
            self._metrics.prefix_indexer_hit_ratio.observe(min(1.0, best / total))
            self._metrics.prefix_indexer_hit_bytes.observe(best * self.block_tokens * 4)

    # -- PreRequest: speculative entries for the routed endpoints ---------------------------------
    def pre_request(self, request: InferenceRequest, result: SchedulingResult) -> None:
        if not self.speculative:
            return
        ctx = request.data.get(self._ctx_key)
        info: PrefixMatchInfo | None = request.data.get(self.key)
        if ctx is None or info is None or not info.total_blocks:
            return
        targets = [self._pod(ep) for ep in result.kv_targets()]
        if not targets:
            return
        request.data[self._held_key] = (targets, ctx, info)
        # After the routing answer is on its way: hashing the whole prompt is bookkeeping.
        try:
            asyncio.get_running_loop().call_soon(self._speculate, targets, ctx, info, self.speculative_max_hold)
        except RuntimeError:
            self._speculate(targets, ctx, info, self.speculative_max_hold)

    # -- response: the prefill is over, the events have `speculativeTTL` to confirm -----------------
    def first_response_chunk(self, request: InferenceRequest, response: ResponseInfo) -> None:
        self._release(request)

    def response_complete(self, request: InferenceRequest, response: ResponseInfo, result: SchedulingResult) -> None:
        self._release(request)  # no first bytes (an error, a disconnect): release all the same

    def _release(self, request: InferenceRequest) -> None:
        held: tuple[list[str], _RoutedPrompt, PrefixMatchInfo] | None = request.data.pop(self._held_key, None)
        if held is not None:
            targets, ctx, info = held
            self._speculate(targets, ctx, info, self.speculative_ttl)

    def _all_keys(self, ctx: _RoutedPrompt, info: PrefixMatchInfo) -> list[int]:
        if len(info.hashes) < info.total_blocks:
            info.hashes = _joined(self._chains(ctx[0], ctx[1]))
        return info.hashes

    def _chains(self, tokens: TokenizedPrompt, root: int) -> list[list[int]]:
        """Every full block's key, per prompt (a batch's prompts each from the root; [keys] for one prompt)."""
        return [block_keys(prompt, self.block_tokens, root) for prompt in tokens.prompts()]

    def _speculate(self, targets: list[str], ctx: _RoutedPrompt, info: PrefixMatchInfo, ttl: float) -> None:
        keys = self._all_keys(ctx, info)
        for pod in targets:
            if self._following and pod not in self._live:
                continue  # left the pool since the routing decision
            self.index.speculate(pod, keys, ttl)

    # -- metrics -------------------------------------------------------------------------------
    def _gauges(self) -> dict[str, float]:
        return {
            "index_keys": float(len(self.index)),
            "index_speculative_entries": float(self.index.speculative_entries),
            "subscribers": float(len(self.pool)),
        }


def _joined(chains: list[list[int]]) -> list[int]:
    """A batch's per-prompt keys in one list (PrefixMatchInfo.hashes); one prompt's as they are."""
    return chains[0] if len(chains) == 1 else [k for chain in chains for k in chain]


def _redis_config(params: Any) -> RedisConfig | None:
    ix = getattr(params, "indexer_config", None)
    kb = ix.kv_block_index_config if ix is not None else None
    return kb.redis_config if kb is not None else None


# Lookups a producer leaves waiting on Redis (each holds one of redis-py's 100 pooled connections, which
# ingestion shares): past this many a request skips Redis at once (`lookup_skips`).
MAX_PENDING_LOOKUPS = 64
# Speculative writes left waiting on Redis (one connection each, up to 1 s): past this many a routed request's
# speculation is skipped (`speculation_skips`), so a stall under load never takes the connections ingestion's
# writes need (with MAX_PENDING_LOOKUPS, well under the pool's 100).
MAX_PENDING_SPECULATIONS = 16


_ADDRESS_FIELD = "indexerConfig.kvBlockIndexConfig.redisConfig.address"


class _LookupsPiledUp(Exception):
    pass


class RedisPrecisePrefixCacheProducer(PrecisePrefixCacheProducer):
    """The same producer on the shared Redis index: lookups are one awaited script call."""

    def _make_store(self) -> IndexStore:
        from llmepp.kvevents.redis_index import STORE_READ_TIMEOUT, RedisStore, connect

        cfg = _redis_config(self.params)
        assert cfg is not None
        self.lookup_timeout = parse_duration(cfg.lookup_timeout)
        # Every call has its own deadline (lookupTimeout, speculation 1 s, writes 5 s): the client's read
        # timeout must not fail a write sooner than its deadline.
        self.redis = connect(cfg.address, field=_ADDRESS_FIELD, read_timeout=STORE_READ_TIMEOUT)
        # What is stored (request keys, tier bits, chain state, stream position) depends on the block
        # size, the seed and the tiers: configurations that differ keep apart, replicas of one share.
        scope = f"{self.block_tokens}.{self.seed:x}.{'+'.join(self.tiers.names)}:"
        prefix = cfg.key_prefix + scope
        self.redis_store = RedisStore(self.redis, self.tiers, prefix=prefix, ttl=parse_duration(cfg.ttl))
        self._tasks: set[asyncio.Task[None]] = set()
        self._pending_lookups = 0
        return self.redis_store

    async def check(self) -> None:
        from llmepp.kvevents.redis_index import check_reachable

        await check_reachable(self.redis, f"plugin {self.name!r}: {_ADDRESS_FIELD}", self.name)

    async def aclose(self) -> None:
        await super().aclose()
        await self.redis.aclose()

    def _gauges(self) -> dict[str, float]:
        return {"subscribers": float(len(self.pool))}

    async def produce(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> None:
        tokens = self._prompt(request)
        if tokens is None:
            return
        root = self._root(request)
        chains = self._chains(tokens, root)
        keys = _joined(chains)
        pods = {self._pod(ep): ep for ep in endpoints}
        hits: dict[Endpoint, int] = {}
        cached: dict[Endpoint, int] = {}
        last: Endpoint | None = None
        try:
            m = await self._lookup(chains, list(pods))
        except Exception as e:  # Redis slow or down: route without prefix data, never stall
            if isinstance(e, TimeoutError):  # past lookupTimeout (redis-py's own timeouts are errors)
                self.stats.lookup_timeouts += 1
            elif isinstance(e, _LookupsPiledUp):
                self.stats.lookup_skips += 1
            else:
                self.stats.lookup_errors += 1
            self._log.warning("lookup", "%s: Redis lookup failed (%r); no prefix data for this request", self.name, e)
        else:
            for pod, w in m.weighted.items():
                ep = pods.get(pod)
                if ep is not None and w:
                    hits[ep] = int(w + 0.5)
                    cached[ep] = m.lengths.get(pod, 0)
            if not hits and m.last:
                last = pods.get(m.last)
        self._publish(request, tokens, root, len(keys), hits, keys, last, cached)

    async def _lookup(self, chains: list[list[int]], pods: list[str]) -> RedisMatch:
        """The lookup, within lookupTimeout whatever redis-py does with a cancellation (in a burst on a stalled
        Redis some are held until the command completes): it runs as a task the request stops waiting for. A
        batch's prompts (the engine caches each on its own): all in one round trip, within the one deadline."""
        if self._pending_lookups >= MAX_PENDING_LOOKUPS:
            raise _LookupsPiledUp(f"{self._pending_lookups} lookups already waiting on Redis")
        store = self.redis_store
        lookup = asyncio.ensure_future(
            store.lookup(chains[0], pods) if len(chains) == 1 else store.lookup_batch(chains, pods)
        )
        self._pending_lookups += 1
        lookup.add_done_callback(self._lookup_done)
        await asyncio.wait((lookup,), timeout=self.lookup_timeout)
        if not lookup.done():
            lookup.cancel()  # not awaited: it gives its connection back when redis-py lets it
            raise TimeoutError
        return lookup.result()

    def _lookup_done(self, lookup: asyncio.Future[RedisMatch]) -> None:
        self._pending_lookups -= 1
        if not lookup.cancelled():
            lookup.exception()  # retrieved: an abandoned lookup's error was counted as a timeout

    def _speculate(self, targets: list[str], ctx: _RoutedPrompt, info: PrefixMatchInfo, ttl: float) -> None:
        keys = self._all_keys(ctx, info)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no event loop (in-process tooling): nothing to write with
        for pod in targets:
            if len(self._tasks) >= MAX_PENDING_SPECULATIONS:
                self.stats.speculation_skips += 1
                continue
            task = loop.create_task(self._speculate_remote(pod, keys, ttl))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _speculate_remote(self, pod: str, keys: list[int], ttl: float) -> None:
        try:
            async with asyncio.timeout(1.0):
                await self.redis_store.speculate(pod, keys, ttl)
        except Exception as e:
            self.stats.speculation_errors += 1
            self._log.warning("speculate", "%s: speculative write to Redis failed: %r", self.name, e)


PrecisePrefixCacheProducer._redis_variant = RedisPrecisePrefixCacheProducer


class PrecisePrefixCacheScorer(PrecisePrefixCacheProducer, Scorer):
    """Deprecated (reference: B, D): `precise-prefix-cache-scorer` = a precise producer and a
    `prefix-cache-scorer` in one plugin. Takes the producer's parameters; scores with the prefix
    scorer's defaults (matched fraction m/T). Prefer the explicit pair."""

    type = "precise-prefix-cache-scorer"
    category = ScorerCategory.AFFINITY

    def __init__(self, name: str, params: PrecisePrefixCacheProducer.Params | None = None) -> None:
        super().__init__(name, params)
        self._scorer = PrefixCacheScorer(name, PrefixCacheScorer.Params())
        self._scorer.data_key = self.key
        log.warning("%s: precise-prefix-cache-scorer is deprecated; use precise-prefix-cache-producer + "
                    "prefix-cache-scorer", name)  # fmt: skip

    def score(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> Sequence[float]:
        return self._scorer.score(request, endpoints)


class _RedisPrecisePrefixCacheScorer(RedisPrecisePrefixCacheProducer, PrecisePrefixCacheScorer):
    pass


PrecisePrefixCacheScorer._redis_variant = _RedisPrecisePrefixCacheScorer


def _zmq_bindable(endpoint: str) -> bool:
    """tcp://<host or *>:<port> (an IPv6 host bracketed: tcp://[::]:5557) or ipc://<path>."""
    if endpoint.startswith("ipc://"):
        return len(endpoint) > len("ipc://")
    if not endpoint.startswith("tcp://"):
        return False
    host, port = split_hostport(endpoint[len("tcp://") :])
    return bool(host and port.isascii() and port.isdigit() and 0 < int(port) < 65536)
