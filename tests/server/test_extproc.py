"""The ext_proc stream state machine, driven over a real gRPC channel like Envoy drives it."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from typing import Any, cast

import grpc
import msgspec
import pytest
from helpers import until

from llmepp.errors import NotFound, ResourceExhausted
from llmepp.request.types import RequestKind, TerminationCause
from llmepp.settings import Settings
from llmepp.testing.fakes import FakeDirector

from .client import (
    BUFFERED,
    ENDPOINTS,
    STREAMED,
    TRANSPORT,
    add_subset,
    lb_metadata,
    request_body,
    request_headers,
    request_trailers,
    response_body,
    response_headers,
    response_trailers,
    serve,
    set_headers,
    streamed,
)


@pytest.fixture(params=["grpc", "h2"], autouse=True)
def transport(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every protocol test runs against both transports."""
    token = TRANSPORT.set(request.param)
    yield request.param
    TRANSPORT.reset(token)


BODY = json.dumps({"model": "m", "prompt": "hello world", "max_tokens": 5}).encode()
CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()
JSON_RESPONSE = json.dumps(
    {
        "id": "x",
        "model": "m",
        "choices": [{"text": "ok"}],
        "usage": {
            "prompt_tokens": 7,
            "completion_tokens": 3,
            "total_tokens": 10,
            "prompt_tokens_details": {"cached_tokens": 4},
        },
    }
).encode()


# The request series' fairness id and priority of a request without either (the reference's defaults).
FP = {"fairness_id": "default-flow", "priority": "0"}
UNPARSED = {**FP, "model_name": "", "target_model_name": ""}


def sse(*events: dict | str) -> list[bytes]:
    out = []
    for e in events:
        payload = e if isinstance(e, str) else json.dumps(e)
        out.append(f"data: {payload}\n\n".encode())
    return out


# -- request side -----------------------------------------------------------------------------
async def test_routes_request_with_header_and_metadata() -> None:
    async with serve() as h:
        s = h.open()
        answers = await s.route(BODY)
        hdr = answers[0]
        assert hdr.WhichOneof("response") == "request_headers"
        common = hdr.request_headers.response
        sets = set_headers(common)
        dest = sets["x-gateway-destination-endpoint"]
        assert dest.decode() in ENDPOINTS
        # raw_value only: Envoy 1.40 ignores `value`.
        opts = {o.header.key: o for o in common.header_mutation.set_headers}
        assert opts["x-gateway-destination-endpoint"].header.value == ""
        assert not opts["x-gateway-destination-endpoint"].HasField("append")
        assert common.clear_route_cache is True
        assert lb_metadata(hdr) == {"x-gateway-destination-endpoint": dest.decode()}
        # A request id was generated and forwarded.
        rid = sets["x-request-id"].decode()
        assert len(rid) == 36
        assert h.director.requests[0].request_id == rid
        body, eos = streamed(answers[1], "request_body")
        assert body == BODY and eos
        req = h.director.requests[0]
        assert req.kind is RequestKind.COMPLETIONS and req.model == "m" and req.prompt == b"hello world"
        assert req.max_tokens == 5


async def test_nothing_is_answered_before_end_of_body() -> None:
    async with serve() as h:
        s = h.open()
        await s.send(request_headers(), request_body(BODY[:10]), request_body(BODY[10:20]))
        await s.send(request_body(BODY[20:]), request_body(b"", eos=True))
        # Answers are ordered: the first one is the routing headers answer, so nothing
        # was sent per chunk.
        first = await s.recv()
        assert first.WhichOneof("response") == "request_headers"
        body, eos = streamed(await s.recv(), "request_body")
        assert body == BODY and eos


async def test_client_request_id_is_kept_and_control_headers_removed() -> None:
    async with serve() as h:
        s = h.open()
        headers = {
            "x-request-id": "client-rid",
            "x-gateway-destination-endpoint": "127.0.0.9:1",
            "x-llm-d-inference-objective": "premium",
            "x-gateway-inference-fairness-id": "tenant-a",
            "x-llm-d-request-dropped-reason": "spoofed",
        }
        answers = await s.route(BODY, headers)
        common = answers[0].request_headers.response
        sets = set_headers(common)
        assert "x-request-id" not in sets
        # The client's destination is overwritten (set, never appended).
        assert sets["x-gateway-destination-endpoint"].decode() in ENDPOINTS
        assert set(common.header_mutation.remove_headers) == {
            "x-llm-d-inference-objective",
            "x-gateway-inference-fairness-id",
            "x-llm-d-request-dropped-reason",
        }
        req = h.director.requests[0]
        assert req.request_id == "client-rid"
        assert req.objective == "premium" and req.fairness_id == "tenant-a"


async def test_a_clients_sidecar_routing_headers_are_removed_unless_the_epp_sets_them() -> None:
    """x-prefiller-host-port & co. steer the decode pod's sidecar: only the EPP may send them."""
    director = FakeDirector(list(ENDPOINTS), extra_headers={"x-prefiller-host-port": "10.0.0.9:8000"})
    async with serve(director) as h:
        spoofed = {
            "x-prefiller-host-port": "203.0.113.7:80",
            "x-encoder-hosts-ports": "203.0.113.7:80",
            "x-kv-cache-source-host-port": "203.0.113.7:80",
            "x-data-parallel-host-port": "203.0.113.7:80",
        }
        common = (await h.open().route(BODY, spoofed))[0].request_headers.response
        assert set_headers(common)["x-prefiller-host-port"] == b"10.0.0.9:8000"  # the EPP's, set over the client's
        assert set(common.header_mutation.remove_headers) == {
            "x-encoder-hosts-ports",
            "x-kv-cache-source-host-port",
            "x-data-parallel-host-port",
        }


async def test_the_other_system_owned_headers_a_client_sends_are_removed() -> None:
    """The reference strips every system-owned request header (pkg/epp/util/request/headers.go): the SLO and
    video inputs the EPP reads, and the served-endpoint key, are not forwarded to the model server as the client
    spelled them (plugins still read them)."""
    async with serve() as h:
        spoofed = {
            "x-llm-d-slo-ttft-ms": "1",
            "x-slo-ttft-ms": "1",
            "x-llm-d-slo-tpot-ms": "1",
            "x-slo-tpot-ms": "1",
            "x-llm-d-video-fps": "30",
            "x-llm-d-video-duration-seconds": "5",
            "x-llm-d-video-resolution": "720p",
            "x-gateway-destination-endpoint-served": "203.0.113.7:80",
        }
        common = (await h.open().route(BODY, spoofed))[0].request_headers.response
        assert set(common.header_mutation.remove_headers) == set(spoofed)
        assert h.director.requests[0].headers["x-llm-d-slo-ttft-ms"] == "1"


async def test_a_clients_tracestate_does_not_outlive_the_traceparent_the_epp_replaces() -> None:
    """With tracing on the EPP writes the traceparent the model server continues, and so owns tracestate:
    the span's own when it has one, else none. The client's would otherwise go on beside a traceparent it
    does not belong to (a new trace when the client's traceparent was invalid; W3C: then discard it)."""
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    client = {"traceparent": "garbage", "tracestate": "vendor=stale"}
    async with serve(FakeDirector(list(ENDPOINTS), extra_headers={"traceparent": traceparent})) as h:
        common = (await h.open().route(BODY, client))[0].request_headers.response
        assert set_headers(common)["traceparent"] == traceparent.encode()
        assert "tracestate" in common.header_mutation.remove_headers
    kept = {"traceparent": traceparent, "tracestate": "vendor=span"}
    async with serve(FakeDirector(list(ENDPOINTS), extra_headers=kept)) as h:
        common = (await h.open().route(BODY, client))[0].request_headers.response
        assert set_headers(common)["tracestate"] == b"vendor=span"
        assert "tracestate" not in common.header_mutation.remove_headers
    async with serve() as h:  # tracing off: the client's trace headers go on untouched
        common = (await h.open().route(BODY, client))[0].request_headers.response
        assert "tracestate" not in common.header_mutation.remove_headers


async def test_decision_headers_are_forwarded() -> None:
    director = FakeDirector(list(ENDPOINTS), extra_headers={"x-prefiller-host-port": "10.0.0.9:8000"})
    async with serve(director) as h:
        answers = await h.open().route(BODY)
        assert set_headers(answers[0].request_headers.response)["x-prefiller-host-port"] == b"10.0.0.9:8000"


async def test_two_megabyte_body_is_rechunked_byte_exact() -> None:
    prompt = os.urandom(1_000_000).hex()  # 2 MB of text
    body = json.dumps({"model": "m", "prompt": prompt}).encode()
    async with serve() as h:
        s = h.open()
        await s.send(request_headers())
        for i in range(0, len(body), 65536):
            await s.send(request_body(body[i : i + 65536]))
        await s.send(request_body(b"", eos=True))
        assert (await s.recv()).WhichOneof("response") == "request_headers"
        got = []
        while True:
            chunk, eos = streamed(await s.recv(), "request_body")
            assert 0 < len(chunk) <= 62_000
            got.append(chunk)
            if eos:
                break
        assert len(got) == -(-len(body) // 62_000)
        assert hashlib.sha256(b"".join(got)).digest() == hashlib.sha256(body).digest()
        assert h.director.requests[0].prompt == prompt.encode()


async def test_fallback_list_primary_only_by_default() -> None:
    async with serve(FakeDirector(list(ENDPOINTS), fallbacks=2)) as h:
        answers = await h.open().route(BODY)
        dest = set_headers(answers[0].request_headers.response)["x-gateway-destination-endpoint"].decode()
        assert "," not in dest
        assert lb_metadata(answers[0])["x-gateway-destination-endpoint"] == dest


async def test_fallback_list_when_enabled_and_scores() -> None:
    scores = {"10.0.0.1:8000": 0.9, "10.0.0.2:8000": 0.5}
    director = FakeDirector(list(ENDPOINTS), fallbacks=2, scores=scores)
    async with serve(director, destination_list=True) as h:
        answers = await h.open().route(BODY)
        dest = set_headers(answers[0].request_headers.response)["x-gateway-destination-endpoint"].decode()
        assert len(dest.split(",")) == 2
        md = lb_metadata(answers[0])
        assert md["x-gateway-destination-endpoint"] == dest
        assert dict(md["x-gateway-destination-endpoint-scores"]) == scores


async def test_subset_hint_is_passed_through() -> None:
    async with serve() as h:
        s = h.open()
        await s.send(request_headers(subset=["10.0.0.2:8000"]))
        end = request_body(BODY, eos=True)
        await s.send(end)
        first = await s.recv()
        assert set_headers(first.request_headers.response)["x-gateway-destination-endpoint"] == b"10.0.0.2:8000"
        assert list(h.director.subsets[0] or []) == ["10.0.0.2:8000"]
        # The hint may also ride on the last body message.
        s2 = h.open()
        end2 = request_body(BODY, eos=True)
        add_subset(end2, ["10.0.0.3:8000"])
        await s2.send(request_headers(), end2)
        first2 = await s2.recv()
        assert set_headers(first2.request_headers.response)["x-gateway-destination-endpoint"] == b"10.0.0.3:8000"


async def test_empty_subset_is_503_no_endpoints() -> None:
    async with serve() as h:
        s = h.open()
        await s.send(request_headers(subset=[]), request_body(BODY, eos=True))
        resp = (await s.recv()).immediate_response
        assert resp.status.code == 503
        hdrs = {o.header.key: o.header.raw_value for o in resp.headers.set_headers}
        assert hdrs["x-llm-d-request-dropped-reason"] == b"rejected-no-endpoints"
        await s.recv_eof()


async def test_an_outage_refusing_every_request_logs_a_line_not_one_per_request(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No endpoints (the pool scaled to zero, every pod restarting): each request is a 503, counted in
    request_error_total; the log says so once per kind of refusal per interval, not at the request rate."""
    with caplog.at_level(logging.WARNING, logger="llmepp.server.stream"):
        async with serve() as h:
            for _ in range(20):
                s = h.open()
                await s.send(request_headers(subset=[]), request_body(BODY, eos=True))
                assert (await s.recv()).immediate_response.status.code == 503
                await s.recv_eof()
    rejected = [r.getMessage() for r in caplog.records if "request rejected" in r.getMessage()]
    assert rejected == ["request rejected: 503 no ready endpoints in the pool"]


async def test_bodyless_request_is_answered_at_once() -> None:
    async with serve() as h:
        s = h.open()
        await s.send(request_headers(path="/v1/models", method="GET", eos=True))
        first = await s.recv()
        dest = set_headers(first.request_headers.response)["x-gateway-destination-endpoint"].decode()
        assert dest in ENDPOINTS
        assert lb_metadata(first)["x-gateway-destination-endpoint"] == dest
        assert h.director.requests[0].kind is RequestKind.BODYLESS
        await s.send(response_headers(), response_body(b'{"data": []}', eos=True))
        assert (await s.recv()).WhichOneof("response") == "response_headers"
        assert streamed(await s.recv(), "response_body") == (b'{"data": []}', True)
        await s.close()
        await s.recv_eof()
        assert len(h.director.completions) == 1


# -- errors ------------------------------------------------------------------------------------
def immediate(resp) -> tuple[int, dict[str, bytes], dict]:  # type: ignore[no-untyped-def]
    assert resp.WhichOneof("response") == "immediate_response", resp
    ir = resp.immediate_response
    hdrs = {o.header.key: o.header.raw_value for o in ir.headers.set_headers}
    return ir.status.code, hdrs, json.loads(ir.body)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"model": "m", "prompt": ', "invalid JSON at byte"),
        (b'{"model" "m"}', "invalid JSON at byte 9: expected ':'"),
        (b'{"prompt": "x"}', 'missing required field "model"'),
        (b'{"model": "m"}', 'missing required field "prompt"'),
        (b'{"model": "m", "prompt": 5}', '"prompt" must be a string or list'),
        (b"[1, 2]", "request body must be a JSON object"),
        (b'{"model": "m", "prompt": "x", "n": ' + b"[" * 3000 + b"]" * 3000 + b"}", "nests JSON too deeply"),
    ],
)
async def test_bad_request_is_400(body: bytes, message: str) -> None:
    async with serve() as h:
        s = h.open()
        await s.send(request_headers(), request_body(body, eos=True))
        status, hdrs, doc = immediate(await s.recv())
        assert status == 400
        assert hdrs["content-type"] == b"application/json"
        assert "x-llm-d-request-dropped-reason" not in hdrs
        assert doc["error"]["code"] == 400 and doc["error"]["type"] == "BadRequest"
        assert message in doc["error"]["message"]
        await s.recv_eof()
        assert await s.status() == grpc.StatusCode.OK
        assert h.director.requests == []
        assert h.sample("llm_d_epp_request_error_total", {**UNPARSED, "error_code": "BadRequest"}) == 1


async def test_body_over_limit_is_413_without_waiting_for_the_end() -> None:
    async with serve(settings=Settings(max_body_bytes=1000)) as h:
        s = h.open()
        await s.send(request_headers(), request_body(b"x" * 600), request_body(b"x" * 600))
        status, _, doc = immediate(await s.recv())
        assert status == 413 and doc["error"]["type"] == "PayloadTooLarge"
        await s.recv_eof()


@pytest.mark.parametrize(
    ("header", "status", "reason"),
    [
        ("429:rejected-saturated", 429, "rejected-saturated"),
        ("503:rejected-no-endpoints", 503, "rejected-no-endpoints"),
    ],
)
async def test_director_errors_become_immediate_responses(header: str, status: int, reason: str) -> None:
    async with serve() as h:
        s = h.open()
        await s.send(request_headers({"x-test-error": header}), request_body(BODY, eos=True))
        got, hdrs, doc = immediate(await s.recv())
        assert got == status
        assert hdrs["x-llm-d-request-dropped-reason"] == reason.encode()
        assert doc["error"]["code"] == status
        await s.recv_eof()
        assert h.director.completions == []
        assert h.sample("llm_d_epp_request_running", {**FP, "model_name": "m", "target_model_name": "m"}) == 0


async def test_director_exception_is_500_not_a_broken_stream(caplog: pytest.LogCaptureFixture) -> None:
    async with serve(FakeDirector(list(ENDPOINTS), raise_exc=RuntimeError("boom"))) as h:
        s = h.open()
        await s.send(request_headers(), request_body(BODY, eos=True))
        status, _, doc = immediate(await s.recv())
        assert status == 500 and doc["error"]["type"] == "Internal"
        await s.recv_eof()
        assert await s.status() == grpc.StatusCode.OK
        assert any("boom" in (r.exc_text or "") for r in caplog.records)
        # A plugin bug fails every request alike: its traceback is logged once per interval, not per request.
        for _ in range(5):
            s = h.open()
            await s.send(request_headers(), request_body(BODY, eos=True))
            assert immediate(await s.recv())[0] == 500
            await s.recv_eof()
        assert sum(1 for r in caplog.records if r.levelno >= logging.ERROR and "boom" in (r.exc_text or "")) == 1


@pytest.mark.parametrize("delay", [0.0, 0.05], ids=["at-once", "after-waiting"])
async def test_a_cancellation_raised_by_routing_is_500_and_spares_the_connection(delay: float) -> None:
    """A CancelledError out of routing that is not the stream's own cancellation (a plugin awaiting a shared
    future someone else cancelled) is an error like any other: 500, the stream ends. Not a stream left
    unanswered until Envoy's idle timeout, nor (h2) the whole connection torn down with every stream on it."""
    director = FakeDirector(list(ENDPOINTS), raise_exc=asyncio.CancelledError())
    director.delay = delay
    async with serve(director) as h:
        s = h.open()
        await s.send(request_headers(), request_body(BODY, eos=True))
        status, _, doc = immediate(await s.recv())
        assert status == 500 and doc["error"]["type"] == "Internal"
        await s.recv_eof()
        assert await s.status() == grpc.StatusCode.OK
        director.raise_exc = None
        s2 = h.open()  # the same connection still serves
        first, *_ = await s2.route(BODY)
        assert first.WhichOneof("response") == "request_headers"


async def test_request_error_from_attribute() -> None:
    director = FakeDirector(list(ENDPOINTS), fail_with=ResourceExhausted("busy"))
    async with serve(director) as h:
        s = h.open()
        await s.send(request_headers(), request_body(BODY, eos=True))
        status, hdrs, doc = immediate(await s.recv())
        assert status == 429 and doc["error"]["message"] == "busy"
        assert "x-llm-d-request-dropped-reason" not in hdrs


# -- response side -------------------------------------------------------------------------------
async def test_json_response_passthrough_and_usage() -> None:
    async with serve() as h:
        s = h.open()
        await s.route(BODY)
        await s.send(response_headers(200, "application/json"))
        assert (await s.recv()).WhichOneof("response") == "response_headers"
        parts = [JSON_RESPONSE[:50], JSON_RESPONSE[50:]]
        await s.send(response_body(parts[0]))
        assert streamed(await s.recv(), "response_body") == (parts[0], False)
        await s.send(response_body(parts[1]))
        assert streamed(await s.recv(), "response_body") == (parts[1], False)
        await s.send(response_body(b"", eos=True))
        assert streamed(await s.recv(), "response_body") == (b"", True)
        await s.close()
        await s.recv_eof()
        (c,) = h.director.completions
        assert c.response.status == 200 and not c.response.streaming
        assert c.response.cause is TerminationCause.NATURAL
        u = c.response.usage
        assert u is not None and (u.prompt_tokens, u.completion_tokens, u.cached_tokens, u.total_tokens) == (
            7,
            3,
            4,
            10,
        )
        assert c.response.bytes == len(JSON_RESPONSE)
        labels = {**FP, "model_name": "m", "target_model_name": "m"}
        assert h.sample("llm_d_epp_request_total", labels) == 1
        assert h.sample("llm_d_epp_request_running", labels) == 0
        assert h.sample("llm_d_epp_request_input_tokens_sum", labels) == 7
        assert h.sample("llm_d_epp_request_output_tokens_sum", labels) == 3
        assert h.sample("llm_d_epp_request_cached_tokens_sum", labels) == 4
        assert h.sample("llm_d_epp_request_duration_seconds_count", labels) == 1
        assert h.sample("llm_d_epp_response_size_bytes_sum", labels) == len(JSON_RESPONSE)
        assert h.sample("llm_d_epp_request_ttft_seconds_count", {**labels, "streaming": "false"}) == 1
        assert h.sample("llm_d_epp_request_processing_duration_seconds_count") == 1
        assert h.sample("llm_d_epp_response_processing_duration_seconds_count") == 1
        assert h.sample("llm_d_epp_extproc_streams_inflight") == 0


async def test_request_metrics_carry_the_target_model_the_director_chose() -> None:
    """An InferenceModelRewrite applied by the director (after parsing) labels every request metric."""
    async with serve(FakeDirector(list(ENDPOINTS), rewrite_to="m-v2")) as h:
        s = h.open()
        await s.route(BODY)
        await s.send(response_headers(200, "application/json"))
        await s.recv()
        await s.send(response_body(JSON_RESPONSE, eos=True))
        await s.recv()
        await s.close()
        await s.recv_eof()
        rewritten = {**FP, "model_name": "m", "target_model_name": "m-v2"}
        assert h.sample("llm_d_epp_request_total", rewritten) == 1
        assert h.sample("llm_d_epp_request_duration_seconds_count", rewritten) == 1
        assert h.sample("llm_d_epp_request_running", rewritten) == 0
        assert h.sample("llm_d_epp_request_total", {**FP, "model_name": "m", "target_model_name": "m"}) == 0
    rejected = FakeDirector(list(ENDPOINTS), rewrite_to="m-v2", fail_with=ResourceExhausted("busy"))
    async with serve(rejected) as h:
        s = h.open()
        await s.send(request_headers(), request_body(BODY, eos=True))
        assert immediate(await s.recv())[0] == 429
        labels = {**FP, "model_name": "m", "target_model_name": "m-v2"}
        assert h.sample("llm_d_epp_request_total", labels) == 0  # refused: an error only, as the reference
        assert h.sample("llm_d_epp_request_error_total", {**labels, "error_code": "ResourceExhausted"}) == 1


async def test_a_404_counts_under_the_reference_error_code() -> None:
    # request_error_total{error_code}: the reference's code for 404 is NotFound (dashboards and alerts name it).
    async with serve(FakeDirector(list(ENDPOINTS), fail_with=NotFound("The model `x` does not exist."))) as h:
        s = h.open()
        await s.send(request_headers(), request_body(BODY, eos=True))
        assert immediate(await s.recv())[0] == 404
        labels = {**FP, "model_name": "m", "target_model_name": "m"}
        assert h.sample("llm_d_epp_request_error_total", {**labels, "error_code": "NotFound"}) == 1


async def test_sse_response_streams_and_usage_from_final_event() -> None:
    usage = {"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14}
    events = sse(
        {"choices": [{"delta": {"content": "a"}}], "usage": None},
        {"choices": [{"delta": {"content": "b"}}], "usage": None},
        {"choices": [], "usage": usage},
        "[DONE]",
    )
    async with serve() as h:
        s = h.open()
        await s.route(CHAT, path="/v1/chat/completions")
        await s.send(response_headers(200, "text/event-stream; charset=utf-8"))
        await s.recv()
        for ev in events:
            await s.send(response_body(ev))
            assert streamed(await s.recv(), "response_body") == (ev, False)
        await s.send(response_body(b"", eos=True))
        assert streamed(await s.recv(), "response_body") == (b"", True)
        (c,) = h.director.completions
        assert c.response.streaming
        assert c.response.usage is not None and c.response.usage.prompt_tokens == 12
        assert c.response.first_byte_at > 0
        # The first-chunk hook fires once for the whole stream, not per chunk.
        assert h.director.first_chunks == [c.request]
        labels = {**FP, "model_name": "m", "target_model_name": "m", "streaming": "true"}
        assert h.sample("llm_d_epp_request_ttft_seconds_count", labels) == 1


async def test_a_compressed_request_body_is_a_400_naming_the_encoding() -> None:
    """Envoy hands the body over as the client sent it: gzip is no JSON, and the answer says why."""
    async with serve() as h:
        s = h.open()
        await s.send(request_headers({"content-encoding": "gzip"}), request_body(gzip.compress(BODY), eos=True))
        status, _, doc = immediate(await s.recv())
        assert status == 400 and doc["error"]["message"] == (
            "request body has content-encoding 'gzip': the router reads JSON bodies uncompressed"
        )
        assert h.director.requests == []


@pytest.mark.parametrize("content_type", ["Text/Event-Stream", "TEXT/EVENT-STREAM; charset=UTF-8"])
async def test_the_event_stream_media_type_is_case_insensitive(content_type: str) -> None:
    async with serve() as h:
        s = h.open()
        await s.route(CHAT, path="/v1/chat/completions")
        await s.send(response_headers(200, content_type))
        await s.recv()
        await s.send(response_body(b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}\n\n'))
        await s.recv()
        await s.send(response_body(b"", eos=True))
        await s.recv()
        await until(lambda: len(h.director.completions) == 1)
        (c,) = h.director.completions
        assert c.response.streaming
        labels = {**FP, "model_name": "m", "target_model_name": "m", "streaming": "true"}
        assert h.sample("llm_d_epp_request_ttft_seconds_count", labels) == 1


async def test_response_headers_from_director_are_set() -> None:
    director = FakeDirector(list(ENDPOINTS), response_header_extra={"x-served-by": "epp"})
    async with serve(director) as h:
        s = h.open()
        await s.route(BODY)
        await s.send(response_headers(200))
        r = await s.recv()
        assert set_headers(r.response_headers.response) == {"x-served-by": b"epp"}
        (_, info, headers) = h.director.response_headers_calls[0]
        assert info.status == 200 and headers[":status"] == "200"


async def test_model_rewrite_both_ways() -> None:
    async with serve() as h:
        s = h.open()
        answers = await s.route(BODY, {"x-llm-d-model-name-rewrite": "big-model-v2"})
        upstream = msgspec.json.decode(b"".join(streamed(a, "request_body")[0] for a in answers[1:]))
        assert upstream == {**json.loads(BODY), "model": "big-model-v2"}
        assert "x-llm-d-model-name-rewrite" in answers[0].request_headers.response.header_mutation.remove_headers
        await s.send(response_headers(200, "text/event-stream"))
        await s.recv()
        # The pattern split across chunks is still rewritten; the spaced variant too.
        chunks = [b'data: {"id":1,"model":"big-mo', b'del-v2","x":1}\n\n', b'data: {"model": "big-model-v2"}\n\n']
        out = b""
        for i, ch in enumerate(chunks):
            await s.send(response_body(ch, eos=i == len(chunks) - 1))
            out += streamed(await s.recv(), "response_body")[0]
        assert out == b'data: {"id":1,"model":"m","x":1}\n\ndata: {"model": "m"}\n\n'
        req = h.director.requests[0]
        assert (req.model, req.target_model) == ("m", "big-model-v2")


async def test_model_rewrite_holds_no_bytes_back_when_the_response_ends_with_trailers() -> None:
    # The rewriter holds back a chunk's tail that may begin the model pattern; a response that ends with
    # trailers (no end-of-stream body chunk) must still get those bytes, before the trailers.
    async with serve() as h:
        s = h.open()
        await s.route(BODY, {"x-llm-d-model-name-rewrite": "big-model-v2"})
        await s.send(response_headers(200, "text/event-stream"))
        await s.recv()
        await s.send(response_body(b'data: {"id":1}\n\ndata: {"model":"big-mo'))
        out = streamed(await s.recv(), "response_body")[0]
        await s.send(response_trailers())
        rest = await s.recv()
        assert rest.WhichOneof("response") == "response_body"
        out += streamed(rest, "response_body")[0]
        assert out == b'data: {"id":1}\n\ndata: {"model":"big-mo'
        assert (await s.recv()).WhichOneof("response") == "response_trailers"


async def test_response_trailers_complete_once() -> None:
    async with serve() as h:
        s = h.open()
        await s.route(BODY)
        await s.send(response_headers(200), response_body(JSON_RESPONSE))
        await s.recv()
        await s.recv()
        await s.send(response_trailers())
        assert (await s.recv()).WhichOneof("response") == "response_trailers"
        await s.close()
        await s.recv_eof()
        (c,) = h.director.completions
        assert c.response.cause is TerminationCause.NATURAL
        assert c.response.usage is not None and c.response.usage.total_tokens == 10


async def test_local_reply_for_an_unrouted_request_is_answered() -> None:
    async with serve() as h:
        s = h.open()
        await s.send(request_headers(), request_body(BODY[:10]))
        # Envoy gives up (e.g. a timeout) and sends its own reply through the response path.
        await s.send(response_headers(504, "text/plain"), response_body(b"upstream request timeout", eos=True))
        assert (await s.recv()).WhichOneof("response") == "response_headers"
        assert streamed(await s.recv(), "response_body") == (b"upstream request timeout", True)
        await s.close()
        await s.recv_eof()
        assert h.director.requests == [] and h.director.completions == []
        assert h.sample("llm_d_epp_request_error_total", {**UNPARSED, "error_code": "ProxyError"}) == 1


async def test_local_reply_after_routing_completes_accounting() -> None:
    async with serve() as h:
        s = h.open()
        await s.route(BODY)
        await s.send(response_headers(503, "text/plain"), response_body(b"no healthy upstream", eos=True))
        await s.recv()
        await s.recv()
        (c,) = h.director.completions
        assert c.response.status == 503 and c.response.cause is TerminationCause.NATURAL
        assert h.director.inflight == {}


# -- cancellation ---------------------------------------------------------------------------------
async def test_cancel_mid_body_holds_nothing() -> None:
    async with serve() as h:
        s = h.open()
        await s.send(request_headers(), request_body(BODY[:10]))
        await until(lambda: h.sample("llm_d_epp_extproc_streams_inflight") == 1)
        s.cancel()
        await until(lambda: h.sample("llm_d_epp_extproc_streams_inflight") == 0)
        assert h.director.requests == [] and h.director.completions == []


async def test_cancel_mid_response_releases_exactly_once() -> None:
    async with serve() as h:
        s = h.open()
        await s.route(CHAT, path="/v1/chat/completions")
        await s.send(response_headers(200, "text/event-stream"), response_body(b"data: {}\n\n"))
        await s.recv()
        await s.recv()
        assert h.director.inflight
        s.cancel()
        await until(lambda: len(h.director.completions) == 1)
        await asyncio.sleep(0.1)
        (c,) = h.director.completions
        assert c.response.cause is TerminationCause.CLIENT_DISCONNECT
        assert h.director.inflight == {}
        assert h.sample("llm_d_epp_request_running", {**FP, "model_name": "m", "target_model_name": "m"}) == 0
        assert h.sample("llm_d_epp_extproc_streams_inflight") == 0


@pytest.mark.parametrize("upstream_status", [200, 503])
async def test_in_flight_eviction_answers_429_mid_response_and_releases_once(upstream_status: int) -> None:
    """Also while an error response streams: the client got one answer (the 429), so one request_error_total
    sample (ResourceExhausted), not a ModelServerError besides."""
    async with serve(out_of_band=True) as h:
        s = h.open()
        await s.route(CHAT, path="/v1/chat/completions")
        await s.send(response_headers(upstream_status, "text/event-stream"), response_body(b"data: {}\n\n"))
        await s.recv()
        await s.recv()
        (req,) = h.director.requests
        assert req.evict is not None and req.evict()
        status, headers, body = immediate(await s.recv())
        assert status == 429 and headers["x-llm-d-request-dropped-reason"] == b"evicted"
        assert body["error"]["message"] == "request evicted by flow control"
        await s.close()  # Envoy ends its side after an immediate response
        assert await s.status() == grpc.StatusCode.OK
        (c,) = h.director.completions
        assert c.response.cause is TerminationCause.EVICTED
        assert not req.evict()  # once
        assert h.director.inflight == {}
        labels = {**FP, "model_name": "m", "target_model_name": "m", "error_code": "ResourceExhausted"}
        assert h.sample("llm_d_epp_request_error_total", labels) == 1
        assert not h.sample("llm_d_epp_request_error_total", {**labels, "error_code": "ModelServerError"})
        assert h.sample("llm_d_epp_request_running", {**FP, "model_name": "m", "target_model_name": "m"}) == 0


async def test_an_eviction_push_waits_for_an_answer_being_written() -> None:
    # Revoked while the response streams: the 429 follows the chunk answers already due, never inside one.
    async with serve(out_of_band=True) as h:
        s = h.open()
        await s.route(CHAT, path="/v1/chat/completions")
        await s.send(response_headers(200, "text/event-stream"))
        await s.recv()
        (req,) = h.director.requests
        await s.send(*(response_body(b"data: {}\n\n") for _ in range(20)))
        assert req.evict is not None and req.evict()
        kinds = []
        while True:
            answer = await s.recv()
            kinds.append(answer.WhichOneof("response"))
            if kinds[-1] == "immediate_response":
                break
        assert set(kinds[:-1]) <= {"response_body"}
        await s.close()
        assert await s.status() == grpc.StatusCode.OK


async def test_a_message_arriving_after_an_eviction_runs_no_response_plugin() -> None:
    """The 429 ends the request: a response chunk Envoy sent before it saw the 429 is not the request's
    first chunk to the response plugins (grpc.aio's handler, waiting on its read, used to handle it)."""
    async with serve(out_of_band=True) as h:
        s = h.open()
        await s.route(CHAT, path="/v1/chat/completions")
        await s.send(response_headers(200, "text/event-stream"))
        await s.recv()
        (req,) = h.director.requests
        assert req.evict is not None and req.evict()
        assert (await s.recv()).WhichOneof("response") == "immediate_response"
        # h2 ended the stream with the 429 (the send fails: InvalidStateError, or on Python 3.12 an AioRpcError);
        # grpc.aio's handler was still reading.
        with contextlib.suppress(asyncio.InvalidStateError, grpc.aio.AioRpcError):
            await s.send(response_body(b"data: {}\n\n"))
        await asyncio.sleep(0.05)
        assert h.director.first_chunks == []
        (c,) = h.director.completions
        assert c.response.cause is TerminationCause.EVICTED
        with contextlib.suppress(asyncio.InvalidStateError, grpc.aio.AioRpcError):
            await s.close()


async def test_without_eviction_no_request_can_be_revoked() -> None:
    async with serve() as h:
        s = h.open()
        await s.route(BODY)
        assert h.director.requests[0].evict is None  # no push per stream, no bound method per request


async def test_stream_closed_after_routing_without_response_releases() -> None:
    async with serve() as h:
        s = h.open()
        await s.route(BODY)
        await s.close()  # Envoy half-closes: the request ended before any response
        await s.recv_eof()
        (c,) = h.director.completions
        assert c.response.cause is TerminationCause.CLIENT_DISCONNECT


async def test_cancel_while_the_director_decides() -> None:
    async with serve(FakeDirector(list(ENDPOINTS), delay=5.0)) as h:
        s = h.open()
        await s.send(request_headers(), request_body(BODY, eos=True))
        await until(lambda: h.sample("llm_d_epp_extproc_streams_inflight") == 1)
        await asyncio.sleep(0.05)
        s.cancel()
        await until(lambda: h.sample("llm_d_epp_extproc_streams_inflight") == 0, within=2.0)
        assert h.director.completions == [] and h.director.inflight == {}


@pytest.mark.parametrize("phase", ["mid_body", "mid_response", "while_deciding"])
async def test_a_stream_the_client_cancels_is_counted_canceled(phase: str) -> None:
    # grpc.aio hands a handler waiting in read() a client's cancel as EOF, like a half-close; both
    # transports must count it `Canceled` all the same, and release what it holds once.
    director = FakeDirector(list(ENDPOINTS), delay=5.0 if phase == "while_deciding" else 0.0)
    async with serve(director, settings=Settings(grpc_stream_metrics=True)) as h:
        s = h.open()
        if phase == "mid_body":
            await s.send(request_headers(), request_body(BODY[:10]))
        elif phase == "mid_response":
            await s.route(CHAT, path="/v1/chat/completions")
            await s.send(response_headers(200, "text/event-stream"), response_body(b"data: {}\n\n"))
            await s.recv()
            await s.recv()
        else:
            await s.send(request_headers(), request_body(BODY, eos=True))
        await until(lambda: h.sample("llm_d_epp_extproc_streams_inflight") == 1)
        await asyncio.sleep(0.05)  # the handler waits: in read(), or on the director
        s.cancel()
        await until(lambda: h.sample("llm_d_epp_extproc_streams_inflight") == 0)
        await asyncio.sleep(0.05)
        assert h.sample("llm_d_epp_extproc_streams_total", {"code": "Canceled"}) == 1
        assert h.sample("llm_d_epp_extproc_streams_total", {"code": "OK"}) == 0
        assert h.sample("llm_d_epp_extproc_stream_duration_seconds_count") == 1
        assert h.director.inflight == {}
        if phase == "mid_response":  # released exactly once, as a disconnect
            (c,) = h.director.completions
            assert c.response.cause is TerminationCause.CLIENT_DISCONNECT
        else:
            assert h.director.completions == []


async def test_streams_that_end_without_a_cancel_are_counted_ok() -> None:
    async with serve(settings=Settings(grpc_stream_metrics=True)) as h:
        s = h.open()  # answered to the end, then half-closed by the client (as Envoy ends a stream)
        await s.route(BODY)
        await s.send(response_headers(200), response_body(JSON_RESPONSE, eos=True))
        await s.recv()
        await s.recv()
        await s.close()
        assert await s.status() == grpc.StatusCode.OK
        s = h.open()  # half-closed after routing, before any response
        await s.route(BODY)
        await s.close()
        await s.recv_eof()
        assert await s.status() == grpc.StatusCode.OK
        await until(lambda: h.sample("llm_d_epp_extproc_streams_total", {"code": "OK"}) == 2)
        await asyncio.sleep(0.05)
        assert h.sample("llm_d_epp_extproc_streams_total", {"code": "Canceled"}) == 0
        assert len(h.director.completions) == 2 and h.director.inflight == {}


async def test_an_evicted_stream_is_counted_ok_on_either_transport() -> None:
    """An eviction's 429 is pushed outside any message handler. h2 ended the stream OK at once; grpc.aio's
    handler went on reading until Envoy's reset and counted the stream Canceled, so an eviction storm read
    as clients hanging up on one transport only."""
    chat = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()
    async with serve(out_of_band=True, settings=Settings(grpc_stream_metrics=True)) as h:
        s = h.open()
        await s.route(chat, path="/v1/chat/completions")
        await s.send(response_headers(200, "text/event-stream"), response_body(b"data: {}\n\n"))
        await s.recv()
        await s.recv()
        (req,) = h.director.requests
        assert req.evict is not None and req.evict()
        assert (await s.recv()).WhichOneof("response") == "immediate_response"
        await asyncio.sleep(0.05)
        s.cancel()  # Envoy resets every ext_proc stream once it is done with it
        await until(lambda: h.sample("llm_d_epp_extproc_streams_inflight") == 0)
        await asyncio.sleep(0.05)
        assert h.sample("llm_d_epp_extproc_streams_total", {"code": "Canceled"}) == 0
        assert h.sample("llm_d_epp_extproc_streams_total", {"code": "OK"}) == 1


# -- other body modes ------------------------------------------------------------------------------
async def test_buffered_mode_routes_on_the_body_answer() -> None:
    async with serve() as h:
        s = h.open()
        await s.send(request_headers(req_mode=BUFFERED, resp_mode=STREAMED))
        first = await s.recv()
        assert first.WhichOneof("response") == "request_headers"
        assert not first.request_headers.HasField("response")
        await s.send(request_body(BODY, eos=True))
        r = await s.recv()
        assert r.WhichOneof("response") == "request_body"
        common = r.request_body.response
        assert set_headers(common)["x-gateway-destination-endpoint"].decode() in ENDPOINTS
        assert common.clear_route_cache and not common.HasField("body_mutation")
        assert lb_metadata(r)["x-gateway-destination-endpoint"] in ENDPOINTS
        await s.send(response_headers(200, "text/event-stream"))
        await s.recv()
        for ev in sse({"a": 1}, "[DONE]"):
            await s.send(response_body(ev))
            r = await s.recv()
            assert r.WhichOneof("response") == "response_body"
            assert not r.response_body.HasField("response")  # plain BodyResponse
        await s.send(response_body(b"", eos=True))
        await s.recv()
        assert len(h.director.completions) == 1


async def test_buffered_mode_model_rewrite_replaces_body_with_length() -> None:
    async with serve() as h:
        s = h.open()
        await s.send(request_headers({"x-gateway-model-name-rewrite": "t"}, req_mode=BUFFERED, resp_mode=STREAMED))
        await s.recv()
        await s.send(request_body(BODY, eos=True))
        common = (await s.recv()).request_body.response
        new_body = common.body_mutation.body
        assert json.loads(new_body)["model"] == "t"
        assert set_headers(common)["content-length"] == str(len(new_body)).encode()
        await s.send(response_headers(200, "application/json", **cast(dict[str, Any], {"content-length": "20"})))
        r = await s.recv()
        assert "content-length" in r.response_headers.response.header_mutation.remove_headers
        await s.send(response_body(b'{"model":"t"}', eos=True))
        r = await s.recv()
        assert r.response_body.response.body_mutation.body == b'{"model":"m"}'


@pytest.mark.parametrize("announced", [True, False])
async def test_streamed_mode_rewrite_before_trailers(announced: bool) -> None:
    # STREAMED mode answers each message once, and a trailers answer carries no body. A response that announces
    # trailers is rewritten chunk by chunk, so its bytes all go out (a name split across chunks stays as sent).
    # Without the announcement the rewriter holds a tail that may begin the pattern; trailers then leave no
    # answer to send it in: the loss is counted (and logged), not silent.
    async with serve() as h:
        s = h.open()
        await s.send(request_headers({"x-gateway-model-name-rewrite": "t"}, req_mode=BUFFERED, resp_mode=STREAMED))
        await s.recv()
        await s.send(request_body(BODY, eos=True))
        await s.recv()
        await s.send(
            response_headers(
                200, "text/event-stream", **cast(dict[str, Any], {"trailer": "x-usage"} if announced else {})
            )
        )
        await s.recv()
        out = []
        for chunk in [b'data: {"model":"t","a":1}\n\ndata: {"model":"', b't"}\n\ndata: {"model":"']:
            await s.send(response_body(chunk))
            out.append((await s.recv()).response_body.response.body_mutation.body)
        await s.send(response_trailers())
        assert (await s.recv()).WhichOneof("response") == "response_trailers"
        lost = h.sample("llm_d_epp_extproc_protocol_errors_total", {"kind": "rewrite_bytes_lost_at_trailers"})
        if announced:
            assert out == [b'data: {"model":"m","a":1}\n\ndata: {"model":"', b't"}\n\ndata: {"model":"'] and not lost
        else:  # the split name held, then rewritten; the last tail held again, and stranded by the trailers
            assert out == [b'data: {"model":"m","a":1}\n\ndata: {', b'"model":"m"}\n\ndata: {'] and lost == 1


async def test_request_trailers_end_the_body() -> None:
    async with serve() as h:
        s = h.open()
        await s.send(request_headers(), request_body(BODY[:20]), request_body(BODY[20:]), request_trailers())
        assert (await s.recv()).WhichOneof("response") == "request_headers"
        body, eos = streamed(await s.recv(), "request_body")
        assert body == BODY and not eos  # the trailers end the stream, not the body
        assert (await s.recv()).WhichOneof("response") == "request_trailers"


async def test_buffered_request_trailers_without_a_body_get_one_trailers_answer_with_the_routing() -> None:
    """BUFFERED, request trailers sent, no body: Envoy sends the trailers in place of a body message and waits
    for their answer alone (a body answer is spurious to it: a 500). The routing rides on that answer's
    envoy.lb metadata, since the request headers can no longer change."""
    async with serve() as h:
        s = h.open()
        await s.send(request_headers(path="/passthrough", req_mode=BUFFERED, resp_mode=STREAMED))
        assert (await s.recv()).WhichOneof("response") == "request_headers"
        await s.send(request_trailers())
        r = await s.recv()
        assert r.WhichOneof("response") == "request_trailers"
        assert lb_metadata(r)["x-gateway-destination-endpoint"] in ENDPOINTS
        await s.send(response_headers(204, eos=True))
        assert (await s.recv()).WhichOneof("response") == "response_headers"
        await until(lambda: len(h.director.completions) == 1)


async def test_messages_sent_while_routing_waits_are_answered_after_it_in_order() -> None:
    # The director waits (as flow control or an async producer would): the routing step is
    # continued in a task, and the trailers that arrive meanwhile are answered after its answers.
    async with serve() as h:
        s = h.open()
        await s.send(request_headers({"x-test-delay-ms": "100"}), request_body(BODY, eos=True), request_trailers())
        first = await s.recv()
        assert set_headers(first.request_headers.response)["x-gateway-destination-endpoint"].decode() in ENDPOINTS
        assert streamed(await s.recv(), "request_body") == (BODY, True)
        assert (await s.recv()).WhichOneof("response") == "request_trailers"
        await s.send(response_headers(200, "application/json"), response_body(JSON_RESPONSE, eos=True))
        assert (await s.recv()).WhichOneof("response") == "response_headers"
        assert streamed(await s.recv(), "response_body") == (JSON_RESPONSE, True)
        await until(lambda: len(h.director.completions) == 1)
        assert h.director.inflight == {}


async def test_request_trailers_after_routing_are_answered() -> None:
    async with serve() as h:
        s = h.open()
        await s.route(BODY)
        await s.send(request_trailers())
        assert (await s.recv()).WhichOneof("response") == "request_trailers"


# -- protocol errors -------------------------------------------------------------------------------
async def test_body_before_headers_is_a_500_and_counted() -> None:
    async with serve() as h:
        s = h.open()
        await s.send(request_body(BODY, eos=True))
        status, _, _ = immediate(await s.recv())
        assert status == 500
        await s.recv_eof()
        assert h.sample("llm_d_epp_extproc_protocol_errors_total", {"kind": "request_body_before_headers"}) == 1


async def test_a_response_before_any_request_headers_means_nothing_is_routed_later() -> None:
    # Found by the stream property test: a response body first, then request headers, routed a request
    # the already-completed stream never released.
    async with serve() as h:
        s = h.open()
        await s.send(response_body(b"", eos=True))
        assert streamed(await s.recv(), "response_body") == (b"", True)
        await s.send(request_headers(req_mode=STREAMED))  # too late: the request side is over
        await s.send(response_trailers())
        assert (await s.recv()).WhichOneof("response") == "response_trailers"
        assert h.director.requests == [] and h.director.inflight == {}
        assert h.sample("llm_d_epp_extproc_protocol_errors_total", {"kind": "duplicate_request_headers"}) == 1


async def test_unexpected_messages_are_counted_and_the_stream_survives() -> None:
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

    async with serve() as h:
        s = h.open()
        await s.send(pb.ProcessingRequest())  # no phase at all
        await s.route(BODY)
        await s.send(request_headers())  # duplicate
        await s.send(request_body(b"late", eos=True))  # after the request was answered
        # Response body before response headers: still echoed.
        await s.send(response_body(b"abc"))
        assert streamed(await s.recv(), "response_body") == (b"abc", False)
        await s.send(response_headers(200))
        assert (await s.recv()).WhichOneof("response") == "response_headers"
        await s.send(response_body(b"", eos=True))
        assert streamed(await s.recv(), "response_body") == (b"", True)
        kinds = {
            k: h.sample("llm_d_epp_extproc_protocol_errors_total", {"kind": k})
            for k in (
                "unknown_message",
                "duplicate_request_headers",
                "unexpected_request_body",
                "response_body_before_headers",
                "duplicate_response_headers",
            )
        }
        assert kinds == {
            "unknown_message": 1,
            "duplicate_request_headers": 1,
            "unexpected_request_body": 1,
            "response_body_before_headers": 1,
            "duplicate_response_headers": 1,
        }
        assert len(h.director.completions) == 1


async def test_many_concurrent_streams() -> None:
    async with serve() as h:

        async def one(i: int) -> bytes:
            s = h.open()
            body = json.dumps({"model": "m", "prompt": f"p{i}"}).encode()
            answers = await s.route(body)
            await s.send(response_headers(200), response_body(JSON_RESPONSE, eos=True))
            await s.recv()
            out, _ = streamed(await s.recv(), "response_body")
            await s.close()
            await s.recv_eof()
            assert streamed(answers[1], "request_body")[0] == body
            return out

        outs = await asyncio.gather(*(one(i) for i in range(60)))
        assert all(o == JSON_RESPONSE for o in outs)
        assert len(h.director.completions) == 60 and h.director.inflight == {}
        assert h.sample("llm_d_epp_extproc_streams_inflight") == 0


async def test_streamed_request_mode_routes_on_headers() -> None:
    async with serve() as h:
        s = h.open()
        # STREAMED request bodies are forwarded as they arrive: the route is picked on the
        # headers by the whole pipeline (no prompt to read), and every chunk gets a plain BodyResponse.
        await s.send(request_headers({"content-length": str(len(BODY))}, req_mode=STREAMED, resp_mode=STREAMED))
        first = await s.recv()
        assert set_headers(first.request_headers.response)["x-gateway-destination-endpoint"].decode() in ENDPOINTS
        req = h.director.requests[0]
        assert req.kind is RequestKind.PASSTHROUGH and req.body_size == len(BODY)
        await s.send(request_body(BODY[:10]), request_body(BODY[10:], eos=True))
        for _ in range(2):
            r = await s.recv()
            assert r.WhichOneof("response") == "request_body" and not r.request_body.HasField("response")
        await s.send(response_headers(200), response_body(JSON_RESPONSE, eos=True))
        await s.recv()
        r = await s.recv()
        assert r.WhichOneof("response") == "response_body" and not r.request_body.HasField("response")
        (c,) = h.director.completions
        assert c.response.usage is not None and c.response.usage.total_tokens == 10


async def test_buffered_response_mode_completes_on_the_single_body_message() -> None:
    async with serve() as h:
        s = h.open()
        await s.send(request_headers(req_mode=BUFFERED, resp_mode=BUFFERED))
        await s.recv()
        await s.send(request_body(BODY, eos=True))
        await s.recv()
        await s.send(response_headers(200), response_body(JSON_RESPONSE, eos=True))
        await s.recv()
        r = await s.recv()
        assert r.WhichOneof("response") == "response_body" and not r.response_body.HasField("response")
        (c,) = h.director.completions
        assert c.response.usage is not None and c.response.bytes == len(JSON_RESPONSE)


# -- a path whose parser reads no body: routed on the headers, the body echoed -----------------------
async def test_an_unread_body_is_routed_on_the_headers_and_streamed_through() -> None:
    async with serve() as h:
        s = h.open()
        await s.send(request_headers({"content-length": "30"}, path="/tokenize"))
        first = await s.recv()  # before any body chunk: nothing is buffered
        assert set_headers(first.request_headers.response)["x-gateway-destination-endpoint"].decode() in ENDPOINTS
        req = h.director.requests[0]
        assert req.kind is RequestKind.PASSTHROUGH and req.body == b"" and req.body_size == 30
        for chunk, eos in ((b"a" * 10, False), (b"b" * 20, False), (b"", True)):
            await s.send(request_body(chunk, eos=eos))
            assert streamed(await s.recv(), "request_body") == (chunk, eos)
        await s.send(response_headers(200), response_body(JSON_RESPONSE, eos=True))
        assert (await s.recv()).WhichOneof("response") == "response_headers"
        assert streamed(await s.recv(), "response_body") == (JSON_RESPONSE, True)
        await until(lambda: len(h.director.completions) == 1)
        assert h.director.inflight == {}
        size = h.sample("llm_d_epp_request_size_bytes_sum", UNPARSED)
        assert size == 30


async def test_an_unread_body_is_not_bounded_by_the_buffer_limit() -> None:
    async with serve(settings=Settings(max_body_bytes=16)) as h:
        s = h.open()
        await s.send(request_headers(path="/custom/endpoint"))
        await s.recv()
        chunk = b"x" * 1000
        await s.send(request_body(chunk), request_body(chunk, eos=True))
        assert streamed(await s.recv(), "request_body") == (chunk, False)
        assert streamed(await s.recv(), "request_body") == (chunk, True)


async def test_a_refused_unread_request_is_answered_at_the_headers() -> None:
    async with serve(FakeDirector(list(ENDPOINTS), fail_with=ResourceExhausted("busy"))) as h:
        s = h.open()
        await s.send(request_headers(path="/v1/anything"))  # the body never has to arrive
        first = await s.recv()
        assert first.immediate_response.status.code == 429
        await s.recv_eof()


async def test_body_chunks_that_arrive_while_unread_routing_waits_follow_its_answer() -> None:
    async with serve() as h:
        s = h.open()
        headers = {"x-test-delay-ms": "100"}
        body = (request_body(b"one"), request_body(b"two", eos=True))
        await s.send(request_headers(headers, path="/passthrough"), *body)
        assert (await s.recv()).WhichOneof("response") == "request_headers"
        assert streamed(await s.recv(), "request_body") == (b"one", False)
        assert streamed(await s.recv(), "request_body") == (b"two", True)


# -- response metadata (ResponseMetadataProcessor) ----------------------------------------------------
def cost_of(response) -> dict:  # type: ignore[no-untyped-def]
    return {"envoy.lb": {"x-cost": response.usage.total_tokens if response.usage else -1}}


async def test_the_last_response_answer_carries_the_reported_metadata() -> None:
    async with serve(FakeDirector(list(ENDPOINTS), metadata=cost_of)) as h:
        s = h.open()
        await s.route(BODY)
        half = len(JSON_RESPONSE) // 2
        await s.send(response_headers(200), response_body(JSON_RESPONSE[:half]))
        await s.recv()
        first = await s.recv()
        assert not first.HasField("dynamic_metadata")  # only the last message's answer
        await s.send(response_body(JSON_RESPONSE[half:], eos=True))
        last = await s.recv()
        assert streamed(last, "response_body") == (JSON_RESPONSE[half:], True)
        assert dict(last.dynamic_metadata["envoy.lb"]) == {"x-cost": 10.0}  # usage read before answering
        await until(lambda: len(h.director.completions) == 1)
        assert h.director.completions[0].response.usage.total_tokens == 10  # type: ignore[union-attr]


async def test_a_response_ended_by_trailers_reports_on_the_trailers_answer() -> None:
    async with serve(FakeDirector(list(ENDPOINTS), metadata=cost_of)) as h:
        s = h.open()
        await s.route(BODY)
        await s.send(response_headers(200), response_body(JSON_RESPONSE), response_trailers())
        await s.recv()
        assert not (await s.recv()).HasField("dynamic_metadata")
        trailers = await s.recv()
        assert trailers.WhichOneof("response") == "response_trailers"
        assert dict(trailers.dynamic_metadata["envoy.lb"]) == {"x-cost": 10.0}


async def test_a_response_ended_by_its_headers_reports_on_the_headers_answer() -> None:
    """A 204, a HEAD answer or a gRPC trailers-only error ends on its headers: that answer is the response's last
    and carries the reporters' metadata (it was sent plain)."""
    async with serve(FakeDirector(list(ENDPOINTS), metadata=cost_of)) as h:
        s = h.open()
        await s.route(BODY)
        await s.send(response_headers(204, eos=True))
        r = await s.recv()
        assert r.WhichOneof("response") == "response_headers"
        assert dict(r.dynamic_metadata["envoy.lb"]) == {"x-cost": -1.0}  # no usage in a 204


async def test_without_metadata_reporters_the_last_answer_is_plain() -> None:
    async with serve() as h:
        s = h.open()
        await s.route(BODY)
        await s.send(response_headers(200), response_body(JSON_RESPONSE, eos=True))
        await s.recv()
        assert not (await s.recv()).HasField("dynamic_metadata")


async def test_stream_metrics_when_enabled_and_the_message_limit_flag() -> None:
    async with serve(settings=Settings(grpc_stream_metrics=True)) as h:
        s = h.open()
        await s.route(BODY)
        await s.send(response_headers(200), response_body(JSON_RESPONSE, eos=True))
        await s.recv()
        await s.recv()
        await s.close()
        await s.status()
        await until(lambda: h.sample("llm_d_epp_extproc_streams_total", {"code": "OK"}) == 1)
        assert h.sample("llm_d_epp_extproc_stream_duration_seconds_count") == 1
    async with serve() as h:  # off by default: not even registered
        assert h.metrics.registry.get_sample_value("llm_d_epp_extproc_stream_duration_seconds_count") is None
    async with serve(settings=Settings(grpc_max_recv_msg_size=64)) as h:
        s = h.open()
        await s.send(request_headers())  # already more than 64 bytes: the stream ends there
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await s.recv()
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_error_series_are_capped_like_the_request_series(monkeypatch: pytest.MonkeyPatch) -> None:
    """Model names are client input: refused requests with ever new models must not grow request_error_total
    past the cap request_total has (it grew one series per model)."""
    from llmepp.server import stream

    monkeypatch.setattr(stream, "MAX_LABEL_PAIRS", 3)
    async with serve(FakeDirector(list(ENDPOINTS), fail_with=ResourceExhausted("busy"))) as h:
        for i in range(12):
            s = h.open()
            body = json.dumps({"model": f"m{i}", "prompt": "hi"}).encode()
            await s.send(request_headers(), request_body(body, eos=True))
            assert immediate(await s.recv())[0] == 429
        errors = [
            sample.labels
            for metric in h.metrics.registry.collect()
            if metric.name == "llm_d_epp_request_error"
            for sample in metric.samples
            if sample.name == "llm_d_epp_request_error_total"
        ]
        assert len(errors) == 4, errors  # 3 models + "other"
        other = {**FP, "model_name": "other", "target_model_name": "other", "error_code": "ResourceExhausted"}
        assert h.sample("llm_d_epp_request_error_total", other) == 9


async def test_label_combinations_are_capped_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """Model and fairness id are each client input with a cap of their own, but every combination had its
    request series: 1,000 pairs x 1,000 fairness ids, about 5 GB and 260M samples per scrape at the caps."""
    from llmepp.server import stream

    monkeypatch.setattr(stream, "MAX_LABEL_SETS", 4)
    async with serve(FakeDirector(list(ENDPOINTS), fail_with=ResourceExhausted("busy"))) as h:
        for i in range(9):
            s = h.open()
            body = json.dumps({"model": f"m{i % 3}", "prompt": "hi"}).encode()
            headers = {"x-llm-d-inference-fairness-id": f"tenant{i // 3}"}
            await s.send(request_headers(headers), request_body(body, eos=True))
            assert immediate(await s.recv())[0] == 429
        label_sets = {
            tuple(sorted(sample.labels.items()))
            for metric in h.metrics.registry.collect()
            if metric.name == "llm_d_epp_request_error"
            for sample in metric.samples
            if sample.name == "llm_d_epp_request_error_total"
        }
        assert len(label_sets) == 5, label_sets  # 4 combinations + "other"
        other = {"model_name": "other", "target_model_name": "other", "fairness_id": "other", "priority": "0"}
        assert h.sample("llm_d_epp_request_error_total", {**other, "error_code": "ResourceExhausted"}) == 5


async def test_a_stream_reset_after_its_request_finished_is_counted_ok() -> None:
    # Envoy (1.40) ends every ext_proc stream with a reset, a request answered to its end included: that is a
    # finished request, not a cancelled one.
    async with serve(settings=Settings(grpc_stream_metrics=True)) as h:
        s = h.open()
        await s.route(BODY)
        await s.send(response_headers(200), response_body(JSON_RESPONSE, eos=True))
        await s.recv()
        await s.recv()
        await asyncio.sleep(0.05)  # the completion runs after the last answer
        s.cancel()
        await until(lambda: h.sample("llm_d_epp_extproc_streams_inflight") == 0)
        await asyncio.sleep(0.05)
        assert h.sample("llm_d_epp_extproc_streams_total", {"code": "OK"}) == 1
        assert h.sample("llm_d_epp_extproc_streams_total", {"code": "Canceled"}) == 0
        (c,) = h.director.completions
        assert c.response.cause is TerminationCause.NATURAL
