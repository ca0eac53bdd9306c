from llmepp.framework.plugin import Plugin
from llmepp.plugins.producers.agent_identity import AgentIdentity
from llmepp.plugins.producers.approx_prefix import ApproxPrefixCacheProducer
from llmepp.plugins.producers.burst_prefix import BurstPrefixCacheProducer
from llmepp.plugins.producers.inflight_load import InFlightLoadProducer
from llmepp.plugins.producers.mm_embeddings import MMEmbeddingsCacheProducer, MMEmbeddingsCacheScorer
from llmepp.plugins.producers.multicluster import MulticlusterApproxPrefixCacheProducer
from llmepp.plugins.producers.p2p_source import P2PSourceProducer
from llmepp.plugins.producers.precise_prefix import PrecisePrefixCacheProducer, PrecisePrefixCacheScorer
from llmepp.plugins.producers.predicted_latency import PredictedLatencyProducer
from llmepp.plugins.producers.session_id import SessionIdProducer
from llmepp.plugins.producers.shared_inflight import RedisInFlightLoadProducer
from llmepp.plugins.producers.token import TokenProducer

PLUGINS: list[type[Plugin]] = [
    TokenProducer,
    ApproxPrefixCacheProducer,
    InFlightLoadProducer,
    SessionIdProducer,
    PrecisePrefixCacheProducer,
    PrecisePrefixCacheScorer,
    RedisInFlightLoadProducer,
    MMEmbeddingsCacheProducer,
    MMEmbeddingsCacheScorer,
    AgentIdentity,
    P2PSourceProducer,
    BurstPrefixCacheProducer,
    MulticlusterApproxPrefixCacheProducer,
    PredictedLatencyProducer,
]
