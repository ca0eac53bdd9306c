"""File-based endpoint discovery: format validation, start-up failure, live reload."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from helpers import until

from llmepp.datalayer.datastore import Datastore
from llmepp.datalayer.endpoint import Endpoint, EndpointSpec
from llmepp.datalayer.endpointsfile import MAX_FILE_BYTES, EndpointsFileError, parse_endpoints
from llmepp.framework.plugin import ConfigError, PluginRegistry
from llmepp.plugins.discovery import PLUGINS
from llmepp.plugins.discovery.file import FileDiscovery

GOOD = """
endpoints:
  - name: vllm-0
    address: 10.0.0.1
    port: "8000"
    labels:
      llm-d.ai/engine-type: vllm
      gpu: 1
      spot: true
  - name: vllm-1
    namespace: team-a
    address: 10.0.0.2
    port: 8001
    metricsPort: 9000
    rank: 1
"""


def test_parse_yaml() -> None:
    a, b = parse_endpoints(GOOD.encode())
    assert a == EndpointSpec(
        name="vllm-0",
        address="10.0.0.1",
        port=8000,
        labels={"llm-d.ai/engine-type": "vllm", "gpu": "1", "spot": "true"},
    )
    assert (b.namespace, b.port, b.metrics_port, dict(b.labels), b.rank) == ("team-a", 8001, 9000, {}, 1)
    assert a.rank == 0


def test_parse_json_and_empty_pool() -> None:
    doc = {"endpoints": [{"name": "a", "address": "127.0.0.1", "port": 1}]}
    (spec,) = parse_endpoints(json.dumps(doc).encode(), json_hint=True)
    assert spec.hostport == "127.0.0.1:1"
    assert parse_endpoints(b"endpoints: []") == []


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ({"name": "a", "address": "10.0.0.1", "port": 70000}, "endpoints[0].port: must be 1-65535, got 70000"),
        ({"name": "a", "address": "10.0.0.1", "port": "0"}, "endpoints[0].port: must be 1-65535, got 0"),
        (
            {"name": "a", "address": "10.0.0.1", "port": "80a"},
            "endpoints[0].port: must be an integer 1-65535, got '80a'",
        ),
        ({"name": "a", "address": "10.0.0.1", "port": True}, "endpoints[0].port: must be an integer 1-65535"),
        ({"name": "a", "address": "10.0.0.1"}, "endpoints[0].port: required"),
        ({"address": "10.0.0.1", "port": 1}, "endpoints[0].name: required"),
        ({"name": 5, "address": "10.0.0.1", "port": 1}, "endpoints[0].name: must be a string, got integer 5"),
        (
            {"name": "a", "address": "10.0.0", "port": 1},
            "endpoints[0].address: must be an IPv4 or IPv6 address, got '10.0.0'",
        ),
        ({"name": "a", "address": "vllm.local", "port": 1}, "endpoints[0].address: must be an IPv4 or IPv6 address"),
        ({"name": "a", "address": "[::1]", "port": 1}, "endpoints[0].address: must be an IPv4 or IPv6 address without"),
        ({"name": "a", "address": "10.0.0.1", "port": 1, "adress": "x"}, "endpoints[0]: unknown field 'adress'"),
        ({"name": "a", "address": "10.0.0.1", "port": 1, "labels": ["x"]}, "endpoints[0].labels: must be a mapping"),
        ({"name": "a", "address": "10.0.0.1", "port": 1, "labels": {"k": {"x": 1}}}, "endpoints[0].labels.k: must be"),
        ({"name": "a", "address": "10.0.0.1", "port": 1, "metricsPort": 99999}, "endpoints[0].metricsPort: must be"),
        ({"name": " a", "address": "10.0.0.1", "port": 1}, "endpoints[0].name: must not contain whitespace"),
        ({"name": "a", "address": "10.0.0.1", "port": 1, "rank": -1}, "endpoints[0].rank: must be an integer 0-255"),
        ({"name": "a", "address": "10.0.0.1", "port": 1, "rank": "1"}, "endpoints[0].rank: must be an integer 0-255"),
        ({"name": "a", "address": "10.0.0.1", "port": 1, "rank": True}, "endpoints[0].rank: must be an integer 0-255"),
        ({"name": "a", "address": "10.0.0.1", "port": "٣٠"}, "endpoints[0].port: must be an integer 1-65535"),
    ],
)
def test_entry_validation_messages(entry: dict[str, object], problem: str) -> None:
    with pytest.raises(EndpointsFileError) as info:
        parse_endpoints(json.dumps({"endpoints": [entry]}).encode(), "eps.json")
    assert problem in str(info.value)
    assert str(info.value).startswith("eps.json: ")


def test_every_problem_is_reported_with_its_index() -> None:
    doc = """
endpoints:
  - {name: ok, address: 10.0.0.1, port: 1}
  - {name: bad-port, address: 10.0.0.2, port: 70000}
  - {name: ok, address: 10.0.0.3, port: 1}
  - {name: same-addr, address: 10.0.0.1, port: 1}
  - {name: ok, namespace: other, address: 10.0.0.4, port: 1}
  - just-a-string
"""
    with pytest.raises(EndpointsFileError) as info:
        parse_endpoints(doc.encode())
    assert info.value.problems == [
        "endpoints[1].port: must be 1-65535, got 70000",
        "endpoints[2].name: duplicate of endpoints[0] (default/ok)",
        "endpoints[3]: address:port 10.0.0.1:1 already used by endpoints[0]",
        "endpoints[5]: must be a mapping with name, address and port, got string",
    ]


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"", "file is empty"),
        (b"- a\n- b\n", "top level must be a mapping with `endpoints`, got list"),
        (b"endpoint: []", "unknown top-level field 'endpoint'"),
        (b"endpoint: []", "endpoints: required"),
        (b"endpoints: {a: 1}", "endpoints: must be a list, got mapping"),
        (b"endpoints: [\n  - name: a\n bad", "not valid YAML/JSON"),
        (b'{"endpoints": [}', "not valid YAML/JSON"),
        (b"endpoints: []\n" + b"#" * MAX_FILE_BYTES, "larger than the 1048576 byte limit"),
        (b'{"endpoints": ' + b"[" * 60_000 + b"]" * 60_000 + b"}", "nested too deeply"),
    ],
)
def test_file_level_problems(data: bytes, problem: str) -> None:
    with pytest.raises(EndpointsFileError, match=problem.replace("[", r"\[").replace("`", ".")):
        parse_endpoints(data)


def test_a_deeply_nested_yaml_file_is_rejected_not_a_crash(tmp_path: Path) -> None:
    """libyaml's C loader overflows the C stack on ~25,000 nested flow collections (SIGSEGV), the file
    well under the size limit: in a child process, as the plugin reads it (in a thread)."""
    path = tmp_path / "eps.yaml"
    path.write_text("endpoints: " + "[" * 60_000 + "]" * 60_000 + "\n")
    code = (
        "import asyncio, sys\n"
        "from llmepp.datalayer.endpointsfile import EndpointsFileError, read_endpoints_file\n"
        "try:\n"
        "    asyncio.run(asyncio.to_thread(read_endpoints_file, sys.argv[1]))\n"
        "except EndpointsFileError as e:\n"
        "    print(e)\n"
    )
    child = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    assert child.returncode == 0, f"exit {child.returncode}: {child.stderr[-500:]}"
    assert child.stdout.strip() == f"{path}: nested too deeply"


# -- the plugin ---------------------------------------------------------------------------
def build(path: Path, watch: bool = False) -> FileDiscovery:
    reg = PluginRegistry()
    reg._loaded_entry_points = True  # only the classes under test
    for cls in PLUGINS:
        reg.register(cls)
    plugin = reg.build("file-discovery", "files", {"path": str(path), "watchFile": watch})
    assert isinstance(plugin, FileDiscovery)
    plugin.poll_interval = 0.02
    return plugin


@pytest.fixture
async def running() -> AsyncIterator[Callable[[FileDiscovery, Datastore], asyncio.Task[None]]]:
    tasks: list[asyncio.Task[None]] = []

    def start(plugin: FileDiscovery, datastore: Datastore) -> asyncio.Task[None]:
        t = asyncio.create_task(plugin.run(datastore))
        tasks.append(t)
        return t

    yield start
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def names(ds: Datastore) -> set[str]:
    return {ep.name for ep in ds.endpoints}


def entries(*items: tuple[str, str, int]) -> str:
    return "endpoints:\n" + "".join(f"  - {{name: {n}, address: {a}, port: {p}}}\n" for n, a, p in items)


async def test_bad_file_at_start_up_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "eps.yaml"
    path.write_text(entries(("a", "10.0.0.1", 1), ("b", "10.0.0.2", 70000)))
    ds = Datastore()
    with pytest.raises(ConfigError) as info:
        await build(path).run(ds)
    message = str(info.value)
    assert message.startswith("plugin 'files' (type file-discovery): ")
    assert f"{path}: endpoints[1].port: must be 1-65535, got 70000" in message
    assert len(ds) == 0 and not ds.synced
    with pytest.raises(ConfigError, match="cannot read"):
        await build(tmp_path / "missing.yaml").run(ds)


def test_path_is_required() -> None:
    reg = PluginRegistry()
    reg._loaded_entry_points = True
    reg.register(FileDiscovery)
    with pytest.raises(ConfigError, match="path"):
        reg.build("file-discovery", "files", {"watchFile": True})


async def test_static_load_marks_synced(tmp_path: Path, running: Callable[..., asyncio.Task[None]]) -> None:
    path = tmp_path / "eps.json"
    path.write_text(json.dumps({"endpoints": [{"name": "a", "address": "10.0.0.1", "port": "8000"}]}))
    ds = Datastore()
    task = running(build(path), ds)
    await until(lambda: ds.synced)
    assert names(ds) == {"a"}
    path.write_text(json.dumps({"endpoints": []}))  # not watched: ignored
    await asyncio.sleep(0.1)
    assert names(ds) == {"a"}
    assert not task.done()  # discovery lives as long as the process


async def test_reload_adds_removes_and_changes(tmp_path: Path, running: Callable[..., asyncio.Task[None]]) -> None:
    path = tmp_path / "eps.yaml"
    path.write_text(entries(("a", "10.0.0.1", 8000), ("b", "10.0.0.2", 8000)))
    ds = Datastore()
    plugin = build(path, watch=True)
    running(plugin, ds)
    await until(lambda: ds.synced)
    a_before = ds.get("a")
    path.write_text(entries(("a", "10.0.0.1", 8000), ("b", "10.0.0.9", 8000), ("c", "10.0.0.3", 8000)))
    await until(lambda: names(ds) == {"a", "b", "c"})
    b = ds.get("b")
    assert b is not None and b.address == "10.0.0.9"
    assert ds.get("a") is a_before  # unchanged entries are untouched
    path.write_text(entries(("c", "10.0.0.3", 8000)))
    await until(lambda: names(ds) == {"c"})
    assert a_before is not None and a_before.removed
    assert plugin.reloads == 2 and plugin.reload_errors == 0


async def test_atomic_rename(tmp_path: Path, running: Callable[..., asyncio.Task[None]]) -> None:
    path = tmp_path / "eps.yaml"
    path.write_text(entries(("a", "10.0.0.1", 8000)))
    ds = Datastore()
    running(build(path, watch=True), ds)
    await until(lambda: ds.synced)
    tmp = tmp_path / ".eps.yaml.tmp"
    tmp.write_text(entries(("z", "10.0.0.26", 8000)))
    os.replace(tmp, path)
    await until(lambda: names(ds) == {"z"})


async def test_configmap_symlink_swap(tmp_path: Path, running: Callable[..., asyncio.Task[None]]) -> None:
    # Kubernetes layout: eps.yaml -> ..data/eps.yaml, ..data -> ..2024_v1 (swapped atomically).
    v1, v2 = tmp_path / "..2024_v1", tmp_path / "..2024_v2"
    v1.mkdir()
    v2.mkdir()
    (v1 / "eps.yaml").write_text(entries(("a", "10.0.0.1", 8000)))
    (v2 / "eps.yaml").write_text(entries(("a", "10.0.0.1", 8000), ("b", "10.0.0.2", 8000)))
    (tmp_path / "..data").symlink_to(v1.name)
    path = tmp_path / "eps.yaml"
    path.symlink_to("..data/eps.yaml")
    ds = Datastore()
    running(build(path, watch=True), ds)
    await until(lambda: names(ds) == {"a"})
    (tmp_path / "..data_tmp").symlink_to(v2.name)
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
    await until(lambda: names(ds) == {"a", "b"})


async def test_bad_reload_keeps_the_pool(
    tmp_path: Path, running: Callable[..., asyncio.Task[None]], caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "eps.yaml"
    path.write_text(entries(("a", "10.0.0.1", 8000), ("b", "10.0.0.2", 8000)))
    ds = Datastore()
    plugin = build(path, watch=True)
    running(plugin, ds)
    await until(lambda: ds.synced)
    path.write_text(entries(("a", "10.0.0.1", 8000), ("b", "10.0.0.2", 99999)))
    await until(lambda: plugin.reload_errors == 1)
    await asyncio.sleep(0.1)
    assert names(ds) == {"a", "b"}
    assert plugin.reload_errors == 1  # logged once per file state, not once per poll
    assert any("endpoints[1].port: must be 1-65535" in r.getMessage() for r in caplog.records)
    path.write_text("endpoints: [")  # broken YAML
    await until(lambda: plugin.reload_errors == 2)
    path.unlink()  # gone
    await until(lambda: plugin.reload_errors == 3)
    assert names(ds) == {"a", "b"}
    path.write_text(entries(("b", "10.0.0.2", 8000)))  # back and valid
    await until(lambda: names(ds) == {"b"})


async def test_an_unexpected_reload_error_is_counted_and_the_watch_goes_on(
    tmp_path: Path, running: Callable[..., asyncio.Task[None]], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "eps.yaml"
    path.write_text(entries(("a", "10.0.0.1", 8000)))
    ds = Datastore()
    plugin = build(path, watch=True)
    task = running(plugin, ds)
    await until(lambda: ds.synced)
    read = plugin.read
    monkeypatch.setattr(plugin, "read", lambda: (_ for _ in ()).throw(RuntimeError("a bug")))
    path.write_text(entries(("b", "10.0.0.2", 8000)))
    await until(lambda: plugin.reload_errors == 1, what="the failed reload counted")
    assert not task.done() and names(ds) == {"a"}
    monkeypatch.setattr(plugin, "read", read)
    path.write_text(entries(("c", "10.0.0.3", 8000)))
    await until(lambda: names(ds) == {"c"}, what="the next good file loaded")


async def test_a_new_rank_behind_the_same_port_is_announced_to_listeners() -> None:
    """Listeners latch an endpoint's rank (the KV-event subscriber reads socketPort + rank): an entry
    whose rank was fixed in the file is a new endpoint to them, not an in-place label change."""
    events: list[tuple[str, int]] = []

    class Recorder:
        def endpoint_added(self, ep: Endpoint) -> None:
            events.append(("added", ep.spec.rank))

        def endpoint_removed(self, ep: Endpoint) -> None:
            events.append(("removed", ep.spec.rank))

    ds = Datastore()
    ds.add_listener(Recorder())
    ds.upsert(EndpointSpec(name="dp", address="10.0.0.1", port=8001, rank=0))
    ds.upsert(EndpointSpec(name="dp", address="10.0.0.1", port=8001, rank=0, labels={"zone": "a"}))
    assert events == [("added", 0)]  # a label change stays in place
    ds.upsert(EndpointSpec(name="dp", address="10.0.0.1", port=8001, rank=1, labels={"zone": "a"}))
    assert events == [("added", 0), ("removed", 0), ("added", 1)]


async def test_reload_errors_are_counted_in_poll_errors(
    tmp_path: Path, running: Callable[..., asyncio.Task[None]]
) -> None:
    from llmepp.framework.plugin import PluginContext
    from llmepp.observability.metrics import EppMetrics

    path = tmp_path / "eps.yaml"
    path.write_text(entries(("a", "10.0.0.1", 8000)))
    plugin = build(path, watch=True)
    metrics = EppMetrics()
    plugin.setup(PluginContext({}, None, None, metrics))
    ds = Datastore()
    running(plugin, ds)
    await until(lambda: ds.synced)
    path.write_text("not: [valid")
    sample = {"source_type": "file-discovery"}
    await until(lambda: metrics.registry.get_sample_value("llm_d_epp_datalayer_poll_errors_total", sample) == 1)


@pytest.mark.parametrize("written", ["1.10", "010", "0x1F", "1e3", "8000"])
def test_an_unquoted_label_value_keeps_what_the_file_says(written: str) -> None:
    """A label is the text the file wrote: YAML would read `1.10` as 1.1 and `010` as 8, and a label
    selector for the written value would stop matching the pod."""
    doc = f"endpoints:\n- {{name: a, address: 10.0.0.1, port: 8000, rank: 1, labels: {{v: {written}}}}}\n"
    (spec,) = parse_endpoints(doc.encode())
    assert spec.labels["v"] == written
    assert type(spec.port) is int and type(spec.rank) is int
