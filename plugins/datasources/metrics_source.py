"""`metrics-data-source`: where and how often each endpoint's Prometheus page is fetched.

The plugin holds configuration only (scheme, path, port override, TLS, interval); the
`MetricsCollector` (llmepp.datalayer.collector) does the polling with it.
"""

from __future__ import annotations

import re
import ssl
from typing import Annotated

import msgspec

from llmepp.datalayer.endpoint import EndpointSpec
from llmepp.datalayer.httpscrape import ScrapeTarget
from llmepp.framework.plugin import ConfigError, Plugin, PluginParams
from llmepp.units import parse_duration

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")


class MetricsDataSource(Plugin):
    """Polls every endpoint's Prometheus text page at `scheme://address:port/path`.

    port = `port` parameter, else the endpoint's metrics port, else its serving port.
    Polling period = `interval` rounded to a whole number of base ticks
    (--refresh-metrics-interval, 50 ms), at least one tick; default every tick.
    """

    type = "metrics-data-source"

    class Params(PluginParams):
        scheme: str = "http"
        path: str = "/metrics"
        port: Annotated[int, msgspec.Meta(ge=1, le=65535)] | None = None
        insecure_skip_verify: bool = True
        ca_cert_path: str | None = None
        client_cert_path: str | None = None
        client_key_path: str | None = None
        interval: str | None = None

    def __init__(self, name: str = "", params: Params | None = None) -> None:
        p = params if params is not None else self.Params()
        super().__init__(name, p)
        if p.scheme not in ("http", "https"):
            raise ConfigError(f"parameters.scheme: must be http or https, got {p.scheme!r}")
        if not p.path.startswith("/") or any(c in p.path for c in " \r\n"):
            raise ConfigError(f"parameters.path: must be an absolute URL path, got {p.path!r}")
        self.scheme = p.scheme
        self.path = p.path
        self.port = p.port
        self.interval: float | None = None
        if p.interval is not None:
            try:
                self.interval = parse_duration(p.interval)
            except ValueError as e:
                raise ConfigError(f"parameters.interval: {e}") from None
            if self.interval <= 0:
                raise ConfigError(f"parameters.interval: must be positive, got {p.interval!r}")
        self.ssl_context = self._ssl_context(p) if p.scheme == "https" else None

    @staticmethod
    def _ssl_context(p: Params) -> ssl.SSLContext:
        if p.insecure_skip_verify:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        else:
            ctx = ssl.create_default_context()
        try:
            if p.ca_cert_path:
                ctx.load_verify_locations(cafile=p.ca_cert_path)
            if p.client_cert_path or p.client_key_path:
                if not (p.client_cert_path and p.client_key_path):
                    raise ConfigError("parameters.clientCertPath and clientKeyPath must be set together")
                ctx.load_cert_chain(p.client_cert_path, p.client_key_path)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"parameters: TLS files: {e}") from None
        return ctx

    def target_for(self, spec: EndpointSpec) -> ScrapeTarget:
        port = self.port or spec.metrics_port or spec.port
        return ScrapeTarget(spec.address, port, self.path, self.ssl_context)

    def ticks_per_poll(self, base_interval: float) -> int:
        """How many base ticks between two polls of one endpoint."""
        if self.interval is None:
            return 1
        return max(1, round(self.interval / base_interval))
