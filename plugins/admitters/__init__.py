from llmepp.framework.plugin import Plugin
from llmepp.plugins.admitters.probabilistic import ProbabilisticAdmitter

PLUGINS: list[type[Plugin]] = [ProbabilisticAdmitter]
