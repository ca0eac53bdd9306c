"""InferenceModelRewrite precedence and target choice, without an API server."""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from typing import Any

import msgspec
import pytest
from prometheus_client import CollectorRegistry

from llmepp.errors import BadRequest
from llmepp.k8s.modelrewrite import ModelRewriter, ModelRewriteStore, RewriteSync, Rule, Target, rules_of
from llmepp.k8s.models import InferenceModelRewrite
from llmepp.request.types import InferenceRequest, RequestKind


def rewrite(name: str, created: str, rules: list[dict[str, Any]], pool: str = "p") -> InferenceModelRewrite:
    doc = {
        "metadata": {"name": name, "creationTimestamp": created},
        "spec": {"poolRef": {"name": pool}, "rules": rules},
    }
    return msgspec.convert(doc, InferenceModelRewrite)


def exact(model: str, *targets: str) -> dict[str, Any]:
    return {"matches": [{"model": {"value": model}}], "targets": [{"modelRewrite": t} for t in targets]}


def catch_all(*targets: str) -> dict[str, Any]:
    return {"targets": [{"modelRewrite": t} for t in targets]}


def request(model: str, target: str | None = None) -> InferenceRequest:
    body = json.dumps({"model": model, "prompt": "x"}).encode()
    return InferenceRequest(
        request_id="r", path="/v1/completions", headers={}, kind=RequestKind.COMPLETIONS, body=body,
        model=model, target_model=target or model,
    )  # fmt: skip


def store_with(*objs: InferenceModelRewrite) -> ModelRewriteStore:
    store = ModelRewriteStore()
    sync = RewriteSync(store, "p", "inference.networking.k8s.io")
    for obj in objs:
        sync.upsert(obj)
    return store


def chosen(store: ModelRewriteStore, model: str) -> str | None:
    rule = store.rule_for(model)
    return None if rule is None else rule.targets[0].model


def test_exact_beats_catch_all_then_oldest_resource_then_first_rule() -> None:
    store = store_with(
        rewrite("young", "2026-05-02T00:00:00Z", [exact("a", "young-a"), catch_all("young-any")]),
        rewrite("old", "2026-05-01T00:00:00Z", [catch_all("old-any"), exact("a", "old-a"), exact("a", "old-a2")]),
        rewrite("other-pool", "2020-01-01T00:00:00Z", [catch_all("never")], pool="q"),
    )
    assert chosen(store, "a") == "old-a"  # exact (not old's earlier catch-all); oldest; first rule
    assert chosen(store, "b") == "old-any"  # the oldest catch-all
    store.delete("old")
    assert chosen(store, "a") == "young-a"
    assert chosen(store, "b") == "young-any"


def test_rewrite_moved_to_another_pool_is_dropped() -> None:
    store = store_with(rewrite("r", "2026-05-01T00:00:00Z", [catch_all("x")]))
    assert chosen(store, "m") == "x"
    RewriteSync(store, "p", "inference.networking.k8s.io").upsert(
        rewrite("r", "2026-05-01T00:00:00Z", [catch_all("x")], pool="q")
    )
    assert store.rule_for("m") is None


def test_weights_split_and_all_zero_weights_are_uniform() -> None:
    rng = random.Random(7)
    weighted = Rule("r", frozenset(), (Target("a", 3), Target("b", 1)), weighted=True)
    picks = Counter(weighted.choose(rng) for _ in range(4000))
    assert 2850 <= picks["a"] <= 3150, picks
    doc = {"targets": [{"modelRewrite": "a", "weight": 0}, {"modelRewrite": "b", "weight": 0}]}
    (zero,) = rules_of(rewrite("z", "2026-01-01T00:00:00Z", [doc]))
    assert not zero.weighted
    picks = Counter(zero.choose(rng) for _ in range(4000))
    assert 1850 <= picks["a"] <= 2150, picks


def test_rewriter_sets_target_decodes_payload_and_counts() -> None:
    registry = CollectorRegistry()
    rewriter = ModelRewriter(store_with(rewrite("r", "2026-01-01T00:00:00Z", [exact("m", "m2")])), registry)
    req = request("m")
    rewriter.rewrite(req)
    assert req.target_model == "m2" and req.payload == {"model": "m", "prompt": "x"}
    sample = registry.get_sample_value(
        "llm_d_epp_model_rewrite_decisions_total", {"model_rewrite_name": "r", "model_name": "m", "target_model": "m2"}
    )
    assert sample == 1.0

    header_rewritten = request("m", target="from-header")
    rewriter.rewrite(header_rewritten)
    assert header_rewritten.target_model == "m2"  # as the reference: a matching rule overrides the header
    header_only = request("other", target="from-header")
    rewriter.rewrite(header_only)
    assert header_only.target_model == "from-header"  # no rule for the model: the header's target stands

    unmatched = request("other")
    rewriter.rewrite(unmatched)
    assert unmatched.target_model == "other" and unmatched.payload is None

    broken = request("m")
    broken.body = b'{"model": "m", '
    with pytest.raises(BadRequest):
        rewriter.rewrite(broken)


def test_a_body_too_deeply_nested_to_decode_for_the_rewrite_is_a_400() -> None:
    # The parser read the body at its own stack depth; decoding it again deeper in the director's stack can
    # hit msgspec's recursion limit: a 400, not a RecursionError (a 500 and a traceback).
    rewriter = ModelRewriter(store_with(rewrite("r", "2026-01-01T00:00:00Z", [exact("m", "m2")])), CollectorRegistry())
    deep = request("m")
    deep.body = b'{"model": "m", "prompt": "x", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    with pytest.raises(BadRequest, match="cannot rewrite model name"):
        rewriter.rewrite(deep)


def test_a_catch_all_rule_does_not_grow_a_series_per_client_model(monkeypatch: pytest.MonkeyPatch) -> None:
    from llmepp.k8s import modelrewrite

    monkeypatch.setattr(modelrewrite, "MAX_DECISION_SERIES", 3)
    registry = CollectorRegistry()
    rewriter = ModelRewriter(store_with(rewrite("r", "2026-01-01T00:00:00Z", [catch_all("base")])), registry)
    for i in range(10):
        req = request(f"client-model-{i}")
        rewriter.rewrite(req)
        assert req.target_model == "base"  # the decision itself is unchanged
    series = [s.labels for m in registry.collect() for s in m.samples if s.name.endswith("decisions_total")]
    assert len(series) == 4, series  # 3 models + "other"
    other = {"model_rewrite_name": "r", "model_name": "other", "target_model": "base"}
    assert registry.get_sample_value("llm_d_epp_model_rewrite_decisions_total", other) == 7


def test_a_long_client_model_name_is_counted_as_other() -> None:
    """A label value repeats on every line of its series: a catch-all rule must not put a client's 100 KB model
    name on every scrape (the README's 256-character bound on label values from client input)."""
    registry = CollectorRegistry()
    rewriter = ModelRewriter(store_with(rewrite("r", "2026-01-01T00:00:00Z", [catch_all("base")])), registry)
    req = request("m" * 100_000)
    rewriter.rewrite(req)
    assert req.target_model == "base"
    series = [s.labels for m in registry.collect() for s in m.samples if s.name.endswith("decisions_total")]
    assert series == [{"model_rewrite_name": "r", "model_name": "other", "target_model": "base"}]


def test_a_rule_whose_matches_name_no_model_matches_nothing_not_everything(caplog: pytest.LogCaptureFixture) -> None:
    # Reference: a rule is a catch-all only when `matches` is empty; matches without a model (a CRD installed
    # without our schema's `required`/`minLength`) index no model, so the rule never applies. It must not
    # turn into a catch-all that rewrites every request of the pool.
    store = ModelRewriteStore()
    sync = RewriteSync(store, "p", "inference.networking.k8s.io")
    odd = [
        {"matches": [{}], "targets": [{"modelRewrite": "hijack-1"}]},
        {"matches": [{"model": {"value": ""}}], "targets": [{"modelRewrite": "hijack-2"}]},
        exact("a", "a2"),
    ]
    with caplog.at_level(logging.WARNING, logger="llmepp.k8s.modelrewrite"):
        sync.upsert(rewrite("r", "2026-01-01T00:00:00Z", odd))
    assert store.rule_for("b") is None  # no catch-all came out of it
    assert chosen(store, "a") == "a2"  # the good rule of the same object still applies
    assert sync.rejected == 2
    assert sum("rules[0]" in r.getMessage() or "rules[1]" in r.getMessage() for r in caplog.records) == 2, caplog.text


def test_a_rule_without_targets_is_a_counted_logged_skip(caplog: pytest.LogCaptureFixture) -> None:
    # The API server accepts a rule without `targets` (minItems only bounds a list that is there). The reference
    # picks that rule and answers its requests 400 "model not found in request body"; we skip it (the next rule
    # in precedence applies), but say so.
    store = ModelRewriteStore()
    sync = RewriteSync(store, "p", "inference.networking.k8s.io")
    with caplog.at_level(logging.WARNING, logger="llmepp.k8s.modelrewrite"):
        sync.upsert(rewrite("r", "2026-01-01T00:00:00Z", [{"matches": [{"model": {"value": "a"}}]}, catch_all("x")]))
    assert chosen(store, "a") == "x" and sync.rejected == 1
    assert any("rules[0]" in r.getMessage() and "target" in r.getMessage() for r in caplog.records), caplog.text


def test_mixed_negative_and_huge_weights() -> None:
    # Reference selectWeightedModel: targets without a weight are never picked once any target has one.
    (mixed,) = rules_of(rewrite("m", "2026-01-01T00:00:00Z", [{"targets": [
        {"modelRewrite": "a", "weight": 5}, {"modelRewrite": "unweighted"}]}]))  # fmt: skip
    rng = random.Random(1)
    assert {mixed.choose(rng) for _ in range(500)} == {"a"}
    # A negative weight (only past a CRD without `minimum`) counts as 0; all of them: uniform, never a crash.
    (neg,) = rules_of(rewrite("n", "2026-01-01T00:00:00Z", [{"targets": [
        {"modelRewrite": "a", "weight": -1}, {"modelRewrite": "b", "weight": -7}]}]))  # fmt: skip
    assert {neg.choose(rng) for _ in range(500)} == {"a", "b"}
    (huge,) = rules_of(rewrite("h", "2026-01-01T00:00:00Z", [{"targets": [
        {"modelRewrite": "a", "weight": 1_000_000}, {"modelRewrite": "b", "weight": 1}]}]))  # fmt: skip
    picks = Counter(huge.choose(rng) for _ in range(2000))
    assert picks["a"] >= 1990, picks


def test_the_split_is_deterministic_for_a_seeded_rng() -> None:
    weights = [
        {"modelRewrite": "a", "weight": 1},
        {"modelRewrite": "b", "weight": 1},
        {"modelRewrite": "c", "weight": 2},
    ]
    store = store_with(
        rewrite("r", "2026-01-01T00:00:00Z", [{"matches": [{"model": {"value": "m"}}], "targets": weights}])
    )

    def run(seed: int) -> list[str]:
        rewriter = ModelRewriter(store, CollectorRegistry(), rng=random.Random(seed))
        out = []
        for _ in range(50):
            req = request("m")
            rewriter.rewrite(req)
            out.append(req.target_model)
        return out

    assert run(3) == run(3) and set(run(3)) == {"a", "b", "c"}


def test_matching_is_exact_and_case_sensitive_and_ties_in_age_go_by_name() -> None:
    same = "2026-01-01T00:00:00Z"
    store = store_with(
        rewrite("zeta", same, [exact("Llama", "from-zeta")]), rewrite("alpha", same, [exact("Llama", "from-alpha")])
    )
    assert chosen(store, "Llama") == "from-alpha"  # deterministic (the reference's sort.Slice is not)
    assert store.rule_for("llama") is None and store.rule_for("Llama ") is None and store.rule_for("Llama-2") is None
