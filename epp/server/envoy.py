"""Envoy ext_proc messages: constants, prebuilt answers and builders.

Answers travel as either a `ProcessingResponse` or its already-serialized bytes: the gRPC
method is registered with `serialize_response`, which passes bytes through. Answers that
never change are serialized once at import; streamed body chunks (the per-chunk hot path)
are encoded by hand — one copy of the chunk, no protobuf objects.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeAlias

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2

# -- names shared with Envoy's config and the reference EPP --------------------------------
DESTINATION_HEADER = "x-gateway-destination-endpoint"
DESTINATION_SCORES_KEY = "x-gateway-destination-endpoint-scores"
LB_NAMESPACE = "envoy.lb"
SUBSET_NAMESPACE = "envoy.lb.subset_hint"
SUBSET_KEY = "x-gateway-destination-endpoint-subset"
REQUEST_ID_HEADER = "x-request-id"

# envoy.extensions.filters.http.ext_proc.v3.ProcessingMode.BodySendMode
MODE_NONE = 0
MODE_STREAMED = 1
MODE_BUFFERED = 2
MODE_BUFFERED_PARTIAL = 3
MODE_FULL_DUPLEX_STREAMED = 4

SERVICE_NAME = "envoy.service.ext_proc.v3.ExternalProcessor"

# ProcessingResponse oneof field tags (field << 3 | wire type 2).
_TAG_REQUEST_BODY = b"\x1a"  # field 3
_TAG_RESPONSE_BODY = b"\x22"  # field 4

# A ProcessingResponse, or its serialized bytes (the protobuf stubs are untyped: Any).
Answer: TypeAlias = Any


def serialize_response(msg: Answer) -> bytes:
    """gRPC response serializer: prebuilt bytes pass through untouched."""
    if msg.__class__ is bytes:
        return msg
    return msg.SerializeToString()


# -- prebuilt answers ----------------------------------------------------------------------
def _ser(msg: pb.ProcessingResponse) -> bytes:
    return msg.SerializeToString()


REQUEST_HEADERS_CONTINUE = _ser(pb.ProcessingResponse(request_headers=pb.HeadersResponse()))
RESPONSE_HEADERS_CONTINUE = _ser(pb.ProcessingResponse(response_headers=pb.HeadersResponse()))
REQUEST_BODY_CONTINUE = _ser(pb.ProcessingResponse(request_body=pb.BodyResponse()))
RESPONSE_BODY_CONTINUE = _ser(pb.ProcessingResponse(response_body=pb.BodyResponse()))
REQUEST_TRAILERS_CONTINUE = _ser(pb.ProcessingResponse(request_trailers=pb.TrailersResponse()))
RESPONSE_TRAILERS_CONTINUE = _ser(pb.ProcessingResponse(response_trailers=pb.TrailersResponse()))


# -- streamed body chunks (hand-encoded) ---------------------------------------------------
_VARINT1 = tuple(bytes((i,)) for i in range(128))


def _varint(n: int) -> bytes:
    if n < 0x80:
        return _VARINT1[n]
    if n < 0x4000:
        return bytes((n & 0x7F | 0x80, n >> 7))
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _streamed(tag: bytes, chunk: bytes | memoryview, end_of_stream: bool) -> bytes:
    """ProcessingResponse{<tag>: BodyResponse{response: CommonResponse{body_mutation:
    BodyMutation{streamed_response: StreamedBodyResponse{body, end_of_stream}}}}}.

    Byte-identical to protobuf's own serialization (proto3 omits empty/false fields).
    """
    n = len(chunk)
    body_key = b"\x0a" + _varint(n) if n else b""
    eos = b"\x10\x01" if end_of_stream else b""
    sbr = len(body_key) + n + len(eos)  # StreamedBodyResponse
    sbr_h = _varint(sbr)
    bm = 1 + len(sbr_h) + sbr  # BodyMutation.streamed_response = field 3
    bm_h = _varint(bm)
    cr = 1 + len(bm_h) + bm  # CommonResponse.body_mutation = field 3
    cr_h = _varint(cr)
    br = 1 + len(cr_h) + cr  # BodyResponse.response = field 1
    return b"".join((tag, _varint(br), b"\x0a", cr_h, b"\x1a", bm_h, b"\x1a", sbr_h, body_key, chunk, eos))


def streamed_request_body(chunk: bytes | memoryview, end_of_stream: bool) -> bytes:
    return _streamed(_TAG_REQUEST_BODY, chunk, end_of_stream)


def streamed_response_body(chunk: bytes, end_of_stream: bool) -> bytes:
    return _streamed(_TAG_RESPONSE_BODY, chunk, end_of_stream)


def streamed_request_chunks(body: bytes, chunk_size: int) -> list[bytes]:
    """The request body as streamed_response answers of ≤ chunk_size bytes, EoS on the last."""
    n = len(body)
    if n <= chunk_size:
        return [streamed_request_body(body, True)]
    view = memoryview(body)
    out = []
    for start in range(0, n, chunk_size):
        end = start + chunk_size
        out.append(streamed_request_body(view[start:end], end >= n))
    return out


# -- the routing answer (hand-encoded: built once per request, on the request path) --------------
_KEY_LB = b"envoy.lb"
_KEY_DEST = DESTINATION_HEADER.encode()
_KEY_SCORES = DESTINATION_SCORES_KEY.encode()
_TAG_REQUEST_HEADERS = b"\x0a"  # ProcessingResponse.request_headers = field 1
_TAG_DYNAMIC_METADATA = b"\x42"  # ProcessingResponse.dynamic_metadata = field 8
_CLEAR_ROUTE_CACHE = b"\x28\x01"  # CommonResponse.clear_route_cache = field 5, true


def _ld(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field."""
    return tag + _varint(len(payload)) + payload


def _header_option_bytes(key: str, value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    hv = _ld(b"\x0a", key.encode()) + (_ld(b"\x1a", raw) if raw else b"")  # key=1, raw_value=3
    return _ld(b"\x0a", hv)  # HeaderValueOption.header = field 1


def _struct_entry(key: bytes, value: bytes) -> bytes:
    """One Struct.fields map entry (key=1, value=2)."""
    return _ld(b"\x0a", _ld(b"\x0a", key) + _ld(b"\x12", value))


_MD_CACHE: dict[str, bytes] = {}
_DEST_OPTION_CACHE: dict[str, bytes] = {}
_CACHE_MAX = 4096  # distinct destinations remembered (a pool is far smaller)


def lb_metadata_bytes(destination: str, scores: Mapping[str, float] | None = None) -> bytes:
    """Serialized `lb_metadata(...)` Struct (cached per destination when there are no scores)."""
    if not scores:
        md = _MD_CACHE.get(destination)
        if md is None:
            if len(_MD_CACHE) >= _CACHE_MAX:
                _MD_CACHE.clear()
            md = _MD_CACHE[destination] = _lb_metadata_bytes(destination, None)
        return md
    return _lb_metadata_bytes(destination, scores)


def _lb_metadata_bytes(destination: str, scores: Mapping[str, float] | None) -> bytes:
    inner = _struct_entry(_KEY_DEST, _ld(b"\x1a", destination.encode()))  # Value.string_value = 3
    if scores:
        s = b"".join(
            _struct_entry(hp.encode(), b"\x11" + struct.pack("<d", score))  # Value.number_value = 2
            for hp, score in scores.items()
        )
        inner += _struct_entry(_KEY_SCORES, _ld(b"\x2a", s))  # Value.struct_value = 5
    return _struct_entry(_KEY_LB, _ld(b"\x2a", inner))


def _set_header_field(key: str, value: str | bytes) -> bytes:
    """HeaderMutation.set_headers entry; the destination's bytes are cached."""
    if key == DESTINATION_HEADER and isinstance(value, str):
        field = _DEST_OPTION_CACHE.get(value)
        if field is None:
            if len(_DEST_OPTION_CACHE) >= _CACHE_MAX:
                _DEST_OPTION_CACHE.clear()
            field = _DEST_OPTION_CACHE[value] = _ld(b"\x0a", _header_option_bytes(key, value))
        return field
    return _ld(b"\x0a", _header_option_bytes(key, value))


def routing_answer(
    set_headers: Iterable[tuple[str, str | bytes]],
    remove: Sequence[str],
    metadata: bytes,
    *,
    on_body: bool = False,
    body: bytes | None = None,
) -> bytes:
    """The routing ProcessingResponse, serialized: on request_headers (FULL_DUPLEX_STREAMED)
    or on request_body (BUFFERED, optionally replacing the body).

    Equal to `routing_headers_response(routing_common(...), lb_metadata(...))` (see tests).
    """
    mutation = b"".join([_set_header_field(k, v) for k, v in set_headers])
    if remove:
        mutation += b"".join([_ld(b"\x12", name.encode()) for name in remove])
    common = _ld(b"\x12", mutation)  # CommonResponse.header_mutation = field 2
    if body is not None:
        common += _ld(b"\x1a", _ld(b"\x0a", body))  # body_mutation{body} (a oneof: always present)
    common += _CLEAR_ROUTE_CACHE
    phase = _ld(b"\x0a", common)  # HeadersResponse / BodyResponse .response = field 1
    return _ld(_TAG_REQUEST_BODY if on_body else _TAG_REQUEST_HEADERS, phase) + _ld(_TAG_DYNAMIC_METADATA, metadata)


def trailers_routing_answer(destination: str, scores: Mapping[str, float] | None) -> bytes:
    """The request trailers' answer carrying the envoy.lb routing metadata (a BUFFERED request with no body)."""
    return REQUEST_TRAILERS_CONTINUE + _ld(_TAG_DYNAMIC_METADATA, lb_metadata_bytes(destination, scores))


# -- builders --------------------------------------------------------------------------------
def header_option(key: str, value: str | bytes) -> base_pb2.HeaderValueOption:
    """Set (overwrite) a header. Envoy 1.40 reads only `raw_value`; `append` is left unset
    (false), so a client-sent value is replaced, never kept first."""
    raw = value.encode() if isinstance(value, str) else value
    return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=key, raw_value=raw))


def header_mutation(
    set_headers: Iterable[tuple[str, str | bytes]] = (), remove: Sequence[str] = ()
) -> pb.HeaderMutation:
    return pb.HeaderMutation(set_headers=[header_option(k, v) for k, v in set_headers], remove_headers=list(remove))


def lb_metadata(destination: str, scores: Mapping[str, float] | None = None) -> struct_pb2.Struct:
    """dynamic_metadata {"envoy.lb": {"x-gateway-destination-endpoint": ..., [scores]}}."""
    md = struct_pb2.Struct()
    lb = md.fields[LB_NAMESPACE].struct_value
    lb.fields[DESTINATION_HEADER].string_value = destination
    if scores:
        s = lb.fields[DESTINATION_SCORES_KEY].struct_value
        for hostport, score in scores.items():
            s.fields[hostport].number_value = score
    return md


def routing_common(
    set_headers: Iterable[tuple[str, str | bytes]], remove: Sequence[str], body: bytes | None = None
) -> pb.CommonResponse:
    """The routing mutation. clear_route_cache is honoured only next to a header_mutation."""
    common = pb.CommonResponse(header_mutation=header_mutation(set_headers, remove), clear_route_cache=True)
    if body is not None:
        common.body_mutation.body = body
    return common


def routing_headers_response(common: pb.CommonResponse, metadata: struct_pb2.Struct) -> pb.ProcessingResponse:
    return pb.ProcessingResponse(request_headers=pb.HeadersResponse(response=common), dynamic_metadata=metadata)


def routing_body_response(common: pb.CommonResponse, metadata: struct_pb2.Struct) -> pb.ProcessingResponse:
    """BUFFERED request mode: the routing mutation rides on the single body answer."""
    return pb.ProcessingResponse(request_body=pb.BodyResponse(response=common), dynamic_metadata=metadata)


def response_headers_response(
    set_headers: Iterable[tuple[str, str | bytes]], remove: Sequence[str] = ()
) -> pb.ProcessingResponse:
    return pb.ProcessingResponse(
        response_headers=pb.HeadersResponse(
            response=pb.CommonResponse(header_mutation=header_mutation(set_headers, remove))
        )
    )


def with_dynamic_metadata(answer: Answer, metadata: Mapping[str, Mapping[str, Any]]) -> bytes:
    """`answer` with `dynamic_metadata` (ProcessingResponse field 8) set to {namespace: {key: value}}:
    a serialized message followed by another field is the message with both."""
    md = struct_pb2.Struct()
    md.update(metadata)
    return serialize_response(answer) + _ld(b"\x42", md.SerializeToString())


def replaced_response_body(body: bytes) -> pb.ProcessingResponse:
    """STREAMED / BUFFERED response modes: replace this chunk's bytes."""
    return pb.ProcessingResponse(
        response_body=pb.BodyResponse(response=pb.CommonResponse(body_mutation=pb.BodyMutation(body=body)))
    )


def immediate_response(
    status: int,
    body: bytes,
    headers: Iterable[tuple[str, str | bytes]] = (),
    details: str = "",
    *,
    grpc_status: int | None = None,
) -> pb.ProcessingResponse:
    answer = pb.ImmediateResponse(
        status=http_status_pb2.HttpStatus(code=status), headers=header_mutation(headers), body=body, details=details
    )
    if grpc_status is not None:
        answer.grpc_status.status = grpc_status
    return pb.ProcessingResponse(immediate_response=answer)


# -- reading -----------------------------------------------------------------------------------
def headers_dict(headers: pb.HttpHeaders) -> dict[str, str]:
    """Header map → {name: value} (see header_map_dict). Envoy sends lower-case names and values in raw_value."""
    return header_map_dict(headers.headers)


def header_map_dict(header_map: base_pb2.HeaderMap) -> dict[str, str]:
    """A HeaderMap (headers, or trailers) → {name: value}.

    - Names are taken as Envoy sends them: lower case (HTTP/2 and Envoy's header maps; lower-casing each
      again would cost ~9% of this function for nothing).
    - A value is UTF-8; one that is not (obs-text, RFC 9110 §5.5) is read as ISO-8859-1, so distinct
      bytes stay distinct strings (`replace` made every such value the same) and the text still
      encodes as UTF-8 (metric labels, logs, JSON, header mutations).
    - A repeated field (Envoy sends one entry per field line of a header it does not coalesce itself)
      is its values joined in order, ", " between them (RFC 9110 §5.3), "; " for cookie (RFC 9113
      §8.2.3, RFC 6265 §5.4); empty values are left out (RFC 9110 §5.6.1). The reference's Go map
      keeps the last one only, so a cookie or a content-coding on an earlier line was lost.
    """
    headers = header_map.headers
    out: dict[str, str] = {}
    for h in headers:
        raw = h.raw_value  # one attribute read per field: upb access is not free
        if raw:
            try:
                out[h.key] = raw.decode()
            except UnicodeDecodeError:
                out[h.key] = raw.decode("latin-1")
        else:
            out[h.key] = h.value
    if len(out) != len(headers):  # a name seen twice (rare): its values joined, in place
        _join_repeated(headers, out)
    return out


_FIELD_SEPARATORS = {"cookie": "; "}


def _field_text(h: base_pb2.HeaderValue) -> str:
    raw = h.raw_value
    if not raw:
        return str(h.value)
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _join_repeated(headers: Iterable[base_pb2.HeaderValue], out: dict[str, str]) -> None:
    """Sets each repeated name of `out` to all its values joined: linear in the map, however many repeats.

    `out` already holds every name at its first position (a later assignment keeps the place).
    """
    fields: dict[str, list[base_pb2.HeaderValue]] = {}
    for h in headers:
        key = h.key
        same = fields.get(key)
        if same is None:
            fields[key] = [h]
        else:
            same.append(h)
    for key, same in fields.items():
        if len(same) > 1:
            values = [_field_text(h) for h in same]
            out[key] = _FIELD_SEPARATORS.get(key, ", ").join([v for v in values if v])


def subset_hint(request: pb.ProcessingRequest) -> list[str] | None:
    """filter_metadata["envoy.lb.subset_hint"]["x-gateway-destination-endpoint-subset"].

    None when absent (the whole pool); an empty list means no candidates.
    """
    if not request.HasField("metadata_context"):
        return None
    fm = request.metadata_context.filter_metadata
    if SUBSET_NAMESPACE not in fm:
        return None
    fields = fm[SUBSET_NAMESPACE].fields
    if SUBSET_KEY not in fields:
        return None
    value = fields[SUBSET_KEY]
    if value.HasField("list_value"):
        return [v.string_value for v in value.list_value.values if v.string_value]
    if value.HasField("string_value"):
        # Tolerate a comma-separated string.
        return [s.strip() for s in value.string_value.split(",") if s.strip()]
    return []
