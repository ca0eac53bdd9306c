"""`models-data-source` and `models-data-extractor`: which models each endpoint serves.

The source holds where and how often (`GET /v1/models` every second by default); the extractor
decodes the OpenAI model list; `ModelsPoller` (llmepp.datalayer.models) runs them and keeps
`endpoint.models` current for `models-responder`.
"""

from __future__ import annotations

from llmepp.datalayer.endpoint import ModelData
from llmepp.datalayer.models import parse_models_page
from llmepp.framework.plugin import Plugin
from llmepp.plugins.datasources.http_source import HttpDataSource, HttpSourceParams

# A model list changes only when a server loads or unloads an adapter; a second keeps a hot-loaded
# adapter's routing current without polling it at the metrics rate.
DEFAULT_INTERVAL = 1.0


class ModelsDataSource(HttpDataSource):
    """Polls every endpoint's `scheme://address:port/v1/models` every `interval` (1s).

    Parameters: `scheme` (http), `path` (/v1/models), `port` (the endpoint's), `interval`, TLS
    (`insecureSkipVerify` true, `caCertPath`, `clientCertPath` / `clientKeyPath`)."""

    type = "models-data-source"

    class Params(HttpSourceParams):
        path: str = "/v1/models"

    @property
    def poll_interval(self) -> float:
        return self.interval if self.interval is not None else DEFAULT_INTERVAL


class ModelsDataExtractor(Plugin):
    """Decodes `{"object": "list", "data": [{"id", "object", "created", "owned_by", "parent"}]}`;
    anything else is an extraction error (the endpoint keeps its last good list)."""

    type = "models-data-extractor"

    def extract(self, body: bytes) -> tuple[ModelData, ...]:
        return parse_models_page(body)
