"""Usage of SGLang's native /generate answers: no `usage` object, but a `meta_info` per output with
`prompt_tokens`, `completion_tokens` and `cached_tokens` (running totals in a stream's chunks)."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from llmepp.request.types import Usage
from llmepp.request.usage import SSE_TAIL_BYTES, UsageCollector, usage_from_json, usage_from_sse


def meta(rid: str, prompt: int, completion: int, cached: int, **extra: Any) -> dict[str, Any]:
    return {"id": rid, "finish_reason": None, "prompt_tokens": prompt, "weight_version": "default",
            "completion_tokens": completion, "cached_tokens": cached,
            "cached_tokens_details": {"device": cached, "host": 0}, "e2e_latency": 0.04, **extra}  # fmt: skip


def answer(rid: str, text: str, prompt: int, completion: int, cached: int) -> dict[str, Any]:
    return {"text": text, "output_ids": list(range(completion)), "meta_info": meta(rid, prompt, completion, cached)}


def stream(*outputs: tuple[str, int, int, int], text_per_token: str = "tok ") -> bytes:
    """A streamed answer: per output (id, prompt, completion, cached), one chunk per token with the running
    totals (and SGLang's cumulative text), interleaved when there are several outputs, then [DONE]."""
    events = []
    longest = max(o[2] for o in outputs)
    for step in range(1, longest + 1):
        for rid, prompt, completion, cached in outputs:
            if step <= completion:
                events.append(answer(rid, text_per_token * step, prompt, step, cached))
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"


def collect(data: bytes, streaming: bool, cuts: list[int] | None = None) -> Usage | None:
    c = UsageCollector(streaming)
    last = 0
    for cut in sorted(cuts or []):
        c.feed(data[last:cut])
        last = cut
    c.feed(data[last:])
    return c.result()


def test_a_non_streamed_answer_gives_its_meta_info() -> None:
    # Before: None (no "usage" key): SGLang /generate traffic had no token accounting at all.
    body = json.dumps(answer("a1", " Paris.", 5, 32, 2)).encode()
    assert usage_from_json(body) == Usage(prompt_tokens=5, completion_tokens=32, cached_tokens=2, total_tokens=37)
    assert collect(body, streaming=False) == Usage(5, 32, 2, 37)


def test_a_batch_answer_sums_its_outputs() -> None:
    # A batch (a list of prompts, or n > 1) is answered with a JSON list, one meta_info per output.
    body = json.dumps([answer("a", "x", 5, 3, 1), answer("b", "y", 7, 4, 0)]).encode()
    assert collect(body, streaming=False) == Usage(12, 7, 1, 19)


def test_a_streamed_answer_gives_the_last_running_totals() -> None:
    data = stream(("a1", 11, 6, 4))
    assert usage_from_sse(data) == Usage(11, 6, 4, 17)
    assert collect(data, streaming=True) == Usage(11, 6, 4, 17)


def test_a_streamed_batch_sums_the_last_totals_of_each_output() -> None:
    data = stream(("a", 10, 3, 2), ("b", 10, 5, 2), ("c", 4, 1, 0))
    assert collect(data, streaming=True) == Usage(24, 9, 4, 33)


def test_a_final_chunk_longer_than_the_kept_tail_still_gives_its_totals() -> None:
    # SGLang's chunks repeat the whole text so far: the last one may outgrow the tail the collector keeps.
    data = stream(("a1", 9, 3, 1), text_per_token="x" * (SSE_TAIL_BYTES // 2))
    assert collect(data, streaming=True) == Usage(9, 3, 1, 12)


def test_an_openai_usage_wins_over_meta_info_and_meta_info_without_counts_is_none() -> None:
    body = json.dumps({"usage": {"prompt_tokens": 1, "completion_tokens": 2}, "meta_info": meta("a", 5, 5, 5)})
    assert usage_from_json(body.encode()) == Usage(1, 2, 0, 3)
    assert usage_from_json(b'{"text": "x", "meta_info": {"id": "a"}}') is None
    assert usage_from_json(b'{"text": "x", "meta_info": null}') is None
    assert usage_from_json(b'[{"text": "x"}, 1, "meta_info"]') is None
    assert usage_from_json(b'{"text": "\\"meta_info\\": {\\"prompt_tokens\\": 3}"}') is None


def test_an_error_answer_gives_no_usage() -> None:
    assert collect(b'{"error": {"message": "bad request", "code": 400}}', streaming=False) is None
    assert collect(b'data: {"error": {"message": "x"}}\n\ndata: [DONE]\n\n', streaming=True) is None


@settings(max_examples=150, deadline=None)
@given(
    outputs=st.lists(st.tuples(st.integers(0, 50), st.integers(1, 12), st.integers(0, 50)), min_size=1, max_size=3),
    data=st.data(),
)
def test_streamed_usage_is_chunking_independent(outputs: list[tuple[int, int, int]], data: st.DataObject) -> None:
    spec = [(f"r{i}", p, c, min(k, p)) for i, (p, c, k) in enumerate(outputs)]
    raw = stream(*spec)
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=8))
    prompt = sum(p for _, p, _, _ in spec)
    completion = sum(c for _, _, c, _ in spec)
    cached = sum(k for _, _, _, k in spec)
    assert collect(raw, streaming=True, cuts=cuts) == Usage(prompt, completion, cached, prompt + completion)
