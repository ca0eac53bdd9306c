"""What every HTTP-polled data source shares: where a page is fetched, over what TLS, how often.

The plugins hold configuration only; pollers in `llmepp.datalayer` (the metrics collector, the
models poller) do the fetching with it.
"""

from __future__ import annotations

import logging
import ssl
from typing import Annotated, Any

import msgspec

from llmepp.datalayer.endpoint import EndpointSpec
from llmepp.datalayer.httpscrape import ScrapeTarget
from llmepp.framework.plugin import ConfigError, Plugin, PluginParams
from llmepp.units import parse_duration

log = logging.getLogger(__name__)


class HttpSourceParams(PluginParams):
    scheme: str = "http"
    path: str = "/"
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] | None = None
    insecure_skip_verify: bool = True
    ca_cert_path: str | None = None
    client_cert_path: str | None = None
    client_key_path: str | None = None
    interval: str | None = None


class HttpDataSource(Plugin):
    """GET `scheme://address:port/path` of every endpoint; port = `port`, else the endpoint's metrics
    port, else its serving port. `interval`: a duration ("1s", "500ms"), None = the source's default."""

    Params = HttpSourceParams

    def __init__(self, name: str = "", params: Any = None) -> None:
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
        if p.scheme == "http":
            # Loading them would be wrong (the pages are plain HTTP) and refusing the config would break
            # configs the reference loads; but a forgotten `scheme: https` must not pass unnoticed.
            unused = [f for f, v in (("caCertPath", p.ca_cert_path), ("clientCertPath", p.client_cert_path),
                                     ("clientKeyPath", p.client_key_path)) if v]  # fmt: skip
            if unused:
                log.warning("plugin %s: parameters.%s ignored: scheme is http (set scheme: https to scrape over TLS)",
                            name, " / ".join(unused))  # fmt: skip

    @staticmethod
    def _ssl_context(p: HttpSourceParams) -> ssl.SSLContext:
        if p.insecure_skip_verify:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        else:
            ctx = ssl.create_default_context()
        if p.ca_cert_path:
            try:
                ctx.load_verify_locations(cafile=p.ca_cert_path)
            except (OSError, ssl.SSLError) as e:
                raise ConfigError(
                    f"parameters.caCertPath: cannot load {p.ca_cert_path!r} (PEM CA certificates): {e}"
                ) from None
        if p.client_cert_path or p.client_key_path:
            if not (p.client_cert_path and p.client_key_path):
                raise ConfigError("parameters.clientCertPath and clientKeyPath must be set together")
            try:
                ctx.load_cert_chain(p.client_cert_path, p.client_key_path)
            except (OSError, ssl.SSLError) as e:
                raise ConfigError(
                    f"parameters.clientCertPath / clientKeyPath: cannot load {p.client_cert_path!r} and "
                    f"{p.client_key_path!r} (a PEM certificate and its key): {e}"
                ) from None
        return ctx

    def target_for(self, spec: EndpointSpec) -> ScrapeTarget:
        port = self.port or spec.metrics_port or spec.port
        return ScrapeTarget(spec.address, port, self.path, self.ssl_context)
