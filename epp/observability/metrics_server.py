"""The Prometheus `/metrics` endpoint, with the reference's Kubernetes authentication and authorization.

With `--metrics-endpoint-auth` (the reference's default, in Kubernetes mode) a scrape must carry a
bearer token the API server accepts (TokenReview) for a user allowed to `get` the non-resource URL
`/metrics` (SubjectAccessReview), as controller-runtime's `WithAuthenticationAndAuthorization` filter
does: Prometheus scrapes with its ServiceAccount token and a ClusterRole like

    rules: [{nonResourceURLs: [/metrics], verbs: [get]}]

and the EPP's own ServiceAccount may create tokenreviews and subjectaccessreviews
(deploy/kubernetes/rbac.yaml). Answers: 401 without a valid token, 403 when the user may not read the
metrics, 503 when the API server cannot be asked; each JSON with a message. Decisions are cached per
token (allowed 60 s, denied 10 s, as the reference's 1 min / 30 s order of magnitude) so a scrape costs
two API calls at most once a minute.

HTTPS with `--metrics-cert-dir` (tls.crt, tls.key), client certificates required with
`--metrics-client-ca-file` (mTLS); plain HTTP otherwise. The page is rendered in a worker thread (gzip
when the scraper accepts it), never on the event loop that routes requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import logging
import os
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from llmepp.framework.plugin import ConfigError
from llmepp.k8s.client import KubeClient, KubeError
from llmepp.observability.logging import quiet_malformed_http_requests
from llmepp.server.listen import any_address_socket
from llmepp.server.tls import CERT_FILE, KEY_FILE, RELOAD_INTERVAL, validity_problem

log = logging.getLogger(__name__)

ALLOW_TTL = 60.0  # s
DENY_TTL = 10.0  # s
_CACHE_SIZE = 1024  # distinct tokens remembered
_API_TIMEOUT = 5.0  # s per decision, waiting for a free slot included
_MAX_REVIEWS = 8  # decisions asked of the API server at once (anyone can send a made-up token)
CERT_CHECK_INTERVAL = RELOAD_INTERVAL  # s between looks at the --metrics-cert-dir files' mtimes
_TOKEN_REVIEWS = "/apis/authentication.k8s.io/v1/tokenreviews"
_ACCESS_REVIEWS = "/apis/authorization.k8s.io/v1/subjectaccessreviews"


def metrics_ssl_context(cert_dir: str | None, client_ca_file: str | None) -> ssl.SSLContext | None:
    """HTTPS for /metrics from --metrics-cert-dir, mTLS with --metrics-client-ca-file; errors name the flag.
    The files are re-read when they change (a renewed Secret), as the reference's certwatcher does."""
    if not cert_dir:
        if client_ca_file:
            raise ConfigError("--metrics-client-ca-file: needs --metrics-cert-dir (client certificates need HTTPS)")
        return None
    return _CertReloader(cert_dir, client_ca_file).listening


class _CertReloader:
    """New handshakes on the listening context are switched (SNI callback) to a context built from the
    current files: checked at most every CERT_CHECK_INTERVAL, rebuilt whole when they changed, the last
    good one kept while they do not load (mid-rotation)."""

    def __init__(self, cert_dir: str, client_ca_file: str | None) -> None:
        self.args = (cert_dir, client_ca_file)
        self.files = [f"{cert_dir}/{CERT_FILE}", f"{cert_dir}/{KEY_FILE}", *filter(None, [client_ca_file])]
        self._stamp = self._stat()
        self.listening = self.current = _context(cert_dir, client_ca_file)
        self.listening.sni_callback = self._hello
        self._checked = time.monotonic()
        self._last_error: str | None = None
        self.reload_failures = 0  # breakages seen (each logged once, however many handshakes it lasts)

    def _stat(self) -> tuple[float, ...] | None:
        try:
            return tuple(os.stat(f).st_mtime for f in self.files)
        except OSError:
            return None  # mid-rotation (a Secret's symlinks swap): look again next time

    def _hello(self, conn: Any, server_name: str | None, ctx: ssl.SSLContext) -> None:
        now = time.monotonic()
        if now - self._checked >= CERT_CHECK_INTERVAL:
            self._checked = now
            stamp = self._stat()
            if stamp is not None and stamp != self._stamp:
                try:
                    self.current = _context(*self.args)
                except ConfigError as e:
                    # Retried every interval (a finished write or a chmod may fix it), told once per breakage.
                    if str(e) != self._last_error:
                        self._last_error = str(e)
                        self.reload_failures += 1
                        log.warning("metrics certificate not reloaded; keeping the previous one: %s", e)
                else:
                    self._stamp, self._last_error = stamp, None
                    log.info("metrics certificate reloaded", extra={"cert_dir": self.args[0]})
        if self.current is not ctx:
            conn.context = self.current


def _context(cert_dir: str, client_ca_file: str | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(f"{cert_dir}/{CERT_FILE}", f"{cert_dir}/{KEY_FILE}")
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"--metrics-cert-dir: cannot load {cert_dir}/{CERT_FILE} and {KEY_FILE}: {e}") from None
    with contextlib.suppress(OSError), open(f"{cert_dir}/{CERT_FILE}", "rb") as f:
        if problem := validity_problem(f.read()):
            log.warning("metrics certificate %s/%s %s: scrapers that verify it will refuse the handshake",
                        cert_dir, CERT_FILE, problem)  # fmt: skip
    if client_ca_file:
        try:
            ctx.load_verify_locations(client_ca_file)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"--metrics-client-ca-file: cannot load {client_ca_file}: {e}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class MetricsAuth:
    """Bearer-token check against the Kubernetes API, cached per token."""

    def __init__(self, client: Callable[[], KubeClient | None], clock: Callable[[], float] = time.monotonic) -> None:
        self._client = client  # the client may connect after the server starts (Kubernetes mode)
        self._clock = clock
        self._cache: OrderedDict[bytes, tuple[float, int, str]] = OrderedDict()
        self._pending: dict[bytes, asyncio.Future[tuple[int, str]]] = {}  # one review per token at a time
        self._slots = asyncio.Semaphore(_MAX_REVIEWS)
        self._api_failing = False  # told once per outage, not per scrape

    async def check(self, authorization: str | None, path: str) -> tuple[int, str]:
        """(HTTP status, message): 200 lets the scrape through."""
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        # A bearer token is ASCII (RFC 6750); header bytes that are not UTF-8 arrive here as surrogates.
        if scheme.lower() != "bearer" or not token or not token.isascii():
            return 401, "a bearer token is required (Authorization: Bearer <ServiceAccount token>)"
        key = hashlib.sha256(f"{path}\0{token}".encode()).digest()
        now = self._clock()
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            return hit[1], hit[2]
        client = self._client()
        if client is None:
            return 503, "cannot verify the token: the Kubernetes API client is not connected yet"
        pending = self._pending.get(key)
        if pending is None:  # scrapes with the same token at the same time share one decision
            pending = self._pending[key] = asyncio.ensure_future(self._decide(client, token, path, key, now))
            pending.add_done_callback(lambda _: self._pending.pop(key, None))
        return await asyncio.shield(pending)  # a scraper hanging up does not cancel the others' answer

    async def _decide(self, client: KubeClient, token: str, path: str, key: bytes, now: float) -> tuple[int, str]:
        try:
            async with asyncio.timeout(_API_TIMEOUT):
                status, message = await self._bounded_review(client, token, path)
        # ClientError: a dropped connection (API server restart); AttributeError / TypeError: an answer
        # that is not the review object it should be. Either way: not verified, 503, nothing cached.
        except (KubeError, aiohttp.ClientError, OSError, TimeoutError, ValueError, AttributeError, TypeError) as e:
            if not self._api_failing:
                self._api_failing = True
                log.warning("metrics auth: the API server could not review a token (scrapes get 503 until it "
                            "does): %r", e)  # fmt: skip
            else:
                log.debug("metrics auth: the API server could not review a token: %r", e)
            return 503, "cannot verify the token: the Kubernetes API did not answer"
        if self._api_failing:
            self._api_failing = False
            log.info("metrics auth: the API server reviews tokens again")
        self._cache[key] = (now + (ALLOW_TTL if status == 200 else DENY_TTL), status, message)
        self._cache.move_to_end(key)
        while len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return status, message

    async def _bounded_review(self, client: KubeClient, token: str, path: str) -> tuple[int, str]:
        async with self._slots:
            return await self._review(client, token, path)

    async def _review(self, client: KubeClient, token: str, path: str) -> tuple[int, str]:
        review = json.loads(await client.request("POST", _TOKEN_REVIEWS, body={
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token}}))  # fmt: skip
        status = review.get("status") or {}
        if not status.get("authenticated"):
            return 401, "the token was not accepted by the Kubernetes API"
        user = status.get("user") or {}
        spec: dict[str, Any] = {
            "user": user.get("username", ""),
            "groups": user.get("groups") or [],
            "nonResourceAttributes": {"path": path, "verb": "get"},
        }
        if user.get("uid"):
            spec["uid"] = user["uid"]
        if user.get("extra"):
            spec["extra"] = user["extra"]
        access = json.loads(await client.request("POST", _ACCESS_REVIEWS, body={
            "apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "spec": spec}))  # fmt: skip
        if not (access.get("status") or {}).get("allowed"):
            return 403, f"user {spec['user']!r} may not get {path}"
        return 200, ""


class MetricsServer:
    """`GET /metrics` on an aiohttp server; `auth` None serves everyone (the reference with auth off)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        auth: MetricsAuth | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.registry = registry
        self.auth = auth
        self.ssl_context = ssl_context
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self, host: str, port: int) -> None:
        quiet_malformed_http_requests()
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site: web.BaseSite = (
            web.TCPSite(self._runner, host, port, ssl_context=self.ssl_context, reuse_address=True)
            if host
            else web.SockSite(self._runner, any_address_socket(port), ssl_context=self.ssl_context)
        )
        await site.start()
        self.port = int(self._runner.addresses[0][1])  # the bound one, when asked for any (0)

    async def aclose(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _metrics(self, request: web.Request) -> web.Response:
        if self.auth is not None:
            status, message = await self.auth.check(request.headers.get("Authorization"), request.path)
            if status != 200:
                return web.json_response({"error": message}, status=status)
        # Content negotiation as prometheus_client's own server: OpenMetrics when asked for, else text 0.0.4.
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        gz = accepts_gzip(request.headers.get("Accept-Encoding", ""))
        body = await asyncio.get_running_loop().run_in_executor(None, _render, encoder, self.registry, gz)
        headers = {"Content-Type": content_type, "Vary": "Accept-Encoding"}
        if gz:
            headers["Content-Encoding"] = "gzip"
        return web.Response(body=body, headers=headers)


def accepts_gzip(accept_encoding: str) -> bool:
    """Whether an Accept-Encoding admits gzip (RFC 9110 12.5.3): `gzip` or `*` with a q-value above 0."""
    accepted: dict[str, bool] = {}
    for item in accept_encoding.split(","):
        coding, *params = (part.strip() for part in item.split(";"))
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        accepted[coding.lower()] = q > 0
    return accepted.get("gzip", accepted.get("x-gzip", accepted.get("*", False)))


def _render(encoder: Callable[[CollectorRegistry], bytes], registry: CollectorRegistry, gz: bool) -> bytes:
    page = encoder(registry)
    return gzip.compress(page, 1) if gz else page
