"""Reading Envoy's HeaderMap: repeated fields, non-UTF-8 values, huge maps."""

from __future__ import annotations

import time
from collections.abc import Sequence

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from hypothesis import given, settings
from hypothesis import strategies as st

from llmepp.plugins.producers.session_id import SessionIdProducer
from llmepp.request import parsers
from llmepp.server import envoy


def raw_map(fields: Sequence[tuple[str, bytes]]) -> base_pb2.HeaderMap:
    """As Envoy sends it: one HeaderValue per field line, the value in raw_value, from the wire."""
    hm = base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v) for k, v in fields])
    return base_pb2.HeaderMap.FromString(hm.SerializeToString())


# -- non-UTF-8 values ------------------------------------------------------------------------
def test_distinct_non_utf8_values_stay_distinct() -> None:
    a = envoy.header_map_dict(raw_map([("x-session-id", b"caf\xe9")]))["x-session-id"]
    b = envoy.header_map_dict(raw_map([("x-session-id", b"caf\xe8")]))["x-session-id"]
    assert a != b
    assert (a, b) == ("café", "cafè")  # obs-text read as ISO-8859-1 (RFC 9110 §5.5)


def test_utf8_values_decode_as_utf8() -> None:
    got = envoy.header_map_dict(raw_map([("a", "é€".encode()), ("b", b"plain")]))
    assert got == {"a": "é€", "b": "plain"}


def test_non_utf8_values_are_valid_text() -> None:
    """A value goes on to metric labels, logs, JSON and header mutations: it must encode as UTF-8."""
    got = envoy.header_map_dict(raw_map([("x-llm-d-inference-fairness-id", bytes(range(0x80, 0x100)))]))
    value = got["x-llm-d-inference-fairness-id"]
    assert value.encode("utf-8").decode("utf-8") == value
    assert value.encode("latin-1") == bytes(range(0x80, 0x100))  # nothing lost


@settings(max_examples=300, deadline=None)
@given(a=st.binary(min_size=1, max_size=12), b=st.binary(min_size=1, max_size=12))
def test_non_utf8_decoding_is_injective(a: bytes, b: bytes) -> None:
    def read(v: bytes) -> str:
        return envoy.header_map_dict(raw_map([("h", v)]))["h"]

    def utf8(v: bytes) -> bool:
        try:
            v.decode("utf-8")
        except UnicodeDecodeError:
            return False
        return True

    if utf8(a):
        assert read(a) == a.decode("utf-8")
    if a != b and utf8(a) == utf8(b):
        assert read(a) != read(b)


# -- repeated fields ---------------------------------------------------------------------------
def test_repeated_fields_join_in_order_with_comma_space() -> None:
    got = envoy.header_map_dict(
        raw_map([("x-session-id", b"s1"), (":path", b"/v1/completions"), ("accept", b"a/b"), ("x-session-id", b"s2")])
    )
    assert got["x-session-id"] == "s1, s2"
    assert got[":path"] == "/v1/completions"
    assert list(got) == ["x-session-id", ":path", "accept"]  # first occurrence keeps its place


def test_repeated_content_encoding_keeps_every_coding() -> None:
    got = envoy.header_map_dict(raw_map([("content-encoding", b"gzip"), ("content-encoding", b"identity")]))
    assert got["content-encoding"] == "gzip, identity"


def test_repeated_cookie_lines_join_with_semicolon() -> None:
    got = envoy.header_map_dict(raw_map([("cookie", b"a=1"), ("cookie", b"session=xyz; b=2"), ("cookie", b"c=3")]))
    assert got["cookie"] == "a=1; session=xyz; b=2; c=3"


def test_empty_repeated_values_are_skipped() -> None:
    """RFC 9110 §5.6.1: empty list elements are ignored."""
    got = envoy.header_map_dict(raw_map([("x-session-id", b""), ("x-session-id", b"s1"), ("x-a", b""), ("x-a", b"")]))
    assert got == {"x-session-id": "s1", "x-a": ""}


def test_repeated_fields_in_the_legacy_value_field() -> None:
    hm = base_pb2.HeaderMap(
        headers=[base_pb2.HeaderValue(key="x-a", value="1"), base_pb2.HeaderValue(key="x-a", raw_value=b"2")]
    )
    assert envoy.headers_dict(pb.HttpHeaders(headers=hm)) == {"x-a": "1, 2"}


# -- names -----------------------------------------------------------------------------------------
def test_unique_lower_case_map_is_read_as_is() -> None:
    fields = [(":path", b"/v1/chat/completions"), ("content-type", b"application/json"), ("x-request-id", b"r1")]
    assert envoy.header_map_dict(raw_map(fields)) == {k: v.decode() for k, v in fields}


# -- huge maps -------------------------------------------------------------------------------------
def test_huge_map_with_many_repeats_is_linear() -> None:
    n = 50_000
    fields = [(f"x-h{i}", b"v") for i in range(n)] + [("cookie", b"k%d=%s" % (i, b"v" * 300)) for i in range(n)]
    hm = raw_map(fields)
    t0 = time.perf_counter()
    got = envoy.header_map_dict(hm)
    elapsed = time.perf_counter() - t0
    assert len(got) == n + 1
    assert got["cookie"].count("; ") == n - 1
    assert got["cookie"].startswith("k0=v") and got["cookie"].endswith("v" * 300)
    assert elapsed < 2.0  # ~0.15 s; a join copying the value per repeat took ~50 s here


# -- what the readers see --------------------------------------------------------------------------
def test_session_cookie_on_an_earlier_cookie_line_is_found() -> None:
    hm = raw_map([(":path", b"/v1/completions"), ("cookie", b"sid=abc; theme=dark"), ("cookie", b"other=1")])
    req = parsers.headers_request(envoy.header_map_dict(hm), request_id="r1")
    producer = SessionIdProducer("s", SessionIdProducer.Params(cookie_name="sid"))
    producer.produce(req, [])
    assert req.data[producer.key] == "abc"


def test_latin1_session_ids_are_distinct_sessions() -> None:
    producer = SessionIdProducer("s", SessionIdProducer.Params())
    ids = []
    for raw in (b"Jos\xe9", b"Jos\xe8", b"Jos\xea"):
        req = parsers.headers_request(envoy.header_map_dict(raw_map([("x-session-id", raw)])), request_id="r")
        producer.produce(req, [])
        ids.append(req.data[producer.key])
    assert len(set(ids)) == 3
