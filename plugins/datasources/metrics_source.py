"""`metrics-data-source`: where and how often each endpoint's Prometheus page is fetched.

The plugin holds configuration only (scheme, path, port override, TLS, interval); the
`MetricsCollector` (llmepp.datalayer.collector) does the polling with it.
"""

from __future__ import annotations

from typing import ClassVar

from llmepp.plugins.datasources.http_source import HttpDataSource, HttpSourceParams


class MetricsDataSource(HttpDataSource):
    """Polls every endpoint's Prometheus text page at `scheme://address:port/path`.

    port = `port` parameter, else the endpoint's metrics port, else its serving port.
    Polling period = `interval` rounded to a whole number of base ticks
    (--refresh-metrics-interval, 50 ms), at least one tick; default every tick.
    """

    type = "metrics-data-source"
    pod_only = "reads model-server metrics; use multicluster-metrics-data-source"
    # A failed fetch resets the endpoint's metrics (instead of letting them age), and a lasting failure
    # is logged again every this many seconds (0: once per streak); see llmepp.datalayer.collector.
    forget_on_failure: ClassVar[bool] = False
    failure_log_interval: ClassVar[float] = 0.0

    class Params(HttpSourceParams):
        path: str = "/metrics"

    def ticks_per_poll(self, base_interval: float) -> int:
        """How many base ticks between two polls of one endpoint."""
        if self.interval is None:
            return 1
        return max(1, round(self.interval / base_interval))
