"""Screeners: narrow a request's candidates before producers and scheduling see them."""

from llmepp.framework.plugin import Plugin
from llmepp.plugins.screeners.disaggregatedset_rollout import DisaggregatedSetRolloutScreener

PLUGINS: list[type[Plugin]] = [DisaggregatedSetRolloutScreener]
