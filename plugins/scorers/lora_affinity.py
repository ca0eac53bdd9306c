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

    A pool without LoRA (maxLoras 0, no active or waiting adapter) scores 0.0 everywhere, as the
    reference's rule does: a constant 0 is the only column that leaves every picker's choice unchanged
    (a constant 1.0 shifts weighted-random-picker's probabilities toward the least-scored endpoints).
    A base-model request on a LoRA-enabled pool follows the rule above, as in the reference (it
    favours endpoints with free adapter slots).

    Why: loading an adapter stalls the batch; reusing a loaded one is free.
    Parameters: none.
    """

    type = "lora-affinity-scorer"
    pod_only = "reads the LoRA adapters each model server has loaded (vllm:lora_requests_info)"
    category = ScorerCategory.AFFINITY

    def score(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        metrics = [ep.metrics for ep in endpoints]
        if not any(m.max_active_models or m.active_models or m.waiting_models for m in metrics):
            return [0.0] * len(metrics)  # the rule's answer with no LoRA state, without the per-endpoint pass
        a = request.target_model or request.model
        return [
            1.0 if a in m.active_models
            else 0.8 if len(m.active_models) + len(m.waiting_models) < m.max_active_models
            else 0.6 if a in m.waiting_models
            else 0.0
            for m in metrics
        ]  # fmt: skip
