"""A lean asyncio load generator: streamed requests, open-loop Poisson stages, chat sessions.

Client-side work is kept small because the client shares 2 cores with the simulator, Envoy and the
routers: one `aiohttp` session, request bodies pre-encoded, SSE parsed by counting event terminators in
each read (no JSON decoding, except for the assistant text of a multi-turn answer, decoded once at the end).

Every read that carries token events is stamped with `time.monotonic()`; TTFT is the first such stamp minus
the request's scheduled arrival (its Poisson slot, or the end of a chat turn's think time), not the moment its
task got to run, so a late sender adds its lag to TTFT instead of hiding it; ITL gaps are the differences
between consecutive stamps (events that arrive in the same read have a gap of 0, as the client saw them). All
times here are wall-clock seconds; the runner converts them to simulated time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

from benchmarks.workloads import Call, Conversation, MultiTurn, StageSpec, Workload


@dataclass(slots=True)
class Outcome:
    stage: int
    key: str
    sent: float
    max_tokens: int
    first: float = 0.0  # wall time of the first token event; 0 = none
    end: float = 0.0
    tokens: int = 0
    reads: list[tuple[float, int]] = field(default_factory=list)  # (stamp, token events in that read)
    error: str | None = None
    status: int = 0
    pod: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None and self.tokens > 0


async def execute(
    session: aiohttp.ClientSession,
    base_url: str,
    call: Call,
    stage: int,
    ttft_timeout: float,
    total_timeout: float,
    want_text: bool = False,
    due: float | None = None,
) -> tuple[Outcome, str]:
    """Send one streamed request; never raises (errors are recorded in the outcome). `due`: the scheduled
    arrival (monotonic), which TTFT and the TTFT timeout count from; None: now."""
    out = Outcome(stage, call.key, time.monotonic() if due is None else due, call.max_tokens)
    raw: list[bytes] = []
    chat = call.path.endswith("chat/completions")
    events = 0
    lead = 1 if chat else 0  # the chat role chunk carries no token
    timeout = aiohttp.ClientTimeout(total=total_timeout, sock_read=ttft_timeout)
    headers = {"Content-Type": "application/json", **dict(call.headers)}
    try:
        async with session.post(base_url + call.path, data=call.body, headers=headers, timeout=timeout) as resp:
            out.status = resp.status
            out.pod = resp.headers.get("x-inference-pod", "")
            if resp.status != 200:
                out.error = f"http {resp.status}"
                await resp.read()
                return _finish(out), ""
            pending = b""  # the read's unfinished event
            async for data in resp.content.iter_any():
                now = time.monotonic()
                # One `data:` event per token; events end with a blank line. Comment events (": keep-alive",
                # which axum-based routers send while a request waits) are no token: counted, they made a
                # keep-alive the first token and reset the TTFT timeout below.
                *complete, pending = (pending + data).split(b"\n\n")
                n = sum(1 for event in complete if event.lstrip(b"\n").startswith(b"data:"))
                if want_text:
                    raw.append(data)
                if not n:
                    # aiohttp's sock_read timeout only sees silence; comments keep a stalled request alive.
                    if out.first == 0.0 and now - out.sent > ttft_timeout:
                        raise TimeoutError
                    continue
                before = max(0, events - lead)
                events += n
                added = max(0, events - lead) - before
                if added:
                    if out.first == 0.0:
                        out.first = now
                    out.reads.append((now, added))
    except TimeoutError:
        out.error = "ttft-timeout" if out.first == 0.0 else "timeout"
    except (aiohttp.ClientError, ConnectionError) as exc:
        out.error = type(exc).__name__
    # The last event is [DONE], after the usage event when the call asked for usage: they were counted as
    # tokens above; take them back.
    if out.error is None:
        drop_trailing_events(out.reads, 2 if call.usage else 1)
    out.tokens = sum(n for _, n in out.reads)
    if out.error is None and out.tokens < call.max_tokens:
        out.error = "short"
    text = _assistant_text(b"".join(raw)) if want_text and out.error is None else ""
    return _finish(out), text


def drop_trailing_events(reads: list[tuple[float, int]], k: int) -> None:
    """Remove the last `k` events from (stamp, events) reads, dropping reads left empty."""
    while k > 0 and reads:
        stamp, n = reads.pop()
        if n > k:
            reads.append((stamp, n - k))
        k -= n


def _finish(out: Outcome) -> Outcome:
    out.end = time.monotonic()
    return out


def _assistant_text(body: bytes) -> str:
    parts = []
    for line in body.split(b"\n"):
        if not line.startswith(b"data: {"):
            continue
        with contextlib.suppress(ValueError, KeyError, IndexError):
            choice = json.loads(line[6:])["choices"][0]
            parts.append(choice.get("delta", {}).get("content") or choice.get("text") or "")
    return "".join(parts)


@dataclass
class RunConfig:
    base_url: str
    time_scale: float
    # inference-perf's request_timeout in the llm-d profiles is 300 s; a request also fails when its first
    # token has not come within that time (the sim aborts it when the client goes away).
    ttft_timeout_sim: float = 300.0
    total_timeout_sim: float = 420.0

    @property
    def ttft_timeout(self) -> float:
        return self.ttft_timeout_sim / self.time_scale

    @property
    def total_timeout(self) -> float:
        return self.total_timeout_sim / self.time_scale


@dataclass
class StageWindow:
    index: int
    spec: StageSpec
    start: float  # wall: first arrival slot
    end: float  # wall: last request of the stage finished
    sent: int = 0  # requests (multi-turn: conversations) started in the stage
    arrivals_end: float = 0.0


async def run_ladder(
    workload: Workload,
    cfg: RunConfig,
    on_stage: Callable[[StageWindow], None] | None = None,
) -> tuple[list[Outcome], list[StageWindow]]:
    """Run the stages in order. As inference-perf does, each stage sends its arrivals and then waits until
    every request it sent has finished (or timed out) before the next stage starts; a stage's window runs
    from its start (the first arrival slot) to its last completion. `on_stage(window)` is called at the end of
    each stage.
    """
    outcomes: list[Outcome] = []
    windows: list[StageWindow] = []
    connector = aiohttp.TCPConnector(limit=0, enable_cleanup_closed=True)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
        counter = 0
        for index, spec in enumerate(workload.stages):
            offsets = workload.arrivals(index, spec)
            start = time.monotonic()
            window = StageWindow(index, spec, start, start + spec.duration / cfg.time_scale)
            windows.append(window)
            tasks: list[asyncio.Task[None]] = []
            for offset in offsets:
                due = start + offset / cfg.time_scale
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                if isinstance(workload, MultiTurn):
                    coro = _conversation(session, workload.conversation(counter), index, cfg, outcomes, due)
                else:
                    call = workload.call(counter)  # type: ignore[attr-defined]
                    coro = _single(session, call, index, cfg, outcomes, due)
                counter += 1
                window.sent += 1
                tasks.append(asyncio.create_task(coro))
            window.arrivals_end = time.monotonic()
            if tasks:
                await asyncio.gather(*tasks)
            window.end = time.monotonic()
            if on_stage:
                on_stage(window)
    return outcomes, windows


async def _single(
    session: aiohttp.ClientSession, call: Call, stage: int, cfg: RunConfig, outcomes: list[Outcome], due: float
) -> None:
    out, _ = await execute(session, cfg.base_url, call, stage, cfg.ttft_timeout, cfg.total_timeout, due=due)
    outcomes.append(out)


async def _conversation(
    session: aiohttp.ClientSession,
    conv: Conversation,
    stage: int,
    cfg: RunConfig,
    outcomes: list[Outcome],
    due: float,
) -> None:
    while not conv.done:
        call = conv.next_call()
        out, text = await execute(
            session, cfg.base_url, call, stage, cfg.ttft_timeout, cfg.total_timeout, want_text=True, due=due
        )
        outcomes.append(out)
        if not out.ok:
            return  # the user gives up on this conversation
        conv.answered(text)
        if not conv.done:  # no think time after the last answer: the stage ends at its last completion
            think = conv.think[conv.turn - 1] / cfg.time_scale
            due = time.monotonic() + think
            await asyncio.sleep(think)
