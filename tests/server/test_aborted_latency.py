"""Latency histograms and requests that never completed.

As the reference (llm-d-router.md §1.5, pkg/epp/handlers/response.go / server.go), e2e latency
(`request_duration_seconds`), response size, TTFT, NTPOT and TPOT are recorded at the response's natural end
only. A request that ends abnormally (client disconnect, Envoy reset, eviction) is released but records none
of them: a client giving up after 50 ms must not show as a 50 ms "request latency" on latency dashboards.
"""

from __future__ import annotations

import asyncio
import json

from .client import response_body, response_headers, serve

BODY = json.dumps({"model": "m", "prompt": "hello world", "max_tokens": 5}).encode()
LABELS = {"model_name": "m", "target_model_name": "m", "fairness_id": "default-flow", "priority": "0"}


async def _until(cond, within: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + within
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def test_a_client_disconnect_mid_stream_is_not_a_request_latency_sample() -> None:
    async with serve() as h:
        s = h.open()
        await s.route(BODY)
        await s.send(response_headers(200, "text/event-stream"))
        await s.recv()
        await s.send(response_body(b'data: {"choices":[{"text":"x"}]}\n\n'))
        await s.recv()
        s.cancel()  # the client went away: Envoy resets the ext_proc stream mid-response
        await _until(lambda: h.director.completions)  # released (exactly once)
        assert h.sample("llm_d_epp_request_running", LABELS) == 0
        assert h.sample("llm_d_epp_request_duration_seconds_count", LABELS) == 0
        assert h.sample("llm_d_epp_request_ttft_seconds_count", {**LABELS, "streaming": "true"}) == 0
        assert h.sample("llm_d_epp_response_size_bytes_count", LABELS) == 0


async def test_a_reset_before_any_response_is_not_a_request_latency_sample() -> None:
    async with serve() as h:
        s = h.open()
        await s.route(BODY)
        s.cancel()  # e.g. the upstream connect failed / the client hung up before the model server answered
        await _until(lambda: h.director.completions)
        assert h.sample("llm_d_epp_request_duration_seconds_count", LABELS) == 0
