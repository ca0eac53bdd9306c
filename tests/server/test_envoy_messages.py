"""Hand-encoded ext_proc answers equal what protobuf itself would build."""

from __future__ import annotations

import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from hypothesis import given, settings
from hypothesis import strategies as st

from llmepp.server import envoy

from .client import add_subset, header_map, request_headers


def streamed_pb(field: str, body: bytes, eos: bool) -> bytes:
    sbr = pb.StreamedBodyResponse(body=body, end_of_stream=eos)
    common = pb.CommonResponse(body_mutation=pb.BodyMutation(streamed_response=sbr))
    return pb.ProcessingResponse(**{field: pb.BodyResponse(response=common)}).SerializeToString()


@pytest.mark.parametrize("size", [0, 1, 127, 128, 16383, 16384, 62_000, 2_097_153])
@pytest.mark.parametrize("eos", [False, True])
def test_streamed_bodies_are_byte_identical(size: int, eos: bool) -> None:
    body = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    assert envoy.streamed_response_body(body, eos) == streamed_pb("response_body", body, eos)
    assert envoy.streamed_request_body(body, eos) == streamed_pb("request_body", body, eos)


def test_request_chunks_split_at_the_limit() -> None:
    body = b"a" * 130_001
    chunks = [pb.ProcessingResponse.FromString(c) for c in envoy.streamed_request_chunks(body, 62_000)]
    parts = [c.request_body.response.body_mutation.streamed_response for c in chunks]
    assert [len(p.body) for p in parts] == [62_000, 62_000, 6_001]
    assert [p.end_of_stream for p in parts] == [False, False, True]


headers_st = st.lists(
    st.tuples(st.sampled_from(["x-a", "x-request-id", "x-gateway-destination-endpoint"]), st.text(max_size=20)),
    max_size=4,
)


@settings(max_examples=200, deadline=None)
@given(
    set_headers=headers_st,
    remove=st.lists(st.sampled_from(["x-llm-d-inference-objective", "x-b"]), max_size=2),
    dest=st.text(min_size=1, max_size=30),
    scores=st.none() | st.dictionaries(st.text(min_size=1, max_size=10), st.floats(allow_nan=False), max_size=3),
    on_body=st.booleans(),
    body=st.none() | st.binary(max_size=40),
)
def test_routing_answer_equals_the_protobuf_build(
    set_headers: list[tuple[str, str]],
    remove: list[str],
    dest: str,
    scores: dict[str, float] | None,
    on_body: bool,
    body: bytes | None,
) -> None:
    got = pb.ProcessingResponse.FromString(
        envoy.routing_answer(set_headers, remove, envoy.lb_metadata_bytes(dest, scores), on_body=on_body, body=body)
    )
    common = envoy.routing_common(set_headers, remove, body)
    md = envoy.lb_metadata(dest, scores)
    want = envoy.routing_body_response(common, md) if on_body else envoy.routing_headers_response(common, md)
    assert got == want


def test_serializer_passes_bytes_through() -> None:
    msg = pb.ProcessingResponse(response_headers=pb.HeadersResponse())
    assert envoy.serialize_response(b"\x12\x00") == b"\x12\x00"
    assert envoy.serialize_response(msg) == msg.SerializeToString() == envoy.RESPONSE_HEADERS_CONTINUE


def test_headers_dict_prefers_raw_value() -> None:
    from envoy.config.core.v3 import base_pb2

    hm = header_map({":path": "/x", "a": "é"})
    hm.headers.append(base_pb2.HeaderValue(key="legacy", value="v"))
    assert envoy.headers_dict(pb.HttpHeaders(headers=hm)) == {":path": "/x", "a": "é", "legacy": "v"}


def test_subset_hint_shapes() -> None:
    msg = request_headers()
    assert envoy.subset_hint(msg) is None
    add_subset(msg, ["10.0.0.1:80", "10.0.0.2:80"])
    assert envoy.subset_hint(msg) == ["10.0.0.1:80", "10.0.0.2:80"]
    add_subset(msg, [])
    assert envoy.subset_hint(msg) == []
    msg.metadata_context.filter_metadata["envoy.lb.subset_hint"].fields[envoy.SUBSET_KEY].string_value = "a:1, b:2"
    assert envoy.subset_hint(msg) == ["a:1", "b:2"]
