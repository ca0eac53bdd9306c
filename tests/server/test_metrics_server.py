"""/metrics: the bearer-token check (TokenReview + SubjectAccessReview, cached), the server (gzip, HTTPS,
client certificates), the flags and their start-up errors. The check against a real API server and the
deploy/ RBAC: tests/k8s/test_manifests.py."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import logging
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from helpers import FILE_CONFIG, write_cert_pair
from prometheus_client import CollectorRegistry, Counter

from llmepp.app import App
from llmepp.cli import settings_from_args
from llmepp.framework.plugin import ConfigError
from llmepp.k8s.client import KubeError
from llmepp.observability import metrics_server
from llmepp.observability.metrics_server import (
    ALLOW_TTL,
    DENY_TTL,
    MetricsAuth,
    MetricsServer,
    accepts_gzip,
    metrics_ssl_context,
)
from llmepp.server.tls import CERT_FILE, KEY_FILE
from llmepp.settings import Settings
from llmepp.testing.ports import free_port


class FakeApi:
    """Answers TokenReview / SubjectAccessReview like an API server would (pure logic, no sockets)."""

    def __init__(self, users: dict[str, str], readers: set[str]) -> None:
        self.users = users  # token → username
        self.readers = readers  # usernames allowed to get /metrics
        self.calls: list[str] = []
        self.fail = False

    async def request(self, method: str, path: str, *, body: Any = None, **_: Any) -> bytes:
        self.calls.append(path.rsplit("/", 1)[-1])
        if self.fail:
            raise KubeError(500, "InternalError")
        spec = body["spec"]
        if path.endswith("tokenreviews"):
            user = self.users.get(spec["token"])
            status = {"authenticated": True, "user": {"username": user, "groups": ["g"]}} if user else {}
        else:
            assert spec["nonResourceAttributes"] == {"path": "/metrics", "verb": "get"} and spec["groups"] == ["g"]
            status = {"allowed": spec["user"] in self.readers}
        return json.dumps({"status": status}).encode()


def auth(api: FakeApi | None, now: list[float]) -> MetricsAuth:
    return MetricsAuth(lambda: api, clock=lambda: now[0])  # type: ignore[arg-type, return-value]


async def test_token_review_then_access_review_cached_per_token() -> None:
    api, now = FakeApi({"t-prom": "prometheus", "t-bob": "bob"}, {"prometheus"}), [0.0]
    a = auth(api, now)
    assert (await a.check(None, "/metrics"))[0] == 401
    assert (await a.check("Basic dXNlcjpwdw==", "/metrics"))[0] == 401
    assert (await a.check("Bearer ", "/metrics"))[0] == 401
    assert api.calls == []  # no token, no API call
    assert await a.check("Bearer t-prom", "/metrics") == (200, "")
    assert api.calls == ["tokenreviews", "subjectaccessreviews"]
    status, message = await a.check("Bearer t-bob", "/metrics")
    assert status == 403 and "'bob' may not get /metrics" in message
    status, message = await a.check("Bearer stolen", "/metrics")
    assert status == 401 and "not accepted" in message
    calls = len(api.calls)
    for token, expected in (("t-prom", 200), ("t-bob", 403), ("stolen", 401)):
        assert (await a.check(f"bearer {token}", "/metrics"))[0] == expected
    assert len(api.calls) == calls  # all three cached
    # Denials are re-checked sooner than grants: RBAC changes take effect within DENY_TTL.
    api.readers.add("bob")
    now[0] = DENY_TTL + 1
    assert (await a.check("Bearer t-bob", "/metrics"))[0] == 200
    assert len(api.calls) == calls + 2
    now[0] = ALLOW_TTL + 1
    api.readers.clear()
    assert (await a.check("Bearer t-prom", "/metrics"))[0] == 403


async def test_an_unreachable_api_is_503_and_not_cached() -> None:
    api, now = FakeApi({"t": "prometheus"}, {"prometheus"}), [0.0]
    a = auth(api, now)
    api.fail = True
    status, message = await a.check("Bearer t", "/metrics")
    assert status == 503 and "did not answer" in message
    api.fail = False
    assert (await a.check("Bearer t", "/metrics"))[0] == 200
    status, message = await auth(None, now).check("Bearer t", "/metrics")
    assert status == 503 and "not connected" in message


class BrokenApi:
    """An API server that drops the connection, or answers 2xx with something that is not a review."""

    def __init__(self, error: BaseException | None = None, body: bytes = b"") -> None:
        self.error, self.body = error, body

    async def request(self, method: str, path: str, **_: Any) -> bytes:
        if self.error is not None:
            raise self.error
        return self.body


@pytest.mark.parametrize(
    "api",
    [
        BrokenApi(aiohttp.ServerDisconnectedError()),  # the API server restarted mid-call
        BrokenApi(aiohttp.ClientPayloadError("truncated")),
        BrokenApi(body=b"null"),
        BrokenApi(body=b'{"status": "yes"}'),
        BrokenApi(body=b'{"status": {"authenticated": true, "user": "bob"}}'),
    ],
)
async def test_an_api_failure_of_any_kind_is_503_not_an_exception(api: BrokenApi) -> None:
    a = MetricsAuth(lambda: api)  # type: ignore[arg-type, return-value]
    status, message = await a.check("Bearer t", "/metrics")
    assert status == 503 and "did not answer" in message
    assert not a._cache  # not a decision: the next scrape asks again


async def test_a_token_that_is_not_ascii_is_401_not_a_server_error() -> None:
    """Header bytes that are not UTF-8 reach the handler as surrogates: a 401, never a 500 and a traceback."""
    api = FakeApi({"t": "prometheus"}, {"prometheus"})
    a = MetricsAuth(lambda: api)  # type: ignore[arg-type, return-value]
    for token in ("\udcff\udcfe", "t\u00e9"):
        status, message = await a.check(f"Bearer {token}", "/metrics")
        assert status == 401 and "bearer token" in message
    assert api.calls == []
    server = MetricsServer(_registry(), auth=a)
    async with serving(server) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\nConnection: close\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 401 "), answer


async def test_malformed_requests_are_one_warning_a_minute_not_an_error_with_a_traceback_each(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """aiohttp logged every request it could not parse at ERROR with a traceback: a client's error, and a broken
    client or a scanner on the /metrics port flooded the EPP's log with them."""
    caplog.set_level(logging.DEBUG)
    server = MetricsServer(_registry())
    async with serving(server) as port:
        for _ in range(5):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
            answer = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            assert answer.startswith(b"HTTP/1.0 400 "), answer
        status, _, _ = await _get(f"http://127.0.0.1:{port}/metrics")  # the server is fine
        assert status == 200
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [(r.levelname, bool(r.exc_info)) for r in loud] == [("WARNING", False)], [r.getMessage() for r in loud]
    message = loud[0].getMessage()
    assert "127.0.0.1" in message and "malformed HTTP request" in message and "Bad Header" in message, message


@contextlib.asynccontextmanager
async def serving(server: MetricsServer) -> AsyncIterator[int]:
    """`server` listening on a free loopback port (yielded) until the block ends."""
    port = free_port()
    await server.start("127.0.0.1", port)
    try:
        yield port
    finally:
        await server.aclose()


async def _get(url: str, headers: dict[str, str] | None = None, ssl_ctx: Any = None) -> tuple[int, dict, bytes]:
    headers = {"Accept-Encoding": "identity", **(headers or {})}  # aiohttp asks for gzip by default
    async with aiohttp.ClientSession(auto_decompress=False) as http, http.get(url, headers=headers, ssl=ssl_ctx) as r:
        return r.status, dict(r.headers), await r.read()


OPENMETRICS = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"


def _registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    Counter("llm_d_epp_test", "a test counter", registry=registry).inc(3)
    return registry


async def test_server_renders_gzips_and_refuses_without_a_token() -> None:
    api = FakeApi({"t": "prometheus"}, {"prometheus"})
    server = MetricsServer(_registry(), auth=MetricsAuth(lambda: api))  # type: ignore[arg-type, return-value]
    async with serving(server) as port:
        url = f"http://127.0.0.1:{port}/metrics"
        status, headers, body = await _get(url)
        assert status == 401 and headers["Content-Type"].startswith("application/json")
        assert "bearer token" in json.loads(body)["error"]
        status, headers, body = await _get(url, {"Authorization": "Bearer t"})
        assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
        assert b"llm_d_epp_test_total 3.0" in body
        status, headers, body = await _get(url, {"Authorization": "Bearer t", "Accept-Encoding": "gzip"})
        assert headers["Content-Encoding"] == "gzip" and b"llm_d_epp_test_total 3.0" in gzip.decompress(body)
        assert headers["Vary"] == "Accept-Encoding"  # a cache in between keeps the two forms apart
        # gzip;q=0 refuses gzip (RFC 9110 12.5.3): it was sent gzipped all the same.
        status, headers, body = await _get(url, {"Authorization": "Bearer t", "Accept-Encoding": "gzip;q=0, identity"})
        assert "Content-Encoding" not in headers and b"llm_d_epp_test_total 3.0" in body
        status, headers, body = await _get(url, {"Authorization": "Bearer t", "Accept": OPENMETRICS})
        assert headers["Content-Type"].startswith("application/openmetrics-text") and body.endswith(b"# EOF\n")


async def test_https_and_client_certificates(tmp_path: Path) -> None:
    server_dir, client_dir = tmp_path / "server", tmp_path / "client"
    write_cert_pair(server_dir)
    write_cert_pair(client_dir)
    ctx = metrics_ssl_context(str(server_dir), str(client_dir / CERT_FILE))
    server = MetricsServer(_registry(), ssl_context=ctx)
    async with serving(server) as port:
        url = f"https://127.0.0.1:{port}/metrics"
        client = ssl.create_default_context(cafile=str(server_dir / CERT_FILE))
        client.check_hostname = False
        with pytest.raises(aiohttp.ClientError):  # no client certificate: the handshake fails
            await _get(url, ssl_ctx=client)
        client.load_cert_chain(client_dir / CERT_FILE, client_dir / KEY_FILE)
        status, _, body = await _get(url, ssl_ctx=client)
        assert status == 200 and b"llm_d_epp_test_total" in body


async def _served_certificate(port: int) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    try:
        return bytes(writer.get_extra_info("ssl_object").getpeercert(binary_form=True))
    finally:
        writer.close()


def _der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)


async def test_a_rotated_metrics_certificate_is_served_to_new_connections(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As the reference's metrics server (controller-runtime's certwatcher): cert-manager renews the Secret,
    new scrapes get the new certificate; a broken rotation keeps the last good one."""
    monkeypatch.setattr(metrics_server, "CERT_CHECK_INTERVAL", 0.0, raising=False)
    first = write_cert_pair(tmp_path)
    server = MetricsServer(_registry(), ssl_context=metrics_ssl_context(str(tmp_path), None))
    async with serving(server) as port:
        assert await _served_certificate(port) == _der(first)
        await asyncio.sleep(0.02)  # a later mtime
        second = write_cert_pair(tmp_path)
        assert await _served_certificate(port) == _der(second)
        (tmp_path / KEY_FILE).write_text("half-written")
        assert await _served_certificate(port) == _der(second)
        status, _, body = await _get(f"https://127.0.0.1:{port}/metrics", ssl_ctx=False)
        assert status == 200 and b"llm_d_epp_test_total" in body


def test_metrics_tls_flags_fail_at_start_up_naming_the_flag(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--metrics-client-ca-file: needs --metrics-cert-dir"):
        metrics_ssl_context(None, "/ca.pem")
    with pytest.raises(ConfigError, match="--metrics-cert-dir: cannot load"):
        metrics_ssl_context(str(tmp_path), None)
    with pytest.raises(ConfigError, match="--metrics-client-ca-file: cannot load"):
        write_cert_pair(tmp_path / "s")
        metrics_ssl_context(str(tmp_path / "s"), str(tmp_path / "missing.pem"))


def test_auth_flag_parses_go_bools_and_defaults_by_mode() -> None:
    assert settings_from_args([]).metrics_endpoint_auth is None
    assert settings_from_args(["--metrics-endpoint-auth=false"]).metrics_endpoint_auth is False
    assert settings_from_args(["--metrics-endpoint-auth"]).metrics_endpoint_auth is True
    # File-discovery mode has no API server to ask: open unless asked for.
    assert App(Settings(config_text=FILE_CONFIG)).metrics_auth is None
    assert App(Settings(config_text=FILE_CONFIG, metrics_endpoint_auth=True)).metrics_auth is not None


async def test_auth_asked_for_without_a_kubeconfig_is_a_start_up_error(tmp_path: Path) -> None:
    settings = Settings(
        config_text=FILE_CONFIG, metrics_endpoint_auth=True, kubeconfig=str(tmp_path / "none"), grpc_port=0,
        grpc_health_port=0, metrics_port=free_port(), bind_address="127.0.0.1", secure_serving=False,
    )  # fmt: skip
    app = App(settings)
    with pytest.raises(ConfigError, match="--metrics-endpoint-auth: needs the Kubernetes API"):
        await app.start()
    await app.shutdown()


async def test_a_broken_metrics_certificate_rotation_is_logged_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A Secret left broken: every scrape still gets the last good certificate, and the log says so once per
    breakage, not on every handshake for as long as it lasts."""
    monkeypatch.setattr(metrics_server, "CERT_CHECK_INTERVAL", 0.0, raising=False)
    first = write_cert_pair(tmp_path)
    server = MetricsServer(_registry(), ssl_context=metrics_ssl_context(str(tmp_path), None))
    async with serving(server) as port:
        await asyncio.sleep(0.02)  # a later mtime
        write_cert_pair(tmp_path / "other")
        (tmp_path / KEY_FILE).write_bytes((tmp_path / "other" / KEY_FILE).read_bytes())  # mismatched pair
        for _ in range(5):
            assert await _served_certificate(port) == _der(first)
        warnings = [r.getMessage() for r in caplog.records if "not reloaded" in r.getMessage()]
        assert len(warnings) == 1, warnings
        second = write_cert_pair(tmp_path)
        assert await _served_certificate(port) == _der(second)
        await asyncio.sleep(0.02)
        (tmp_path / CERT_FILE).write_text("half-written")
        for _ in range(3):
            assert await _served_certificate(port) == _der(second)
        assert len([r for r in caplog.records if "not reloaded" in r.getMessage()]) == 2


class GatedApi(FakeApi):
    """A FakeApi whose answers wait for `gate` (a slow or hung API server), counting calls in flight."""

    def __init__(self, users: dict[str, str], readers: set[str]) -> None:
        super().__init__(users, readers)
        self.gate = asyncio.Event()
        self.inflight = self.most_inflight = 0

    async def request(self, method: str, path: str, *, body: Any = None, **kw: Any) -> bytes:
        self.inflight += 1
        self.most_inflight = max(self.most_inflight, self.inflight)
        try:
            await self.gate.wait()
            return await super().request(method, path, body=body, **kw)
        finally:
            self.inflight -= 1


async def test_concurrent_scrapes_with_one_token_share_one_review() -> None:
    """Scrapes that arrive together (several Prometheus replicas, a retry) with the same token: one
    TokenReview + SubjectAccessReview, not one pair each."""
    api = GatedApi({"t": "prometheus"}, {"prometheus"})
    a = MetricsAuth(lambda: api)  # type: ignore[arg-type, return-value]
    checks = [asyncio.create_task(a.check("Bearer t", "/metrics")) for _ in range(20)]
    await asyncio.sleep(0.05)
    checks[0].cancel()  # a scraper that hangs up does not cancel the others' answer
    api.gate.set()
    results = await asyncio.gather(*checks[1:])
    assert results == [(200, "")] * 19
    assert api.calls == ["tokenreviews", "subjectaccessreviews"]


async def test_reviews_in_flight_are_bounded_and_a_hung_api_fails_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Anyone can send a bearer token: a flood of made-up tokens must not become as many concurrent API calls
    (the reference's client-go is rate-limited), and a hung API server answers 503 within the timeout,
    never lets a scrape through."""
    monkeypatch.setattr(metrics_server, "_API_TIMEOUT", 0.3)
    api = GatedApi({"t": "prometheus"}, {"prometheus"})
    a = MetricsAuth(lambda: api)  # type: ignore[arg-type, return-value]
    loop = asyncio.get_running_loop()
    start = loop.time()
    results = await asyncio.gather(*(a.check(f"Bearer made-up-{i}", "/metrics") for i in range(200)))
    assert loop.time() - start < 2.0
    assert {status for status, _ in results} == {503}
    assert api.most_inflight <= metrics_server._MAX_REVIEWS < 200, api.most_inflight
    assert not a._cache


async def test_a_huge_or_malformed_authorization_header_is_refused_without_an_api_call() -> None:
    api = FakeApi({"t": "prometheus"}, {"prometheus"})
    a = MetricsAuth(lambda: api)  # type: ignore[arg-type, return-value]
    for header in ("Bearer", "Bearer\tt", "Token t", "Bearer  ", "bearer" + "x" * 10):
        assert (await a.check(header, "/metrics"))[0] == 401, header
    server = MetricsServer(_registry(), auth=a)
    async with serving(server) as port:
        status, _, _ = await _get(f"http://127.0.0.1:{port}/metrics", {"Authorization": "Bearer " + "a" * 100_000})
        assert 400 <= status < 500 and status != 200
        assert (await _get(f"http://127.0.0.1:{port}/metrics", {"Authorization": "Bearer t"}))[0] == 200
    assert api.calls == ["tokenreviews", "subjectaccessreviews"]


def test_an_expired_metrics_certificate_is_said_at_start_up(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Prometheus verifies the certificate (unless told not to): an expired one fails every scrape, so the log
    says why at start-up, naming the file (served anyway, as the reference's certwatcher does)."""
    from .test_tls import _dated_pair

    _dated_pair(tmp_path, (-30, -1))
    assert metrics_ssl_context(str(tmp_path), None) is not None
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("expired" in m and f"{tmp_path}/{CERT_FILE}" in m for m in warnings), warnings


@pytest.mark.parametrize(
    ("accept", "gzipped"),
    [("gzip", True), ("GZIP;q=0.5", True), ("br, gzip;q=1.0", True), ("*", True), ("x-gzip", True),
     ("gzip;q=0", False), ("gzip; q=0.0", False), ("identity", False), ("", False), ("*;q=0", False),
     ("*, gzip;q=0", False), ("gzip;q=x", False), ("gzipped", False)],
)  # fmt: skip
def test_gzip_is_sent_only_when_accepted(accept: str, gzipped: bool) -> None:
    assert accepts_gzip(accept) is gzipped


async def test_the_server_reports_the_port_it_bound() -> None:
    server = MetricsServer(_registry())
    await server.start("127.0.0.1", 0)
    try:
        assert server.port > 0  # was 0: the port asked for
        status, _, body = await _get(f"http://127.0.0.1:{server.port}/metrics")
        assert status == 200 and b"llm_d_epp_test_total" in body
    finally:
        await server.aclose()
