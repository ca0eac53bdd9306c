from llmepp.framework.plugin import Plugin
from llmepp.plugins.admitters.latency_slo import LatencySLOAdmitter
from llmepp.plugins.admitters.probabilistic import ProbabilisticAdmitter

PLUGINS: list[type[Plugin]] = [ProbabilisticAdmitter, LatencySLOAdmitter]
