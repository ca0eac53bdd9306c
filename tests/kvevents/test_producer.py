"""The precise producer as configured: the reference's precise-prefix config (example C) loads and
wires up; PrefixMatchInfo feeds prefix-cache-scorer and prefix-based-pd-decider; speculation."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from helpers import until
from prometheus_client.exposition import choose_encoder
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from llmepp.config.loader import Components, build, load_config
from llmepp.datalayer.datastore import Datastore
from llmepp.datalayer.endpoint import Endpoint, EndpointSpec
from llmepp.framework.datakeys import PREFIX_CACHE_MATCH_INFO, TOKENIZED_PROMPT, PrefixMatchInfo, scoped
from llmepp.framework.plugin import ConfigError, PluginContext, registry
from llmepp.framework.scheduling import ProfileResult, SchedulingResult
from llmepp.kvevents.chain import Delta
from llmepp.kvevents.keys import block_keys, root_key
from llmepp.observability.metrics import EppMetrics
from llmepp.plugins.datasources.endpoint_notification import EndpointNotificationSource
from llmepp.plugins.producers.precise_prefix import PrecisePrefixCacheProducer, PrecisePrefixCacheScorer
from llmepp.plugins.profile_handlers.prefix_based_decider import PrefixBasedPDDecider
from llmepp.plugins.scorers.prefix_cache import PrefixCacheScorer
from llmepp.request.parsers import parse_request
from llmepp.request.types import InferenceRequest, ResponseInfo
from llmepp_sim.tokenizer import TOKENIZER_PATH

# The reference's test/perf/config/router-configs/precise-prefix.yaml shape (§2 example C).
EXAMPLE_C = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: token-producer
  parameters:
    modelName: Qwen/Qwen3-8B
    vllm:
      url: http://localhost:8000
- type: endpoint-notification-source
- type: precise-prefix-cache-producer
  parameters:
    tokenProcessorConfig:
      blockSizeTokens: 16
    speculativeIndexing: true
    kvEventsConfig:
      topicFilter: "kv@"
      concurrency: 32
      discoverPods: true
      podDiscoveryConfig:
        socketPort: 5557
- type: active-request-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
  parameters:
    prefixMatchInfoProducerName: precise-prefix-cache-producer
- type: no-hit-lru-scorer
dataLayer:
  sources:
  - pluginRef: endpoint-notification-source
    extractors:
    - pluginRef: precise-prefix-cache-producer
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: active-request-scorer, weight: 4}
  - {pluginRef: kv-cache-utilization-scorer, weight: 2}
  - {pluginRef: prefix-cache-scorer, weight: 2}
  - {pluginRef: no-hit-lru-scorer, weight: 2}
"""

HF_TOKENS = f"""
- type: token-producer
  parameters:
    tokenizer: {{backend: hf, path: "{TOKENIZER_PATH}", chatTemplate: role-tags}}
"""
VLLM_TOKENS = """- type: token-producer
  parameters:
    modelName: Qwen/Qwen3-8B
    vllm:
      url: http://localhost:8000
"""
assert VLLM_TOKENS in EXAMPLE_C
# Example C with a local tokenizer instead of the render sidecar (no model server needed).
EXAMPLE_C_HF = EXAMPLE_C.replace(VLLM_TOKENS, HF_TOKENS)


def components(text: str) -> tuple[Components, Datastore]:
    datastore = Datastore()
    return build(load_config(text), datastore=datastore, metrics=EppMetrics()), datastore


def example_c(
    text: str = EXAMPLE_C_HF,
) -> tuple[Components, Datastore, list[Endpoint], PrecisePrefixCacheProducer]:
    """Example C built over three endpoints: the components, the datastore, the endpoints, the precise producer."""
    c, datastore = components(text)
    producer = c.plugins["precise-prefix-cache-producer"]
    assert isinstance(producer, PrecisePrefixCacheProducer)
    return c, datastore, pods(datastore), producer


def pods(datastore: Datastore, n: int = 3) -> list[Endpoint]:
    for i in range(n):
        datastore.upsert(EndpointSpec(name=f"p{i}", address=f"127.0.0.{170 + i}", port=8000))
    return list(datastore.endpoints)


def chat(prompt: str) -> InferenceRequest:
    body = {"model": "sim-model", "messages": [{"role": "user", "content": prompt}]}
    return parse_request({":path": "/v1/chat/completions"}, json.dumps(body).encode(), request_id="r")


async def run_producers(c: Components, req: InferenceRequest, eps: list[Endpoint]) -> None:
    for p in c.pipeline.producers:
        out = p.produce(req, eps)
        if asyncio.iscoroutine(out):
            await out


def hold(producer: PrecisePrefixCacheProducer, pod: Endpoint, token_bytes: bytes, blocks: int) -> None:
    """Pretend events said `pod` holds the first `blocks` blocks (pure index state)."""
    keys = block_keys(token_bytes, producer.block_tokens, root_key("sim-model"))[:blocks]
    producer.index.apply(pod.hostport, Delta(keys=keys, masks=[1] * len(keys)))


async def test_example_c_loads_and_wires_the_notification_source() -> None:
    c, datastore = components(EXAMPLE_C)
    producer = c.plugins["precise-prefix-cache-producer"]
    assert isinstance(producer, PrecisePrefixCacheProducer)
    assert producer.speculative and producer.block_tokens == 16 and producer.pool_options.socket_port == 5557
    assert [p.type for p in c.pipeline.producers][:2] == ["token-producer", "precise-prefix-cache-producer"]
    scorer = c.plugins["prefix-cache-scorer"]
    assert isinstance(scorer, PrefixCacheScorer)
    assert scorer.data_key == scoped(PREFIX_CACHE_MATCH_INFO, "precise-prefix-cache-producer")
    assert any(ds.source.type == "endpoint-notification-source" for ds in c.data_sources)
    assert any(ds.source.type == "metrics-data-source" for ds in c.data_sources)  # defaults still injected
    weights = [(w.scorer.type, w.weight) for w in c.pipeline.scheduler.profiles["default"].scorers]
    assert weights == [("active-request-scorer", 4), ("kv-cache-utilization-scorer", 2),
                       ("prefix-cache-scorer", 2), ("no-hit-lru-scorer", 2)]  # fmt: skip
    # Endpoints reach the producer through the notification source: one subscriber each.
    eps = pods(datastore)
    assert len(producer.pool) == 3
    datastore.delete("p1")
    assert len(producer.pool) == 2
    await asyncio.sleep(0)
    for plugin in c.plugins.values():
        await plugin.aclose()
    del eps


async def test_lookup_feeds_scorer_and_decider_and_speculation_spreads_to_the_routed_pod() -> None:
    c, datastore, eps, producer = example_c()
    prompt = "tell me about the weather in the mountains and the valleys " * 8
    req = chat(prompt)
    await run_producers(c, req, eps)
    tokens = req.data[TOKENIZED_PROMPT]
    assert tokens.backend == "hf"
    hold(producer, eps[1], tokens.token_bytes, 5)

    req = chat(prompt)
    await run_producers(c, req, eps)
    info: PrefixMatchInfo = req.data[scoped(PREFIX_CACHE_MATCH_INFO, producer.name)]
    assert info.block_size == 16 and info.total_blocks == tokens.count // 16
    assert info.hits == {eps[1]: 5}
    scores = c.plugins["prefix-cache-scorer"].score(req, eps)  # type: ignore[attr-defined]
    assert scores[1] == pytest.approx(5 / info.total_blocks) and scores[0] == scores[2] == 0

    # prefix-based-pd-decider reads the same data through the producer name.
    decider = registry.build("prefix-based-pd-decider", "decider", {
        "nonCachedTokens": 32, "prefixMatchInfoProducerName": producer.name})  # fmt: skip
    decider.setup(PluginContext(c.plugins, datastore, None, None))
    uncached = tokens.count - 5 * 16
    assert decider.disaggregate(req, eps[1]) is (uncached >= 32)  # type: ignore[attr-defined]
    assert decider.disaggregate(req, eps[0]) is True  # type: ignore[attr-defined]

    # Routed to p2: speculative entries make the next identical request see p2 as well.
    result = SchedulingResult("default", {"default": ProfileResult(targets=[eps[2]])})
    producer.pre_request(req, result)
    await asyncio.sleep(0)  # speculation runs right after the routing answer
    again = chat(prompt)
    await run_producers(c, again, eps)
    hits = again.data[scoped(PREFIX_CACHE_MATCH_INFO, producer.name)].hits
    assert hits == {eps[1]: 5, eps[2]: info.total_blocks}
    for plugin in c.plugins.values():
        await plugin.aclose()


def completion(prompt: str | list[str]) -> InferenceRequest:
    body = {"model": "sim-model", "prompt": prompt}
    return parse_request({":path": "/v1/completions"}, json.dumps(body).encode(), request_id="r")


async def test_a_batch_matches_and_speculates_each_prompt_on_its_own() -> None:
    """vLLM runs and caches each prompt of a completions batch as a request of its own: each prompt's blocks
    are looked up from the root and the matches add up, and speculation marks each prompt's blocks on the
    routed pod. Before, the joined prompt was looked up as one: the second prompt never matched."""
    c, _, eps, producer = example_c()
    key = scoped(PREFIX_CACHE_MATCH_INFO, producer.name)
    a, b = "tell me about the weather in the mountains " * 8, "and now for something completely different " * 8
    singles = {}
    for prompt in (a, b):
        req = singles[prompt] = completion(prompt)
        await run_producers(c, req, eps)
    blocks = {p: req.data[TOKENIZED_PROMPT].count // 16 for p, req in singles.items()}
    hold(producer, eps[1], singles[b].data[TOKENIZED_PROMPT].token_bytes, 3)

    batch = completion([a, b])
    await run_producers(c, batch, eps)
    info: PrefixMatchInfo = batch.data[key]
    assert info.total_blocks == blocks[a] + blocks[b] and info.hits == {eps[1]: 3}

    producer.pre_request(batch, SchedulingResult("default", {"default": ProfileResult(targets=[eps[2]])}))
    await asyncio.sleep(0)  # speculation runs right after the routing answer
    for prompt in (a, b):
        again = completion(prompt)
        await run_producers(c, again, eps)
        assert again.data[key].hits.get(eps[2]) == blocks[prompt]
    for plugin in c.plugins.values():
        await plugin.aclose()


async def test_a_prefix_evicted_at_its_pod_is_scored_back_there() -> None:
    c, _, eps, producer = example_c()
    prompt = "a system prompt that many questions share, long enough for a few blocks " * 6
    req = chat(prompt)
    await run_producers(c, req, eps)
    token_bytes = req.data[TOKENIZED_PROMPT].token_bytes
    hold(producer, eps[2], token_bytes, 4)
    keys = block_keys(token_bytes, producer.block_tokens, root_key("sim-model"))[:4]
    producer.index.apply(eps[2].hostport, Delta(keys=keys, masks=[0] * 4))  # the pod's removal events
    req = chat(prompt)
    await run_producers(c, req, eps)
    info: PrefixMatchInfo = req.data[scoped(PREFIX_CACHE_MATCH_INFO, producer.name)]
    assert info.hits == {} and info.last_holder is eps[2]
    scores = c.plugins["no-hit-lru-scorer"].score(req, eps)  # type: ignore[attr-defined]
    assert max(scores) == scores[2] == 1.0 and scores.count(1.0) == 1
    for plugin in c.plugins.values():
        await plugin.aclose()


async def test_speculation_is_held_until_the_first_token_then_lapses_unless_confirmed() -> None:
    """Speculative entries cover the whole prefill (however long), then `speculativeTTL` for the
    pod's events to confirm them; a request that ends without output releases them too."""
    now = [0.0]
    c, _, eps, producer = example_c(
        EXAMPLE_C_HF.replace("speculativeIndexing: true", "speculativeIndexing: true\n    speculativeTTL: 2s")
    )
    producer.index.clock = lambda: now[0]
    key = scoped(PREFIX_CACHE_MATCH_INFO, producer.name)

    async def hits(prompt: str) -> dict[Endpoint, int]:
        req = chat(prompt)
        await run_producers(c, req, eps)
        return dict(req.data[key].hits)

    for prompt, end in (("a prompt that ends well " * 8, "first"), ("a prompt that fails " * 8, "complete")):
        req = chat(prompt)
        await run_producers(c, req, eps)
        result = SchedulingResult("default", {"default": ProfileResult(targets=[eps[2]])})
        producer.pre_request(req, result)
        await asyncio.sleep(0)
        now[0] += 60.0  # a minute of prefill: still held
        assert set(await hits(prompt)) == {eps[2]}
        if end == "first":
            producer.first_response_chunk(req, ResponseInfo(status=200))
        else:
            producer.response_complete(req, ResponseInfo(status=503), result)
        now[0] += 1.0
        assert set(await hits(prompt)) == {eps[2]}  # within speculativeTTL of the release
        now[0] += 1.5
        assert await hits(prompt) == {}  # no event confirmed it
    producer.response_complete(req, ResponseInfo(status=200), result)  # a second release changes nothing
    assert producer.index.speculative_entries == 0
    for plugin in c.plugins.values():
        await plugin.aclose()


async def test_deprecated_precise_scorer_wrapper_scores_by_itself() -> None:
    text = f"""
plugins:
{HF_TOKENS}
- type: precise-prefix-cache-scorer
  parameters: {{tokenProcessorConfig: {{blockSize: 16}}}}
schedulingProfiles:
- name: default
  plugins: [{{pluginRef: precise-prefix-cache-scorer, weight: 3}}]
"""
    c, datastore = components(text)
    eps = pods(datastore, 2)
    wrapper = c.plugins["precise-prefix-cache-scorer"]
    assert isinstance(wrapper, PrecisePrefixCacheScorer)
    req = chat("a prompt long enough for a few blocks of tokens " * 6)
    await run_producers(c, req, eps)
    hold(wrapper, eps[0], req.data[TOKENIZED_PROMPT].token_bytes, 2)
    req2 = chat("a prompt long enough for a few blocks of tokens " * 6)
    await run_producers(c, req2, eps)
    total = req2.data[TOKENIZED_PROMPT].count // 16
    assert list(wrapper.score(req2, eps)) == [pytest.approx(2 / total), 0.0]
    await wrapper.aclose()


@pytest.mark.parametrize(
    ("params", "error"),
    [
        ({"kvEventsConfig": {"zmqEndpoint": "tcp://*"}}, "zmqEndpoint: a tcp://<host>:<port>"),
        ({"kvEventsConfig": {"zmqEndpoint": "udp://*:5557"}}, "zmqEndpoint"),
        ({"kvEventsConfig": {"engineType": "sglang"}}, "only vllm"),
        ({"sessionManager": "s"}, "sessionManager"),
        ({"tokenProcessorConfig": {"blockSizeTokens": 0}}, "blockSizeTokens"),
        ({"kvEventsConfig": {"podDiscoveryConfig": {"socketPort": 70000}}}, "ports"),
        ({"speculativeTTL": "soon"}, "invalid duration"),
        ({"indexerConfig": {"kvBlockIndexConfig": {"inMemoryConfig": {"size": 0}}}}, "size"),
        ({"kvEventsConfig": {"typo": 1}}, "typo"),
        ({"kvEventsConfig": {"maxMessageBytes": -1}}, "maxMessageBytes"),
    ],
)
def test_bad_configs_name_the_field(params: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        registry.build("precise-prefix-cache-producer", "p", params)


def test_reference_indexer_fields_are_accepted() -> None:
    p = registry.build("precise-prefix-cache-producer", "p", {
        "indexerConfig": {
            "kvBlockIndexConfig": {"inMemoryConfig": {"size": 1000, "podCacheSize": 4}, "enableMetrics": True},
            "kvCacheBackendConfigs": [{"name": "gpu", "weight": 1.0}, {"name": "cpu", "weight": 0.5}],
            "tokenizersPoolConfig": {"modelName": "x"},
        },
        "kvEventsConfig": {"podDiscoveryConfig": {"socketPort": 6000, "replaySocketPort": 6001,
                                                  "podLabelSelector": "a=b"}},
        "tokenProcessorConfig": {"hashSeed": "42", "hashAlgorithm": "cbor-fnv"},
    })  # fmt: skip
    assert isinstance(p, PrecisePrefixCacheProducer)
    assert p.index.size == 1000 and p.index.pod_cache_size == 4
    assert p.tiers.weight_of[2] == 0.5 and p.pool_options.replay_socket_port == 6001


def test_the_kv_event_message_size_limit_is_configurable() -> None:
    default = registry.build("precise-prefix-cache-producer", "p", {})
    assert isinstance(default, PrecisePrefixCacheProducer)
    assert default.pool_options.subscriber.max_message_bytes == 64 << 20
    p = registry.build("precise-prefix-cache-producer", "p", {"kvEventsConfig": {"maxMessageBytes": 0}})
    assert isinstance(p, PrecisePrefixCacheProducer)
    assert p.pool_options.subscriber.max_message_bytes == 0  # no limit


def test_notification_source_replays_known_endpoints_to_late_extractors() -> None:
    datastore = Datastore()
    source = EndpointNotificationSource("src")
    source.setup(PluginContext({}, datastore, None, None))
    datastore.upsert(EndpointSpec(name="a", address="127.0.0.171", port=1))

    class Recorder:
        def __init__(self) -> None:
            self.events: list[str] = []

        def endpoint_added(self, endpoint: Endpoint) -> None:
            self.events.append("+" + endpoint.name)

        def endpoint_removed(self, endpoint: Endpoint) -> None:
            self.events.append("-" + endpoint.name)

    rec = Recorder()
    source.attach(rec)
    datastore.upsert(EndpointSpec(name="b", address="127.0.0.172", port=1))
    datastore.delete("a")
    assert rec.events == ["+a", "+b", "-a"]


async def test_speculation_for_a_removed_endpoint_does_not_bring_its_pod_back() -> None:
    """A request routed to an endpoint that leaves the pool before its response: releasing its
    speculation re-created the pod in the index after the pool had forgotten it, and nothing ever
    released it again (with pod churn the index's pod bits, and so every mask, grew without bound)."""
    c, datastore, eps, producer = example_c()
    req = chat("a prompt long enough for a few blocks of tokens " * 6)
    await run_producers(c, req, eps)
    producer.pre_request(req, SchedulingResult("default", {"default": ProfileResult(targets=[eps[2]])}))
    await asyncio.sleep(0)  # the speculation runs
    gone = eps[2].hostport
    assert producer.index.bit_of(gone) != 0
    datastore.delete("p2")
    await until(lambda: producer.index.bit_of(gone) == 0, what="the pool forgot the pod")
    producer.first_response_chunk(req, ResponseInfo(status=200))
    assert producer.index.bit_of(gone) == 0 and producer.index.speculative_entries == 0
    # A pod still in the pool is speculated for as before.
    req = chat("another prompt long enough for a few blocks of tokens " * 6)
    await run_producers(c, req, eps[:2])
    producer.pre_request(req, SchedulingResult("default", {"default": ProfileResult(targets=[eps[1]])}))
    await asyncio.sleep(0)
    assert producer.index.speculative_entries > 0 and producer.index.bit_of(eps[1].hostport) != 0
    for plugin in c.plugins.values():
        await plugin.aclose()


async def test_the_pd_decider_counts_blocks_a_pod_holds_on_cpu_as_cached() -> None:
    """Reference §6: hit = CachedBlockCount x block size; the precise producer's hits are the tier-weighted
    score (cpu 0.8), which made a decode pod holding the whole prompt on CPU look 20% uncached."""
    c, datastore, eps, producer = example_c()
    prompt = "tell me about the weather in the mountains and the valleys " * 8
    req = chat(prompt)
    await run_producers(c, req, eps)
    tokens = req.data[TOKENIZED_PROMPT]
    total = tokens.count // 16
    keys = block_keys(tokens.token_bytes, 16, root_key("sim-model"))[:total]
    cpu = producer.tiers.bit("cpu")
    producer.index.apply(eps[1].hostport, Delta(keys=keys, masks=[cpu] * len(keys)))  # whole prompt, on CPU
    req = chat(prompt)
    await run_producers(c, req, eps)
    uncached = tokens.count - total * 16  # < 16: only the trailing partial block is not cached
    # Threshold between the true uncached count and the one a 0.8-weighted hit count gives.
    weighted_uncached = tokens.count - round(total * 0.8) * 16
    threshold = uncached + 1
    assert weighted_uncached >= threshold, (uncached, weighted_uncached)
    decider = registry.build(
        "prefix-based-pd-decider", "d", {"nonCachedTokens": threshold, "prefixMatchInfoProducerName": producer.name}
    )
    assert isinstance(decider, PrefixBasedPDDecider)
    decider.setup(PluginContext(c.plugins, datastore, None, None))
    # Reference: (in - CachedBlockCount*16) = uncached < threshold -> no disaggregation.
    assert decider.disaggregate(req, eps[1]) is False
    for plugin in c.plugins.values():
        await plugin.aclose()


TWO_INDEXES = """
plugins:
- {type: precise-prefix-cache-producer, name: prefill-index, parameters: {kvEventsConfig: {discoverPods: false}}}
- {type: precise-prefix-cache-producer, name: decode-index, parameters: {kvEventsConfig: {discoverPods: false}}}
- {type: prefix-cache-scorer, name: prefill-prefix, parameters: {prefixMatchInfoProducerName: prefill-index}}
- {type: prefix-cache-scorer, name: decode-prefix, parameters: {prefixMatchInfoProducerName: decode-index}}
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins: [{pluginRef: prefill-prefix}, {pluginRef: decode-prefix}, {pluginRef: max-score-picker}]
"""


def test_two_precise_producers_export_each_family_once() -> None:
    """Each producer registered a collector of its own, and the registry (not auto-describing) took both: every
    llm_d_epp_kv_* family appeared twice, which OpenMetrics (Prometheus 3's first choice) refuses outright."""
    metrics = EppMetrics()
    build(load_config(TWO_INDEXES), datastore=Datastore(), metrics=metrics)
    encoder, content_type = choose_encoder("application/openmetrics-text;version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    families = {f.name: f for f in text_string_to_metric_families(encoder(metrics.registry).decode())}
    producers = {s.labels["producer"] for s in families["llm_d_epp_kv_events_messages"].samples}
    assert producers == {"prefill-index", "decode-index"}
