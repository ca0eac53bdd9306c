"""Requests the end-to-end modules send through Envoy, and what they read back."""

from __future__ import annotations

from typing import Any

import aiohttp
from multidict import CIMultiDict

# The status, a copy of the response headers, the body's text.
Answer = tuple[int, CIMultiDict[str], str]


async def post_json(
    http: aiohttp.ClientSession, url: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> Answer:
    async with http.post(url, json=body, headers=headers or {}) as resp:
        return resp.status, resp.headers.copy(), await resp.text()


async def completion(
    http: aiohttp.ClientSession,
    base_url: str,
    model: str,
    prompt: str,
    max_tokens: int,
    headers: dict[str, str] | None = None,
) -> Answer:
    """A /v1/completions request."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens}
    return await post_json(http, f"{base_url}/v1/completions", body, headers)
