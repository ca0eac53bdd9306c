"""Client-chosen ids that key state outliving a request are bounded (llmepp.request.clientids): a header may hold
~60 KiB (Envoy's default limit), so an id kept whole for minutes (rollout decisions, 5 min) or an hour
(program-aware fairness records) is memory a client chooses. A longer id is kept as "sha256:<hex>" (the same id,
the same value); ids of up to 256 characters are kept as sent."""

from __future__ import annotations

import json

from llmepp.plugins.screeners.disaggregatedset_rollout import RevisionDecisions
from llmepp.request.clientids import MAX_ID_CHARS, bounded_id
from llmepp.request.parsers import parse_request

BODY = json.dumps({"model": "m", "prompt": "hi"}).encode()
LONG = "tenant-" + "x" * 48_000


def test_bounded_ids_are_stable_and_short() -> None:
    assert bounded_id("tenant-a") == "tenant-a" and bounded_id("y" * MAX_ID_CHARS) == "y" * MAX_ID_CHARS
    assert bounded_id(LONG) == bounded_id(LONG) != bounded_id(LONG + "z")
    assert bounded_id(LONG).startswith("sha256:") and len(bounded_id(LONG)) == len("sha256:") + 64


def test_a_long_fairness_id_is_bounded_where_the_request_is_parsed() -> None:
    """Every consumer (flow registry, program-aware fairness, metrics labels) sees the bounded id."""
    for header in ("x-llm-d-inference-fairness-id", "x-gateway-inference-fairness-id"):
        req = parse_request({":path": "/v1/completions", header: LONG}, BODY, request_id="r")
        assert req.fairness_id == bounded_id(LONG)
    short = parse_request({":path": "/v1/completions", "x-llm-d-inference-fairness-id": "team-a"}, BODY, request_id="r")
    assert short.fairness_id == "team-a"
    default = parse_request({":path": "/v1/completions"}, BODY, request_id="r")
    assert default.fairness_id == "default-flow"


def test_the_rollout_decision_store_keeps_long_ids_bounded() -> None:
    store = RevisionDecisions()
    assert store.get_or_set(LONG, "older") == "older"
    assert store.get_or_set(LONG, "newer") == "older"  # the same id: the decision stored first
    assert all(len(key) <= MAX_ID_CHARS for key in store._entries)
