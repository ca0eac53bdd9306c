"""The decode-side P/D routing sidecar: a reverse proxy in front of one decode model server.

    client/Envoy ──► sidecar :8000 ──(x-prefiller-host-port?)──► prefill pod   (1-token prefill)
                                   └──────────────────────────────► local vLLM :8200 (decode, streamed)

Without `x-prefiller-host-port` (or with an empty value, which the EPP sets to neutralise a
client-sent one) every request is proxied to the local decoder unchanged and streamed back
(the request target byte for byte, no header the client did not send). A GET / HEAD the decoder
redirects to itself (a model server's `/metrics` -> `/metrics/`) is followed there, so a scrape
through the sidecar gets the page; a redirect passed on names the sidecar, not the decoder.
Several header lines with different values are a 400 JSON error: which one the EPP set is unknown.

With it, on `POST /v1/completions` and `POST /v1/chat/completions` (NIXL v2 protocol, the
reference sidecar's default connector):

1. the request goes to the prefill pod with `kv_transfer_params = {do_remote_decode: true,
   do_remote_prefill: false, remote_*: null}`, `stream: false` (no `stream_options`),
   `max_tokens: 1` (and `max_completion_tokens: 1` for chat or when present), `min_tokens`
   dropped (vLLM rejects min_tokens > max_tokens). 502/503/504 and connection failures are
   retried `prefill_max_retries` times with exponential backoff, each wait at most
   MAX_RETRY_BACKOFF (a prefill is idempotent, and a local prefill on the decode pod is the
   expensive alternative); an attempt that outlives `prefill_timeout` is a 504 at once.
   Redirects are not followed; an answer is at most max_body_bytes;
2. a prefill error is returned to the client with its status and JSON body as-is (a non-JSON
   body is wrapped in an OpenAI-style JSON error); an unreachable prefill pod is a 502 JSON error.
   Either carries `x-pd-failed-stage: prefill`;
3. the original request goes to the local decoder with the prefill response's
   `kv_transfer_params` (do_remote_prefill + remote block ids/host/port) and its response -
   status, headers (x-inference-pod ...), SSE bytes - is streamed back untouched. A prefill
   response without kv_transfer_params is logged and the decoder prefills locally.

Data parallelism (`data_parallel_size` N > 1, the reference's `--data-parallel-size`): a vLLM
pod with N data-parallel ranks serves rank r on its own port. The sidecar listens on N ports,
`port + r`, and rank r's server fronts rank r's model server at the decoder URL's port + r
(reference `pkg/sidecar/proxy/data_parallel.go`). The rank-0 (primary) server also honours
`x-data-parallel-host-port: <pod ip>:<port + r>`, which the EPP's `data-parallel-profile-handler`
sets when it routes a request picked for rank r to the pod's primary port: the request (and, on the
P/D path, its decode step after the remote prefill) goes to rank r's model server. The value must
name this pod's own address (`pod_ip`) and one of its N rank ports; anything else is a 400 JSON
error and nothing is proxied (the header never picks an arbitrary host). The other ranks' servers
ignore the header and serve their own rank, like the reference's rank clones. The header is a
routing instruction for the sidecar and never reaches a model server. With N = 1 it is ignored.

The response path does one read and one write per chunk (`iter_any`), nothing per event; a streamed
answer silent for `decode_idle_timeout` is cut, the wait for an answer is not bounded (a non-streamed
generation is silent until it ends).
Request bodies are read whole (chunked uploads from Envoy included): the P/D path must parse
the JSON anyway, and the pass-through path stays simple. A WebSocket (vLLM's Realtime API,
`/v1/realtime`) is relayed to the decoder message for message.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import aiohttp
import msgspec
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from llmepp.datalayer.endpoint import join_hostport
from llmepp.decoding import DECODE_ERRORS
from llmepp.httpclient import MAX_HEADER_LINE_BYTES, upstream_connector
from llmepp.observability.logging import quiet_malformed_http_requests
from llmepp.server.listen import any_address_socket

log = logging.getLogger(__name__)

PREFILL_HEADER = "x-prefiller-host-port"
ENCODER_HEADER = "x-encoder-hosts-ports"
# The data-parallel rank (ip:port) the EPP picked (reference pkg/common/routing: DataParallelEndpointHeader).
DATA_PARALLEL_HEADER = "x-data-parallel-host-port"
FAILED_STAGE_HEADER = "x-pd-failed-stage"
# vLLM names a request by X-Request-Id. Before vLLM PR #29665 (remote_request_id in kv_transfer_params) the
# NixlConnector pairs the decode's "blocks read" notification with the prefill by that id, so both requests
# must carry the same one (reference connector_nixlv2.go adds one uuid to both).
REQUEST_ID_HEADER = "X-Request-Id"
PD_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
TRANSIENT_STATUSES = frozenset({502, 503, 504})
# RFC 7230 hop-by-hop headers plus those aiohttp recomputes (length, host); the P/D control
# headers are consumed here and never reach a model server.
_DROP_REQUEST = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers",
     "transfer-encoding", "upgrade", "content-length", "host", "expect", PREFILL_HEADER, ENCODER_HEADER,
     DATA_PARALLEL_HEADER}
)  # fmt: skip
_DROP_RESPONSE = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers",
     "transfer-encoding", "upgrade", "content-length"}
)  # fmt: skip
_JSON = "application/json"
# aiohttp client defaults a proxy must not add to what the client sent: a Content-Type the model server reads
# the body by (FastAPI parses an untyped body as JSON, an octet-stream one not), an Accept-Encoding that would
# get a compressed answer relayed as is to a client that cannot decode it.
_NO_AUTO_HEADERS = frozenset({"Accept", "Accept-Encoding", "User-Agent", "Content-Type"})
# Content codings aiohttp's server decodes (http_parser.py): the body read is no longer encoded.
_DECODED_ENCODINGS = frozenset({"gzip", "deflate", "br", "zstd"})
# A DNS name (RFC 1123 labels), the only hosts besides IP literals a host:port header may name.
_HOSTNAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")
# The longest wait between prefill attempts when doubling (a larger configured base is used as is).
MAX_RETRY_BACKOFF = 10.0
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
# Redirects of a GET / HEAD the sidecar follows on the decoder itself, e.g. a model server's /metrics -> /metrics/.
MAX_DECODER_REDIRECTS = 10
# --host values that listen on every address (the default "" is every address, IPv6 and IPv4).
EVERY_ADDRESS = ("", "0.0.0.0", "::")


@dataclass
class SidecarOptions:
    host: str = ""  # every address, IPv6 and IPv4 (server.listen), as the reference's `:port`
    port: int = 8000  # 0 = any free port (tests)
    decoder_url: str = "http://127.0.0.1:8200"
    prefill_scheme: str = "http"
    prefill_max_retries: int = 2
    prefill_retry_backoff: float = 0.2  # seconds before the first retry; doubles per retry
    connect_timeout: float = 5.0
    prefill_timeout: float = 300.0  # one prefill attempt, end to end
    decode_idle_timeout: float = 600.0  # longest silence from the decoder once its answer has started
    max_body_bytes: int = 64 * 1024 * 1024
    # SSRF guard: networks x-prefiller-host-port may point into; empty = any address.
    allowed_prefill_networks: list[str] = field(default_factory=list)
    # https upstreams: verify their certificates, per stage (--tls-insecure-skip-verify turns it off).
    tls_verify_prefill: bool = True
    tls_verify_decoder: bool = True
    # Data-parallel ranks of the local model server: rank r is served on port + r and fronts the
    # decoder URL's port + r. 1 = no data parallelism (one port, one decoder).
    data_parallel_size: int = 1
    # This pod's address as the EPP names it in x-data-parallel-host-port (the reference reads
    # POD_IP); "" = `host` when that is a concrete address. Needed only when data_parallel_size > 1.
    pod_ip: str = ""
    networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        if self.prefill_max_retries < 0:
            raise ValueError("prefill-max-retries must be >= 0")
        if self.prefill_retry_backoff < 0:
            raise ValueError("prefill-retry-backoff must be >= 0")
        for name in ("connect_timeout", "prefill_timeout", "decode_idle_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name.replace('_', '-')} must be > 0")
        if self.max_body_bytes <= 0:  # aiohttp would read 0 as "no limit"
            raise ValueError("max-body-size must be > 0")
        if self.prefill_scheme not in ("http", "https"):
            raise ValueError("prefill-scheme must be http or https")
        self.decoder_url = self.decoder_url.rstrip("/")
        if not self.decoder_url.startswith(("http://", "https://")):
            raise ValueError(f"decoder-url must be an http(s) URL, got {self.decoder_url!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port {self.port} is out of range 1..65535 (0 = any free port)")
        try:
            decoder_port = URL(self.decoder_url).port
        except ValueError as e:
            raise ValueError(f"decoder-url {self.decoder_url!r}: {e}") from None
        if decoder_port is not None and not 1 <= decoder_port <= 65535:
            raise ValueError(f"decoder port {decoder_port} is out of range 1..65535")
        self.networks = [ipaddress.ip_network(n, strict=False) for n in self.allowed_prefill_networks]
        self._check_data_parallel()

    def _check_data_parallel(self) -> None:
        n = self.data_parallel_size
        if n < 1:
            raise ValueError(f"data-parallel-size must be a positive integer, got {n}")
        if n == 1:
            return
        if self.port == 0:
            raise ValueError("data-parallel-size > 1 needs a fixed port: the ranks listen on port .. port + size - 1")
        _check_port_range("port", self.port, n)
        decoder_port = URL(self.decoder_url).explicit_port
        if decoder_port is None:
            raise ValueError(f"data-parallel-size > 1 needs a port in decoder-url (rank r is its port + r), "
                             f"got {self.decoder_url!r}")  # fmt: skip
        _check_port_range("decoder port", decoder_port, n)
        self.pod_ip = self.pod_ip.strip().removeprefix("[").removesuffix("]")
        if not self.pod_ip:
            if self.host in EVERY_ADDRESS:
                raise ValueError(
                    "data-parallel-size > 1 needs this pod's IP, the address the EPP names in "
                    f"{DATA_PARALLEL_HEADER}: set POD_IP (or --pod-ip), or listen on that address (--host)"
                )
            self.pod_ip = self.host

    @property
    def rank_ports(self) -> list[int]:
        """The listening port of each data-parallel rank (one entry without data parallelism)."""
        return [self.port + r for r in range(self.data_parallel_size)] if self.port else [self.port]

    @property
    def decoder_urls(self) -> list[str]:
        """The model server behind each data-parallel rank: the decoder URL's port + rank."""
        if self.data_parallel_size == 1:
            return [self.decoder_url]
        base = URL(self.decoder_url)
        assert base.explicit_port is not None  # checked above
        return [str(base.with_port(base.explicit_port + r)).rstrip("/") for r in range(self.data_parallel_size)]


def _check_port_range(name: str, first: int, size: int) -> None:
    if not 1 <= first <= 65535:
        raise ValueError(f"{name} {first} is out of range 1..65535")
    if first + size - 1 > 65535:
        raise ValueError(f"{name} range {first}..{first + size - 1} (one per data-parallel rank) exceeds 65535")


def retry_delay(base: float, attempt: int) -> float:
    """The wait after failed attempt `attempt` (0 = the first): `base` doubled per retry, at most
    MAX_RETRY_BACKOFF (a larger `base` is used as is), so many retries never wait for ever."""
    return max(base, min(base * 2 ** min(attempt, 64), MAX_RETRY_BACKOFF))


class ProxyError(Exception):
    """An error answered by the sidecar itself, as an OpenAI-style JSON body."""

    def __init__(self, status: int, message: str, *, stage: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.stage = stage

    def response(self) -> web.Response:
        return json_error(self.status, self.message, stage=self.stage)


def json_error(status: int, message: str, *, stage: str | None = None) -> web.Response:
    error = {"message": message, "type": _ERROR_TYPES.get(status, "Error"), "code": status}
    body = msgspec.json.encode({"error": error})
    headers = {FAILED_STAGE_HEADER: stage} if stage else None
    return web.Response(status=status, body=body, content_type=_JSON, headers=headers)


_ERROR_TYPES = {400: "BadRequest", 403: "Forbidden", 413: "PayloadTooLarge", 502: "BadGateway", 504: "GatewayTimeout"}


def _same_host(a: str, b: str) -> bool:
    """Two host names or IP literals denote the same address (IPv6 spellings normalised)."""
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return a.lower() == b.lower()


def data_parallel_rank(value: str, pod_ip: str, ports: list[int]) -> int:
    """The rank `x-data-parallel-host-port: value` names: `pod_ip` and one of the rank `ports`;
    ValueError (with the client-facing reason) for anything else."""
    host, port = parse_hostport(value, DATA_PARALLEL_HEADER)
    if not _same_host(host, pod_ip) or port not in ports:
        first, last = ports[0], ports[-1]
        raise ValueError(
            f"{DATA_PARALLEL_HEADER} {value[:100]!r} names no data-parallel rank of this pod ({pod_ip}:{first}..{last})"
        )
    return ports.index(port)


def prefill_request(payload: Mapping[str, Any], chat: bool) -> dict[str, Any]:
    """The 1-token, non-streaming prefill-only copy of a completion request (NIXL v2)."""
    body = dict(payload)
    body["kv_transfer_params"] = {
        "do_remote_decode": True,
        "do_remote_prefill": False,
        "remote_engine_id": None,
        "remote_block_ids": None,
        "remote_host": None,
        "remote_port": None,
    }
    body["stream"] = False
    body.pop("stream_options", None)
    body["max_tokens"] = 1
    if chat or "max_completion_tokens" in body:
        body["max_completion_tokens"] = 1
    body.pop("min_tokens", None)
    return body


def forward_headers(headers: Iterable[tuple[str, str]]) -> CIMultiDict[str]:
    """A request's headers for an upstream: without hop-by-hop ones (also those its `Connection`
    names), nor a Content-Encoding aiohttp decoded when reading the body (the body sent is plain)."""
    items = list(headers)
    drop = _DROP_REQUEST | connection_tokens(items)
    if any(k.lower() == "content-encoding" and v.lower() in _DECODED_ENCODINGS for k, v in items):
        drop |= {"content-encoding"}
    out: CIMultiDict[str] = CIMultiDict()
    for k, v in items:
        if k.lower() not in drop:
            out.add(k, v)
    return out


def connection_tokens(headers: Iterable[tuple[str, str]]) -> frozenset[str]:
    """The header names `Connection` lists: hop-by-hop too (RFC 9110 7.6.1)."""
    tokens = (t.strip().lower() for k, v in headers if k.lower() == "connection" for t in v.split(","))
    return frozenset(tokens) - {""}


def parse_hostport(value: str, header: str = PREFILL_HEADER) -> tuple[str, int]:
    """`ip:port`, `[v6]:port`, `v6:port` (the last colon separates the port) or `name:port` →
    (host, port); ValueError when malformed: the host must be one IP literal or DNS name, never
    something that would change the URL built from it (a path, userinfo, several hosts)."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not (port_text.isascii() and port_text.isdigit()):  # not "８０００" or "²"
        raise ValueError(f"{header} must be host:port, got {value[:100]!r}")
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"{header}: port out of range in {value[:100]!r}")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if "%" in host or (ip is None and (bracketed or not _HOSTNAME.fullmatch(host))):
        raise ValueError(f"{header}: {host[:100]!r} is not an IP address or host name in {value[:100]!r}")
    return host, port


def _decoder_redirect(upstream: aiohttp.ClientResponse, url: URL) -> URL | None:
    """Where a redirect of the decoder at `url` points when that is the decoder itself (None otherwise)."""
    if upstream.status not in _REDIRECTS or "Location" not in upstream.headers:
        return None
    try:
        location = url.join(URL(upstream.headers["Location"]))
    except ValueError:
        return None
    same = (location.scheme, location.host, location.port) == (url.scheme, url.host, url.port)
    return location if same and not location.raw_path.startswith("//") else None


def _sendable_close_code(code: Any) -> bool:
    """A WebSocket close code an endpoint may put in a Close frame (RFC 6455 7.4): not 1005/1006/1015."""
    return isinstance(code, int) and (code in _SENDABLE_CLOSE_CODES or 3000 <= code <= 4999)


_SENDABLE_CLOSE_CODES = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014})


def _close_reason(text: str | None) -> bytes:
    """A Close frame's reason: at most 123 bytes of UTF-8, cut at a character boundary."""
    return (text or "").encode()[:123].decode(errors="ignore").encode()


class _IdleWatch:
    """Fails the reads of a decoder's answer once it has sent nothing for `idle` seconds (a hung decoder
    mid-stream). One timer per answer; per chunk the relay only stores the time of the last one, and
    marks itself `busy` while its write waits for the client (time a slow client takes is no silence)."""

    __slots__ = ("_handle", "_idle", "_payload", "busy", "last", "loop")

    def __init__(self, payload: aiohttp.StreamReader, idle: float) -> None:
        self.loop = asyncio.get_running_loop()
        self._payload = payload
        self._idle = idle
        self.last = self.loop.time()
        # True while the relay writes to the client: a slow client blocks the reads too, no decoder silence.
        self.busy = False
        self._handle = self.loop.call_later(idle, self._check)

    def _check(self) -> None:
        quiet = self.loop.time() - self.last
        if self.busy:
            self._handle = self.loop.call_later(self._idle, self._check)
        elif quiet < self._idle:
            self._handle = self.loop.call_later(self._idle - quiet, self._check)
        else:
            self._payload.set_exception(TimeoutError(f"the decoder sent nothing for {self._idle:g} s"))

    def cancel(self) -> None:
        self._handle.cancel()


class Sidecar:
    """The proxy server. `await start()`, then `url`; `await stop()` releases everything.

    With data parallelism it serves one port per rank (`ports`, rank 0 = `port`), all sharing one
    upstream connection pool."""

    def __init__(self, options: SidecarOptions) -> None:
        self.options = options
        self.port = options.port
        self.ports = options.rank_ports
        self.decoders = options.decoder_urls
        self._session: aiohttp.ClientSession | None = None
        self._runners: list[web.AppRunner] = []
        self._dp_warned = False
        o = options
        self._prefill_timeout = aiohttp.ClientTimeout(total=o.prefill_timeout, connect=o.connect_timeout)
        # No read timeout: a non-streamed answer is silent until its generation ends, however long that takes.
        # The silences of a streamed answer are bounded by _IdleWatch.
        self._decode_timeout = aiohttp.ClientTimeout(total=None, connect=o.connect_timeout)

    @property
    def url(self) -> str:
        return f"http://{self.options.host}:{self.port}"

    def app(self, rank: int = 0) -> web.Application:
        """The server of one data-parallel rank (the only one without data parallelism)."""
        app = web.Application(client_max_size=self.options.max_body_bytes)
        app.router.add_route("*", "/{tail:.*}", partial(self.handle, rank=rank))
        return app

    async def start(self) -> None:
        # No pool limit: every in-flight request holds one upstream connection anyway, and a
        # limit would queue decodes behind slow prefills. Raw bytes: no decompression in between.
        quiet_malformed_http_requests()
        connector = upstream_connector(limit=0, ttl_dns_cache=60)
        self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        try:
            for rank, port in enumerate(self.ports):
                # handler_cancellation: a client that goes away cancels its prefill wait / upstream reads.
                runner = web.AppRunner(
                    self.app(rank),
                    handler_cancellation=True,
                    access_log=None,
                    max_line_size=MAX_HEADER_LINE_BYTES,
                    max_field_size=MAX_HEADER_LINE_BYTES,
                )
                self._runners.append(runner)
                await runner.setup()
                site: web.BaseSite = (
                    web.TCPSite(runner, self.options.host, port, backlog=1024)
                    if self.options.host
                    else web.SockSite(runner, any_address_socket(port), backlog=1024)
                )
                await site.start()
        except BaseException:
            await self.stop()
            raise
        self.port = int(self._runners[0].addresses[0][1])
        self.ports[0] = self.port

    async def stop(self) -> None:
        # Together: every rank port stops accepting at once and the in-flight requests of all
        # ranks drain in one shutdown timeout, not rank after rank.
        runners, self._runners = self._runners, []
        await asyncio.gather(*(runner.cleanup() for runner in runners))
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- request handling ------------------------------------------------------------------
    async def handle(self, request: web.Request, rank: int = 0) -> web.StreamResponse:
        """A request on rank `rank`'s port."""
        try:
            if rank == 0 and len(self.ports) > 1:
                rank = self._picked_rank(request)
            if request.method == "POST" and request.path in PD_PATHS:
                prefiller = self._prefiller(request)
                if prefiller:
                    return await self._disaggregated(request, prefiller, rank)
            if request.method == "GET" and request.headers.get("Upgrade", "").lower() == "websocket":
                return await self._websocket(request, rank)
            body = await request.read() if request.can_read_body else None
            return await self._to_decoder(request, forward_headers(request.headers.items()), body, rank)
        except ProxyError as e:
            return e.response()
        except web.HTTPRequestEntityTooLarge:
            return json_error(413, f"request body exceeds {self.options.max_body_bytes} bytes")
        except web.RequestPayloadError as e:  # e.g. a body that is not the Content-Encoding it claims
            response = json_error(400, f"request body is unreadable: {' '.join(str(e).split())}")
            response.force_close()  # the rest of the request cannot be read: this connection is done
            return response

    @staticmethod
    def _prefiller(request: web.Request) -> str:
        """The x-prefiller-host-port value ("" = none). Several different lines are a 400: they
        mean "a, b" (RFC 9110 5.3), and taking the first would let a client's value sent ahead
        of the one a gateway appended pick the prefill pod."""
        values = {v.strip() for v in request.headers.getall(PREFILL_HEADER, ())}
        if len(values) > 1:
            raise ProxyError(400, f"{PREFILL_HEADER} must name one prefill pod, got {len(values)} values")
        return values.pop() if values else ""

    def _picked_rank(self, request: web.Request) -> int:
        """The rank `x-data-parallel-host-port` names on the primary port (0 without it)."""
        values = {v.strip() for v in request.headers.getall(DATA_PARALLEL_HEADER, ())} - {""}
        if not values:
            return 0
        if len(values) > 1:
            raise ProxyError(400, f"{DATA_PARALLEL_HEADER} must name one rank, got {len(values)} values")
        value = values.pop()
        try:
            rank = data_parallel_rank(value, self.options.pod_ip, self.ports)
        except ValueError as e:
            log.debug("refused %s: %s", request.path, e)  # client input, a 400: no line per request by default
            raise ProxyError(400, str(e)) from None
        if not self._dp_warned:
            self._dp_warned = True
            log.info(
                "routing by %s (deprecated in the reference: a gateway that routes to every rank port, "
                "e.g. Istio >= 1.28.1, reaches the rank ports directly)",
                DATA_PARALLEL_HEADER,
            )
        log.debug("data-parallel routing of %s to rank %d (%s)", request.path, rank, value)
        return rank

    async def _disaggregated(self, request: web.Request, prefiller: str, rank: int = 0) -> web.StreamResponse:
        target = self._check_prefiller(prefiller)
        raw = await request.read()
        try:
            payload = msgspec.json.decode(raw)
        except DECODE_ERRORS as e:
            raise ProxyError(400, f"request body is not valid JSON: {e}") from None
        if not isinstance(payload, dict):
            raise ProxyError(400, "request body must be a JSON object")
        headers = forward_headers(request.headers.items())
        headers["Content-Type"] = _JSON
        if not headers.get(REQUEST_ID_HEADER, "").strip():  # the client's (Envoy's) id otherwise, as vLLM reads it
            headers[REQUEST_ID_HEADER] = str(uuid.uuid4())
        chat = request.path == "/v1/chat/completions"
        pbody = msgspec.json.encode(prefill_request(payload, chat))
        url = f"{self.options.prefill_scheme}://{target}{request.path_qs}"
        status, content_type, answer = await self._prefill(url, headers, pbody, prefiller)
        if status >= 400:
            return self._prefill_error(status, content_type, answer, prefiller)
        if not 200 <= status < 300:  # e.g. a redirect, never followed: only the named pod prefills
            raise ProxyError(502, f"prefill pod {prefiller} answered {status}, not a prefill result", stage="prefill")
        try:
            prefilled = msgspec.json.decode(answer)
        except DECODE_ERRORS:
            raise ProxyError(502, f"prefill pod {prefiller} answered invalid JSON", stage="prefill") from None
        kv = prefilled.get("kv_transfer_params") if isinstance(prefilled, dict) else None
        if isinstance(kv, dict):
            payload["kv_transfer_params"] = kv
        else:
            # The decoder can still serve the request by prefilling itself; say so loudly.
            log.warning("prefill pod %s returned no kv_transfer_params; the decoder prefills locally", prefiller)
            payload.pop("kv_transfer_params", None)
        return await self._to_decoder(request, headers, msgspec.json.encode(payload), rank)

    def _check_prefiller(self, prefiller: str) -> str:
        """The prefill pod's URL authority (host:port) once the header value passed the checks."""
        try:
            host, port = parse_hostport(prefiller)
        except ValueError as e:
            raise ProxyError(400, str(e)) from None
        networks = self.options.networks
        if not networks:
            return join_hostport(host, port)
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            raise ProxyError(403, f"prefill host {host[:100]!r} is not an allowed address") from None
        if not any(addr in net for net in networks):
            raise ProxyError(403, f"prefill host {host} is not in the allowed networks")
        return join_hostport(host, port)

    async def _prefill(
        self, url: str, headers: CIMultiDict[str], body: bytes, prefiller: str
    ) -> tuple[int, str, bytes]:
        """POST the prefill, retrying transient failures; (status, content type, body)."""
        assert self._session is not None
        o = self.options
        attempt = 0
        while True:
            try:
                # No redirects (they would reach hosts the header and the SSRF guard never named);
                # decompressed (the client's Accept-Encoding is forwarded); at most max_body_bytes.
                async with self._session.post(
                    url,
                    data=body,
                    headers=headers,
                    timeout=self._prefill_timeout,
                    allow_redirects=False,
                    auto_decompress=True,
                    ssl=o.tls_verify_prefill,
                ) as up:
                    answer = await self._read_prefill(up, prefiller)
                    status, content_type = up.status, up.headers.get("Content-Type", "")
                if status not in TRANSIENT_STATUSES or attempt >= o.prefill_max_retries:
                    return status, content_type, answer
                reason = f"status {status}"
            except (aiohttp.ClientError, TimeoutError) as e:
                # A connect timeout is a connection failure; a prefill that outlived prefill_timeout
                # is not retried: that would wait the whole timeout again on a stuck or overloaded pod.
                gave_up = isinstance(e, TimeoutError) and not isinstance(e, aiohttp.ConnectionTimeoutError)
                # A certificate the pod presents will not verify on the next attempt either.
                gave_up = gave_up or isinstance(e, aiohttp.ClientConnectorCertificateError)
                if gave_up or attempt >= o.prefill_max_retries:
                    kind = "timed out" if isinstance(e, TimeoutError) else f"unreachable ({e.__class__.__name__}: {e})"
                    raise ProxyError(
                        504 if isinstance(e, TimeoutError) else 502,
                        f"prefill pod {prefiller} {kind} after {attempt + 1} attempt(s)",
                        stage="prefill",
                    ) from None
                reason = e.__class__.__name__
            delay = retry_delay(o.prefill_retry_backoff, attempt)
            attempt += 1
            log.info("retrying prefill at %s (attempt %d, after %s) in %.2fs", prefiller, attempt + 1, reason, delay)
            await asyncio.sleep(delay)

    async def _read_prefill(self, up: aiohttp.ClientResponse, prefiller: str) -> bytes:
        """The prefill answer, refused (502) past max_body_bytes rather than buffered whole."""
        limit = self.options.max_body_bytes
        answer = bytearray()
        async for chunk in up.content.iter_any():
            answer += chunk
            if len(answer) > limit:
                raise ProxyError(502, f"prefill pod {prefiller} answered more than {limit} bytes", stage="prefill")
        return bytes(answer)

    @staticmethod
    def _prefill_error(status: int, content_type: str, answer: bytes, prefiller: str) -> web.Response:
        """The prefill pod's error as-is when it is a JSON error, else wrapped in one."""
        if content_type.startswith(_JSON):
            try:
                if isinstance(msgspec.json.decode(answer), dict):
                    return web.Response(
                        status=status, body=answer, content_type=_JSON, headers={FAILED_STAGE_HEADER: "prefill"}
                    )
            except DECODE_ERRORS:
                pass
        text = answer[:500].decode("utf-8", "replace")
        return json_error(status, f"prefill pod {prefiller} returned {status}: {text}", stage="prefill")

    async def _websocket(self, request: web.Request, rank: int) -> web.StreamResponse:
        """A WebSocket to the decoder (vLLM's Realtime API, /v1/realtime), relayed message for message: the
        sidecar owns the pod's serving port, so an upgrade dropped here reaches the model server nowhere."""
        assert self._session is not None
        target = request.raw_path if request.raw_path.startswith("/") else request.path_qs
        url = URL(self.decoders[rank] + target, encoded=target.isascii())
        # The handshake's own headers are the client library's to write; the rest (auth, ids) go through.
        headers = {
            k: v
            for k, v in forward_headers(request.headers.items()).items()
            if not k.lower().startswith("sec-websocket")
        }
        protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
        try:
            upstream = await self._session.ws_connect(
                url.with_scheme("wss" if url.scheme == "https" else "ws"), headers=headers, protocols=protocols,
                ssl=self.options.tls_verify_decoder, timeout=aiohttp.ClientWSTimeout(ws_receive=None),
                max_msg_size=self.options.max_body_bytes,
            )  # fmt: skip
        except aiohttp.WSServerHandshakeError as e:
            status = e.status if 400 <= e.status < 600 else 502
            raise ProxyError(status, f"decoder refused the WebSocket: {e.message}") from None
        except (aiohttp.ClientError, TimeoutError) as e:
            raise ProxyError(502, f"decoder unreachable: {type(e).__name__}") from None
        client = web.WebSocketResponse(protocols=[upstream.protocol] if upstream.protocol else (),
                                       max_msg_size=self.options.max_body_bytes)  # fmt: skip
        ends: dict[Any, tuple[int, bytes]] = {}  # per side: the close code and reason to send it
        try:
            await client.prepare(request)

            async def relay(source: Any, sink: Any, abnormal: int) -> None:
                while True:
                    message = await source.receive()
                    if message.type is aiohttp.WSMsgType.TEXT:
                        await sink.send_str(message.data)
                    elif message.type is aiohttp.WSMsgType.BINARY:
                        await sink.send_bytes(message.data)
                    else:  # closing or an error: end both sides
                        break
                if message.type is aiohttp.WSMsgType.CLOSING:  # the other direction is closing `source`
                    return
                # The Close frame as sent (code and reason); a connection lost without one is no normal closure.
                if message.type is aiohttp.WSMsgType.CLOSE:
                    sendable = _sendable_close_code(message.data)
                    ends[sink] = (message.data, _close_reason(message.extra)) if sendable else (1000, b"")
                else:
                    ends[sink] = (abnormal, b"")
                code, reason = ends[sink]
                await sink.close(code=code, message=reason)

            # Either side closing ends the relay; the other direction is cancelled with it. The close code
            # (and reason) one side sent is passed on, also when the handler is cancelled mid-handshake.
            tasks = [
                asyncio.create_task(relay(client, upstream, aiohttp.WSCloseCode.GOING_AWAY)),
                asyncio.create_task(relay(upstream, client, aiohttp.WSCloseCode.INTERNAL_ERROR)),
            ]
            try:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            code, reason = ends.get(upstream, (aiohttp.WSCloseCode.GOING_AWAY, b""))  # default: the client left
            await upstream.close(code=code, message=reason)
            code, reason = ends.get(client, (aiohttp.WSCloseCode.OK, b""))
            await client.close(code=code, message=reason)
        return client

    async def _to_decoder(
        self, request: web.Request, headers: CIMultiDict[str], body: bytes | None, rank: int = 0
    ) -> web.StreamResponse:
        """Send to the local decoder (rank `rank`'s) and stream its answer back byte for byte."""
        assert self._session is not None
        decoder = self.decoders[rank]
        # The request target byte for byte (origin form): aiohttp's path_qs doubles a leading "//", and
        # requoting would decode e.g. %2F in the query. Its parser let no space or control through.
        target = request.raw_path if request.raw_path.startswith("/") else request.path_qs
        url = URL(decoder + target, encoded=target.isascii())
        # A redirect that stays on the decoder is followed for a GET / HEAD (a scraper of /metrics follows
        # none, and one that does would go to the decoder's address, which only the sidecar reaches).
        hops = MAX_DECODER_REDIRECTS if request.method in ("GET", "HEAD") else 0
        while True:
            try:
                upstream = await self._session.request(
                    request.method,
                    url,
                    headers=headers,
                    data=body,
                    timeout=self._decode_timeout,
                    allow_redirects=False,
                    skip_auto_headers=_NO_AUTO_HEADERS,
                    ssl=self.options.tls_verify_decoder,
                )
            except (aiohttp.ClientError, TimeoutError) as e:
                raise ProxyError(502, f"decoder at {decoder} unreachable: {e}", stage="decode") from None
            location = _decoder_redirect(upstream, url)
            if location is None or hops == 0:
                break
            hops -= 1
            upstream.release()
            url = location
        async with upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            drop = _DROP_RESPONSE | connection_tokens(upstream.headers.items())
            for k, v in upstream.headers.items():
                if k.lower() not in drop:
                    if location is not None and k.lower() == "location":
                        v = str(location.relative())  # back through the sidecar, never to the decoder directly
                    response.headers.add(k, v)
            if upstream.content_length is not None and "Transfer-Encoding" not in upstream.headers:
                response.content_length = upstream.content_length
            await response.prepare(request)
            # After prepare the status is out: a decoder failure can only cut the stream, which
            # the client sees as a truncated chunked body (aiohttp closes the connection).
            watch = _IdleWatch(upstream.content, self.options.decode_idle_timeout)
            clock = watch.loop.time
            try:
                async for chunk in upstream.content.iter_any():
                    watch.busy = True
                    await response.write(chunk)
                    watch.busy = False
                    watch.last = clock()
            except (aiohttp.ClientError, TimeoutError) as e:
                log.warning("decoder stream broke after the response started: %s; closing the connection", e)
                if request.transport is not None:
                    request.transport.abort()
                return response  # logged above; nothing more to tell the client
            finally:
                watch.cancel()
            await response.write_eof()
            return response
