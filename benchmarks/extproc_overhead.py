"""ext_proc protocol overhead of the EPP (results and method: benchmarks/EXTPROC.md).

    .venv/bin/python -m benchmarks.extproc_overhead all            # a, b and c
    .venv/bin/python -m benchmarks.extproc_overhead latency --n 2000
    .venv/bin/python -m benchmarks.extproc_overhead throughput --seconds 8 --concurrency 64
    .venv/bin/python -m benchmarks.extproc_overhead chunks --chunks 2000 --streams 16
    .venv/bin/python -m benchmarks.extproc_overhead long --sizes-kb 16,128,512,2048
    .venv/bin/python -m benchmarks.extproc_overhead inprocess --inprocess-n 20000
    .venv/bin/python -m benchmarks.extproc_overhead all --quick    # smoke run (seconds)

(a) latency: sequential small POST /v1/completions, one keep-alive HTTP/1.1 connection per
    target, targets interleaved in rounds: direct to the model server, Envoy without
    ext_proc, Envoy + the no-op processor, Envoy + the EPP (the real director with the default
    profile; `--director fake`: a trivial round robin, the protocol logic alone).
    Added latency = target − "Envoy without ext_proc"; ratio = EPP added / no-op added
    (also the median of per-round ratios: robust when the machine's load drifts).
(b) throughput: one EPP process driven directly over gRPC by a load generator process
    that speaks ext_proc like Envoy does for an HTTP/1.1 request (request headers, body
    chunk, empty end-of-stream chunk, response headers, response chunk, empty EoS chunk):
    requests/s, and requests per EPP CPU-second (= requests/s per core).
(c) chunks: streams with many SSE response chunks: EPP CPU-µs per response chunk.
(d) long: (a) with long prompts (a completions request of 16 KB - 2 MB of prose): what the
    EPP adds for long contexts over a no-op processor that streams the same body through
    (the EPP buffers it, parses it, hashes its prefix blocks and sends it back in chunks).
(e) inprocess: (a)'s six messages, as Envoy sends them, handled with no transport: the CPU of
    each step of the no-op stream and of the EPP's with a trivial director (`fake`: the
    protocol state machine alone) and with the real one (`default`: plus the routing).

Every server runs in its own process (uvloop); the CPU of the EPP / no-op process (all
threads) is read from /proc. The machine is shared: treat single runs as noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.metrics import pct

REPO = Path(__file__).resolve().parents[1]
MODEL_HOST = "127.0.0.2"
REQUEST_BODY = b'{"model":"m","prompt":"hello world, a short prompt","max_tokens":8}'
_PROSE = (
    "the model reads a long document about inference serving routing caches pods gateways and "
    "answers questions about what it read while the router keeps each prefix on one pod"
)


def long_request_body(kb: int) -> bytes:
    """A completions request whose prompt is `kb` KiB of prose (deterministic)."""
    n = kb * 1024
    vocab = _PROSE.split()
    words = (vocab[(i * 7 + i // 13) % len(vocab)] for i in range(n // 3))
    return json.dumps({"model": "m", "prompt": " ".join(words)[:n], "max_tokens": 8}).encode()


RESPONSE_JSON = json.dumps(
    {
        "id": "cmpl-1",
        "object": "text_completion",
        "model": "m",
        "choices": [{"index": 0, "text": " hi there", "finish_reason": "length"}],
        "usage": {"prompt_tokens": 8, "completion_tokens": 8, "total_tokens": 16},
    }
).encode()
SSE_CHUNK = (
    b'data: {"id":"cmpl-1","object":"text_completion","model":"m","choices":[{"index":0,"text":" tok",'
    b'"logprobs":null,"finish_reason":null}],"usage":null}\n\n'
)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """user+sys CPU of a process, all threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine() -> str:
    model = ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "")
    except OSError:
        pass
    return f"nproc={os.cpu_count()}, cpu={model or platform.processor()}, python={platform.python_version()}"


# =====================================================================================
# Child processes
# =====================================================================================
def _run_loop(main: Any, loop: str) -> None:
    loop = os.environ.get("EPP_BENCH_LOOP", loop)  # experiments: asyncio vs uvloop
    if loop == "uvloop":
        import uvloop

        uvloop.run(main)
    else:
        asyncio.run(main)


def _director(kind: str, endpoint: str, metrics: Any) -> Any:
    """`fake`: trivial round robin (the protocol floor); `default`: the real director with the
    built-in default profile (`DEFAULT_CONFIG` + its producers), as `epp` runs it without a config."""
    if kind == "fake":
        from llmepp.testing.fakes import FakeDirector

        return FakeDirector([endpoint], record=False, honour_test_headers=False)
    from llmepp.config.loader import build, load_config
    from llmepp.config.schema import DEFAULT_CONFIG
    from llmepp.datalayer.datastore import Datastore
    from llmepp.datalayer.endpoint import EndpointSpec
    from llmepp.director import Director

    host, port = endpoint.rsplit(":", 1)
    datastore = Datastore()
    datastore.upsert(EndpointSpec(name="model", address=host, port=int(port)))
    components = build(load_config(DEFAULT_CONFIG), datastore=datastore, metrics=metrics)
    return Director(datastore, components.pipeline, metrics)


async def _serve_epp(port: int, endpoint: str, timing: bool, transport: str, director_kind: str) -> None:
    from llmepp.gctuning import tune_gc
    from llmepp.observability.metrics import EppMetrics
    from llmepp.server.extproc import ExtProcServicer, create_server
    from llmepp.settings import Settings

    metrics = EppMetrics()
    director = _director(director_kind, endpoint, metrics)
    settings = Settings()
    servicer = ExtProcServicer(director, metrics, settings, time_response_chunks=timing)
    tune_gc()  # as `epp` does once it serves
    if transport in ("h2", "h2-tls"):
        from llmepp.server.h2 import create_h2_server
        from llmepp.server.tls import ServingCert

        ssl = ServingCert.from_settings(settings).ssl_context() if transport == "h2-tls" else None
        h2 = create_h2_server(servicer, settings, address=f"127.0.0.1:{port}", ssl=ssl)
        await h2.start()
        print("READY", flush=True)
        await h2.wait_for_termination()
        return
    extra = json.loads(os.environ.get("EPP_BENCH_GRPC_OPTIONS", "[]"))
    server, _ = create_server(servicer, settings, address=f"127.0.0.1:{port}", options=[tuple(o) for o in extra])
    await server.start()
    print("READY", flush=True)
    await server.wait_for_termination()


async def _serve_noop(port: int, endpoint: str, transport: str) -> None:
    from benchmarks.noop_extproc import create_noop_h2_server, create_noop_server
    from llmepp.gctuning import tune_gc

    tune_gc()  # the same runtime settings as the EPP: the comparison is of the processing

    if transport == "h2":
        h2 = create_noop_h2_server(endpoint, f"127.0.0.1:{port}")
        await h2.start()
        print("READY", flush=True)
        await h2.wait_for_termination()
        return
    extra = json.loads(os.environ.get("EPP_BENCH_GRPC_OPTIONS", "[]"))
    server, _ = create_noop_server(endpoint, f"127.0.0.1:{port}", [tuple(o) for o in extra])
    await server.start()
    print("READY", flush=True)
    await server.wait_for_termination()


async def _serve_model(host: str, port: int) -> None:
    from aiohttp import web

    async def completions(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=RESPONSE_JSON, content_type="application/json")

    app = web.Application(client_max_size=64 << 20)  # long-prompt runs send up to megabytes
    app.router.add_post("/v1/completions", completions)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    print("READY", flush=True)
    await asyncio.Event().wait()


class Child:
    """A benchmark server in its own process (this module's `serve-*` subcommands)."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.extproc_overhead", *args],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if "READY" not in line:
            self.stop()
            raise RuntimeError(f"child {args} failed to start: {line!r}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# =====================================================================================
# (a) latency through Envoy
# =====================================================================================
class HttpClient:
    """Blocking keep-alive HTTP/1.1 client on a raw socket: ~10 µs of its own per request."""

    def __init__(
        self, port: int, host: str = "127.0.0.1", path: str = "/v1/completions", body: bytes = REQUEST_BODY
    ) -> None:
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.request = (
            f"POST {path} HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n"
        ).encode() + body

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("closed")
        self.buf += data

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _take(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def call(self) -> tuple[int, bytes]:
        self.sock.sendall(self.request)
        status = int(self._line().split()[1])
        length, chunked = -1, False
        while True:
            line = self._line()
            if not line:
                break
            k, _, v = line.partition(b":")
            k = k.strip().lower()
            if k == b"content-length":
                length = int(v)
            elif k == b"transfer-encoding" and b"chunked" in v.lower():
                chunked = True
        if not chunked:
            return status, self._take(max(length, 0))
        body = b""
        while True:
            size = int(self._line().split(b";")[0], 16)
            if size == 0:
                self._line()
                return status, body
            body += self._take(size)
            self._take(2)

    def close(self) -> None:
        self.sock.close()


@dataclass
class LatencyResult:
    name: str
    p50_ms: float
    p99_ms: float
    mean_ms: float


async def bench_latency(
    n: int, rounds: int, warmup: int, transports: Sequence[str], body: bytes = REQUEST_BODY
) -> dict[str, Any]:
    from llmepp.testing.envoy import EnvoyProcess, render_envoy_config

    model_port = free_port(MODEL_HOST)
    endpoint = f"{MODEL_HOST}:{model_port}"
    model = Child("serve-model", "--host", MODEL_HOST, "--port", str(model_port))
    children = [model]
    envoys: list[EnvoyProcess] = []
    targets: dict[str, int] = {"direct": model_port}
    try:
        port, admin = free_port(), free_port()
        env = EnvoyProcess(
            render_envoy_config(
                port, 0, admin, listen_address="127.0.0.1", ext_proc=False, upstream=(MODEL_HOST, model_port)
            ),
            admin,
        )
        await env.start()
        envoys.append(env)
        targets["envoy"] = port
        for transport in transports:
            # h2-tls: the shipped default (--secure-serving, self-signed), EPP only: its cost over h2c.
            for kind in ("epp",) if transport == "h2-tls" else ("noop", "epp"):
                proc_port = free_port()
                children.append(
                    Child(
                        f"serve-{kind}",
                        *_director_args(kind),
                        "--port",
                        str(proc_port),
                        "--endpoint",
                        endpoint,
                        "--transport",
                        transport,
                    )
                )
                port, admin = free_port(), free_port()
                tls = transport == "h2-tls"
                config = render_envoy_config(port, proc_port, admin, listen_address="127.0.0.1", epp_tls=tls)
                env = EnvoyProcess(config, admin)
                await env.start()
                envoys.append(env)
                targets[f"envoy+{kind}" + {"h2": "-h2", "h2-tls": "-h2-tls"}.get(transport, "")] = port
        clients: dict[str, HttpClient] = {}
        for name, port in targets.items():
            host_client = HttpClient(port, MODEL_HOST if name == "direct" else "127.0.0.1", body=body)
            clients[name] = host_client
            for _ in range(warmup):
                status, answer = host_client.call()
                assert status == 200 and answer == RESPONSE_JSON, (name, status, answer[:200])
        samples: dict[str, list[float]] = {k: [] for k in targets}
        # Per-round medians: the machine's load drifts, so ratios are taken round by round.
        round_p50: dict[str, list[float]] = {k: [] for k in targets}
        per_round = max(1, n // rounds)
        perf = time.perf_counter
        for _ in range(rounds):
            for name, client in clients.items():
                out: list[float] = []
                for _ in range(per_round):
                    t0 = perf()
                    client.call()
                    out.append(perf() - t0)
                samples[name] += out
                round_p50[name].append(statistics.median(out) * 1e3)
        for c in clients.values():
            c.close()
    finally:
        for env in envoys:
            await env.stop()
        for child in children:
            child.stop()
    results = {
        k: LatencyResult(k, pct(v, 0.5) * 1e3, pct(v, 0.99) * 1e3, statistics.fmean(v) * 1e3)
        for k, v in samples.items()
    }
    base = results["envoy"]
    added: dict[str, dict[str, float]] = {}
    for name, r in results.items():
        if name.startswith("envoy+"):
            added[name] = {"p50_ms": r.p50_ms - base.p50_ms, "p99_ms": r.p99_ms - base.p99_ms}
    ratios: dict[str, dict[str, float]] = {}
    for suffix in ("", "-h2"):
        noop, epp = added.get("envoy+noop" + suffix), added.get("envoy+epp" + suffix)
        if noop and epp:
            ratios[f"epp{suffix}/noop{suffix}"] = {
                k: epp[k] / noop[k] if noop[k] > 0 else float("nan") for k in ("p50_ms", "p99_ms")
            }
    if "envoy+epp-h2-tls" in added and "envoy+epp-h2" in added:
        h2c = added["envoy+epp-h2"]
        ratios["epp-h2-tls/epp-h2"] = {k: added["envoy+epp-h2-tls"][k] / h2c[k] for k in ("p50_ms", "p99_ms")}
    if "envoy+epp-h2" in added and "envoy+noop" in added:
        noop = added["envoy+noop"]
        ratios["epp-h2/noop"] = {k: added["envoy+epp-h2"][k] / noop[k] for k in ("p50_ms", "p99_ms")}
    # The same p50 ratios computed per round, then the median over rounds (robust to drift).
    base_r = round_p50["envoy"]
    for num, den in (("epp", "noop"), ("epp-h2", "noop-h2"), ("epp-h2", "noop")):
        a, b = round_p50.get("envoy+" + num), round_p50.get("envoy+" + den)
        if a and b:
            per = [(x - e) / (y - e) for x, y, e in zip(a, b, base_r) if y - e > 0]
            if per and f"{num}/{den}" in ratios:
                ratios[f"{num}/{den}"]["p50_per_round_median"] = statistics.median(per)
    return {
        "requests_per_target": per_round * rounds,
        "targets": {k: vars(v) for k, v in results.items()},
        "added_over_envoy": added,
        "ratios": ratios,
    }


async def bench_long(sizes_kb: Sequence[int], n: int, rounds: int, transports: Sequence[str]) -> list[dict[str, Any]]:
    """(a) once per prompt size, fresh processes each time; h2-tls is left out (its cost is per message)."""
    rows = []
    for kb in sizes_kb:
        body = long_request_body(kb)
        lat = await bench_latency(n, rounds, max(5, n // 10), [t for t in transports if t != "h2-tls"], body=body)
        added = lat["added_over_envoy"]
        extra = {}
        for suffix in ("", "-h2"):
            epp, noop = added.get("envoy+epp" + suffix), added.get("envoy+noop" + suffix)
            if epp and noop:
                extra["epp" + suffix] = epp["p50_ms"] - noop["p50_ms"]
        rows.append({"kb": kb, "body_bytes": len(body), "latency": lat, "epp_minus_noop_p50_ms": extra})
    return rows


# =====================================================================================
# (b) / (c) load generator speaking ext_proc (child process)
# =====================================================================================
def _header_map(headers: dict[str, str]) -> Any:
    """An ext_proc HeaderMap as Envoy fills it: values in raw_value."""
    from envoy.config.core.v3 import base_pb2

    return base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in headers.items()])


async def _loadgen(port: int, mode: str, seconds: float, concurrency: int, chunks: int, streams: int) -> None:
    import grpc
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
    from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

    req_headers = pb.ProcessingRequest(
        request_headers=pb.HttpHeaders(
            headers=_header_map(
                {
                    ":method": "POST",
                    ":path": "/v1/completions",
                    ":authority": "gw",
                    ":scheme": "http",
                    "content-type": "application/json",
                    "x-forwarded-proto": "http",
                    "x-request-id": "6b1c2f0e-3a6f-4a53-9b59-0a1a7f1f2f10",
                    "user-agent": "bench",
                    "accept": "*/*",
                }
            )
        ),
        protocol_config=pb.ProtocolConfiguration(request_body_mode=4, response_body_mode=4),
    )
    req_body = pb.ProcessingRequest(request_body=pb.HttpBody(body=REQUEST_BODY))
    req_eos = pb.ProcessingRequest(request_body=pb.HttpBody(end_of_stream=True))
    resp_headers = pb.ProcessingRequest(
        response_headers=pb.HttpHeaders(
            headers=_header_map(
                {
                    ":status": "200",
                    "content-type": "text/event-stream" if mode == "chunks" else "application/json",
                    "date": "Thu, 01 Jan 2026 00:00:00 GMT",
                    "server": "uvicorn",
                    "x-envoy-upstream-service-time": "1",
                }
            )
        )
    )
    resp_body = pb.ProcessingRequest(response_body=pb.HttpBody(body=RESPONSE_JSON))
    resp_chunk = pb.ProcessingRequest(response_body=pb.HttpBody(body=SSE_CHUNK))
    resp_eos = pb.ProcessingRequest(response_body=pb.HttpBody(end_of_stream=True))

    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.ExternalProcessorStub(channel)

    async def one_request() -> None:
        call = stub.Process()
        await call.write(req_headers)
        await call.write(req_body)
        await call.write(req_eos)
        await call.read()
        await call.read()
        await call.write(resp_headers)
        await call.read()
        await call.write(resp_body)
        await call.read()
        await call.write(resp_eos)
        await call.read()
        await call.done_writing()
        await call.read()

    async def one_stream(n_chunks: int) -> None:
        call = stub.Process()
        await call.write(req_headers)
        await call.write(req_body)
        await call.write(req_eos)
        await call.read()
        await call.read()
        await call.write(resp_headers)
        await call.read()

        async def reader() -> None:
            for _ in range(n_chunks + 1):
                await call.read()

        task = asyncio.create_task(reader())
        for _ in range(n_chunks):
            await call.write(resp_chunk)
        await call.write(resp_eos)
        await task
        await call.done_writing()
        await call.read()

    # Warm up connections and code paths.
    await asyncio.gather(*(one_request() for _ in range(50)))
    print("WARM", flush=True)
    sys.stdin.readline()  # the parent snapshots the server's CPU, then says go
    done = 0
    t0 = time.perf_counter()
    if mode == "throughput":
        stop_at = t0 + seconds

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < stop_at:
                await one_request()
                done += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    else:
        await asyncio.gather(*(one_stream(chunks) for _ in range(streams)))
        done = streams
    elapsed = time.perf_counter() - t0
    print(json.dumps({"done": done, "elapsed": elapsed}), flush=True)
    await channel.close()


def _drive(server: Child, args: list[str]) -> dict[str, Any]:
    gen = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.extproc_overhead", "loadgen", *args],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert gen.stdout is not None and gen.stdin is not None
    if "WARM" not in gen.stdout.readline():
        gen.kill()
        raise RuntimeError("load generator failed")
    c0, g0 = server.cpu(), cpu_seconds(gen.pid)
    gen.stdin.write("go\n")
    gen.stdin.flush()
    out = json.loads(gen.stdout.readline())
    c1, g1 = server.cpu(), cpu_seconds(gen.pid)
    gen.wait(10)
    return {**out, "server_cpu": c1 - c0, "loadgen_cpu": g1 - g0}


# Which director the EPP child runs (`--director`); the no-op server has none.
DIRECTOR = "default"


def _director_args(kind: str) -> list[str]:
    return ["--director", DIRECTOR] if kind == "epp" else []


def _variants(transports: Sequence[str]) -> list[tuple[str, str, str]]:
    """Throughput / chunk servers; the load generator speaks plaintext gRPC, so h2-tls is latency-only."""
    plain = [t for t in transports if t != "h2-tls"]
    return [(kind + ("-h2" if t == "h2" else ""), kind, t) for t in plain for kind in ("noop", "epp")]


def bench_throughput(
    seconds: float, concurrency: int, transports: Sequence[str], env: dict[str, str] | None = None
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, kind, transport in _variants(transports):
        port = free_port()
        server = Child(
            f"serve-{kind}",
            *_director_args(kind),
            "--port",
            str(port),
            "--endpoint",
            "10.0.0.1:8000",
            "--transport",
            transport,
            env=env,
        )
        try:
            r = _drive(server, ["--port", str(port), "--mode", "throughput", "--seconds", str(seconds),
                                "--concurrency", str(concurrency)])  # fmt: skip
        finally:
            server.stop()
        out[name] = {
            "requests": r["done"],
            "requests_per_s": r["done"] / r["elapsed"],
            "server_cpu_s": r["server_cpu"],
            "server_cpu_util": r["server_cpu"] / r["elapsed"],
            "requests_per_cpu_s": r["done"] / r["server_cpu"] if r["server_cpu"] else float("nan"),
            "server_cpu_us_per_request": r["server_cpu"] / r["done"] * 1e6,
            "loadgen_cpu_util": r["loadgen_cpu"] / r["elapsed"],
        }
    return out


def bench_chunks(
    chunks: int, streams: int, transports: Sequence[str], env: dict[str, str] | None = None, timing: bool = True
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, kind, transport in _variants(transports):
        port = free_port()
        extra = [] if timing or kind == "noop" else ["--no-timing"]
        server = Child(
            f"serve-{kind}", *_director_args(kind), "--port", str(port), "--endpoint", "10.0.0.1:8000",
            "--transport", transport, *extra, env=env,
        )  # fmt: skip
        try:
            r = _drive(server, ["--port", str(port), "--mode", "chunks", "--chunks", str(chunks),
                                "--streams", str(streams)])  # fmt: skip
        finally:
            server.stop()
        total = chunks * streams
        out[name] = {
            "chunks": total,
            "chunks_per_s": total / r["elapsed"],
            "server_cpu_us_per_chunk": r["server_cpu"] / total * 1e6,
            "server_cpu_util": r["server_cpu"] / r["elapsed"],
        }
    return out


# =====================================================================================
# (e) in-process: the stream logic's CPU per message, no transport
# =====================================================================================
IN_PROCESS_TARGETS = ("noop", "fake", "default")  # the no-op stream; the EPP's with a trivial / the real director
IN_PROCESS_STEPS = (
    "request headers",
    "request body",
    "request end of stream",
    "response headers",
    "response body",
    "response end of stream",
    "after the last answer",
)
_IN_PROCESS_ROUNDS = 3


def envoy_messages() -> list[bytes]:
    """The six ext_proc messages Envoy 1.40 sends for (a)'s small request, FULL_DUPLEX_STREAMED both ways, with
    the header sets the latency run's Envoy sends: each body chunk, then its end of stream as a message alone."""
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

    from llmepp.server.envoy import MODE_FULL_DUPLEX_STREAMED

    request = {
        ":authority": "bench",
        ":path": "/v1/completions",
        ":method": "POST",
        ":scheme": "http",
        "content-type": "application/json",
        "content-length": str(len(REQUEST_BODY)),
        "x-forwarded-proto": "http",
        "x-request-id": "cbfa4b4c-6a7f-47fe-a794-b6f8c5f68209",
    }
    response = {
        ":status": "200",
        "content-type": "application/json",
        "content-length": str(len(RESPONSE_JSON)),
        "date": "Wed, 25 Nov 2026 15:53:11 GMT",
        "server": "Python/3.11 aiohttp/3.14.5",
        "x-envoy-upstream-service-time": "0",
    }
    fds = pb.ProtocolConfiguration(
        request_body_mode=MODE_FULL_DUPLEX_STREAMED, response_body_mode=MODE_FULL_DUPLEX_STREAMED
    )
    messages = [
        pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=_header_map(request)), protocol_config=fds),
        pb.ProcessingRequest(request_body=pb.HttpBody(body=REQUEST_BODY)),
        pb.ProcessingRequest(request_body=pb.HttpBody(end_of_stream=True)),
        pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=_header_map(response))),
        pb.ProcessingRequest(response_body=pb.HttpBody(body=RESPONSE_JSON)),
        pb.ProcessingRequest(response_body=pb.HttpBody(end_of_stream=True)),
    ]
    return [m.SerializeToString() for m in messages]


async def _inprocess_run(target: str, n: int) -> list[float]:
    """µs per request for each of IN_PROCESS_STEPS: every message decoded and handled as the h2 server does (the
    routing step run eagerly), then one loop turn, in which the completion queued after the last answer runs."""
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

    from benchmarks.noop_extproc import NoopStream, _route_answer
    from llmepp.gctuning import tune_gc
    from llmepp.observability.metrics import EppMetrics
    from llmepp.server.stream import ExtProcStream, Pending, StreamContext
    from llmepp.settings import Settings

    endpoint = f"{MODEL_HOST}:8000"
    if target == "noop":
        route = _route_answer(endpoint)

        def new_stream() -> Any:
            return NoopStream(route)
    else:
        metrics = EppMetrics()
        context = StreamContext(_director(target, endpoint, metrics), metrics, Settings())

        def new_stream() -> Any:
            return ExtProcStream(context)

    tune_gc()  # as the servers run
    raw = envoy_messages()
    decode = pb.ProcessingRequest.FromString
    perf = time.perf_counter
    warmup = n // 10
    totals = [0.0] * len(IN_PROCESS_STEPS)
    for i in range(warmup + n):
        if i == warmup:
            totals = [0.0] * len(IN_PROCESS_STEPS)
        stream = new_stream()
        for step, message in enumerate(raw):
            t0 = perf()
            msg = decode(message)
            out = stream.handle(msg.WhichOneof("request"), msg)
            if out.__class__ is Pending:
                done, out = out.step()
                if not done:
                    raise RuntimeError("the routing step waited: an in-process run cannot time it")
            totals[step] += perf() - t0
        t0 = perf()
        await asyncio.sleep(0)
        stream.finish()
        totals[-1] += perf() - t0
        if target != "noop" and stream.decision is None:
            raise RuntimeError(f"the {target} director did not route the request: nothing routed was measured")
    return [t / n * 1e6 for t in totals]


def bench_inprocess(n: int) -> dict[str, Any]:
    """Each target in its own process, the targets interleaved over rounds; the median of each step."""
    rounds: dict[str, list[list[float]]] = {t: [] for t in IN_PROCESS_TARGETS}
    for _ in range(_IN_PROCESS_ROUNDS):
        for target in IN_PROCESS_TARGETS:
            out = subprocess.run(
                [sys.executable, "-m", "benchmarks.extproc_overhead", "inprocess-run", "--target", target, "--n",
                 str(n)],
                cwd=REPO, capture_output=True, text=True,
            )  # fmt: skip
            if out.returncode:
                raise RuntimeError(f"in-process run of {target} failed:\n{out.stderr}")
            rounds[target].append(json.loads(out.stdout))
    result: dict[str, Any] = {"requests_per_round": n, "rounds": _IN_PROCESS_ROUNDS}
    for target, runs in rounds.items():
        steps = [statistics.median(r[i] for r in runs) for i in range(len(IN_PROCESS_STEPS))]
        result[target] = {
            "us_per_step": dict(zip(IN_PROCESS_STEPS, steps, strict=True)),
            "latency_path_us": sum(steps[:-1]),  # every answer the request's latency waits for
        }
    return result


# =====================================================================================
def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("all", "latency", "throughput", "chunks", "long", "inprocess"):
        p = sub.add_parser(name)
        p.add_argument("--quick", action="store_true")
        p.add_argument("--n", type=int, default=2000, help="latency: requests per target")
        p.add_argument("--rounds", type=int, default=20)
        p.add_argument("--seconds", type=float, default=8.0, help="throughput: duration")
        p.add_argument("--concurrency", type=int, default=64)
        p.add_argument("--chunks", type=int, default=2000, help="chunks: response chunks per stream")
        p.add_argument("--streams", type=int, default=16)
        p.add_argument("--sizes-kb", default="16,128,512,2048", help="long: prompt sizes in KiB")
        p.add_argument("--long-n", type=int, default=200, help="long: requests per target and size")
        p.add_argument("--inprocess-n", type=int, default=20000, help="inprocess: requests per target and round")
        p.add_argument("--grpc-experiments", default=None, help="GRPC_EXPERIMENTS for the servers")
        p.add_argument("--no-timing", action="store_true", help="EPP without per-chunk timing")
        p.add_argument("--json", action="store_true", help="print JSON only")
        p.add_argument("--transports", default="grpc,h2,h2-tls",
                       help="comma-separated: grpc, h2, h2-tls (latency only: the EPP over TLS)")  # fmt: skip
        p.add_argument("--director", choices=("fake", "default"), default="default",
                       help="EPP director: the real one with the default profile, or a trivial fake")  # fmt: skip
    p = sub.add_parser("serve-epp")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--endpoint", required=True)
    p.add_argument("--loop", default="uvloop")
    p.add_argument("--no-timing", action="store_true")
    p.add_argument("--transport", default="grpc")
    p.add_argument("--director", choices=("fake", "default"), default="default")
    p = sub.add_parser("inprocess-run")
    p.add_argument("--target", choices=IN_PROCESS_TARGETS, required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--loop", default="uvloop")
    p = sub.add_parser("serve-noop")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--endpoint", required=True)
    p.add_argument("--loop", default="uvloop")
    p.add_argument("--transport", default="grpc")
    p = sub.add_parser("serve-model")
    p.add_argument("--host", default=MODEL_HOST)
    p.add_argument("--port", type=int, required=True)
    p = sub.add_parser("loadgen")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--mode", choices=("throughput", "chunks"), required=True)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--chunks", type=int, default=1000)
    p.add_argument("--streams", type=int, default=16)
    args = ap.parse_args(argv)
    if (args.n if args.cmd == "inprocess-run" else getattr(args, "inprocess_n", 1)) < 1:
        ap.error("the number of in-process requests must be at least 1")

    if args.cmd == "serve-epp":
        _run_loop(_serve_epp(args.port, args.endpoint, not args.no_timing, args.transport, args.director), args.loop)
        return
    if args.cmd == "inprocess-run":
        steps: list[float] = []

        async def run() -> None:
            steps.extend(await _inprocess_run(args.target, args.n))

        _run_loop(run(), args.loop)
        print(json.dumps(steps))
        return
    if args.cmd == "serve-noop":
        _run_loop(_serve_noop(args.port, args.endpoint, args.transport), args.loop)
        return
    if args.cmd == "serve-model":
        _run_loop(_serve_model(args.host, args.port), "uvloop")
        return
    if args.cmd == "loadgen":
        _run_loop(_loadgen(args.port, args.mode, args.seconds, args.concurrency, args.chunks, args.streams), "uvloop")
        return

    global DIRECTOR
    DIRECTOR = args.director
    if args.quick:
        args.n, args.rounds, args.seconds, args.chunks, args.streams = 300, 3, 2.0, 300, 8
        args.sizes_kb, args.long_n, args.inprocess_n = "128", 40, 2000
    env = {"GRPC_EXPERIMENTS": args.grpc_experiments} if args.grpc_experiments is not None else None
    transports = [t for t in args.transports.split(",") if t]
    report: dict[str, Any] = {"machine": machine()}
    if args.cmd in ("all", "latency"):
        report["latency"] = asyncio.run(bench_latency(args.n, args.rounds, 200, transports))
    if args.cmd in ("all", "throughput"):
        report["throughput"] = bench_throughput(args.seconds, args.concurrency, transports, env)
    if args.cmd in ("all", "chunks"):
        report["chunks"] = bench_chunks(args.chunks, args.streams, transports, env, timing=not args.no_timing)
    if args.cmd in ("all", "long"):
        sizes = [int(x) for x in args.sizes_kb.split(",") if x]
        report["long"] = asyncio.run(bench_long(sizes, args.long_n, min(args.rounds, 10), transports))
    if args.cmd == "inprocess":
        report["inprocess"] = bench_inprocess(args.inprocess_n)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(_format(report))


def _format(r: dict[str, Any]) -> str:
    lines = [f"machine: {r['machine']}"]
    if "latency" in r:
        lat = r["latency"]
        lines.append(f"\n(a) latency, {lat['requests_per_target']} sequential requests per target (ms)")
        lines.append(f"  {'target':<14} {'p50':>8} {'p99':>8} {'mean':>8}")
        for name, t in lat["targets"].items():
            lines.append(f"  {name:<14} {t['p50_ms']:8.3f} {t['p99_ms']:8.3f} {t['mean_ms']:8.3f}")
        for name, a in lat["added_over_envoy"].items():
            lines.append(f"  added by {name:<14} p50 {a['p50_ms']:6.3f} ms  p99 {a['p99_ms']:6.3f} ms")
        for name, q in lat["ratios"].items():
            per = q.get("p50_per_round_median")
            extra = f"  (median of per-round p50 ratios {per:.2f}x)" if per is not None else ""
            lines.append(f"  ratio {name:<12} p50 {q['p50_ms']:.2f}x  p99 {q['p99_ms']:.2f}x{extra}")
    if "throughput" in r:
        lines.append("\n(b) ext_proc throughput, one server process driven over gRPC")
        for name, t in r["throughput"].items():
            lines.append(
                f"  {name:<8} {t['requests_per_s']:8.0f} req/s at {t['server_cpu_util'] * 100:5.1f}% CPU -> "
                f"{t['requests_per_cpu_s']:6.0f} req per CPU-second ({t['server_cpu_us_per_request']:.0f} µs/req); "
                f"loadgen {t['loadgen_cpu_util'] * 100:.0f}% CPU"
            )
    if "chunks" in r:
        lines.append("\n(c) response chunk pass-through")
        for name, t in r["chunks"].items():
            lines.append(
                f"  {name:<8} {t['server_cpu_us_per_chunk']:6.1f} CPU-µs per chunk "
                f"({t['chunks_per_s']:.0f} chunks/s at {t['server_cpu_util'] * 100:.0f}% CPU)"
            )
    if "long" in r:
        lines.append("\n(d) long prompts: added latency over Envoy alone, p50 ms (EPP minus no-op)")
        for row in r["long"]:
            added = row["latency"]["added_over_envoy"]
            cells = "  ".join(f"{name.removeprefix('envoy+')} {a['p50_ms']:.3f}" for name, a in added.items())
            diff = "  ".join(f"{k} {v:+.3f}" for k, v in row["epp_minus_noop_p50_ms"].items())
            lines.append(f"  {row['kb']:>5} KiB: {cells}  ({diff})")
    if "inprocess" in r:
        ip = r["inprocess"]
        lines.append(f"\n(e) in-process CPU per request, µs (median of {ip['rounds']} rounds of "
                     f"{ip['requests_per_round']} requests)")  # fmt: skip
        lines.append(f"  {'step':<24}" + "".join(f"{t:>10}" for t in IN_PROCESS_TARGETS))
        lines.extend(
            f"  {step:<24}" + "".join(f"{ip[t]['us_per_step'][step]:10.1f}" for t in IN_PROCESS_TARGETS)
            for step in IN_PROCESS_STEPS
        )
        lines.append(
            f"  {'latency path (1-6)':<24}" + "".join(f"{ip[t]['latency_path_us']:10.1f}" for t in IN_PROCESS_TARGETS)
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
