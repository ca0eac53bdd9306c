"""A request's latency objectives from its headers (reference §1.2: current names, then deprecated aliases)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

from llmepp.request.types import InferenceRequest

log = logging.getLogger(__name__)

TTFT_SLO_HEADERS = ("x-llm-d-slo-ttft-ms", "x-slo-ttft-ms")
TPOT_SLO_HEADERS = ("x-llm-d-slo-tpot-ms", "x-slo-tpot-ms")
# An SLO header above this (about 11.6 days) counts as this: far beyond any latency, and small enough that
# the headroom arithmetic (· sloBufferFactor, SLO − prediction, their ranges) stays finite.
MAX_SLO_MS = 1e9


def slo_ms(headers: Mapping[str, str], names: Sequence[str]) -> float:
    """The first present header of `names` as milliseconds; 0 (no SLO) when absent, not a number,
    negative or infinite, as the reference reads it; at most MAX_SLO_MS."""
    for name in names:
        raw = headers.get(name)
        if raw is None:
            continue
        try:
            value = float(raw)
        except ValueError:
            log.debug("%s: %r is not a number; no SLO", name, raw)
            return 0.0
        return min(value, MAX_SLO_MS) if math.isfinite(value) and value > 0 else 0.0
    return 0.0


def request_slos(request: InferenceRequest) -> tuple[float, float]:
    """(TTFT SLO, TPOT SLO) in ms from the request's headers; 0 = none."""
    return slo_ms(request.headers, TTFT_SLO_HEADERS), slo_ms(request.headers, TPOT_SLO_HEADERS)
