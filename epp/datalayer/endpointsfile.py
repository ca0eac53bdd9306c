"""The endpoints file of file-based discovery: reading and validation.

Format (YAML or JSON, at most 1 MiB):

    endpoints:
      - name: vllm-0            # required, unique per namespace
        namespace: default      # optional
        address: 10.0.0.1       # required, IPv4 or IPv6 literal (fd00::1, no brackets)
        port: "8000"            # required, 1-65535 (integer or string)
        labels: {llm-d.ai/engine-type: vllm}   # optional
        metricsPort: 9000       # optional extension: scrape /metrics on another port
        rank: 1                 # optional: data-parallel rank (KV events on socketPort + rank), 0-255

Every problem is reported (not just the first), each naming the entry and field, e.g.
`endpoints[2].port: must be 1-65535, got 70000`.

Other discoveries reading this format (multicluster-file-discovery: clusters, whose address may be a
hostname) pass their own `address_check` and an `entry_check` for the labels they interpret.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import yaml

from llmepp.datalayer.endpoint import EndpointSpec
from llmepp.framework.plugin import ConfigError

__all__ = [
    "MAX_FILE_BYTES",
    "EndpointsFileError",
    "ip_address",
    "ipv4_address",
    "parse_endpoints",
    "read_endpoints_file",
]

MAX_FILE_BYTES = 1 << 20
_ENTRY_FIELDS = ("name", "namespace", "address", "port", "labels", "metricsPort", "rank")
MAX_RANK = 255


class _Int(int):
    """A YAML integer that remembers how the file wrote it (`010`, `0x1F`): a label keeps that text."""

    source = ""


class _Float(float):
    """A YAML float that remembers how the file wrote it (`1.10`): a label keeps that text."""

    source = ""


def _loader(base: type[yaml.SafeLoader]) -> type[yaml.SafeLoader]:
    class Loader(base):  # type: ignore[valid-type,misc]
        pass

    def make(cls: type[_Int] | type[_Float], construct: str):  # type: ignore[no-untyped-def]
        def construct_number(loader: yaml.SafeLoader, node: yaml.ScalarNode):  # type: ignore[no-untyped-def]
            value = cls(getattr(yaml.SafeLoader, construct)(loader, node))
            value.source = node.value
            return value

        return construct_number

    Loader.add_constructor("tag:yaml.org,2002:int", make(_Int, "construct_yaml_int"))
    Loader.add_constructor("tag:yaml.org,2002:float", make(_Float, "construct_yaml_float"))
    return Loader


_Loader: type[yaml.SafeLoader] = _loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader))
_PyLoader: type[yaml.SafeLoader] = _loader(yaml.SafeLoader)
# libyaml's composer recurses on the C stack: ~25,000 nested flow collections overflow an 8 MB thread stack
# (SIGSEGV, nothing to catch). Flow nesting cannot exceed the count of `[` and `{`, so past this many the
# pure-Python loader reads the file (its RecursionError is caught; it is ~4x slower).
_C_LOADER_MAX_OPENERS = 10_000

# What is wrong with an entry's `address` (None: nothing), and with a whole entry: each problem as
# `<field>: <what>` relative to the entry (e.g. "labels.metricsPort: must be 1-65535").
AddressCheck = Callable[[str], str | None]
EntryCheck = Callable[[EndpointSpec], list[str]]


def ipv4_address(address: str) -> str | None:
    """An IPv4 literal (the reference's file discovery)."""
    try:
        ipaddress.IPv4Address(address)
    except ValueError:
        return f"must be an IPv4 address, got {address!r}"
    return None


def ip_address(address: str) -> str | None:
    """The pod rule: an IPv4 or IPv6 literal, IPv6 without brackets or zone (`fd00::1`; the EPP writes
    `[fd00::1]:8000` itself). The entry keeps the address in canonical form (`FD00:0::1` -> `fd00::1`),
    as Kubernetes reports pod IPs and gateways write subset hints."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        hint = " without brackets" if address.startswith("[") else ""
        return f"must be an IPv4 or IPv6 address{hint}, got {address!r}"
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
        return f"must be an IP address without a zone, got {address!r}"
    return None


class EndpointsFileError(ConfigError):
    """The file cannot be used; `problems` lists every issue found."""

    def __init__(self, source: str, problems: list[str]) -> None:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        super().__init__(f"{source}: " + "; ".join(shown))
        self.source = source
        self.problems = problems


def read_endpoints_file(
    path: str, *, address_check: AddressCheck = ip_address, entry_check: EntryCheck | None = None
) -> list[EndpointSpec]:
    """Read and validate `path`. Blocking: call it through asyncio.to_thread on the loop."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise EndpointsFileError(path, [f"cannot read: {e.strerror or e}"]) from None
    if len(data) > MAX_FILE_BYTES:
        raise EndpointsFileError(path, [f"file is larger than the {MAX_FILE_BYTES} byte limit"])
    return parse_endpoints(
        data, path, json_hint=path.endswith(".json"), address_check=address_check, entry_check=entry_check
    )


def parse_endpoints(
    data: bytes,
    source: str = "<endpoints>",
    *,
    json_hint: bool = False,
    address_check: AddressCheck = ip_address,
    entry_check: EntryCheck | None = None,
) -> list[EndpointSpec]:
    """Validate an endpoints document; raises EndpointsFileError listing every problem."""
    if len(data) > MAX_FILE_BYTES:
        raise EndpointsFileError(source, [f"file is larger than the {MAX_FILE_BYTES} byte limit"])
    try:
        if json_hint or data.lstrip()[:1] == b"{":
            doc = json.loads(data)
        else:
            few_openers = data.count(b"[") + data.count(b"{") <= _C_LOADER_MAX_OPENERS
            doc = yaml.load(data, Loader=_Loader if few_openers else _PyLoader)
    except (ValueError, yaml.YAMLError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise EndpointsFileError(source, [f"not valid {'JSON' if json_hint else 'YAML/JSON'}: {e}"]) from None
    except RecursionError:
        raise EndpointsFileError(source, ["nested too deeply"]) from None
    if doc is None:
        raise EndpointsFileError(source, ["file is empty; expected `endpoints: [...]`"])
    if not isinstance(doc, dict):
        raise EndpointsFileError(source, [f"top level must be a mapping with `endpoints`, got {_kind(doc)}"])
    problems: list[str] = [f"unknown top-level field {k!r}" for k in doc if k != "endpoints"]
    entries = doc.get("endpoints")
    if entries is None:
        problems.append("endpoints: required (an empty pool is `endpoints: []`)")
        raise EndpointsFileError(source, problems)
    if not isinstance(entries, list):
        raise EndpointsFileError(source, [*problems, f"endpoints: must be a list, got {_kind(entries)}"])
    specs: list[EndpointSpec] = []
    by_key: dict[tuple[str, str], int] = {}
    by_hostport: dict[str, int] = {}
    for i, entry in enumerate(entries):
        spec = _entry(entry, f"endpoints[{i}]", problems, address_check, entry_check)
        if spec is None:
            continue
        key = (spec.namespace, spec.name)
        if key in by_key:
            problems.append(
                f"endpoints[{i}].name: duplicate of endpoints[{by_key[key]}] ({spec.namespace}/{spec.name})"
            )
            continue
        if spec.hostport in by_hostport:
            problems.append(
                f"endpoints[{i}]: address:port {spec.hostport} already used by endpoints[{by_hostport[spec.hostport]}]"
            )
            continue
        by_key[key] = i
        by_hostport[spec.hostport] = i
        specs.append(spec)
    if problems:
        raise EndpointsFileError(source, problems)
    return specs


def _entry(
    entry: Any, where: str, problems: list[str], address_check: AddressCheck, entry_check: EntryCheck | None
) -> EndpointSpec | None:
    if not isinstance(entry, dict):
        problems.append(f"{where}: must be a mapping with name, address and port, got {_kind(entry)}")
        return None
    before = len(problems)
    problems.extend(
        f"{where}: unknown field {k!r} (allowed: {', '.join(_ENTRY_FIELDS)})" for k in entry if k not in _ENTRY_FIELDS
    )
    name = _string(entry, "name", where, problems, required=True)
    namespace = _string(entry, "namespace", where, problems, required=False) or "default"
    address = _string(entry, "address", where, problems, required=True)
    if address and (problem := address_check(address)) is not None:
        problems.append(f"{where}.address: {problem}")
    port = _port(entry, "port", where, problems, required=True)
    metrics_port = _port(entry, "metricsPort", where, problems, required=False)
    labels = _labels(entry.get("labels"), where, problems)
    rank = entry.get("rank", 0)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= MAX_RANK:
        problems.append(f"{where}.rank: must be an integer 0-{MAX_RANK}, got {_kind(rank)} {rank!r}")
    else:
        rank = int(rank)
    if len(problems) > before or not name or not address or port is None:
        return None
    if ":" in address:  # an IPv6 literal: one spelling, so addresses and address:port compare
        with contextlib.suppress(ValueError):
            address = str(ipaddress.IPv6Address(address))
    spec = EndpointSpec(
        name=name,
        address=address,
        port=port,
        namespace=namespace,
        labels=labels,
        metrics_port=metrics_port,
        rank=rank,
    )
    if entry_check is not None and (more := entry_check(spec)):
        problems.extend(f"{where}.{p}" for p in more)
        return None
    return spec


def _string(entry: dict[str, Any], key: str, where: str, problems: list[str], *, required: bool) -> str:
    value = entry.get(key)
    if value is None or value == "":
        if required:
            problems.append(f"{where}.{key}: required")
        return ""
    if not isinstance(value, str):
        problems.append(f"{where}.{key}: must be a string, got {_kind(value)} {value!r}")
        return ""
    if value != value.strip() or any(c in value for c in "\r\n\t"):
        problems.append(f"{where}.{key}: must not contain whitespace at the ends or control characters")
        return ""
    return value


def _port(entry: dict[str, Any], key: str, where: str, problems: list[str], *, required: bool) -> int | None:
    value = entry.get(key)
    if value is None or value == "":
        if required:
            problems.append(f"{where}.{key}: required")
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        problems.append(f"{where}.{key}: must be an integer 1-65535, got {_kind(value)} {value!r}")
        return None
    if isinstance(value, str):
        digits = value.strip()
        if not (digits.isascii() and digits.isdecimal()):  # int() would read "٣٠" as 30
            problems.append(f"{where}.{key}: must be an integer 1-65535, got {value!r}")
            return None
        value = int(value)
    if not 1 <= value <= 65535:
        problems.append(f"{where}.{key}: must be 1-65535, got {value}")
        return None
    return int(value)


def _labels(value: Any, where: str, problems: list[str]) -> Mapping[str, str]:
    if value is None:
        return MappingProxyType({})
    if not isinstance(value, dict):
        problems.append(f"{where}.labels: must be a mapping of names to strings, got {_kind(value)}")
        return MappingProxyType({})
    out: dict[str, str] = {}
    for k, v in value.items():
        if not isinstance(k, str) or not k:
            problems.append(f"{where}.labels: label names must be non-empty strings, got {k!r}")
        elif isinstance(v, bool):  # YAML turns `true` into a bool; labels are strings
            out[k] = "true" if v else "false"
        elif isinstance(v, (str, int, float)):
            # As written: YAML resolved `1.10` to 1.1 and `010` to 8, which str() would turn into other labels.
            out[k] = getattr(v, "source", "") or str(v)
        elif v is None:
            out[k] = ""
        else:
            problems.append(f"{where}.labels.{k}: must be a string, got {_kind(v)}")
    return MappingProxyType(out)


def _kind(value: Any) -> str:
    for cls, kind in ((dict, "mapping"), (list, "list"), (str, "string"), (bool, "boolean"), (int, "integer"),
                      (float, "number")):  # fmt: skip
        if isinstance(value, cls):
            return kind
    return type(value).__name__
