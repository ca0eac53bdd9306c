from llmepp.framework.plugin import Plugin
from llmepp.plugins.flowcontrol.concurrency_detector import ConcurrencyDetector
from llmepp.plugins.flowcontrol.eviction_policies import PriorityThenTimeEvictionOrder, SheddableEvictionFilter
from llmepp.plugins.flowcontrol.fairness import GlobalStrictFairnessPolicy, RoundRobinFairnessPolicy
from llmepp.plugins.flowcontrol.ordering import EdfOrderingPolicy, FcfsOrderingPolicy, SloDeadlineOrderingPolicy
from llmepp.plugins.flowcontrol.program_fairness import ProgramAwareFairness
from llmepp.plugins.flowcontrol.usage_limit import (
    PriorityHoldbackPolicy,
    SoftReflectiveCeilingPolicy,
    StaticUsageLimitPolicy,
)
from llmepp.plugins.flowcontrol.utilization_detector import UtilizationDetector

PLUGINS: list[type[Plugin]] = [
    FcfsOrderingPolicy,
    EdfOrderingPolicy,
    SloDeadlineOrderingPolicy,
    GlobalStrictFairnessPolicy,
    RoundRobinFairnessPolicy,
    ProgramAwareFairness,
    StaticUsageLimitPolicy,
    PriorityHoldbackPolicy,
    SoftReflectiveCeilingPolicy,
    UtilizationDetector,
    ConcurrencyDetector,
    SheddableEvictionFilter,
    PriorityThenTimeEvictionOrder,
]
