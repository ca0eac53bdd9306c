"""Reporters: response headers that say how a request was served."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from helpers import endpoint, request

from llmepp.framework.plugin import ConfigError, registry
from llmepp.framework.scheduling import ProfileResult, SchedulingResult
from llmepp.plugins.reporters.served_endpoint import DestinationEndpointServed
from llmepp.request.types import ResponseInfo, Usage


def test_the_served_endpoint_header_names_the_primary_target() -> None:
    for type_ in ("destination-endpoint-served", "destination-endpoint-served-verifier"):
        plugin = registry.build(type_, type_, None)
        assert isinstance(plugin, DestinationEndpointServed)
        req = request()
        assert plugin.response_headers(req, ResponseInfo(status=200), {}) is None  # never scheduled
        target, fallback = endpoint(3), endpoint(1)
        req.scheduling = SchedulingResult("default", {"default": ProfileResult(targets=[target, fallback])})
        headers = plugin.response_headers(req, ResponseInfo(status=200), {})
        assert headers == {"x-conformance-test-served-endpoint": target.hostport}


# -- request-attribute-reporter ------------------------------------------------------------------------
def reporter(*attributes: dict[str, object]) -> Any:
    return registry.build("request-attribute-reporter", "cost", {"attributes": list(attributes)})


COST: dict[str, object] = {
    "key": {"name": "x-gateway-inference-request-cost"},
    "expression": "usage.prompt_tokens + usage.completion_tokens",
    "condition": "has(usage.prompt_tokens) && has(usage.completion_tokens)",
}


def answered(usage: Usage | None) -> ResponseInfo:
    return ResponseInfo(status=200, usage=usage)


def test_the_expression_is_reported_in_its_namespace() -> None:
    r = reporter(COST, {"key": {"namespace": "billing", "name": "cached"},
                        "expression": "usage.prompt_tokens_details.cached_tokens"})  # fmt: skip
    out = r.response_metadata(request(), answered(Usage(prompt_tokens=7, completion_tokens=3, cached_tokens=4)))
    assert out == {"envoy.lb": {"x-gateway-inference-request-cost": 10}, "billing": {"cached": 4}}


def test_no_usage_means_the_condition_is_false_and_nothing_is_reported() -> None:
    assert reporter(COST).response_metadata(request(), answered(None)) is None


def test_failing_or_non_numeric_expressions_report_nothing_and_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    r = reporter(
        {"key": {"name": "a"}, "expression": "usage.prompt_tokens"},  # no usage: an evaluation error
        {"key": {"name": "b"}, "expression": "usage.completion_tokens > 2.0"},  # a bool
        {"key": {"name": "c"}, "expression": "usage.completion_tokens * 2"},  # double * int: CEL has no overload
    )
    with caplog.at_level(logging.WARNING):
        assert r.response_metadata(request(), answered(Usage(completion_tokens=3))) == {"envoy.lb": {"a": 0}}
        assert r.response_metadata(request(), answered(None)) is None  # no usage: `a` fails to evaluate
    assert "cost: attribute envoy.lb/a not reported" in caplog.text
    assert "expression gave bool True, not a number" in caplog.text
    assert "cost: attribute envoy.lb/c not reported" in caplog.text


def test_usage_numbers_are_doubles_and_a_double_result_is_truncated_as_the_reference() -> None:
    """The reference's `usage` is a google.protobuf.Struct (numbers are doubles) and it reports int64(result):
    a weighted token cost from a reference config gives the same integer here."""
    usage = Usage(prompt_tokens=8, completion_tokens=3, total_tokens=11)
    r = reporter(
        {"key": {"name": "weighted"}, "expression": "usage.prompt_tokens * 0.25 + usage.completion_tokens * 1.0"},
        {"key": {"name": "truncated"}, "expression": "usage.completion_tokens * 1.5"},  # 4.5
        {"key": {"name": "negative"}, "expression": "0.0 - usage.completion_tokens * 1.5"},  # -4.5
        {"key": {"name": "infinite"}, "expression": "usage.completion_tokens / 0.0"},
    )
    out = r.response_metadata(request(), answered(usage))
    assert out == {"envoy.lb": {"weighted": 5, "truncated": 4, "negative": -4}}
    assert all(type(v) is int for v in out["envoy.lb"].values())


def test_an_empty_namespace_is_the_default_one() -> None:
    r = reporter({"key": {"namespace": "", "name": "cost"}, "expression": "usage.total_tokens"})
    assert r.response_metadata(request(), answered(Usage(total_tokens=11))) == {"envoy.lb": {"cost": 11}}


@pytest.mark.parametrize(
    ("attributes", "message"),
    [
        ([], "parameters.attributes: at least one attribute is required"),
        ([{"key": {"name": "a"}, "expression": "usage.prompt_tokens +"}], "attributes[0].expression: not a CEL"),
        ([COST, {"key": {"name": "b"}, "expression": "1", "condition": "has("}], "attributes[1].condition: not a CEL"),
        ([{"key": {"name": ""}, "expression": "1"}], "attributes[0].key: name must not be empty"),
        ([{"expression": "1"}], "missing required field `key`"),
    ],
)
def test_bad_attributes_are_start_up_errors_naming_the_field(attributes: list[object], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        registry.build("request-attribute-reporter", "cost", {"attributes": attributes})
    assert message in str(e.value)
