"""Reporters: response headers that say how a request was served."""

from __future__ import annotations

from helpers import endpoint, request

from llmepp.framework.plugin import registry
from llmepp.framework.scheduling import ProfileResult, SchedulingResult
from llmepp.request.types import ResponseInfo


def test_the_served_endpoint_header_names_the_primary_target() -> None:
    for type_ in ("destination-endpoint-served", "destination-endpoint-served-verifier"):
        plugin = registry.build(type_, type_, None)
        req = request()
        assert plugin.response_headers(req, ResponseInfo(status=200), {}) is None  # never scheduled
        target, fallback = endpoint(3), endpoint(1)
        req.scheduling = SchedulingResult("default", {"default": ProfileResult(targets=[target, fallback])})
        headers = plugin.response_headers(req, ResponseInfo(status=200), {})
        assert headers == {"x-conformance-test-served-endpoint": target.hostport}
