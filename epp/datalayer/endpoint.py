"""The endpoint model shared by discovery, scraping, scheduling and accounting.

An `Endpoint` is one model-server rank (pod IP + port). Discovery creates it from an
`EndpointSpec`; the metrics collector replaces `endpoint.metrics` with a fresh immutable
`EndpointMetrics` after every scrape (one attribute store, so readers never see a torn
update), and the models poller `endpoint.models` likewise; the director keeps router-local
in-flight counters in `endpoint.inflight`. Data-layer extractors other than the metrics scrape
(DCGM GPU utilisation, topology) keep their values in `endpoint.attributes`, which no scrape
touches. Scheduling plugins only read these objects.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


def join_hostport(host: str, port: int | str) -> str:
    """`host:port` with an IPv6 literal bracketed (`[fd00::1]:8000`), as Go's net.JoinHostPort: the form
    Envoy's ORIGINAL_DST cluster parses from `x-gateway-destination-endpoint`, and URLs and ZeroMQ
    `tcp://` endpoints take. `host` is a bare address or name (never already bracketed)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def split_hostport(value: str) -> tuple[str, str]:
    """(host, port) of `[v6]:port`, `v4:port` or `name:port`, the host without brackets; the port is ""
    when `value` has none (`10.0.0.1`, `[fd00::1]`). An unbracketed IPv6 `fd00::1:8000` (what this EPP
    wrote before it bracketed) splits at its last colon. Never raises: a malformed bracket gives
    (value, ""), a host that matches no address."""
    if value.startswith("["):
        end = value.find("]")
        if end > 0 and (end + 1 == len(value) or value[end + 1] == ":"):
            return value[1:end], value[end + 2 :]
        return value, ""
    host, sep, port = value.rpartition(":")
    return (host, port) if sep else (value, "")


@dataclass(frozen=True, slots=True)
class EndpointSpec:
    """What discovery knows about an endpoint (file entry or pod + target port)."""

    name: str
    address: str
    port: int
    namespace: str = "default"
    labels: Mapping[str, str] = field(default_factory=dict)
    # Where /metrics is scraped; defaults to address:port.
    metrics_port: int | None = None
    # Data-parallel rank: the position of `port` in the pool's targetPorts. A vLLM data-parallel
    # deployment publishes each rank's KV events on its own port: the producer's socketPort + rank.
    rank: int = 0
    # Kubernetes discovery only (empty from an endpoints file): the pod's name (its rank endpoints
    # are `<pod>-rank-<i>`), its `spec.hostname`, and the address of its node (`status.hostIP`).
    # The DCGM source matches the exporter's `pod` label and can scrape a per-node exporter; the
    # topology extractor falls back to the hostname when the hostname label is missing.
    pod_name: str = ""
    hostname: str = ""
    node_address: str = ""
    # `address:port` as Envoy and the P/D sidecars read it (IPv6 bracketed: join_hostport); read on every
    # request, so computed once.
    hostport: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "hostport", join_hostport(self.address, self.port))

    @property
    def pod(self) -> str:
        """The pod this endpoint belongs to: `pod_name`, else (file discovery) the endpoint's name,
        as the reference's file discovery names it."""
        return self.pod_name or self.name


@dataclass(frozen=True, slots=True)
class EndpointMetrics:
    """One scrape of a model server's /metrics (vLLM names, see datalayer.metrics)."""

    # A pod's counts; on a hub, a cluster's pool averages per pod (llmepp.datalayer.multicluster).
    waiting_queue_size: float = 0
    running_requests_size: float = 0
    kv_cache_usage_percent: float = 0.0  # fraction 0..1, as vLLM reports it
    # LoRA adapters: running / waiting adapter names and the server's max_lora.
    active_models: frozenset[str] = frozenset()
    waiting_models: frozenset[str] = frozenset()
    max_active_models: int = 0
    cache_block_size: int = 0
    cache_num_blocks: int = 0
    # time.monotonic() of the scrape that produced this object; 0.0 = never scraped.
    update_time: float = 0.0
    # The engine config's customMetrics: attributeKey → value (read by endpoint-attribute-*). Never mutated.
    attributes: Mapping[str, float] = field(default_factory=dict)


NO_METRICS = EndpointMetrics()


@dataclass(frozen=True, slots=True)
class ModelData:
    """One entry of a model server's `GET /v1/models` list (models-data-source)."""

    id: str
    object: str = "model"
    created: int = 0
    owned_by: str = ""
    # The base model of a LoRA adapter; None for a base model.
    parent: str | None = None
    root: str | None = None  # vLLM: the model's path or hub name
    max_model_len: int | None = None  # vLLM: the context length it serves


@dataclass(slots=True)
class InFlight:
    """Router-local load: requests and prompt tokens this EPP has sent and not seen finish."""

    requests: int = 0
    tokens: int = 0


@dataclass(eq=False, slots=True)
class Endpoint:
    """A routable model-server endpoint. Hashable by identity, so it can key per-request dicts."""

    spec: EndpointSpec
    metrics: EndpointMetrics = NO_METRICS
    inflight: InFlight = field(default_factory=InFlight)
    # The models it serves, from its /v1/models (models-data-source); None until first fetched.
    models: tuple[ModelData, ...] | None = None
    # Set when discovery removes the endpoint; long-lived plugin state uses it to drop entries.
    removed: bool = False
    # Set by the metrics collector while the server has stopped answering (Datastore.set_unreachable):
    # routing leaves it out as long as another candidate answers.
    unreachable: bool = False
    # Values data-layer extractors other than the metrics scrape attach, keyed
    # `scoped(attribute, extractor name)`: the DCGM extractor's GPUUtilization, the topology
    # extractor's Topology. Kept apart from `metrics` so a vLLM scrape, which replaces `metrics`,
    # can never erase them; they go with the Endpoint when discovery removes or replaces it.
    attributes: dict[str, object] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def namespace(self) -> str:
        return self.spec.namespace

    @property
    def address(self) -> str:
        return self.spec.address

    @property
    def port(self) -> int:
        return self.spec.port

    @property
    def hostport(self) -> str:
        return self.spec.hostport

    @property
    def labels(self) -> Mapping[str, str]:
        return self.spec.labels

    def metrics_age(self, now: float) -> float:
        """Seconds since the last successful scrape (infinite if never scraped)."""
        t = self.metrics.update_time
        return now - t if t else float("inf")

    def __repr__(self) -> str:
        return f"Endpoint({self.spec.namespace}/{self.spec.name} {self.hostport})"
