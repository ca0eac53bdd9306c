"""`llm_d_epp_kv_events_{orphans,unknown_removals,unknown_medium,skipped_kind,unkeyable}_total` are
exported as Prometheus *counters*: they must not go down when a pod leaves the pool (scale-down, rolling
update, an IP reused by a new pod) or a subscriber restarts with fresh chains. Prometheus would read the
decrease as a counter reset (a spike in `rate()`/`increase()`), so the producer keeps one running total."""

from __future__ import annotations

from llmepp.datalayer.endpoint import Endpoint, EndpointSpec
from llmepp.framework.plugin import PluginContext, registry
from llmepp.kvevents.chain import Delta
from llmepp.kvevents.wire import BlockRemoved, BlockStored
from llmepp.observability.metrics import EppMetrics
from llmepp.plugins.producers.precise_prefix import PrecisePrefixCacheProducer


def _value(metrics: EppMetrics, name: str) -> float:
    v = metrics.registry.get_sample_value(f"llm_d_epp_kv_events_{name}_total", {"producer": "p"})
    assert v is not None, name
    return v


def test_chain_counters_never_decrease_when_a_pod_leaves_the_pool() -> None:
    metrics = EppMetrics()
    producer = registry.build("precise-prefix-cache-producer", "p", {})
    assert isinstance(producer, PrecisePrefixCacheProducer)
    producer.setup(PluginContext({}, None, None, metrics))
    a = Endpoint(EndpointSpec(name="a", address="127.0.0.231", port=8000))
    b = Endpoint(EndpointSpec(name="b", address="127.0.0.232", port=8000))
    producer.endpoint_added(a)
    producer.endpoint_added(b)
    for chains in producer.pool.chains():
        delta = Delta()
        chains.stored(BlockStored([5], 999, list(range(16)), 16), "m", delta)  # parent never seen: orphan
        chains.removed(BlockRemoved([77]), delta)  # never stored: unknown removal
    assert _value(metrics, "orphans") == 2
    assert _value(metrics, "unknown_removals") == 2
    producer.endpoint_removed(a)  # pod a scaled away
    assert _value(metrics, "orphans") >= 2, "a Prometheus counter went down"
    assert _value(metrics, "unknown_removals") >= 2, "a Prometheus counter went down"
