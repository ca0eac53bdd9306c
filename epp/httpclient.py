"""Connection pools of the EPP's HTTP clients towards model servers and their sidecars."""

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
