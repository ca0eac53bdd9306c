from llmepp.framework.plugin import Plugin
from llmepp.plugins.scorers.active_request import ActiveRequestScorer
from llmepp.plugins.scorers.context_length import ContextLengthAware
from llmepp.plugins.scorers.endpoint_attribute import EndpointAttributeScorer
from llmepp.plugins.scorers.header_label_affinity import HeaderLabelAffinityScorer
from llmepp.plugins.scorers.kv_cache_utilization import KVCacheUtilizationScorer
from llmepp.plugins.scorers.latency import LatencyScorer
from llmepp.plugins.scorers.load_aware import LoadAwareScorer
from llmepp.plugins.scorers.lora_affinity import LoraAffinityScorer
from llmepp.plugins.scorers.multicluster import (
    MulticlusterKVCacheUtilizationScorer,
    MulticlusterPrefixCacheScorer,
    MulticlusterQueueScorer,
)
from llmepp.plugins.scorers.no_hit_lru import NoHitLRUScorer
from llmepp.plugins.scorers.prefix_cache import PrefixCacheScorer
from llmepp.plugins.scorers.queue import QueueScorer
from llmepp.plugins.scorers.running_requests import RunningRequestsSizeScorer
from llmepp.plugins.scorers.session_affinity import SessionAffinityScorer
from llmepp.plugins.scorers.token_load import TokenLoadScorer
from llmepp.plugins.scorers.topology_affinity import TopologyAffinityScorer

PLUGINS: list[type[Plugin]] = [
    QueueScorer,
    KVCacheUtilizationScorer,
    PrefixCacheScorer,
    RunningRequestsSizeScorer,
    LoadAwareScorer,
    ActiveRequestScorer,
    TokenLoadScorer,
    NoHitLRUScorer,
    LoraAffinityScorer,
    SessionAffinityScorer,
    HeaderLabelAffinityScorer,
    ContextLengthAware,
    EndpointAttributeScorer,
    TopologyAffinityScorer,
    MulticlusterQueueScorer,
    MulticlusterKVCacheUtilizationScorer,
    MulticlusterPrefixCacheScorer,
    LatencyScorer,
]
