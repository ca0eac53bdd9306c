"""`multicluster-file-discovery`: a hub EPP's endpoints are clusters, listed in a file.

Each entry is one cluster: its gateway (where the hub routes a request: `address:port` goes out in
`x-gateway-destination-endpoint`, like a pod's) and where that cluster's EPP serves its /metrics
(read by `multicluster-metrics-data-source` for the pool averages the multicluster scorers use).

    endpoints:
    - name: cluster-a                # required, unique
      address: 10.20.0.5             # the cluster gateway: an IPv4 address or a DNS hostname
      port: 80
      labels:
        metricsAddress: 10.20.0.9    # the cluster EPP's metrics host (default: `address`)
        metricsPort: "9090"          # its metrics port (default: `metricsPort` below, else `port`)
    - name: cluster-b
      address: gw.cluster-b.example.com
      port: 443
      labels: {metricsAddress: epp.cluster-b.example.com, metricsPort: "9090"}

Parameters and behaviour are file-discovery's (`path`, `watchFile`: see plugins/discovery/file.py):
the same file format (at most 1 MiB, every problem reported with the entry and field), start-up
errors, live reload and the previous set kept when a reload fails. What differs (reference: llm-d-router
`discovery/file` multicluster variant and its README):

- `address` may be an IPv4 or IPv6 address (no brackets; the pick goes out as `[fd00::1]:80`) or an
  RFC-1123 hostname (a cluster is reached through its gateway's name). A hostname is logged once as a
  warning: the standalone Envoy of deploy/envoy.yaml (an ORIGINAL_DST cluster) needs an IP in
  `x-gateway-destination-endpoint` and answers 503 otherwise; a gateway that resolves names (e.g.
  Envoy's dynamic forward proxy) can use it.
- the labels `metricsAddress` (an IP or hostname) and `metricsPort` (1-65535) say where the cluster's
  EPP serves its metrics when that is not the gateway (it rarely is: the gateway forwards inference
  traffic, the EPP serves /metrics on its own port). As in the reference, `metricsPort` defaults to
  the entry's port; here it is also honoured without `metricsAddress` (the gateway's host, another
  port), and the entry's own `metricsPort` field is accepted too (the two must agree).
"""

from __future__ import annotations

import ipaddress
import logging
import re

from llmepp.datalayer.endpoint import EndpointSpec
from llmepp.datalayer.endpointsfile import read_endpoints_file
from llmepp.datalayer.multicluster import DISCOVERY_TYPE, METRICS_ADDRESS_LABEL, METRICS_PORT_LABEL
from llmepp.plugins.discovery.file import FileDiscovery

log = logging.getLogger(__name__)

_DNS_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def is_hostname(host: str) -> bool:
    """An RFC-1123 name: dot-separated labels of 1-63 letters, digits and inner hyphens, at most 253
    characters (a trailing dot allowed), with at least one letter so a mistyped IP is not taken."""
    name = host[:-1] if host.endswith(".") else host
    if not name or len(name) > 253:
        return False
    return all(_DNS_LABEL.fullmatch(part) for part in name.split(".")) and any(c.isalpha() for c in name)


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def gateway_address(address: str) -> str | None:
    """What is wrong with a cluster's gateway address, or None."""
    ip = _ip(address)
    if ip is None:
        return None if is_hostname(address) else f"must be an IP address or a DNS hostname, got {address!r}"
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
        return f"must be an IP address without a zone, got {address!r}"
    return None


def cluster_labels(spec: EndpointSpec) -> list[str]:
    """Problems with the labels this discovery interprets (relative to the entry)."""
    problems: list[str] = []
    host = spec.labels.get(METRICS_ADDRESS_LABEL)
    if host is not None and _ip(host) is None and not is_hostname(host):
        problems.append(f"labels.{METRICS_ADDRESS_LABEL}: must be an IP address or a DNS hostname, got {host!r}")
    port = spec.labels.get(METRICS_PORT_LABEL)
    if port is not None:
        if not port.isdecimal() or not 1 <= int(port) <= 65535:
            problems.append(f"labels.{METRICS_PORT_LABEL}: must be a port 1-65535, got {port!r}")
        elif spec.metrics_port is not None and spec.metrics_port != int(port):
            problems.append(
                f"labels.{METRICS_PORT_LABEL}: {port} disagrees with the entry's metricsPort {spec.metrics_port}; "
                "set one of them"
            )
    return problems


class MulticlusterFileDiscovery(FileDiscovery):
    """Clusters (their gateways) as the endpoints, from a YAML/JSON file; see the module docstring.

    Parameters: `path` (required), `watchFile` (false), as file-discovery.
    """

    type = DISCOVERY_TYPE

    def __init__(self, name: str, params: FileDiscovery.Params) -> None:
        super().__init__(name, params)
        self._warned: set[tuple[str, str]] = set()

    def read(self) -> list[EndpointSpec]:
        specs = read_endpoints_file(self.path, address_check=gateway_address, entry_check=cluster_labels)
        for spec in specs:
            if _ip(spec.address) is None and (spec.name, spec.address) not in self._warned:
                self._warned.add((spec.name, spec.address))
                log.warning(
                    "cluster %s: gateway address %s is a hostname; the gateway in front of this EPP must resolve "
                    "it (Envoy's ORIGINAL_DST cluster does not: it needs an IP)",
                    spec.name,
                    spec.address,
                    extra={"endpoint": spec.name, "path": self.path},
                )
        return specs
