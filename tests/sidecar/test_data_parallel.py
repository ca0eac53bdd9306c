"""The sidecar's data-parallel mode (`--data-parallel-size N`) against in-process recording ranks:
one port per rank, each in front of its own model-server rank; on the primary port,
`x-data-parallel-host-port` picks the rank (also for the decode step after a remote prefill), is
validated (this pod's address, one of its rank ports: anything else is a 400 and nothing is
proxied) and never reaches a model server. Also the flag's validation."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from llmepp.sidecar.cli import options_from_args
from llmepp.sidecar.proxy import DATA_PARALLEL_HEADER, PREFILL_HEADER, Sidecar, SidecarOptions, data_parallel_rank
from llmepp.testing.ports import free_port, free_port_run

HOST = "127.0.0.1"
KV = {"do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": "p", "remote_block_ids": [1],
      "remote_host": HOST, "remote_port": 1}  # fmt: skip


@dataclass
class Rank:
    """A model server (one rank, or the prefill pod) that records what reaches it."""

    name: str
    port: int
    seen: list[tuple[str, str, dict[str, str], Any]] = field(default_factory=list)
    runner: web.AppRunner | None = None

    async def start(self) -> Rank:
        async def handle(request: web.Request) -> web.Response:
            raw = await request.read()
            body = json.loads(raw) if raw else None
            self.seen.append((request.method, request.path, {k.lower(): v for k, v in request.headers.items()}, body))
            answer: dict[str, Any] = {"served_by": self.name}
            if isinstance(body, dict) and body.get("kv_transfer_params", {}).get("do_remote_decode"):
                answer["kv_transfer_params"] = KV
            return web.json_response(answer, headers={"x-inference-pod": self.name})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, HOST, self.port).start()
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    def hostport(self) -> str:
        return f"{HOST}:{self.port}"


@dataclass
class Pod:
    ranks: list[Rank]
    prefill: Rank
    sidecar: Sidecar

    def rank_port(self, rank: int) -> str:
        return f"{HOST}:{self.sidecar.ports[rank]}"

    def url(self, rank: int = 0) -> str:
        return f"http://{self.rank_port(rank)}"

    def served(self) -> list[int]:
        """How many requests each rank's model server got."""
        return [len(r.seen) for r in self.ranks]

    def clear(self) -> None:
        for r in [*self.ranks, self.prefill]:
            r.seen.clear()


async def start_pod(size: int, **opts: Any) -> Pod:
    vllm = free_port_run(HOST, size)
    ranks = [await Rank(f"rank-{r}", vllm + r).start() for r in range(size)]
    prefill = await Rank("prefill", free_port(HOST)).start()
    port = free_port_run(HOST, size) if size > 1 else 0
    options = SidecarOptions(host=HOST, port=port, decoder_url=f"http://{HOST}:{vllm}", data_parallel_size=size, **opts)
    sidecar = Sidecar(options)
    await sidecar.start()
    return Pod(ranks, prefill, sidecar)


async def stop_pod(pod: Pod) -> None:
    await pod.sidecar.stop()
    for r in [*pod.ranks, pod.prefill]:
        await r.stop()


@pytest.fixture
async def pod() -> AsyncIterator[Pod]:
    p = await start_pod(3)
    yield p
    await stop_pod(p)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


BODY = {"model": "m", "prompt": "hello", "max_tokens": 4}


async def test_each_rank_port_fronts_its_own_rank(pod: Pod, http: aiohttp.ClientSession) -> None:
    assert pod.sidecar.ports == [pod.sidecar.port + r for r in range(3)]
    for rank in (0, 1, 2):
        async with http.post(f"{pod.url(rank)}/v1/completions", json=BODY) as resp:
            assert resp.status == 200 and resp.headers["x-inference-pod"] == f"rank-{rank}"
    async with http.get(f"{pod.url(2)}/metrics") as resp:  # the EPP scrapes each rank on its own port
        assert resp.headers["x-inference-pod"] == "rank-2"
    assert pod.served() == [1, 1, 2]


async def test_the_header_picks_the_rank_on_the_primary_port(pod: Pod, http: aiohttp.ClientSession) -> None:
    for rank in (2, 0, 1, 2):
        headers = {DATA_PARALLEL_HEADER: pod.rank_port(rank)}
        async with http.post(f"{pod.url()}/v1/completions", json=BODY, headers=headers) as resp:
            assert resp.status == 200 and (await resp.json())["served_by"] == f"rank-{rank}"
    # Every path (not only completions), e.g. the model list; an empty value means no pick (rank 0).
    async with http.get(f"{pod.url()}/v1/models", headers={DATA_PARALLEL_HEADER: pod.rank_port(1)}) as resp:
        assert resp.headers["x-inference-pod"] == "rank-1"
    async with http.post(f"{pod.url()}/v1/completions", json=BODY, headers={DATA_PARALLEL_HEADER: ""}) as resp:
        assert resp.headers["x-inference-pod"] == "rank-0"
    assert pod.served() == [2, 2, 2]
    # The routing header is the sidecar's: no model server sees it (nor the P/D one).
    assert not any(DATA_PARALLEL_HEADER in h for r in pod.ranks for _, _, h, _ in r.seen)


async def test_other_rank_ports_ignore_the_header(pod: Pod, http: aiohttp.ClientSession) -> None:
    """Like the reference's rank servers: only the primary port forwards; rank r's port is rank r."""
    for header in (pod.rank_port(0), "10.9.9.9:80", "garbage"):
        async with http.post(f"{pod.url(1)}/v1/completions", json=BODY, headers={DATA_PARALLEL_HEADER: header}) as r:
            assert r.status == 200 and r.headers["x-inference-pod"] == "rank-1"
    assert pod.served() == [0, 3, 0]
    assert not any(DATA_PARALLEL_HEADER in h for _, _, h, _ in pod.ranks[1].seen)


async def test_remote_prefill_then_decode_on_the_named_rank(pod: Pod, http: aiohttp.ClientSession) -> None:
    headers = {DATA_PARALLEL_HEADER: pod.rank_port(2), PREFILL_HEADER: pod.prefill.hostport()}
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 9, "stream": False}
    async with http.post(f"{pod.url()}/v1/chat/completions", json=chat, headers=headers) as resp:
        assert resp.status == 200 and (await resp.json())["served_by"] == "rank-2"
    assert pod.served() == [0, 0, 1]
    [(_, path, prefill_headers, prefill_body)] = pod.prefill.seen
    assert path == "/v1/chat/completions" and prefill_body["max_tokens"] == 1
    assert prefill_body["kv_transfer_params"]["do_remote_decode"] is True
    assert DATA_PARALLEL_HEADER not in prefill_headers and PREFILL_HEADER not in prefill_headers
    [(_, _, decode_headers, decode_body)] = pod.ranks[2].seen
    assert decode_body["kv_transfer_params"] == KV and decode_body["max_tokens"] == 9
    assert DATA_PARALLEL_HEADER not in decode_headers and PREFILL_HEADER not in decode_headers

    # Without the header, the primary port's decode stays on rank 0; on rank 1's port, rank 1.
    pod.clear()
    for rank in (0, 1):
        async with http.post(f"{pod.url(rank)}/v1/completions", json=BODY,
                             headers={PREFILL_HEADER: pod.prefill.hostport()}) as resp:  # fmt: skip
            assert resp.status == 200 and resp.headers["x-inference-pod"] == f"rank-{rank}"
    assert pod.served() == [1, 1, 0] and len(pod.prefill.seen) == 2


async def test_a_header_naming_anything_else_is_a_400_and_nothing_is_proxied(
    pod: Pod, http: aiohttp.ClientSession
) -> None:
    first = pod.sidecar.port
    ranks = f"{HOST}:{first}..{first + 2}"
    cases = [
        f"10.9.9.9:{first + 1}",  # another host, a rank port: never proxied there (SSRF)
        f"localhost:{first + 1}",  # a name, not this pod's address
        f"{HOST}:{first + 3}",  # this pod, one past the last rank
        f"{HOST}:{first - 1}",
        f"{HOST}:{pod.ranks[1].port}",  # a model server's own port, not a rank port
        f"[::1]:{first}",
    ]
    for value in cases:
        for prefill in ({}, {PREFILL_HEADER: pod.prefill.hostport()}):
            headers = {DATA_PARALLEL_HEADER: value, **prefill}
            async with http.post(f"{pod.url()}/v1/completions", json=BODY, headers=headers) as resp:
                assert resp.status == 400, value
                assert resp.content_type == "application/json"
                error = (await resp.json())["error"]
                assert error["code"] == 400 and f"names no data-parallel rank of this pod ({ranks})" in error["message"]
    malformed = [("nope", "must be host:port"), (f"{HOST}:", "must be host:port"), (":80", "must be host:port"),
                 (f"{HOST}:99999", "port out of range")]  # fmt: skip
    for value, message in malformed:
        async with http.post(f"{pod.url()}/v1/completions", json=BODY, headers={DATA_PARALLEL_HEADER: value}) as resp:
            assert resp.status == 400 and message in (await resp.json())["error"]["message"]
    two = [(DATA_PARALLEL_HEADER, pod.rank_port(1)), (DATA_PARALLEL_HEADER, pod.rank_port(2))]
    async with http.post(f"{pod.url()}/v1/completions", json=BODY, headers=two) as resp:
        assert resp.status == 400 and "must name one rank" in (await resp.json())["error"]["message"]
    assert pod.served() == [0, 0, 0] and pod.prefill.seen == []


async def test_without_data_parallelism_the_header_is_ignored(http: aiohttp.ClientSession) -> None:
    pod = await start_pod(1)
    try:
        assert pod.sidecar.ports == [pod.sidecar.port]
        for value in ("10.9.9.9:80", "garbage", ""):
            async with http.post(f"{pod.url()}/v1/completions", json=BODY, headers={DATA_PARALLEL_HEADER: value}) as r:
                assert r.status == 200 and r.headers["x-inference-pod"] == "rank-0"
        assert pod.served() == [3]
        assert not any(DATA_PARALLEL_HEADER in h for _, _, h, _ in pod.ranks[0].seen)
    finally:
        await stop_pod(pod)


async def test_a_busy_rank_port_fails_the_start_and_releases_the_others() -> None:
    port = free_port_run(HOST, 2)
    blocker = await Rank("blocker", port + 1).start()
    sidecar = Sidecar(SidecarOptions(host=HOST, port=port, decoder_url="http://127.0.0.1:8200", data_parallel_size=2))
    try:
        with pytest.raises(OSError):
            await sidecar.start()
        await (await Rank("again", port).start()).stop()  # rank 0's port was released
    finally:
        await blocker.stop()


async def test_stop_closes_every_rank_port_then_drains_them_together(http: aiohttp.ClientSession) -> None:
    vllm = free_port_run(HOST, 2)
    arrived: list[str] = []
    both_arrived, release = asyncio.Event(), asyncio.Event()

    async def decode(request: web.Request) -> web.Response:
        if request.path.startswith("/slow"):
            arrived.append(request.path)
            if len(arrived) == 2:
                both_arrived.set()
            await release.wait()
        return web.json_response({})

    app = web.Application()
    app.router.add_get("/{tail:.*}", decode)
    runners = [web.AppRunner(app, access_log=None) for _ in range(2)]
    for rank, runner in enumerate(runners):
        await runner.setup()
        await web.TCPSite(runner, HOST, vllm + rank).start()
    port = free_port_run(HOST, 2)
    sidecar = Sidecar(SidecarOptions(host=HOST, port=port, decoder_url=f"http://{HOST}:{vllm}", data_parallel_size=2))
    await sidecar.start()
    stopping = None
    try:
        inflight = [asyncio.ensure_future(http.get(f"http://{HOST}:{port + r}/slow")) for r in range(2)]
        await asyncio.wait_for(both_arrived.wait(), 5)
        stopping = asyncio.ensure_future(sidecar.stop())
        await asyncio.sleep(0.1)
        # Was: the ranks were stopped one after the other, so rank 1 kept accepting new requests
        # while rank 0 drained (and a pod took up to N x the drain timeout to stop).
        async with aiohttp.ClientSession() as fresh:
            for r in range(2):
                with pytest.raises(aiohttp.ClientConnectorError):
                    await fresh.get(f"http://{HOST}:{port + r}/new")
        release.set()
        for done in await asyncio.gather(*inflight):  # the requests in flight are answered
            assert done.status == 200
            done.release()
        await asyncio.wait_for(stopping, 5)
    finally:
        release.set()
        await (stopping or sidecar.stop())
        for runner in runners:
            await runner.cleanup()


def test_data_parallel_rank() -> None:
    ports = [8000, 8001, 8002, 8003]
    assert data_parallel_rank("10.0.0.5:8000", "10.0.0.5", ports) == 0
    assert data_parallel_rank("10.0.0.5:8003", "10.0.0.5", ports) == 3
    assert data_parallel_rank("[fd00::5]:8002", "fd00:0:0::5", ports) == 2  # IPv6 spellings compare equal
    assert data_parallel_rank("Pod-A.ns:8001", "pod-a.ns", ports) == 1
    for bad in ("10.0.0.6:8001", "10.0.0.5:8004", "10.0.0.5:7999", "10.0.0.5", "10.0.0.5:80x", "[fd00::6]:8000"):
        with pytest.raises(ValueError):
            data_parallel_rank(bad, "10.0.0.5" if "." in bad else "fd00::5", ports)


def test_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("POD_IP", raising=False)
    # The reference flags of a data-parallel decode pod, with the pod IP from the downward API.
    monkeypatch.setenv("POD_IP", "10.0.0.5")
    options, _ = options_from_args(["--port=8000", "--vllm-port=8200", "--data-parallel-size=4"])
    assert options.data_parallel_size == 4 and options.pod_ip == "10.0.0.5"
    assert options.rank_ports == [8000, 8001, 8002, 8003]
    assert options.decoder_urls == [f"http://127.0.0.1:{p}" for p in (8200, 8201, 8202, 8203)]
    options, _ = options_from_args(["--data-parallel-size", "2", "--pod-ip", "[fd00::5]", "--enable-tls", "decoder",
                                    "--decoder-url", "https://10.0.0.5:9000/base"])  # fmt: skip
    assert options.pod_ip == "fd00::5"
    assert options.decoder_urls == ["https://10.0.0.5:9000/base", "https://10.0.0.5:9001/base"]
    monkeypatch.delenv("POD_IP")
    # Without POD_IP / --pod-ip, a concrete listen address is the pod's.
    options, _ = options_from_args(["--host", "10.0.0.7", "--data-parallel-size", "2"])
    assert options.pod_ip == "10.0.0.7"
    # Size 1 (the default) changes nothing and needs no pod IP.
    options, _ = options_from_args(["--data-parallel-size=1"])
    assert options.rank_ports == [8000] and options.decoder_urls == ["http://127.0.0.1:8200"] and options.pod_ip == ""
    for bad, reason in (
        (["--data-parallel-size", "0", "--pod-ip", "10.0.0.5"], "data-parallel-size must be a positive integer, got 0"),
        (["--data-parallel-size", "-2", "--pod-ip", "10.0.0.5"], "must be a positive integer"),
        (["--data-parallel-size", "2"], "set POD_IP (or --pod-ip)"),
        (["--data-parallel-size", "2", "--host", "::"], "set POD_IP (or --pod-ip)"),
        (["--data-parallel-size", "2", "--pod-ip", "10.0.0.5", "--port", "65535"], "port range 65535..65536"),
        (["--data-parallel-size", "2", "--pod-ip", "10.0.0.5", "--vllm-port", "65535"], "decoder port range"),
        (["--data-parallel-size", "2", "--pod-ip", "10.0.0.5", "--port", "0"], "needs a fixed port"),
        (["--data-parallel-size", "2", "--pod-ip", "10.0.0.5", "--decoder-url", "http://10.0.0.5"],
         "needs a port in decoder-url"),
    ):  # fmt: skip
        with pytest.raises(SystemExit):
            options_from_args(bad)
        assert reason in capsys.readouterr().err, bad


@settings(max_examples=500, deadline=None)
@given(value=st.text(max_size=40) | st.builds(lambda h, p: f"{h}:{p}", st.sampled_from(["10.0.0.5", "[::1]", "x"]),
                                               st.text(max_size=6) | st.integers(0, 70000).map(str)))  # fmt: skip
def test_any_header_value_names_a_rank_exactly_or_is_refused(value: str) -> None:
    ports = [8000, 8001]
    try:
        rank = data_parallel_rank(value, "10.0.0.5", ports)
    except ValueError as e:
        assert "x-data-parallel-host-port" in str(e)
    else:  # accepted only when it names this pod's IP and a rank port, in ASCII digits
        host, port = value.rsplit(":", 1)
        assert host == "10.0.0.5" and port.isascii() and ports[rank] == int(port)
