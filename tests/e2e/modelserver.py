"""A tiny OpenAI-shaped model server (aiohttp) that reports what reached it.

Response headers: x-served-by (ip:port), x-received-bytes, x-received-sha256,
x-received-model, x-received-dest (the x-gateway-destination-endpoint it saw),
x-received-te (transfer-encoding). Streaming answers `events` SSE events `gap` apart,
then a usage event and [DONE].
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass, field

from aiohttp import web

USAGE = {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13, "prompt_tokens_details": {"cached_tokens": 2}}


@dataclass
class ModelServer:
    host: str
    port: int
    events: int = 5
    gap: float = 0.0
    received: list[bytes] = field(default_factory=list)

    @property
    def hostport(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/completions", self._generate)
        app.router.add_post("/v1/chat/completions", self._generate)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/big", self._big)
        app.router.add_get("/v1/realtime", self._realtime)
        app.router.add_route("*", "/{tail:.*}", self._echo)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()

    async def stop(self) -> None:
        await self._runner.cleanup()

    async def _realtime(self, request: web.Request) -> web.WebSocketResponse:
        """A WebSocket (as vLLM's Realtime API): echoes each text message with the server's address."""
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            await ws.send_str(f"{self.hostport}:{message.data}")
        return ws

    def _diag(self, request: web.Request, body: bytes, model: str = "") -> dict[str, str]:
        return {
            "x-served-by": self.hostport,
            "x-received-bytes": str(len(body)),
            "x-received-sha256": hashlib.sha256(body).hexdigest(),
            "x-received-model": model,
            "x-received-dest": request.headers.get("x-gateway-destination-endpoint", "-"),
            "x-received-te": request.headers.get("transfer-encoding", "-"),
            "x-received-objective": request.headers.get("x-llm-d-inference-objective", "-"),
            "x-received-fairness": request.headers.get("x-llm-d-inference-fairness-id", "-"),
        }

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "m"}]}, headers=self._diag(request, b""))

    async def _big(self, request: web.Request) -> web.StreamResponse:
        """`n` bytes of a repeating pattern, in 1 MiB writes (flow-control exercise)."""
        n = int(request.query["n"])
        resp = web.StreamResponse(headers={"x-served-by": self.hostport})
        resp.content_length = n
        await resp.prepare(request)
        block = bytes(range(256)) * 4096
        while n > 0:
            await resp.write(block[: min(n, len(block))])
            n -= len(block)
        await resp.write_eof()
        return resp

    async def _echo(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.received.append(body)
        return web.Response(body=body, headers=self._diag(request, body))

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.received.append(body)
        doc = json.loads(body)
        model = doc.get("model", "")
        headers = self._diag(request, body, model)
        if not doc.get("stream"):
            out = {
                "id": "c1",
                "model": model,
                "choices": [{"text": "hello"}],
                "usage": USAGE,
                "served_by": self.hostport,
                "received_sha256": headers["x-received-sha256"],
            }
            return web.json_response(out, headers=headers)
        resp = web.StreamResponse(headers={**headers, "content-type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(self.events):
            chunk = {"id": "c1", "model": model, "choices": [{"index": 0, "text": f"t{i}"}], "usage": None}
            await resp.write(f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n".encode())
            if self.gap:
                await asyncio.sleep(self.gap)
        await resp.write(
            f"data: {json.dumps({'id': 'c1', 'model': model, 'choices': [], 'usage': USAGE})}\n\n".encode()
        )
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp
