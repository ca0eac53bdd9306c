"""The EPP's streaming latency histograms and a streamed answer Envoy delivers in one message (response body
mode BUFFERED / BUFFERED_PARTIAL): its arrival is the whole generation, not a first token, and it has no token
gaps, so it records no `request_ttft_seconds{streaming="true"}` and no `request_streaming_tpot_seconds` sample
(the end-to-end latency and token counts still are). Training skips such answers the same way
(test_buffered_response_training)."""

from __future__ import annotations

import asyncio
import json

import pytest

from .client import BUFFERED, FDS, response_body, response_headers, serve

BODY = json.dumps({"model": "m", "prompt": "hello world", "max_tokens": 5, "stream": True}).encode()
SSE = [b'data: {"choices":[{"index":0,"text":"t%d"}]}\n\n' % i for i in range(5)] + [
    b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5,"total_tokens":8}}\n\ndata: [DONE]\n\n'
]
LABELS = {"model_name": "m", "target_model_name": "m", "fairness_id": "default-flow", "priority": "0"}


async def samples(resp_mode: int) -> tuple[float, float, float]:
    """(streaming TTFT, streaming TPOT, e2e latency) sample counts after one streamed answer."""
    async with serve() as h:
        s = h.open()
        await s.route(BODY, resp_mode=resp_mode)
        await s.send(response_headers(200, "text/event-stream"))
        await s.recv()
        chunks = SSE if resp_mode == FDS else [b"".join(SSE)]  # BUFFERED: Envoy sends the whole answer at once
        for i, chunk in enumerate(chunks):
            await asyncio.sleep(0.01)
            await s.send(response_body(chunk, eos=i == len(chunks) - 1))
            await s.recv()
        for _ in range(300):
            if h.director.completions:
                break
            await asyncio.sleep(0.01)
        return (
            h.sample("llm_d_epp_request_ttft_seconds_count", {**LABELS, "streaming": "true"}),
            h.sample("llm_d_epp_request_streaming_tpot_seconds_count", LABELS),
            h.sample("llm_d_epp_request_duration_seconds_count", LABELS),
        )


async def test_control_a_streamed_answer_records_ttft_and_tpot() -> None:
    assert await samples(FDS) == (1, 1, 1)


@pytest.mark.parametrize("mode", [BUFFERED, 3], ids=["BUFFERED", "BUFFERED_PARTIAL"])
async def test_an_answer_delivered_in_one_message_records_no_streaming_ttft_or_tpot(mode: int) -> None:
    assert await samples(mode) == (0, 0, 1)
