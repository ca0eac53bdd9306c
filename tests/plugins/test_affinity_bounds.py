"""Affinity state and ties: session ids are bounded as the session-id-producer bounds them; endpoint-attribute
topK shares places tied at its cut at random."""

from __future__ import annotations

from typing import Any

from helpers import endpoint, request

from llmepp.framework.plugin import PluginContext, registry
from llmepp.framework.scheduling import ProfileResult, SchedulingResult
from llmepp.request.clientids import MAX_ID_CHARS as MAX_SESSION_ID_CHARS


def make(type_: str, params: dict[str, Any] | None = None, *others: Any, name: str = "") -> Any:
    plugin = registry.build(type_, name or type_, params)
    ctx = PluginContext({p.name: p for p in (plugin, *others)}, None, None, None)
    plugin.setup(ctx)
    return plugin


def result_for(ep: Any, profile: str = "default") -> SchedulingResult:
    return SchedulingResult(primary_profile=profile, profiles={profile: ProfileResult(targets=[ep])})


def test_session_id_from_a_header_is_bounded_like_the_session_id_producers() -> None:
    """strategy session_id with the default source ({header: x-session-id}) keys a binding by the session id
    for evictionTtlSeconds (300 s). As session-id-producer, an id over 256 characters is kept as
    "sha256:<hex>": a header may hold ~60 KiB (Envoy's limit), and a fresh 60 KiB id per request would pin
    60 KiB for five minutes (≈ 18 GB at 1,000 req/s)."""
    for type_ in ("session-affinity-filter", "session-affinity-scorer"):
        f = make(type_, {"strategy": "session_id"})
        eps = [endpoint(0), endpoint(1)]
        r = request()
        r.headers["x-session-id"] = "s" * 60_000
        if type_.endswith("filter"):
            f.filter(r, eps)
        else:
            f.score(r, eps)
        f.pre_request(r, result_for(eps[0]))
        (key,) = f.bindings
        assert len(key) <= len("sha256:") + 64 or len(key) <= MAX_SESSION_ID_CHARS, (
            f"{type_}: a {len(key)}-character session id is kept as a binding key"
        )


def test_endpoint_attribute_topk_does_not_herd_ties_onto_the_first_candidates() -> None:
    """topK keeps "the K endpoints with the highest (or lowest) attribute value"; when values tie (an idle
    pool: every waiting queue 0, every running count equal within a scrape interval), keeping the first K in
    datastore order would give every request in a burst the same K pods and the other N − K nothing until a
    scrape shows the first K loaded: herding, where max-score-picker shuffles ties."""
    f = make(
        "endpoint-attribute-filter",
        {"attribute": "waiting-queue", "algorithm": {"type": "topK", "topK": {"k": 2, "higherIsBetter": False}}},
    )
    eps = [endpoint(i, queue=0) for i in range(8)]
    seen: set[str] = set()
    for _ in range(200):
        seen.update(ep.name for ep in f.filter(request(), eps))
    assert len(seen) > 2, f"200 requests over 8 tied endpoints only ever kept {sorted(seen)}"
