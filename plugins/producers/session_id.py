"""`session-id-producer`: the request's session identifier, from a header or a cookie."""

from __future__ import annotations

from collections.abc import Sequence

from llmepp.datalayer.endpoint import Endpoint
from llmepp.framework.datakeys import scoped
from llmepp.framework.plugin import PluginParams
from llmepp.framework.requestcontrol import DataProducer
from llmepp.request.clientids import bounded_id
from llmepp.request.types import InferenceRequest

# Data key of the session identifier (a str); consumers resolve the producer at setup.
SESSION_ID = "SessionID"
DEFAULT_SESSION_HEADER = "x-session-id"


class SessionIdProducer(DataProducer):
    """Writes `SessionID` (a non-empty, stripped string) when the request carries one.

    Why: session-affinity plugins (`strategy: session_id` with an `attribute: SessionID`
    source) and other session-aware plugins read one identifier without caring how the
    client sent it.

    Parameters: exactly one of `headerName` (request header, case-insensitive) or
    `cookieName` (a cookie in the `Cookie` header). With neither — which is how the loader
    auto-creates it as the default SessionID producer — it reads the `x-session-id` header.
    Absent or empty source: nothing is written ("no session preference"). An id longer than
    256 characters is written as "sha256:" + the hex digest of its UTF-8 (same id, same value).
    """

    type = "session-id-producer"
    produces = frozenset({SESSION_ID})

    class Params(PluginParams):
        header_name: str = ""
        cookie_name: str = ""

        def __post_init__(self) -> None:
            if self.header_name.strip() and self.cookie_name.strip():
                raise ValueError("exactly one of headerName or cookieName may be set")

    def __init__(self, name: str, params: Params) -> None:
        super().__init__(name, params)
        self.cookie = params.cookie_name.strip()
        self.header = "" if self.cookie else (params.header_name.strip().lower() or DEFAULT_SESSION_HEADER)
        self.key = scoped(SESSION_ID, self.name)

    def produce(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> None:
        value = self._cookie(request) if self.cookie else request.headers.get(self.header, "").strip()
        if value:
            request.data[self.key] = bounded_id(value)

    def _cookie(self, request: InferenceRequest) -> str:
        raw = request.headers.get("cookie")
        if not raw:
            return ""
        for part in raw.split(";"):
            name, sep, value = part.partition("=")
            if sep and name.strip() == self.cookie:
                return value.strip().strip('"')
        return ""
