"""Session affinity shared by `session-affinity-filter` (hard pin) and `session-affinity-scorer`
(soft preference): parameters, the two strategies, and the request / response hooks.

Strategies (`strategy`):

* `encoded_endpoint_header` (default, stateless): the request header
  (`encodedEndpointHeaderConfig.header`, default `x-session-token`) holds base64 of
  `namespace/name` of the endpoint that served the session before. Every response carries
  that header for the endpoint chosen now (the target of `profileName`, default the primary
  profile), so the client echoes it back. An undecodable token means no session.
* `session_id` (stateful): an opaque identifier from the first non-empty of
  `sessionIdConfig.sources` (each `{header: name}` or `{attribute: request-data key}`;
  default `[{header: x-session-id}]`) is bound server-side to the endpoint it was routed to.
  Unbound → no preference. Bound and the endpoint is a candidate → that endpoint. Bound but
  the endpoint is not a candidate → no preference, and the binding moves to wherever the
  request goes; a request other scorers sent elsewhere leaves the binding where it is. Every request
  of the session keeps its binding alive; bindings unused for `evictionTtlSeconds` (300) are swept
  every `evictionSweepSeconds` (10). Nothing is written on the response.

For P/D, run one instance per profile: `profileName: prefill` with header
`x-session-token-prefill` pins the prefill endpoint the same way. The default header is
`x-session-token` whatever the profile (as the reference), so two instances for different
profiles must be given different headers: setup rejects a clash.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from llmepp.datalayer.endpoint import Endpoint
from llmepp.framework.plugin import ConfigError, Plugin, PluginContext, PluginParams
from llmepp.framework.requestcontrol import PreRequest, ResponseHeaderProcessor
from llmepp.framework.scheduling import SchedulingResult
from llmepp.plugins.filters.common import set_consumes
from llmepp.request.clientids import bounded_id
from llmepp.request.types import InferenceRequest, ResponseInfo
from llmepp.tasks import cancel_and_wait

log = logging.getLogger(__name__)

ENCODED_ENDPOINT_HEADER = "encoded_endpoint_header"
SESSION_ID = "session_id"
DEFAULT_TOKEN_HEADER = "x-session-token"
DEFAULT_SESSION_ID_HEADER = "x-session-id"
SESSION_ID_DATA_KEY = "SessionID"  # the session-id-producer's data key
DEFAULT_TTL_S = 300.0
DEFAULT_SWEEP_S = 10.0


class EncodedEndpointHeaderConfig(PluginParams):
    header: str = DEFAULT_TOKEN_HEADER


class SessionIdSource(PluginParams):
    header: str = ""
    attribute: str = ""

    def __post_init__(self) -> None:
        if bool(self.header.strip()) == bool(self.attribute.strip()):
            raise ValueError("sessionIdConfig.sources: exactly one of header or attribute must be set")


class SessionIdConfig(PluginParams):
    sources: list[SessionIdSource] = []
    # 0 means "use the default", as in the reference.
    eviction_ttl_seconds: float = DEFAULT_TTL_S
    eviction_sweep_seconds: float = DEFAULT_SWEEP_S

    def __post_init__(self) -> None:
        if self.eviction_ttl_seconds < 0:
            raise ValueError("sessionIdConfig.evictionTtlSeconds must be > 0")
        if self.eviction_sweep_seconds < 0:
            raise ValueError("sessionIdConfig.evictionSweepSeconds must be > 0")


class SessionAffinityParams(PluginParams):
    strategy: str = ENCODED_ENDPOINT_HEADER
    profile_name: str = ""
    encoded_endpoint_header_config: EncodedEndpointHeaderConfig | None = None
    session_id_config: SessionIdConfig | None = None
    # Older reference releases configured the token header here; still accepted.
    header_name: str = ""

    def __post_init__(self) -> None:
        if self.strategy not in (ENCODED_ENDPOINT_HEADER, SESSION_ID):
            raise ValueError(f"strategy must be {ENCODED_ENDPOINT_HEADER!r} or {SESSION_ID!r}")
        cfg = self.encoded_endpoint_header_config
        if self.header_name and cfg is not None and cfg.header.strip().lower() != self.header_name.strip().lower():
            raise ValueError("headerName and encodedEndpointHeaderConfig.header disagree; set only one")

    def token_header(self) -> str:
        cfg = self.encoded_endpoint_header_config
        name = self.header_name or (cfg.header if cfg is not None else "")
        return name.strip().lower() or DEFAULT_TOKEN_HEADER


def encode_token(endpoint: Endpoint) -> str:
    return base64.b64encode(f"{endpoint.namespace}/{endpoint.name}".encode()).decode("ascii")


def decode_token(token: str) -> tuple[str, str] | None:
    """(namespace, name) from a token, or None when it is not valid base64 of `ns/name`."""
    try:
        ns, sep, name = base64.b64decode(token, validate=True).decode("utf-8").partition("/")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    return (ns, name) if sep and name else None


def find(endpoints: Sequence[Endpoint], namespace: str, name: str) -> Endpoint | None:
    for ep in endpoints:
        spec = ep.spec
        if spec.name == name and spec.namespace == namespace:
            return ep
    return None


@dataclass(slots=True)
class _Binding:
    namespace: str
    name: str
    last_seen: float


class SessionAffinity(PreRequest, ResponseHeaderProcessor):
    """Mixin for the filter and scorer: `session_target()` is the endpoint the session is
    pinned to among the candidates (None: no preference); PreRequest records the chosen
    endpoint (token strategy: for the response; session_id: the binding)."""

    Params = SessionAffinityParams

    def __init__(self, name: str, params: SessionAffinityParams) -> None:
        Plugin.__init__(self, name, params)
        self.strategy = params.strategy
        self.profile_name = params.profile_name
        self.header = params.token_header()
        cfg = params.session_id_config or SessionIdConfig()
        self.sources = [(s.header.strip().lower(), s.attribute.strip()) for s in cfg.sources] or [
            (DEFAULT_SESSION_ID_HEADER, "")
        ]
        self.ttl = cfg.eviction_ttl_seconds or DEFAULT_TTL_S
        self.sweep_interval = cfg.eviction_sweep_seconds or DEFAULT_SWEEP_S
        self.bindings: dict[str, _Binding] = {}
        self._next_sweep = 0.0
        self._sweeper: asyncio.Task[None] | None = None
        # Per-instance request.data keys (two instances, e.g. decode and prefill, never clash).
        self._target_key = f"{self.name}/session-target"
        self._presence_key = f"{self.name}/session-bound-present"
        # A `SessionID` attribute source makes the loader create the session-id-producer.
        self._attribute_keys = {attr: attr for _, attr in self.sources if attr}
        wants_id = self.strategy == SESSION_ID and SESSION_ID_DATA_KEY in self._attribute_keys
        set_consumes(self, {SESSION_ID_DATA_KEY} if wants_id else ())

    def setup(self, ctx: PluginContext) -> None:
        if self.strategy != SESSION_ID:
            # Two instances for different profiles writing one header would overwrite each
            # other's token on the response (the reference default is the same for both).
            for other in ctx.plugins_of(SessionAffinity):
                if (
                    other is not self
                    and other.strategy == ENCODED_ENDPOINT_HEADER
                    and other.header == self.header
                    and other.profile_name != self.profile_name
                ):
                    raise ConfigError(
                        f"plugin {self.name!r} (type {self.type}): encodedEndpointHeaderConfig.header: "
                        f"{self.header!r} is also written by plugin "
                        f"{other.name!r} for another profile; give each profile its own header "
                        f"(e.g. {DEFAULT_TOKEN_HEADER}-{self.profile_name or other.profile_name})"
                    )
            return
        # An attribute another plugin produces is read under that producer's scoped key.
        for attr in self._attribute_keys:
            if any(attr in p.produces for p in ctx.plugins_of(Plugin)):
                self._attribute_keys[attr] = ctx.producer_key(self, attr, "", "sessionIdConfig.sources.attribute")
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (unit tests, in-process benchmarks): swept lazily from pre_request
        self._sweeper = loop.create_task(self._sweep_forever(), name=f"{self.name}-session-sweep")

    async def aclose(self) -> None:
        sweeper, self._sweeper = self._sweeper, None
        await cancel_and_wait(sweeper)

    # -- request side ------------------------------------------------------------------------
    def session_id(self, request: InferenceRequest) -> str:
        for header, attr in self.sources:
            if header:
                value = request.headers.get(header, "").strip()
            else:
                raw = request.data.get(self._attribute_keys[attr])
                value = raw.strip() if isinstance(raw, str) else ""
            if value:
                # As session-id-producer: a binding key is kept for the TTL, so a client must not choose its size.
                return bounded_id(value)
        return ""

    def session_target(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> Endpoint | None:
        if self.strategy == ENCODED_ENDPOINT_HEADER:
            token = request.headers.get(self.header)
            if not token:
                return None
            decoded = decode_token(token)
            return find(endpoints, *decoded) if decoded is not None else None
        sid = self.session_id(request)
        if not sid:
            return None
        bound = self.bindings.get(sid)
        if bound is None:
            return None
        target = find(endpoints, bound.namespace, bound.name)
        # PreRequest moves the binding only when the bound endpoint was not a candidate.
        request.data[self._presence_key] = target is not None
        return target

    def pre_request(self, request: InferenceRequest, result: SchedulingResult) -> None:
        res = result.profiles.get(self.profile_name or result.primary_profile)
        if res is None or not res.targets:
            return
        chosen = res.targets[0]
        if self.strategy == ENCODED_ENDPOINT_HEADER:
            request.data[self._target_key] = chosen
            return
        sid = self.session_id(request)
        if not sid:
            return
        now = time.monotonic()
        bound = self.bindings.get(sid)
        if bound is None:
            self.bindings[sid] = _Binding(chosen.namespace, chosen.name, now)
        elif bound.name == chosen.name and bound.namespace == chosen.namespace:
            bound.last_seen = now
        elif request.data.get(self._presence_key) is False:
            # The bound endpoint was gone from the candidates: follow the request.
            bound.namespace, bound.name, bound.last_seen = chosen.namespace, chosen.name, now
        else:
            # Outweighed by other scorers this time: the binding stays, and the session is active.
            bound.last_seen = now
        if self._sweeper is None and now >= self._next_sweep:
            self.sweep(now)

    def sweep(self, now: float) -> None:
        """Drop bindings unused for longer than the TTL."""
        self._next_sweep = now + self.sweep_interval
        ttl = self.ttl
        expired = [sid for sid, b in self.bindings.items() if now - b.last_seen > ttl]
        for sid in expired:
            del self.bindings[sid]

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval)
            self.sweep(time.monotonic())

    # -- response side -----------------------------------------------------------------------
    def response_headers(
        self, request: InferenceRequest, response: ResponseInfo, headers: dict[str, str]
    ) -> dict[str, str] | None:
        target: Endpoint | None = request.data.get(self._target_key)
        if target is None:
            return None
        return {self.header: encode_token(target)}
