from llmepp.framework.plugin import Plugin
from llmepp.plugins.filters.endpoint_attribute import EndpointAttributeFilter
from llmepp.plugins.filters.header_testing import HeaderBasedTestingFilter
from llmepp.plugins.filters.label_selector import ByLabelFilter, LabelSelectorFilter
from llmepp.plugins.filters.load_balance import LoadBalanceFilter
from llmepp.plugins.filters.multicluster import MulticlusterSessionAffinityFilter
from llmepp.plugins.filters.prefix_cache_affinity import PrefixCacheAffinityFilter
from llmepp.plugins.filters.roles import DecodeFilter, EncodeFilter, PrefillFilter
from llmepp.plugins.filters.session_affinity import SessionAffinityFilter
from llmepp.plugins.filters.slo_headroom_tier import SLOHeadroomTierFilter
from llmepp.plugins.filters.topology_affinity import TopologyAffinityFilter
from llmepp.plugins.filters.utilization import UtilizationFilter

PLUGINS: list[type[Plugin]] = [
    LabelSelectorFilter,
    ByLabelFilter,
    UtilizationFilter,
    LoadBalanceFilter,
    EndpointAttributeFilter,
    PrefixCacheAffinityFilter,
    SessionAffinityFilter,
    DecodeFilter,
    PrefillFilter,
    EncodeFilter,
    HeaderBasedTestingFilter,
    TopologyAffinityFilter,
    MulticlusterSessionAffinityFilter,
    SLOHeadroomTierFilter,
]
