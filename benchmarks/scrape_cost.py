"""CPU cost of scraping N model servers' /metrics every 50 ms.

    .venv/bin/python benchmarks/scrape_cost.py                        # production collector
    .venv/bin/python benchmarks/scrape_cost.py --mode all --seconds 10  # compare drivers

A child process serves a realistic ~57 KB vLLM page from N addresses (127.0.0.2...),
using a minimal keep-alive HTTP server so it can keep up with 2,000 requests/s on its
own core; its CPU is not counted. This process runs the scraper under uvloop and reports:

- cpu %: user+sys CPU seconds of this process per wall second (100 % = one core),
- scrapes/s: requests the servers answered per second (target N / interval),
- errors: poll / extract error counters,
- age p99/max: metrics age sampled every 100 ms across endpoints (staleness),
- loop lag p99/max: how late a 10 ms timer fires (what ext_proc traffic would feel).

Modes: `collector` (MetricsCollector: one ticker, callbacks, custom HTTP client),
`tasks` (a task per endpoint looping over `await ScrapeClient.fetch()`),
`aiohttp` (a task per endpoint with a shared aiohttp ClientSession).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import resource
import socket
import sys
import time
from collections.abc import Callable, Coroutine
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import uvloop

# Run as a script (the documented command): the repository root (`benchmarks`) and tests/ (`datalayer`).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datalayer.vllm_page import vllm_page  # type: ignore[import-not-found,unused-ignore]

from benchmarks.metrics import pct
from llmepp.datalayer.collector import MetricsCollector
from llmepp.datalayer.datastore import Datastore
from llmepp.datalayer.endpoint import EndpointSpec
from llmepp.datalayer.httpscrape import ScrapeClient, ScrapeError
from llmepp.observability.metrics import EppMetrics
from llmepp.plugins.datasources.core_metrics import CoreMetricsExtractor
from llmepp.plugins.datasources.metrics_source import MetricsDataSource

PORT = 18900


# ---------------------------------------------------------------------------------------
# Fake model servers (child process)
# ---------------------------------------------------------------------------------------
class _ServerProto(asyncio.Protocol):
    responses: list[bytes] = []
    served = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t: Any = transport  # uvloop transports are not asyncio.Transport instances
        self.buf = b""
        self.i = id(self) % 8

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            self.buf = self.buf[end + 4 :]
            self.i = (self.i + 1) % len(self.responses)
            self.t.write(self.responses[self.i])
            _ServerProto.served += 1


# ---------------------------------------------------------------------------------------
# Drivers (this process)
# ---------------------------------------------------------------------------------------
class Run:
    def __init__(self, n: int, interval: float) -> None:
        self.n = n
        self.interval = interval
        self.metrics = EppMetrics()
        self.datastore = Datastore()
        self.source = MetricsDataSource("metrics-data-source", MetricsDataSource.Params(port=PORT))
        self.extractor = CoreMetricsExtractor("core-metrics-extractor", CoreMetricsExtractor.Params())
        self.errors = {"poll": 0, "extract": 0}

    def add_endpoints(self) -> None:
        for i in range(self.n):
            self.datastore.upsert(EndpointSpec(name=f"vllm-{i}", address=f"127.0.0.{2 + i}", port=PORT))

    def counters(self) -> dict[str, float]:
        poll = _count(self.metrics.poll_errors.labels(source_type="metrics-data-source"))
        extract = _count(
            self.metrics.extract_errors.labels(
                source_type="metrics-data-source", extractor_type="core-metrics-extractor"
            )
        )
        return {"poll": poll + self.errors["poll"], "extract": extract + self.errors["extract"]}


def _count(child: Any) -> float:
    """A counter child's value: lock-free `Tally` (`.value`) or a prometheus_client child."""
    value = getattr(child, "value", None)
    return float(value) if value is not None else float(child._value.get())


async def drive_collector(run: Run) -> Callable[[], Coroutine[Any, Any, None]]:
    collector = MetricsCollector(run.datastore, run.metrics, run.interval, run.source, run.extractor)
    await collector.start()
    run.add_endpoints()
    return collector.aclose


async def drive_tasks(run: Run) -> Callable[[], Coroutine[Any, Any, None]]:
    run.add_endpoints()

    async def one(ep: Any) -> None:
        client = ScrapeClient(run.source.target_for(ep.spec), lambda b, e: None, 1.0)
        mapping = run.extractor.mapping_for(ep.labels)
        memo = mapping.new_memo()
        while True:
            t0 = time.monotonic()
            try:
                body = await client.fetch()
            except ScrapeError:
                run.errors["poll"] += 1
            else:
                m, err = mapping.extract(body, ep.metrics, time.monotonic(), memo)
                if m is not None:
                    ep.metrics = m
                if err is not None:
                    run.errors["extract"] += 1
            await asyncio.sleep(max(0.0, run.interval - (time.monotonic() - t0)))

    tasks = [asyncio.create_task(one(ep)) for ep in run.datastore.endpoints]

    async def stop() -> None:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    return stop


async def drive_aiohttp(run: Run) -> Callable[[], Coroutine[Any, Any, None]]:
    import aiohttp

    run.add_endpoints()
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, limit_per_host=2, keepalive_timeout=10),
        timeout=aiohttp.ClientTimeout(total=1.0),
        auto_decompress=False,
    )

    async def one(ep: Any) -> None:
        url = run.source.target_for(ep.spec).url
        mapping = run.extractor.mapping_for(ep.labels)
        memo = mapping.new_memo()
        while True:
            t0 = time.monotonic()
            try:
                async with session.get(url) as resp:
                    body = await resp.read()
                    ok = resp.status == 200
            except (aiohttp.ClientError, TimeoutError):
                ok, body = False, b""
            if not ok:
                run.errors["poll"] += 1
            else:
                m, err = mapping.extract(body, ep.metrics, time.monotonic(), memo)
                if m is not None:
                    ep.metrics = m
                if err is not None:
                    run.errors["extract"] += 1
            await asyncio.sleep(max(0.0, run.interval - (time.monotonic() - t0)))

    tasks = [asyncio.create_task(one(ep)) for ep in run.datastore.endpoints]

    async def stop() -> None:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await session.close()

    return stop


DRIVERS = {"collector": drive_collector, "tasks": drive_tasks, "aiohttp": drive_aiohttp}


async def measure(
    mode: str, n: int, interval: float, seconds: float, warmup: float, conn: Connection
) -> dict[str, Any]:
    run = Run(n, interval)
    stop = await DRIVERS[mode](run)
    await asyncio.sleep(warmup)
    lags: list[float] = []
    ages: list[float] = []

    async def probe() -> None:  # loop responsiveness, as a 10 ms timer sees it
        while True:
            t = time.monotonic()
            await asyncio.sleep(0.01)
            lags.append(time.monotonic() - t - 0.01)

    async def staleness() -> None:
        while True:
            await asyncio.sleep(0.1)
            now = time.monotonic()
            ages.extend(ep.metrics_age(now) for ep in run.datastore.endpoints)

    conn.send("count")
    served0 = conn.recv()
    errors0 = run.counters()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    w0 = time.monotonic()
    aux = [asyncio.create_task(probe()), asyncio.create_task(staleness())]
    await asyncio.sleep(seconds)
    wall = time.monotonic() - w0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    conn.send("count")
    served1 = conn.recv()
    errors1 = run.counters()
    for t in aux:
        t.cancel()
    await stop()
    user, sys_ = r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime
    scrapes = (served1 - served0) / wall
    return {
        "mode": mode,
        "endpoints": n,
        "interval_ms": interval * 1000,
        "cpu_pct": 100 * (user + sys_) / wall,
        "user_pct": 100 * user / wall,
        "sys_pct": 100 * sys_ / wall,
        "scrapes_per_s": scrapes,
        "target_scrapes_per_s": n / interval,
        "cpu_us_per_scrape": 1e6 * (user + sys_) / max(1.0, served1 - served0),
        "poll_errors": errors1["poll"] - errors0["poll"],
        "extract_errors": errors1["extract"] - errors0["extract"],
        "age_p99_ms": 1000 * pct(ages, 0.99),
        "age_max_ms": 1000 * max(ages, default=float("nan")),
        "loop_lag_p99_ms": 1000 * pct(lags, 0.99),
        "loop_lag_max_ms": 1000 * max(lags, default=float("nan")),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=[*DRIVERS, "all"], default="collector")
    ap.add_argument("--endpoints", type=int, default=100)
    ap.add_argument("--interval", type=float, default=0.05)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--json", action="store_true", help="print one JSON object per mode")
    args = ap.parse_args()
    modes = list(DRIVERS) if args.mode == "all" else [args.mode]
    for mode in modes:
        parent, child = mp.get_context("spawn").Pipe()
        server = mp.get_context("spawn").Process(target=_serve_counted, args=(args.endpoints, child), daemon=True)
        server.start()
        msg, page_size = parent.recv()
        assert msg == "ready"
        uvloop.install()
        result = asyncio.run(measure(mode, args.endpoints, args.interval, args.seconds, args.warmup, parent))
        parent.send("stop")
        server.join(5)
        result["page_bytes"] = page_size
        result["python"] = sys.version.split()[0]
        result["cpus"] = os.cpu_count()
        if args.json:
            print(json.dumps(result))
        else:
            print(
                f"{mode:9s} {args.endpoints} endpoints @ {args.interval * 1000:.0f} ms, page {page_size} B: "
                f"cpu {result['cpu_pct']:.1f}% of a core "
                f"(user {result['user_pct']:.1f}%, sys {result['sys_pct']:.1f}%), "
                f"{result['scrapes_per_s']:.0f}/{result['target_scrapes_per_s']:.0f} scrapes/s, "
                f"{result['cpu_us_per_scrape']:.0f} us CPU/scrape, errors poll={result['poll_errors']:.0f} "
                f"extract={result['extract_errors']:.0f}, age p99 {result['age_p99_ms']:.0f} ms "
                f"max {result['age_max_ms']:.0f} ms, loop lag p99 {result['loop_lag_p99_ms']:.1f} ms "
                f"max {result['loop_lag_max_ms']:.1f} ms",
                flush=True,
            )


def _serve_counted(n: int, conn: Connection) -> None:
    """Server entry point: serves until told to stop, answering "count" requests meanwhile."""
    uvloop.install()
    pages = [vllm_page(waiting=i, running=10 + i, kv_usage=i / 10) for i in range(8)]
    _ServerProto.responses = [
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
        + f"Content-Length: {len(p)}\r\n\r\n".encode()
        + p
        for p in pages
    ]

    async def run() -> None:
        loop = asyncio.get_running_loop()
        for i in range(n):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((f"127.0.0.{2 + i}", PORT))
            await loop.create_server(_ServerProto, sock=sock, backlog=64)
        conn.send(("ready", len(pages[0])))
        while True:
            msg = await asyncio.to_thread(conn.recv)  # the loop keeps serving meanwhile
            if msg == "stop":
                return
            conn.send(_ServerProto.served)

    asyncio.run(run())


if __name__ == "__main__":
    main()
