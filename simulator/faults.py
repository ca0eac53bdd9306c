"""Fault injection: random failures, forced statuses, slow start.

* ``--failure-injection-rate`` (percent) of inference requests fail with one of ``--failure-types``
  (drawn uniformly, from a RNG seeded by ``--seed``), before any engine work, like llm-d-inference-sim.
* ``X-Return-Error: <status>`` on a request forces that status.
* ``--startup-duration`` seconds (wall clock) after the pod starts listening: ``/health`` and inference
  requests answer 503 (``/metrics`` answers, with an idle engine).

Slow/hung ``/metrics`` and the kill/revive cycle live in ``server.py`` and ``pod.py``.
"""

from __future__ import annotations

import random

from llmepp_sim.config import PodConfig
from llmepp_sim.errors import ApiError, context_length_exceeded, status_error

FORCE_ERROR_HEADER = "X-Return-Error"


def injected_error(kind: str, config: PodConfig, model: str) -> ApiError:
    if kind == "rate_limit":
        return ApiError(
            429,
            f"Rate limit reached for {model} in organization org-sim on requests per min (RPM): "
            "Limit 3, Used 3, Requested 1.",
        )
    if kind == "invalid_api_key":
        return ApiError(401, "Incorrect API key provided: sk-sim***. You can find your API key in your settings.")
    if kind == "context_length":
        return context_length_exceeded(config.max_model_len, config.max_model_len, 1)
    if kind == "server_error":
        return ApiError(500, "The server had an error while processing your request. Sorry about that!")
    if kind == "invalid_request":
        return ApiError(400, "Invalid request: the request could not be parsed (injected failure).")
    if kind == "model_not_found":
        return ApiError(404, f"The model `{model}-nonexistent` does not exist.", param="model")
    raise ValueError(f"unknown failure type {kind!r}")


class FaultInjector:
    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)

    def forced(self, header_value: str | None) -> ApiError | None:
        if not header_value:
            return None
        try:
            status = int(header_value.strip())
        except ValueError:
            return None
        if not 400 <= status <= 599:
            return None
        return status_error(status)

    def maybe_fail(self, config: PodConfig, model: str) -> ApiError | None:
        rate = config.failure_injection_rate
        if rate <= 0 or not config.failure_types:
            return None
        if rate < 100 and self._rng.random() * 100 >= rate:
            return None
        return injected_error(self._rng.choice(config.failure_types), config, model)
