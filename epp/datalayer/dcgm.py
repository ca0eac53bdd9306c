"""GPU utilisation from the NVIDIA DCGM exporter: its page read, and the poller that keeps it.

The exporter publishes one `DCGM_FI_DEV_GPU_UTIL` gauge per GPU: the percentage (0-100) of the
last sample period during which a kernel ran. Run as a DaemonSet with `DCGM_EXPORTER_KUBERNETES=true`
(the GPU Operator's default) each series names the pod using that GPU in a `pod` label, so a
node's page mixes pods; run as a sidecar its page is the pod's own GPUs, usually unlabelled.

    GPUUtilization(e) = max{ value(s) : s a DCGM_FI_DEV_GPU_UTIL series whose `pod` label is
                             e's pod, or that has no `pod` label } / 100

(the reference extractor's rule). The max because a tensor-parallel pod is as busy as its busiest
GPU. A sample line that is malformed (or not finite) is skipped and counted; the other GPUs
still count. No series left is an extraction error, and the endpoint keeps its last value.

`DcgmPoller` (a `PagePoller`) fetches each endpoint's page every `interval` and stores the value
in `endpoint.attributes` under the extractor's key, out of reach of the vLLM metrics scrape.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from llmepp.datalayer.datastore import Datastore
from llmepp.datalayer.endpoint import Endpoint, EndpointSpec
from llmepp.datalayer.httpscrape import ScrapeTarget
from llmepp.datalayer.pagepoll import PageError, PagePoller, PageSource
from llmepp.datalayer.promtext import Selector
from llmepp.framework.plugin import ConfigError
from llmepp.observability.metrics import EppMetrics

__all__ = [
    "DCGM_EXTRACTOR_TYPE",
    "GPU_UTILIZATION",
    "GPU_UTIL_METRIC",
    "DcgmPageError",
    "DcgmPoller",
    "GpuReading",
    "parse_gpu_utilization",
]

GPU_UTIL_METRIC = "DCGM_FI_DEV_GPU_UTIL"
POD_LABEL = "pod"
# The endpoint attribute (reference `attrgpu.GPUUtilizationDataKey`) and the extractor type.
GPU_UTILIZATION = "GPUUtilization"
DCGM_EXTRACTOR_TYPE = "dcgm-extractor"

_SELECTOR = Selector(GPU_UTIL_METRIC)


class DcgmPageError(PageError):
    """A DCGM page that gives no utilisation for the endpoint's pod (or gave it from a partly broken page)."""


@dataclass(frozen=True, slots=True)
class GpuReading:
    utilization: float  # 0..1: the busiest of the pod's GPUs
    gpus: int  # series that counted
    skipped: int  # malformed or non-finite sample lines of the metric


def parse_gpu_utilization(page: bytes, pod: str) -> GpuReading:
    """The pod's GPU utilisation on a DCGM page; raises DcgmPageError when it has none."""
    found, skipped = _SELECTOR.series_skipping_malformed(page)
    best = -math.inf
    gpus = 0
    for s in found:
        owner = s.labels.get(POD_LABEL)
        if owner is not None and owner != pod:
            continue  # another pod's GPU on a node-wide page (an unassigned GPU has pod="")
        if not math.isfinite(s.value):
            skipped += 1
            continue
        gpus += 1
        if s.value > best:
            best = s.value
    if not gpus:
        if not found and not skipped:
            raise DcgmPageError(f"{GPU_UTIL_METRIC} not found")
        why = f"no usable {GPU_UTIL_METRIC} series for pod {pod!r}"
        raise DcgmPageError(f"{why} ({skipped} malformed sample lines skipped)" if skipped else why)
    return GpuReading(best / 100.0, gpus, skipped)


class DcgmSource(PageSource, Protocol):
    """What the poller needs from the source plugin (dcgm-data-source)."""

    @property
    def name(self) -> str: ...

    @property
    def use_node_address(self) -> bool: ...


class DcgmExtractor(Protocol):
    """What the poller needs from the extractor plugin (dcgm-extractor)."""

    @property
    def type(self) -> str: ...

    @property
    def name(self) -> str: ...

    def attribute_key(self, attribute: str) -> str: ...


class DcgmPoller(PagePoller):
    """Fetches every endpoint's DCGM page every `source.poll_interval` and stores GPUUtilization in
    `endpoint.attributes[extractor.attribute_key("GPUUtilization")]` for each wired extractor.

    `node_addresses`: whether discovery records each endpoint's node address (Kubernetes mode);
    a source with `useNodeAddress` is refused without it rather than scraping somewhere else."""

    what = "DCGM page"
    no_target = "no node address (the pod's status.hostIP) to fetch it from"

    def __init__(
        self,
        datastore: Datastore,
        metrics: EppMetrics,
        source: DcgmSource,
        extractors: Sequence[DcgmExtractor],
        *,
        node_addresses: bool,
        timeout: float = 1.0,
    ) -> None:
        label = f"plugin {source.name!r} (type {source.type})"
        if not extractors:
            raise ConfigError(f"dataLayer.sources: {label} has no extractor; add a {DCGM_EXTRACTOR_TYPE}")
        for x in extractors:
            if x.type != DCGM_EXTRACTOR_TYPE:
                raise ConfigError(
                    f"dataLayer.sources: {label} feeds only {DCGM_EXTRACTOR_TYPE} extractors, "
                    f"not {x.name!r} (type {x.type})"
                )
        if source.use_node_address and not node_addresses:
            raise ConfigError(
                f"{label}: parameters.useNodeAddress: true needs each endpoint's node address, which only "
                "Kubernetes discovery records (the pod's status.hostIP); endpoints from a discovery plugin "
                "(file-discovery) have none. Scrape the exporter as a sidecar (useNodeAddress: false) instead"
            )
        self.use_node_address = source.use_node_address
        super().__init__(datastore, metrics, source, DCGM_EXTRACTOR_TYPE, timeout)
        self.keys = tuple(x.attribute_key(GPU_UTILIZATION) for x in extractors)

    def target_for(self, spec: EndpointSpec) -> ScrapeTarget | None:
        if self.use_node_address and not spec.node_address:
            return None  # the node address is unknown: skipped, never scraped at some other host
        return self.source.target_for(spec)

    def store(self, endpoint: Endpoint, body: bytes) -> PageError | None:
        reading = parse_gpu_utilization(body, endpoint.spec.pod)
        for key in self.keys:
            endpoint.attributes[key] = reading.utilization
        if reading.skipped:
            # Applied (the good GPUs are real data), but the page is counted as a broken one.
            return DcgmPageError(f"{reading.skipped} malformed {GPU_UTIL_METRIC} sample lines skipped")
        return None
