from llmepp.framework.plugin import Plugin
from llmepp.plugins.scorers.kv_cache_utilization import KVCacheUtilizationScorer
from llmepp.plugins.scorers.prefix_cache import PrefixCacheScorer
from llmepp.plugins.scorers.queue import QueueScorer

PLUGINS: list[type[Plugin]] = [QueueScorer, KVCacheUtilizationScorer, PrefixCacheScorer]
