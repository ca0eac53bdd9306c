"""The load generator's streaming client: what counts as a token, when the TTFT is taken."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest_asyncio
from aiohttp import web

from benchmarks.loadgen import RunConfig, execute, run_ladder
from benchmarks.workloads import Call, Conversation, MultiTurn, Scale, StageSpec, Workload, _completion

TOKENS = 3
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest_asyncio.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    runners: list[web.AppRunner] = []

    async def start(handler: Handler) -> str:
        app = web.Application()
        app.router.add_post("/v1/completions", handler)
        app.router.add_post("/v1/chat/completions", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    yield start
    for runner in runners:
        await runner.cleanup()


def _token(i: int) -> bytes:
    return b'data: {"choices":[{"index":0,"text":" t%d","finish_reason":null}]}\n\n' % i


async def test_keep_alive_comments_are_neither_the_first_token_nor_tokens(
    serve: Callable[[Handler], Awaitable[str]],
) -> None:
    """smg (axum) sends `: keep-alive` comments while a request waits: they were counted as token events, so
    its TTFT was taken at the first one (15 s wall: 60 s simulated at time scale 4) and its tokens inflated."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b": keep-alive\n\n")
        await asyncio.sleep(0.3)
        await response.write(b":\n\n" + _token(0)[:20])  # an event split across reads
        await response.write(_token(0)[20:] + _token(1))
        await response.write(_token(2) + b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    url = await serve(handler)
    call = Call("/v1/completions", _completion("hi", TOKENS), TOKENS, 1, "k", usage=False)
    async with aiohttp.ClientSession() as session:
        out, _ = await execute(session, url, call, 0, 10.0, 10.0)
    assert out.ok and out.tokens == TOKENS, out
    assert out.first - out.sent >= 0.3


async def test_a_request_kept_alive_by_comments_still_times_out_waiting_for_its_first_token(
    serve: Callable[[Handler], Awaitable[str]],
) -> None:
    """aiohttp's read timeout sees only silence; comments every 50 ms kept a stalled request alive past it."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for _ in range(40):
            await response.write(b": keep-alive\n\n")
            await asyncio.sleep(0.05)
        return response

    url = await serve(handler)
    call = Call("/v1/completions", _completion("hi", TOKENS), TOKENS, 1, "k", usage=False)
    async with aiohttp.ClientSession() as session:
        out, _ = await execute(session, url, call, 0, 0.3, 10.0)
    assert out.error == "ttft-timeout" and out.tokens == 0
    assert out.end - out.sent < 1.0  # not the 2 s the comments lasted


class _OneConversation(MultiTurn):
    """One conversation of one turn, started at once, whose user would think 2 s after the answer."""

    def arrivals(self, index: int, stage: StageSpec) -> list[float]:
        return [0.0]

    def conversation(self, i: int) -> Conversation:
        return Conversation(f"c{i}", [{"role": "system", "content": "s"}], ["hello"], 3, think=[2.0])


async def test_a_multi_turn_stage_ends_at_its_last_completion(serve: Callable[[Handler], Awaitable[str]]) -> None:
    """A stage's time is first arrival to last completion (benchmarks/README.md): no think time after a
    conversation's last answer (it was slept, so every stage's window, and its tokens/s, had an idle tail)."""

    async def chat(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        role = b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
        token = b'data: {"choices":[{"index":0,"delta":{"content":" t"},"finish_reason":null}]}\n\n'
        await response.write(role + token * 3 + b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    wl = _OneConversation("multi-turn", [StageSpec(1.0, 1.0)], scale=Scale(), turns=1)
    outcomes, windows = await run_ladder(wl, RunConfig(await serve(chat), time_scale=1.0))
    assert len(outcomes) == 1 and outcomes[0].ok and outcomes[0].tokens == 3, outcomes
    tail = windows[0].end - outcomes[0].end
    assert tail < 0.5, f"the stage ended {tail:.2f} s after its last completion"


class _LateSender(Workload):
    """One request at offset 0 whose sender is held up 0.3 s (building the call blocks the loop), as a
    client sharing two cores with the pods and the routers can be."""

    def arrivals(self, index: int, stage: StageSpec) -> list[float]:
        return [0.0]

    def call(self, i: int) -> Call:
        time.sleep(0.3)
        return Call("/v1/completions", _completion("hi", TOKENS), TOKENS, 1, "k", usage=False)


async def test_ttft_counts_from_the_scheduled_arrival_not_from_a_late_send(
    serve: Callable[[Handler], Awaitable[str]],
) -> None:
    """An open-loop client that falls behind must not hide its lag: TTFT starts at the Poisson slot."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(_token(0) + _token(1) + _token(2) + b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    wl = _LateSender("late", [StageSpec(1.0, 1.0)])
    outcomes, windows = await run_ladder(wl, RunConfig(await serve(handler), time_scale=1.0))
    assert len(outcomes) == 1 and outcomes[0].ok, outcomes
    assert outcomes[0].sent == windows[0].start
    assert outcomes[0].first - outcomes[0].sent >= 0.3
