"""Helpers for the simulator tests: real pods on loopback, a real aiohttp client, real ZMQ.

Every pod binds port 0 (and ZMQ ``*`` ports) so parallel test runs never collide.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from llmepp_sim import PodConfig, SimCluster

# Most tests run 10x faster than real time. Tests whose assertions compare short latencies run at 3x:
# on a loaded 2-core machine the event loop can lag tens of ms, which is 10x larger in simulated time.
FAST = 10.0
STEADY = 3.0


def pod(host: str = "127.0.0.2", **overrides: Any) -> PodConfig:
    values: dict[str, Any] = {"host": host, "port": 0}
    values.update(overrides)
    return PodConfig(**values)


def running(configs: Sequence[PodConfig], time_scale: float = FAST) -> SimCluster:
    """``async with running([...]) as cluster:`` starts the pods on entry and stops them on exit, failed or not."""
    return SimCluster(list(configs), time_scale=time_scale)


async def started(configs: Sequence[PodConfig], time_scale: float = FAST) -> SimCluster:
    """A started cluster the caller stops itself, for tests that tear down other resources before it."""
    cluster = SimCluster(list(configs), time_scale=time_scale)
    await cluster.start()
    return cluster


@dataclass
class Result:
    status: int
    headers: dict[str, str]
    body: dict[str, Any]
    ttft_wall: float  # seconds from request start to the first content byte / token
    total_wall: float
    lines: list[str] = field(default_factory=list)  # raw SSE lines for streamed requests

    @property
    def cached_tokens(self) -> int:
        return int(self.body["usage"]["prompt_tokens_details"]["cached_tokens"])


async def complete(
    session: aiohttp.ClientSession,
    url: str,
    prompt: Any,
    max_tokens: int | None = 2,
    *,
    stream: bool = False,
    chat: bool = False,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> Result:
    """One inference request; streaming requests measure TTFT at the first token chunk."""
    body: dict[str, Any] = {"model": "sim-model", **extra}
    if chat:
        body["messages"] = prompt
    else:
        body["prompt"] = prompt
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if stream:
        body["stream"] = True
        body.setdefault("stream_options", {"include_usage": True})
    path = "/v1/chat/completions" if chat else "/v1/completions"
    start = time.monotonic()
    async with session.post(url + path, json=body, headers=headers) as response:
        if not stream or response.status != 200:
            payload = await response.json(content_type=None)
            now = time.monotonic() - start
            return Result(response.status, dict(response.headers), payload, now, now)
        lines: list[str] = []
        first: float | None = None
        usage_body: dict[str, Any] = {}
        async for raw in response.content:
            line = raw.decode().rstrip("\n")
            lines.append(line)
            if line.startswith("data: {") and first is None and ('"text"' in line or '"content":" ' in line):
                first = time.monotonic() - start
            if line.startswith("data: {") and '"usage"' in line:
                usage_body = json.loads(line[len("data: ") :])
        total = time.monotonic() - start
        return Result(response.status, dict(response.headers), usage_body, first or total, total, lines)


async def scrape(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    """``{family name: family}`` parsed by prometheus_client's own text parser."""
    async with session.get(url + "/metrics") as response:
        assert response.status == 200
        text = await response.text()
    return {family.name: family for family in text_string_to_metric_families(text)}


async def scrape_until(
    session: aiohttp.ClientSession, url: str, cond: Callable[[dict[str, Any]], bool], within: float = 5.0
) -> dict[str, Any]:
    """Scrape until ``cond(families)`` holds and return those families. Requests sent together from tasks reach
    the pod over however many loop turns a loaded machine takes: a fixed sleep before one scrape is a race."""
    deadline = time.monotonic() + within
    while not cond(families := await scrape(session, url)):
        assert time.monotonic() < deadline, f"no scrape of {url} met the condition in {within} s"
        await asyncio.sleep(0.02)  # not faster: each scrape is rendered on the loop the pods run on
    return families


def sample(families: dict[str, Any], family: str, suffix: str = "", **labels: str) -> float:
    """Value of the first sample of ``family`` named family+suffix whose labels include ``labels``.

    A counter's value sample is ``<family>_total``; that suffix is implied.
    """
    if not suffix and families[family].type == "counter":
        suffix = "_total"
    for s in families[family].samples:
        if s.name == family + suffix and all(s.labels.get(k) == v for k, v in labels.items()):
            return float(s.value)
    raise KeyError(f"{family}{suffix} {labels}")


def words(n: int, salt: str = "") -> str:
    """A prompt of n common words (each a single token of the shipped tokenizer, plus the salt)."""
    vocabulary = ["cache", "request", "server", "model", "token", "prefix", "queue", "batch"]
    return salt + " ".join(vocabulary[i % len(vocabulary)] for i in range(n))
