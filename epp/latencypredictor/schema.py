"""The predictor's HTTP API bodies, field for field the llm-d latency predictor's (its pydantic models).

Decoded leniently like pydantic's default mode (an integer may come as 3.0 or "3"); every bound is
checked (a fraction in [0, 1], counts ≥ 0, latencies ≥ 0 and finite), so NaN / infinite / negative
values are answered 422 with the field's path, never stored.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

Fraction = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
MAX_COUNT = 2**40
Count = Annotated[int, msgspec.Meta(ge=0, le=MAX_COUNT)]
# Milliseconds; the upper bound (about 28 hours) also keeps infinity out.
Millis = Annotated[float, msgspec.Meta(ge=0.0, le=1e8)]


class PredictionRequest(msgspec.Struct, kw_only=True):
    """One candidate endpoint's state plus the request's features (what the EPP sends per endpoint)."""

    kv_cache_percentage: Fraction
    input_token_length: Count
    num_request_waiting: Count
    num_request_running: Count
    num_tokens_generated: Count
    prefix_cache_score: Fraction = 0.0
    pod_type: str | None = ""
    prefill_tokens_in_flight: Count = 0
    decode_tokens_in_flight: Count = 0


class TrainingEntry(PredictionRequest, kw_only=True):
    """An observed request: its features at dispatch and what it measured. A latency of 0 means "not
    observed" (the EPP sends TTFT and TPOT samples as separate entries)."""

    actual_ttft_ms: Millis
    actual_tpot_ms: Millis
    timestamp: str | float | None = None


class BulkPredictionRequest(msgspec.Struct):
    requests: Annotated[list[PredictionRequest], msgspec.Meta(min_length=1, max_length=10000)]


class BulkTrainingRequest(msgspec.Struct):
    entries: Annotated[list[TrainingEntry], msgspec.Meta(max_length=100000)]


def decode(body: bytes, kind: type[msgspec.Struct]) -> msgspec.Struct:
    """`kind` from a JSON body; raises msgspec.DecodeError (not JSON) or msgspec.ValidationError
    (a field's type or bound, with its path)."""
    try:
        return msgspec.json.decode(body, type=kind, strict=False)
    except (UnicodeDecodeError, RecursionError) as e:  # a string that is not UTF-8; nesting past msgspec's limit
        raise msgspec.DecodeError(str(e)) from None
