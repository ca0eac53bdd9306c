"""`lora-affinity-scorer`: prefer endpoints that already have the request's LoRA adapter loaded."""

from __future__ import annotations

from collections.abc import Sequence

from llmepp.datalayer.endpoint import Endpoint
from llmepp.framework.scheduling import Scorer, ScorerCategory
from llmepp.request.types import InferenceRequest


class LoraAffinityScorer(Scorer):
    """Adapter a = `request.target_model` (the model name after rewrite), per endpoint from
    `vllm:lora_requests_info` (running / waiting adapters, max_lora):

        a running (active)                  → 1.0
        |active| + |waiting| < maxLoras     → 0.8   (room to load it)
        a waiting to be loaded              → 0.6
        otherwise                           → 0.0   (full, would need an eviction)

    Non-LoRA case (this build's choice; the reference applies the rule above regardless):
    when **no candidate reports any LoRA state** (maxLoras 0, no active or waiting adapter —
    LoRA disabled, or never scraped) the request cannot be LoRA-routed and every endpoint
    scores 1.0, i.e. the scorer expresses no preference. A base-model request on a
    LoRA-enabled pool follows the rule above, as in the reference (it favours endpoints
    with free adapter slots).

    Why: loading an adapter stalls the batch; reusing a loaded one is free.
    Parameters: none.
    """

    type = "lora-affinity-scorer"
    pod_only = "reads the LoRA adapters each model server has loaded (vllm:lora_requests_info)"
    category = ScorerCategory.AFFINITY

    def score(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        metrics = [ep.metrics for ep in endpoints]
        if not any(m.max_active_models or m.active_models or m.waiting_models for m in metrics):
            return [1.0] * len(metrics)
        a = request.target_model or request.model
        return [
            1.0 if a in m.active_models
            else 0.8 if len(m.active_models) + len(m.waiting_models) < m.max_active_models
            else 0.6 if a in m.waiting_models
            else 0.0
            for m in metrics
        ]  # fmt: skip
