"""dcgm-data-source / dcgm-extractor: the page rule (max of the pod's GPUs / 100, malformed lines
skipped and counted), the poller against real HTTP servers on 127.0.0.x (a vLLM scrape on the same
endpoint included: it must not erase the GPU utilisation), config loading with the reference's
YAML, endpoint-attribute-filter / -scorer reading GPUUtilization, and start-up errors."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from helpers import FILE_CONFIG, request
from hypothesis import given
from hypothesis import strategies as st

from llmepp.app import App
from llmepp.config.loader import Components, build, load_config
from llmepp.datalayer.collector import MetricsCollector
from llmepp.datalayer.datastore import Datastore
from llmepp.datalayer.dcgm import DcgmPageError, DcgmPoller, parse_gpu_utilization
from llmepp.datalayer.endpoint import Endpoint, EndpointMetrics, EndpointSpec
from llmepp.director import Director, RoutingDecision
from llmepp.framework.plugin import ConfigError
from llmepp.observability.metrics import EppMetrics
from llmepp.plugins.datasources.core_metrics import CoreMetricsExtractor
from llmepp.plugins.datasources.dcgm import DcgmDataSource, DcgmExtractor
from llmepp.plugins.datasources.metrics_source import MetricsDataSource
from llmepp.settings import Settings

from .fakes import MetricsServer
from .vllm_page import vllm_page

KEY = "GPUUtilization/dcgm-extractor"
HEADER = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"


def dcgm_page(*series: tuple[str, float | str], extra: bytes = b"") -> bytes:
    """A dcgm-exporter page: (labels inside the braces, value) per GPU, among the exporter's other families."""
    lines = [
        "# HELP DCGM_FI_DEV_SM_CLOCK SM clock frequency (in MHz).",
        "# TYPE DCGM_FI_DEV_SM_CLOCK gauge",
        'DCGM_FI_DEV_SM_CLOCK{gpu="0",UUID="GPU-0",device="nvidia0",modelName="NVIDIA H100 80GB HBM3"} 1980',
        "# HELP DCGM_FI_DEV_GPU_UTIL GPU utilization (in %).",
        "# TYPE DCGM_FI_DEV_GPU_UTIL gauge",
    ]
    lines += [f"DCGM_FI_DEV_GPU_UTIL{{{labels}}} {value}" for labels, value in series]
    lines += [
        "# HELP DCGM_FI_DEV_FB_USED Framebuffer memory used (in MiB).",
        "# TYPE DCGM_FI_DEV_FB_USED gauge",
        'DCGM_FI_DEV_FB_USED{gpu="0",UUID="GPU-0"} 74000',
    ]
    return ("\n".join(lines) + "\n").encode() + extra


def gpu(i: int, pod: str | None = None, namespace: str = "llm") -> str:
    base = f'gpu="{i}",UUID="GPU-{i}",device="nvidia{i}",modelName="NVIDIA H100 80GB HBM3",Hostname="node-1"'
    if pod is None:
        return base
    return base + f',container="vllm",namespace="{namespace}",pod="{pod}"'


# -- the page rule ----------------------------------------------------------------------------------
def test_a_sidecar_page_gives_the_busiest_gpu() -> None:
    r = parse_gpu_utilization(dcgm_page((gpu(0), 35), (gpu(1), 87), (gpu(2), 12), (gpu(3), 0)), "vllm-0")
    assert (r.utilization, r.gpus, r.skipped) == (0.87, 4, 0)


def test_a_node_page_counts_only_the_pods_own_gpus() -> None:
    page = dcgm_page((gpu(0, "vllm-0"), 40), (gpu(1, "vllm-0"), 55), (gpu(2, "vllm-1"), 99), (gpu(3, ""), 100))
    assert parse_gpu_utilization(page, "vllm-0").utilization == 0.55
    assert parse_gpu_utilization(page, "vllm-1").utilization == 0.99  # the unassigned GPU (pod="") never counts
    with pytest.raises(DcgmPageError, match=r"no usable DCGM_FI_DEV_GPU_UTIL series for pod 'vllm-2'$"):
        parse_gpu_utilization(page, "vllm-2")


def test_malformed_lines_are_skipped_and_counted() -> None:
    page = dcgm_page(
        (gpu(0), 20),
        (gpu(1), "abc"),  # bad value
        ('gpu="2",UUID="GPU-2', 90),  # unterminated label text
        (gpu(3), "NaN"),  # parses, but is no utilisation
        (gpu(4), "1_0"),  # Python-only number spelling
        (gpu(5), 60),
    )
    r = parse_gpu_utilization(page, "vllm-0")
    assert (r.utilization, r.gpus, r.skipped) == (0.6, 2, 4)
    # Label text that is not UTF-8 is one more malformed line (its pod cannot be told).
    not_utf8 = parse_gpu_utilization(page.replace(b'{gpu="5"', b'{pod="\xff",gpu="5"'), "vllm-0")
    assert (not_utf8.utilization, not_utf8.gpus, not_utf8.skipped) == (0.2, 1, 5)
    broken = dcgm_page((gpu(0), "x"), (gpu(1), "Inf"))
    with pytest.raises(DcgmPageError, match=r"series for pod 'vllm-0' \(2 malformed sample lines skipped\)"):
        parse_gpu_utilization(broken, "vllm-0")
    with pytest.raises(DcgmPageError, match="DCGM_FI_DEV_GPU_UTIL not found"):
        parse_gpu_utilization(b"<html>not metrics</html>", "vllm-0")
    with pytest.raises(DcgmPageError, match=r"\(1 malformed sample lines skipped\)"):  # a bare name: no value
        parse_gpu_utilization(b"\xff\xfe\x00garbage\nDCGM_FI_DEV_GPU_UTIL", "vllm-0")


@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_crash_the_page_reader(tail: bytes) -> None:
    for page in (tail, dcgm_page((gpu(0), 50)) + tail, b"DCGM_FI_DEV_GPU_UTIL" + tail):
        try:
            r = parse_gpu_utilization(page, "vllm-0")
        except DcgmPageError:
            continue
        assert r.gpus >= 1 and r.skipped >= 0 and math.isfinite(r.utilization)


# -- the poller against real servers ------------------------------------------------------------------
ServerFactory = Callable[..., Awaitable[MetricsServer]]


@pytest.fixture
async def servers() -> AsyncIterator[ServerFactory]:
    started: list[MetricsServer] = []

    async def start(host: str, page: bytes) -> MetricsServer:
        s = await MetricsServer(host, page).start()
        started.append(s)
        return s

    yield start
    for s in started:
        await s.stop()


async def until(cond: Callable[[], bool], within: float = 3.0) -> None:
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def errors(metrics: EppMetrics) -> tuple[float, float]:
    poll = metrics.registry.get_sample_value(
        "llm_d_epp_datalayer_poll_errors_total", {"source_type": "dcgm-data-source"}
    )
    extract = metrics.registry.get_sample_value(
        "llm_d_epp_datalayer_extract_errors_total",
        {"source_type": "dcgm-data-source", "extractor_type": "dcgm-extractor"},
    )
    return poll or 0.0, extract or 0.0


def source(**params: Any) -> DcgmDataSource:
    return DcgmDataSource("dcgm-data-source", DcgmDataSource.Params(**params))


def poller(ds: Datastore, metrics: EppMetrics, extractor: str = "dcgm-extractor", **params: Any) -> DcgmPoller:
    """A Kubernetes-mode poller (node addresses known) of one source and one extractor."""
    return DcgmPoller(ds, metrics, source(**params), [DcgmExtractor(extractor)], node_addresses=True)


def added(ds: Datastore, spec: EndpointSpec) -> Endpoint:
    ds.upsert(spec)
    found = ds.get(spec.name, spec.namespace)
    assert found is not None
    return found


async def test_the_poller_keeps_each_endpoints_gpu_utilisation(servers: ServerFactory) -> None:
    a = await servers("127.0.0.160", dcgm_page((gpu(0), 35), (gpu(1), 87)))
    node = await servers("127.0.0.161", dcgm_page((gpu(0, "p-0"), 10), (gpu(1, "p-1"), 70)))
    metrics, ds = EppMetrics(), Datastore(pool_name="pool")
    sidecar = poller(ds, metrics, port=a.port, interval="50ms")
    node_poller = poller(ds, metrics, "gpu", port=node.port, interval="50ms", use_node_address=True)
    await sidecar.start()
    await node_poller.start()
    try:
        # The sidecar exporter on the pod's IP; the DaemonSet one on the node's address (pods elsewhere).
        ep = added(ds, EndpointSpec(name="a", address=a.host, port=8000))
        p0 = added(ds, EndpointSpec(name="p-0-rank-0", address="10.9.0.1", port=8000, pod_name="p-0",
                                    node_address=node.host))  # fmt: skip
        p1 = added(ds, EndpointSpec(name="p-1-rank-0", address="10.9.0.2", port=8000, pod_name="p-1",
                                    node_address=node.host))  # fmt: skip
        await until(lambda: KEY in ep.attributes and "GPUUtilization/gpu" in p0.attributes)
        await until(lambda: "GPUUtilization/gpu" in p1.attributes)
        assert ep.attributes[KEY] == 0.87
        assert (p0.attributes["GPUUtilization/gpu"], p1.attributes["GPUUtilization/gpu"]) == (0.10, 0.70)

        # The page changes: the next poll shows it.
        a.page = dcgm_page((gpu(0), 5), (gpu(1), 20))
        await until(lambda: ep.attributes[KEY] == 0.20)

        # Some lines malformed: the good GPUs still count, the page counts as an extraction error.
        a.page = dcgm_page((gpu(0), 44), (gpu(1), "garbage"), ('gpu="2",bad', 99))
        await until(lambda: ep.attributes[KEY] == 0.44)
        assert errors(metrics)[1] >= 1

        # No usable series: counted, the last value stays.
        seen = errors(metrics)[1]
        a.page = b"# HELP DCGM_FI_DEV_FB_USED x\nDCGM_FI_DEV_FB_USED 1\n"
        await until(lambda: errors(metrics)[1] >= seen + 2)
        assert ep.attributes[KEY] == 0.44
        # A failing exporter: counted likewise.
        a.mode = "status"
        await until(lambda: errors(metrics)[0] >= 1)
        assert ep.attributes[KEY] == 0.44

        # A removed endpoint is no longer polled.
        ds.delete("a")
        await asyncio.sleep(0.1)
        before = a.requests
        await asyncio.sleep(0.2)
        assert a.requests == before
    finally:
        await sidecar.aclose()
        await node_poller.aclose()


async def test_an_endpoint_without_a_node_address_is_skipped_not_scraped_elsewhere(servers: ServerFactory) -> None:
    s = await servers("127.0.0.162", dcgm_page((gpu(0), 50)))
    metrics, ds = EppMetrics(), Datastore()
    p = poller(ds, metrics, port=s.port, use_node_address=True, interval="50ms")
    await p.start()
    try:
        ep = added(ds, EndpointSpec(name="a", address=s.host, port=8000))  # its own IP serves a page: not asked
        await asyncio.sleep(0.2)
        assert s.requests == 0 and KEY not in ep.attributes
        # Discovery learns the node address (spec replaced in place): polled from then on.
        ds.upsert(EndpointSpec(name="a", address=s.host, port=8000, node_address=s.host))
        await until(lambda: ep.attributes.get(KEY) == 0.5)
    finally:
        await p.aclose()


async def test_a_vllm_scrape_does_not_erase_the_gpu_utilisation(servers: ServerFactory) -> None:
    """Both sources on one endpoint: the metrics collector replaces `endpoint.metrics` on every
    scrape; the GPU utilisation lives apart and survives every one of them."""
    vllm = await servers("127.0.0.163", vllm_page(waiting=2))
    exporter = await servers("127.0.0.163", dcgm_page((gpu(0), 64)))
    metrics, ds = EppMetrics(), Datastore()
    collector = MetricsCollector(ds, metrics, 0.05, MetricsDataSource("metrics-data-source"), CoreMetricsExtractor())
    dcgm = poller(ds, metrics, port=exporter.port, interval="1s")
    await collector.start()
    await dcgm.start()
    try:
        ep = added(ds, EndpointSpec(name="a", address=vllm.host, port=vllm.port))
        await until(lambda: KEY in ep.attributes and ep.metrics.update_time > 0)
        exporter.mode = "status"  # from now on only the vLLM scrapes touch the endpoint
        first = ep.metrics
        vllm.page = vllm_page(waiting=7)
        await until(lambda: ep.metrics.waiting_queue_size == 7)  # at least one more scrape replaced metrics
        await asyncio.sleep(0.3)  # ~6 more scrapes at 50 ms, none of them a DCGM poll (1 s)
        assert ep.metrics is not first
        assert ep.attributes[KEY] == 0.64
        assert KEY not in ep.metrics.attributes
    finally:
        await collector.aclose()
        await dcgm.aclose()


# -- configuration --------------------------------------------------------------------------------------
# The reference's dcgm-data-source README example (DaemonSet mode left out: file endpoints), with an
# endpoint-attribute-filter in its `producer` form and a scorer without it.
CONFIG = (
    HEADER
    + """
plugins:
- type: dcgm-data-source
  name: dcgm-source
  parameters:
    port: 9400
- type: dcgm-extractor
  name: dcgm-extractor
- type: endpoint-attribute-filter
  name: gpu-not-saturated
  parameters:
    attribute: GPUUtilization
    producer: dcgm-extractor
    onMissing: Pass
    fallbackOnEmpty: true
    algorithm: {type: threshold, threshold: {operator: LessThan, value: 0.9}}
- type: endpoint-attribute-scorer
  name: gpu-idle
  parameters:
    attributeKey: GPUUtilization
    algorithm: {type: linear_lower_is_better, normalization: {fixedRange: {min: 0, max: 1}}}
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: gpu-not-saturated
  - pluginRef: gpu-idle
  - pluginRef: max-score-picker
dataLayer:
  sources:
  - pluginRef: dcgm-source
    extractors:
    - pluginRef: dcgm-extractor
"""
)


def built(text: str, n: int = 4) -> tuple[Components, Datastore]:
    ds = Datastore()
    for i in range(n):
        ds.upsert(EndpointSpec(name=f"pod-{i}", address=f"10.4.0.{i + 1}", port=8000))
    for ep in ds.endpoints:
        ep.metrics = EndpointMetrics(update_time=1.0)
    return build(load_config(text), datastore=ds, metrics=EppMetrics()), ds


async def test_the_reference_config_loads_and_gpu_utilisation_drives_scheduling() -> None:
    c, ds = built(CONFIG)
    src = c.plugins["dcgm-source"]
    assert isinstance(src, DcgmDataSource)
    assert (src.port, src.path, src.use_node_address, src.poll_interval) == (9400, "/metrics", False, 1.0)
    wired = {d.source.name: [x.name for x in d.extractors] for d in c.data_sources}
    assert wired["dcgm-source"] == ["dcgm-extractor"]
    assert src.target_for(ds.endpoints[0].spec).url == "http://10.4.0.1:9400/metrics"

    # pod-0 and pod-1 saturated (filtered), pod-2 busier than pod-3, pod-4 never reported (kept, scores 0).
    eps = {ep.name: ep for ep in ds.endpoints}
    for name, util in (("pod-0", 0.95), ("pod-1", 0.9), ("pod-2", 0.5), ("pod-3", 0.2)):
        eps[name].attributes[KEY] = util
    d = Director(ds, c.pipeline, EppMetrics())
    for _ in range(5):
        decision = await d.handle_request(request(b"x"), None)
        assert isinstance(decision, RoutingDecision)
        assert decision.targets[0].name == "pod-3"
    req = request(b"x")
    f = c.plugins["gpu-not-saturated"]
    assert [ep.name for ep in f.filter(req, ds.endpoints)] == ["pod-2", "pod-3"]  # type: ignore[attr-defined]
    s = c.plugins["gpu-idle"]
    assert s.score(req, ds.endpoints) == pytest.approx([0.05, 0.1, 0.5, 0.8])  # type: ignore[attr-defined]


def test_a_lone_dcgm_extractor_gets_its_source_wired() -> None:
    c, _ = built(HEADER + "plugins:\n- type: dcgm-extractor\n- type: queue-scorer\n")
    wired = {d.source.type: [x.type for x in d.extractors] for d in c.data_sources}
    assert wired["dcgm-data-source"] == ["dcgm-extractor"]
    assert isinstance(c.plugins["dcgm-data-source"], DcgmDataSource)


@pytest.mark.parametrize(
    ("plugins", "message"),
    [
        ("- {type: dcgm-data-source, parameters: {port: 0}}", "`parameters.port`"),
        ("- {type: dcgm-data-source, parameters: {port: 70000}}", "`parameters.port`"),
        ("- {type: dcgm-data-source, parameters: {useNodeAddress: maybe}}", "`parameters.useNodeAddress`"),
        ("- {type: dcgm-data-source, parameters: {path: metrics}}", "path: must be an absolute URL path"),
        ("- {type: dcgm-data-source, parameters: {scheme: ftp}}", "scheme: must be http or https"),
        ("- {type: dcgm-data-source, parameters: {interval: 0s}}", "interval: must be positive"),
        ("- {type: dcgm-data-source, parameters: {podLabel: pod}}", "unknown field `podLabel`"),
        # (dcgm-extractor takes no parameters: a block is ignored with a warning, as the reference's factory
        # ignores its decoder; tests/plugins/test_reference_configs.py)
        # The filter names an attribute the extractor does not attach, or no extractor is there.
        ("- {type: dcgm-extractor}\n- type: endpoint-attribute-filter\n  parameters: {attribute: GPUUtilization,"
         " producer: nope, algorithm: {type: threshold, threshold: {operator: LessThan, value: 1}}}",
         "no plugin named 'nope'"),
        ("- type: endpoint-attribute-filter\n  parameters: {attribute: GPUUtilization, producer: dcgm-extractor,"
         " algorithm: {type: threshold, threshold: {operator: LessThan, value: 1}}}",
         "consumes GPUUtilization but no configured plugin produces it"),
        ("- type: endpoint-attribute-scorer\n  parameters: {attributeKey: GPUUtilization,"
         " algorithm: {type: linear_lower_is_better}}", "attached by a configured data-layer extractor"),
        ("- {type: dcgm-extractor, name: a}\n- {type: dcgm-extractor, name: b}\n- type: endpoint-attribute-scorer\n"
         "  parameters: {attributeKey: GPUUtilization, algorithm: {type: linear_lower_is_better}}",
         "attribute 'GPUUtilization' is attached by a, b; name one with `producer`"),
    ],
)  # fmt: skip
def test_bad_parameters_are_start_up_errors_naming_the_field(plugins: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        built(HEADER + "plugins:\n" + plugins + "\n", 0)
    assert message in str(e.value)


def file_config(plugins: str, sources: str = "") -> str:
    """helpers.FILE_CONFIG (file discovery) with more plugins and `dataLayer.sources` lines."""
    return FILE_CONFIG.replace("- type: queue-scorer\n", "- type: queue-scorer\n" + plugins) + sources


NODE_MODE = """
- type: dcgm-data-source
  parameters: {useNodeAddress: true}
- type: dcgm-extractor
"""


def test_use_node_address_is_refused_at_start_up_without_node_addresses() -> None:
    with pytest.raises(ConfigError) as e:
        App(Settings(config_text=file_config(NODE_MODE)))
    assert "plugin 'dcgm-data-source' (type dcgm-data-source): parameters.useNodeAddress: true needs each " in str(
        e.value
    )
    assert "only Kubernetes discovery records" in str(e.value)
    # Kubernetes discovery records the pod's status.hostIP: accepted, and scraped there.
    text = HEADER + "plugins:\n- type: queue-scorer" + NODE_MODE
    app = App(Settings(config_text=text, endpoint_selector="app=v", endpoint_target_ports=(8000,)))
    assert len(app.dcgm_pollers) == 1
    spec = EndpointSpec(name="p-rank-0", address="10.0.0.5", port=8000, pod_name="p", node_address="192.168.0.9")
    assert app.dcgm_pollers[0].target_for(spec).url == "http://192.168.0.9:9400/metrics"  # type: ignore[union-attr]
    # A file-mode sidecar config is fine.
    app = App(Settings(config_text=file_config("- type: dcgm-extractor\n")))
    assert [p.source.type for p in app.dcgm_pollers] == ["dcgm-data-source"]


def test_a_dcgm_source_feeds_only_dcgm_extractors() -> None:
    text = file_config(
        "- type: dcgm-data-source\n- type: core-metrics-extractor\n  name: wrong\n",
        "  sources:\n  - pluginRef: dcgm-data-source\n    extractors: [{pluginRef: wrong}]\n",
    )
    with pytest.raises(ConfigError, match=r"feeds only dcgm-extractor extractors, not 'wrong' \(type core-metrics"):
        App(Settings(config_text=text))
