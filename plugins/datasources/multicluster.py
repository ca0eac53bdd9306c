"""`multicluster-metrics-data-source` and `multicluster-metrics-extractor`: each cluster's load, as its
own EPP publishes it.

A hub EPP (endpoints = clusters, from `multicluster-file-discovery`) scrapes every cluster's EPP
/metrics page with the pod scraper (`MetricsCollector`, one keep-alive connection per cluster) and
reads the pool averages that EPP publishes (llmepp.datalayer.multicluster):

    pool KV-cache utilization(c) = llm_d_epp_average_kv_cache_utilization on c's EPP page   (0..1)
    pool queue size(c)           = llm_d_epp_average_queue_size on c's EPP page
    ready endpoints(c)           = llm_d_epp_ready_endpoints on c's EPP page
    pool running requests(c)     = llm_d_epp_average_running_requests on c's EPP page (optional)

which `multicluster-kv-cache-utilization-scorer` and `multicluster-queue-scorer` score. The gauges are
the peer EPP's, over its pods, refreshed every `--refresh-prometheus-metrics-interval` there (5 s
by default: run the cluster EPPs with e.g. `--refresh-prometheus-metrics-interval 1s` for a hub that
follows load faster). A cluster whose EPP reports 0 ready endpoints is unavailable: the extractor, a
screener as well, takes it out of every request's candidates (all clusters stay when none is
available), and the change is counted (`llm_d_epp_multicluster_cluster_unavailable_total{cluster}`)
and logged once (WARNING; INFO when it ends). The hub publishes its own pool gauges from these
(llmepp.datalayer.multicluster.pool_averages), so a hub can itself be a cluster of another hub.

The cluster EPPs' metrics endpoint must answer the hub: in Kubernetes mode an EPP checks the
scraper's bearer token (`--metrics-endpoint-auth`), and this source sends none (nor does the
reference's), so turn that off on the cluster EPPs and, to protect the page, serve it over mTLS
(`--metrics-cert-dir` + `--metrics-client-ca-file` there, `caCertPath` + `clientCertPath` /
`clientKeyPath` here).

    plugins:
    - type: multicluster-file-discovery
      parameters: {path: /etc/epp/clusters.yaml, watchFile: true}
    - type: multicluster-metrics-data-source
      parameters: {scheme: http, interval: 1s}
    - type: multicluster-metrics-extractor
    - type: multicluster-queue-scorer
    - type: multicluster-kv-cache-utilization-scorer
    dataLayer:
      discovery: {pluginRef: multicluster-file-discovery}
      sources:
      - pluginRef: multicluster-metrics-data-source
        extractors: [{pluginRef: multicluster-metrics-extractor}]

A cluster whose scrape fails is counted (`llm_d_epp_datalayer_poll_errors_total{source_type=
"multicluster-metrics-data-source"}` for an unreachable peer, a timeout or a non-200 status;
`llm_d_epp_datalayer_extract_errors_total{..., extractor_type="multicluster-metrics-extractor"}` for a
page that is malformed, lacks a gauge or has an impossible value: NaN, ±Inf, negative), logged
(WARNING on the first failure, again every 30 s while it lasts, INFO on recovery; a 401 / 403 with its
fix) and from that scrape on has no value for what could not be read: unknown, which the scorers rank
below every cluster whose load is known — never as an idle cluster, which would draw all the traffic
to the one cluster nobody can see.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

from llmepp.datalayer.endpoint import NO_METRICS, Endpoint, EndpointMetrics, EndpointSpec
from llmepp.datalayer.engines import CustomMetricSpec, EngineMapping, EngineSpecs, ExtractionFailed, PageMemo
from llmepp.datalayer.httpscrape import BadStatus, ScrapeError, ScrapeTarget
from llmepp.datalayer.multicluster import (
    DEFAULT_KV_METRIC,
    DEFAULT_QUEUE_METRIC,
    DEFAULT_READY_METRIC,
    DEFAULT_RUNNING_METRIC,
    EXTRACTOR_TYPE,
    METRICS_ADDRESS_LABEL,
    METRICS_PORT_LABEL,
    POOL_KV_CACHE_UTILIZATION,
    POOL_QUEUE_SIZE,
    POOL_READY_ENDPOINTS,
    POOL_RUNNING_REQUESTS,
    SOURCE_TYPE,
    available,
    cluster_metrics,
)
from llmepp.datalayer.promtext import InvalidSpec, Selector
from llmepp.framework.plugin import ConfigError, PluginParams
from llmepp.framework.requestcontrol import Screener
from llmepp.plugins.datasources.metrics_source import MetricsDataSource
from llmepp.request.types import InferenceRequest

# A peer that keeps failing is logged again this often (the first failure and the recovery always are).
FAILURE_LOG_INTERVAL = 30.0


class AuthRequired(BadStatus):
    """A cluster EPP refused the hub's scrape for want of a bearer token (which a hub does not send)."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.args = (
            f"HTTP status {status}: the cluster EPP's /metrics wants a bearer token, which a hub does not send; "
            "run that EPP with --metrics-endpoint-auth=false (and protect /metrics with mTLS: "
            "--metrics-client-ca-file there, clientCertPath / clientKeyPath here)",
        )


class MulticlusterMetricsDataSource(MetricsDataSource):
    """Scrapes every cluster's EPP metrics page: `scheme://host:port/path`.

    host = the entry's `metricsAddress` label, else its gateway address; port = the `port` parameter,
    else the entry's `metricsPort` (label or field), else its gateway port.

    Parameters (reference defaults): `scheme` https, `path` /metrics, `insecureSkipVerify` false — unlike
    the pod source, the peer's certificate is verified (the scrape crosses a trust boundary): give
    `caCertPath` for a private CA, or `insecureSkipVerify: true` to opt out — `caCertPath`,
    `clientCertPath` / `clientKeyPath` (mTLS), `port`, `interval` (default: every
    `--refresh-metrics-interval` tick; rounded to whole ticks). A page is read up to 16 MiB (the
    scraper's cap for every source). A failed scrape leaves the cluster's load unknown (see the module
    docstring).
    """

    type = SOURCE_TYPE
    pod_only = ""
    forget_on_failure: ClassVar[bool] = True
    clusters_as_endpoints: ClassVar[bool] = True
    failure_log_interval: ClassVar[float] = FAILURE_LOG_INTERVAL

    class Params(MetricsDataSource.Params):
        scheme: str = "https"
        insecure_skip_verify: bool = False

    def explain_failure(self, err: ScrapeError) -> Exception:
        """A failed scrape as logged: a 401 / 403 says how to fix it (the hub sends no bearer token)."""
        if isinstance(err, BadStatus) and err.status in (401, 403):
            return AuthRequired(err.status)
        return err

    def target_for(self, spec: EndpointSpec) -> ScrapeTarget:
        labels = spec.labels
        host = labels.get(METRICS_ADDRESS_LABEL) or spec.address
        label_port = labels.get(METRICS_PORT_LABEL, "")
        port = self.port or (int(label_port) if label_port.isdecimal() else 0) or spec.metrics_port or spec.port
        return ScrapeTarget(host, port, self.path, self.ssl_context)


# A ready count at or past this is no pool's (the reference's counts are int64).
_MAX_READY = 2.0**63
_WHAT = {
    POOL_KV_CACHE_UTILIZATION: "KV-cache utilization",
    POOL_QUEUE_SIZE: "queue size",
    POOL_READY_ENDPOINTS: "ready endpoint count",
    POOL_RUNNING_REQUESTS: "running request count",
}


class PoolAverages(EngineMapping):
    """The pool gauges as endpoint attributes (and, while the cluster is available and both averages
    are known, as its per-endpoint fields: multicluster.cluster_metrics). Nothing carries over from the
    previous scrape: a gauge the page lacks is absent (unknown), and a page with none resets the
    endpoint to NO_METRICS; the problem is still reported (an extraction error; not for the optional
    running-requests gauge). A negative value, or a ready count past int64, is a broken peer: dropped
    (unknown) and reported as an extraction error, as a missing gauge is."""

    __slots__ = ()

    def extract(
        self, page: bytes, previous: EndpointMetrics, now: float, memo: PageMemo | None = None
    ) -> tuple[EndpointMetrics, ExtractionFailed | None]:
        metrics, err = super().extract(page, NO_METRICS, now, memo)
        if metrics is None:
            return NO_METRICS, err
        attributes = metrics.attributes
        # NaN / Inf are refused by the parser; a negative average (or a ready count no pool has) is a
        # broken peer too: unknown, as a missing gauge, never the idlest cluster or a negative weight.
        bad = {k: v for k, v in attributes.items() if v < 0.0 or (k == POOL_READY_ENDPOINTS and v >= _MAX_READY)}
        if bad:
            attributes = {k: v for k, v in attributes.items() if k not in bad}
            spec = {c.attribute_key: c.metric_spec for c in self.specs.custom}
            problems = [
                f"custom metric {k}: {spec[k]}: value {v} is not a pool {_WHAT.get(k, k)}" for k, v in bad.items()
            ]
            err = ExtractionFailed([*(err.problems if err is not None else ()), *problems])
            if not attributes:
                return NO_METRICS, err
        return cluster_metrics(attributes, now), err


class MulticlusterMetricsExtractor(Screener):
    """Reads a cluster EPP's pool gauges into the attributes the multicluster scorers read, and screens
    out the clusters whose EPP reports no ready endpoints (see the module docstring).

    Parameters: `kvCacheUtilizationMetric` (llm_d_epp_average_kv_cache_utilization), `queueSizeMetric`
    (llm_d_epp_average_queue_size), `readyEndpointsMetric` (llm_d_epp_ready_endpoints),
    `runningRequestsMetric` (llm_d_epp_average_running_requests; optional on the page): metric specs,
    `name` or `name{label=value}`; empty = the default. Wire it under a `multicluster-metrics-data-source`
    in `dataLayer.sources`.
    """

    type = EXTRACTOR_TYPE

    class Params(PluginParams):
        kv_cache_utilization_metric: str = DEFAULT_KV_METRIC
        queue_size_metric: str = DEFAULT_QUEUE_METRIC
        ready_endpoints_metric: str = DEFAULT_READY_METRIC
        running_requests_metric: str = DEFAULT_RUNNING_METRIC

    def __init__(self, name: str = "", params: Params | None = None) -> None:
        p = params if params is not None else self.Params()
        super().__init__(name, p)
        kv = p.kv_cache_utilization_metric.strip() or DEFAULT_KV_METRIC
        queue = p.queue_size_metric.strip() or DEFAULT_QUEUE_METRIC
        ready = p.ready_endpoints_metric.strip() or DEFAULT_READY_METRIC
        running = p.running_requests_metric.strip() or DEFAULT_RUNNING_METRIC
        for field, spec in (
            ("kvCacheUtilizationMetric", kv),
            ("queueSizeMetric", queue),
            ("readyEndpointsMetric", ready),
            ("runningRequestsMetric", running),
        ):
            try:
                Selector.parse(spec)
            except InvalidSpec as e:
                raise ConfigError(f"parameters.{field}: {e}") from None
        self.mapping = PoolAverages(
            EngineSpecs(
                name="epp-pool-averages",
                custom=(
                    CustomMetricSpec(POOL_KV_CACHE_UTILIZATION, kv),
                    CustomMetricSpec(POOL_QUEUE_SIZE, queue),
                    CustomMetricSpec(POOL_READY_ENDPOINTS, ready),
                    CustomMetricSpec(POOL_RUNNING_REQUESTS, running, optional=True),
                ),
            )
        )

    def mapping_for(self, labels: Mapping[str, str]) -> EngineMapping:
        """The same mapping for every cluster (the collector's MappingProvider)."""
        return self.mapping

    def screen(self, request: InferenceRequest, candidates: Sequence[Endpoint]) -> Sequence[Endpoint]:
        """The candidates without the clusters whose EPP reports no ready endpoints (all of them when
        every one does)."""
        return available(candidates)
