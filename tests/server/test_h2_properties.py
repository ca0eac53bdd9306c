"""The HTTP/2 transport against any frame sequence a peer could send (property-based, over a real socket):
no connection error escapes as an exception, every routed request is released when the connection
goes, and the server keeps serving well-formed connections."""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmepp.observability.metrics import EppMetrics
from llmepp.server.extproc import ExtProcServicer
from llmepp.server.h2 import (
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    PING,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    H2ExtProcServer,
    create_h2_server,
)
from llmepp.settings import Settings
from llmepp.testing.fakes import FakeDirector

from .client import ENDPOINTS, request_body, request_headers, response_body, response_headers
from .test_h2 import RawClient, frame, grpc_msg, open_stream

PRIORITY, PUSH_PROMISE, CONTINUATION, UNKNOWN = 2, 5, 9, 0x20
BODY = b'{"model": "m", "prompt": "hello"}'

grpc_payloads = st.sampled_from(
    [
        grpc_msg(request_headers()),
        grpc_msg(request_body(BODY, eos=True)),
        grpc_msg(response_headers(200)),
        grpc_msg(response_body(b"{}", eos=True)),
        grpc_msg(request_body(BODY, eos=True))[:7],  # a message cut short
        b"\x01\x00\x00\x00\x01x",  # a compressed message
        b"\x00\xff\xff\xff\xff",  # an impossible length
    ]
)
frames = st.one_of(
    st.builds(lambda sid, flags, p: frame(DATA, flags, sid, p), st.sampled_from([1, 3, 0, 2]),
              st.sampled_from([0, END_STREAM, 0x08]), grpc_payloads),
    st.builds(lambda sid, flags: frame(HEADERS, flags, sid, b"\x83\x86"), st.sampled_from([1, 3, 5, 0, 2]),
              st.sampled_from([END_HEADERS, END_HEADERS | END_STREAM, 0, 0x20 | END_HEADERS])),
    st.builds(lambda kind, flags, sid, p: frame(kind, flags, sid, p),
              st.sampled_from([RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, PRIORITY, PUSH_PROMISE,
                               CONTINUATION, UNKNOWN]),
              st.integers(0, 255), st.sampled_from([0, 1, 3, 7]), st.binary(max_size=16)),
    st.builds(lambda ident, value: frame(SETTINGS, 0, 0, struct.pack(">HI", ident, value)),
              st.integers(1, 6), st.sampled_from([0, 1, 16383, 16384, 65535, 2**24, 2**31, 2**32 - 1])),
    st.builds(lambda sid, inc: frame(WINDOW_UPDATE, 0, sid, struct.pack(">I", inc)),
              st.sampled_from([0, 1]), st.sampled_from([0, 1, 2**31 - 1])),
    st.binary(min_size=1, max_size=12),  # bytes that are not a frame boundary at all
)  # fmt: skip


class Env:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.director = FakeDirector(list(ENDPOINTS))
        settings_ = Settings(max_body_bytes=4096)
        self.server: H2ExtProcServer = create_h2_server(
            ExtProcServicer(self.director, EppMetrics(), settings_), settings_, address="127.0.0.1:0"
        )
        self.loop.run_until_complete(self.server.start())

    def close(self) -> None:
        self.loop.run_until_complete(self.server.stop(None))
        self.loop.close()


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    e = Env()
    yield e
    e.close()


async def _exchange(port: int, data: bytes) -> None:
    client = await RawClient.connect(port)
    client.send(data)
    try:
        while True:  # read what the server answers until it closes or goes quiet
            await asyncio.wait_for(client.reader.read(65536), 0.05)
            if client.reader.at_eof():
                break
    except (TimeoutError, ConnectionError):
        pass
    client.close()


async def _released(director: FakeDirector) -> bool:
    for _ in range(100):
        if not director.inflight:
            return True
        await asyncio.sleep(0.01)
    return False


async def _serves(port: int) -> bool:
    client = await RawClient.connect(port)
    client.send(open_stream(1, request_headers(), request_body(BODY, eos=True)))
    _, _, sid, _ = await client.until(DATA, 1)
    routed = bool(client.messages(sid))
    client.send(frame(RST_STREAM, 0, 1, b"\x00\x00\x00\x08"))
    client.close()
    return routed


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(frames, max_size=10))
def test_any_frames_leave_no_exception_and_no_request_held(
    env: Env, caplog: pytest.LogCaptureFixture, frames_sent: list[bytes]
) -> None:
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="llmepp.server.h2"):
        env.loop.run_until_complete(_exchange(env.server.port, b"".join(frames_sent)))
        assert env.loop.run_until_complete(_released(env.director)), env.director.inflight
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert env.loop.run_until_complete(_serves(env.server.port))
    assert env.loop.run_until_complete(_released(env.director))
