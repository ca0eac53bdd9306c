"""HTTP settings on the model-server path: the connection pools of the EPP's clients towards model servers and
their sidecars, and the request-header limits of the aiohttp servers that take proxied requests."""

from __future__ import annotations

from typing import Any

import aiohttp

# Idle pooled connections are dropped before the server closes them: uvicorn (vLLM's server, the latency
# predictor's) closes an idle keep-alive connection after 5 s by default, and a request sent on a connection
# the server is closing at that moment fails. aiohttp keeps idle connections 15 s by default.
KEEPALIVE_SECONDS = 4.0


def upstream_connector(**options: Any) -> aiohttp.TCPConnector:
    """A TCPConnector (aiohttp's `options`) whose idle connections expire before a uvicorn server's."""
    return aiohttp.TCPConnector(keepalive_timeout=KEEPALIVE_SECONDS, **options)


# Envoy passes up to 60 KiB of request headers by default (max_request_headers_kb) and Go's net/http (the
# reference sidecar) up to 1 MiB; aiohttp's defaults refuse any header line over 8,190 bytes, with a plain-text
# 400. The servers that take proxied requests (the P/D sidecar, the simulated pods) take what Envoy passes.
MAX_HEADER_LINE_BYTES = 64 * 1024  # aiohttp servers: max_line_size and max_field_size
