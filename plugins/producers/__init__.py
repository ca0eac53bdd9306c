from llmepp.framework.plugin import Plugin
from llmepp.plugins.producers.approx_prefix import ApproxPrefixCacheProducer
from llmepp.plugins.producers.token import TokenProducer

PLUGINS: list[type[Plugin]] = [TokenProducer, ApproxPrefixCacheProducer]
