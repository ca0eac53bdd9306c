"""`dcgm-data-source` and `dcgm-extractor`: each endpoint's GPU utilisation, from the NVIDIA DCGM exporter.

The source holds where and how often: `GET scheme://host:port/path` with host = the pod's IP (the
exporter as a sidecar, default) or, with `useNodeAddress`, its node's address (the exporter as a
DaemonSet: one page per node, its series told apart by their `pod` label). The extractor reads
`DCGM_FI_DEV_GPU_UTIL` and attaches

    GPUUtilization(e) = max over e's pod's DCGM_FI_DEV_GPU_UTIL series / 100      (0..1)

to the endpoint (`llmepp.datalayer.dcgm` has the exact series rule; `DcgmPoller` runs the two).
`endpoint-attribute-filter` / `endpoint-attribute-scorer` read it as attribute `GPUUtilization`,
with `producer: <extractor name>` (the reference's form) or without. A vLLM scrape never erases it:
it lives in `endpoint.attributes`, not in the scraped metrics.

    plugins:
    - type: dcgm-data-source
      parameters: {port: 9400, useNodeAddress: true}
    - type: dcgm-extractor
    - type: endpoint-attribute-filter
      parameters:
        attribute: GPUUtilization
        producer: dcgm-extractor
        algorithm: {type: threshold, threshold: {operator: LessThan, value: 0.9}}
    dataLayer:
      sources:
      - pluginRef: dcgm-data-source
        extractors: [{pluginRef: dcgm-extractor}]

A config with a `dcgm-extractor` and no `dataLayer.sources` entry for the source gets the two
wired (a default `dcgm-data-source` is made when none is configured).
"""

from __future__ import annotations

from typing import Annotated, ClassVar

import msgspec

from llmepp.datalayer.dcgm import DCGM_EXTRACTOR_TYPE, GPU_UTILIZATION
from llmepp.datalayer.endpoint import EndpointSpec
from llmepp.datalayer.httpscrape import ScrapeTarget
from llmepp.framework.datalayer import AttributeExtractor
from llmepp.plugins.datasources.http_source import HttpDataSource, HttpSourceParams

DCGM_SOURCE_TYPE = "dcgm-data-source"
# The exporter recomputes its page every few seconds (dcgm-exporter's collection interval is 30 s
# by default), so polling it at the 50 ms metrics rate would only multiply identical fetches.
DEFAULT_INTERVAL = 1.0


class DcgmDataSource(HttpDataSource):
    """Polls every endpoint's DCGM exporter page every `interval` (1s).

    Parameters: `port` (9400: the exporter's, not the model server's), `path` (/metrics),
    `useNodeAddress` (false: the pod's IP; true: its node's address, Kubernetes discovery only —
    refused at start-up with file discovery, whose endpoints have no node address), `scheme`
    (http), `interval`, TLS (`insecureSkipVerify` true, `caCertPath`, `clientCertPath` /
    `clientKeyPath`)."""

    type = DCGM_SOURCE_TYPE
    pod_only = "scrapes the GPU metrics of each pod's DCGM exporter"

    class Params(HttpSourceParams):
        path: str = "/metrics"
        port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 9400
        use_node_address: bool = False

    def __init__(self, name: str = "", params: Params | None = None) -> None:
        p = params if params is not None else self.Params()
        super().__init__(name, p)
        self.use_node_address = p.use_node_address

    @property
    def poll_interval(self) -> float:
        return self.interval if self.interval is not None else DEFAULT_INTERVAL

    def target_for(self, spec: EndpointSpec) -> ScrapeTarget:
        """The pod's exporter, or with `useNodeAddress` its node's (DcgmPoller skips an endpoint
        whose node address is unknown rather than scrape another host)."""
        host = spec.node_address if self.use_node_address else spec.address
        assert self.port is not None  # Params gives it a default
        return ScrapeTarget(host, self.port, self.path, self.ssl_context)


class DcgmExtractor(AttributeExtractor):
    """Reads `DCGM_FI_DEV_GPU_UTIL` off the pages of the `dcgm-data-source` it is wired to and
    attaches `GPUUtilization` (0..1) to each endpoint. Parameters: none."""

    type = DCGM_EXTRACTOR_TYPE
    pod_only = "reads the GPU metrics of each pod's DCGM exporter"
    endpoint_attributes = frozenset({GPU_UTILIZATION})
    # Declared so a filter / scorer naming this plugin as its `producer` finds its attribute
    # produced (the loader checks every consumed key has a producer).
    produces = frozenset({GPU_UTILIZATION})
    data_sources: ClassVar[tuple[tuple[str, str], ...]] = ((DCGM_SOURCE_TYPE, DCGM_EXTRACTOR_TYPE),)
