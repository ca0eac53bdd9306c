"""One simulated pod: HTTP listener (+ optional gRPC listener) + engine + KV-event publisher, with a
kill/revive lifecycle.

``kill()`` models a crashed vLLM: the listening sockets close (HTTP and gRPC), every open connection (in-flight and
keep-alive) is dropped, running requests are aborted, the KV-event sockets close and all engine state
(KV cache, counters) is lost. ``revive()`` brings up a fresh engine on the same address and ports (KV
event ``seq`` restarts at 0, ``--startup-duration`` applies again), like a restarted container.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from aiohttp import web

from llmepp.httpclient import MAX_HEADER_LINE_BYTES
from llmepp_sim.clock import SimClock
from llmepp_sim.config import PodConfig, apply_runtime_patch, pod_config_to_dict
from llmepp_sim.engine import Engine
from llmepp_sim.faults import FaultInjector
from llmepp_sim.kvevents import KVEventPublisher
from llmepp_sim.lora import LoraManager
from llmepp_sim.metrics import CacheInfo, PodMetrics
from llmepp_sim.server import build_app
from llmepp_sim.textgen import FillerToken, filler_vocabulary
from llmepp_sim.tokenizer import ChatRenderer, SimTokenizer, jinja_renderer, render_body, shared_tokenizer

if TYPE_CHECKING:
    from llmepp_sim.grpc_server import GrpcFace

KILL_RESPONSE_GRACE = 0.05  # s: lets the /admin/kill reply reach the client before the socket drops


def bind_listener(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(1024)
    except OSError as e:
        sock.close()
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise OSError(e.errno, f"cannot listen on {where}: {e.strerror}") from e
    sock.setblocking(False)
    return sock


class SimPod:
    def __init__(
        self,
        config: PodConfig,
        clock: SimClock | None = None,
        tokenizer: SimTokenizer | None = None,
        fillers: tuple[FillerToken, ...] | None = None,
    ) -> None:
        config.validate()
        self.config = config
        self.clock = clock or SimClock()
        self.tokenizer = tokenizer or shared_tokenizer()
        self.fillers = fillers or filler_vocabulary(self.tokenizer)
        self.render_chat: ChatRenderer = jinja_renderer(config.chat_template) if config.chat_template else render_body
        self.faults = FaultInjector(config.seed)
        self.name = config.name or "sim"
        self.host = config.host
        self.port = config.port
        # None = no gRPC face; 0 until the first start resolves it (a revived pod keeps the resolved port).
        self.grpc_port: int | None = config.grpc_port
        self._grpc: GrpcFace | None = None
        self.alive = False
        self.started_wall = time.time()
        self._up_since = time.monotonic()
        self._zmq_endpoint = config.zmq_endpoint
        self._replay_endpoint = config.kv_events_replay_endpoint
        self._runner: web.AppRunner | None = None
        self._site: web.SockSite | None = None
        self._revive_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self.publisher: KVEventPublisher | None = None
        self._build_runtime()

    # ------------------------------------------------------------------ addresses
    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def grpc_address(self) -> str:
        """``host:port`` of the gRPC face ("" when the pod has none)."""
        if self.grpc_port is None:
            return ""
        return f"[{self.host}]:{self.grpc_port}" if ":" in self.host else f"{self.host}:{self.grpc_port}"

    @property
    def kv_events_endpoint(self) -> str:
        return self.publisher.endpoint if self.publisher else ""

    @property
    def kv_events_replay_endpoint(self) -> str:
        return self.publisher.replay_endpoint if self.publisher else ""

    @property
    def kv_events_topic(self) -> str:
        return self.config.kv_events_topic.format(
            pod=self.name, host=self.host, port=self.port, model=self.config.model_name
        )

    @property
    def ready(self) -> bool:
        return self.alive and time.monotonic() - self._up_since >= self.config.startup_duration

    @property
    def uptime(self) -> float:
        """Wall-clock seconds since the pod (last) came up."""
        return time.monotonic() - self._up_since if self.alive else 0.0

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        app = build_app(self)
        # handler_cancellation: a client that disconnects aborts its request and frees its seat, as in vLLM.
        self._runner = web.AppRunner(
            app,
            handle_signals=False,
            access_log=None,
            shutdown_timeout=1.0,
            handler_cancellation=True,
            max_line_size=MAX_HEADER_LINE_BYTES,
            max_field_size=MAX_HEADER_LINE_BYTES,
        )
        await self._runner.setup()
        await self._come_up()

    async def stop(self) -> None:
        if self._revive_task is not None:
            self._revive_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._revive_task
            self._revive_task = None
        if self.alive:
            await self._go_down()
        for task in list(self._background):
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def kill(self, duration: float | None = None) -> None:
        """Crash now; come back after ``duration`` wall-clock seconds (``None`` = only via ``revive()``)."""
        if self.alive:
            await self._go_down()
        if duration is not None:
            self._revive_task = asyncio.get_running_loop().create_task(self._revive_after(duration))

    async def revive(self) -> None:
        if self._revive_task is not None and self._revive_task is not asyncio.current_task():
            self._revive_task.cancel()
            self._revive_task = None
        if not self.alive:
            self._build_runtime()
            await self._come_up()

    def schedule_kill(self, duration: float | None) -> None:
        """Kill from inside a request handler, after its response has been sent."""

        async def later() -> None:
            await asyncio.sleep(KILL_RESPONSE_GRACE)
            await self.kill(duration)

        task = asyncio.get_running_loop().create_task(later())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _revive_after(self, duration: float) -> None:
        await asyncio.sleep(duration)
        await self.revive()

    def _build_runtime(self) -> None:
        """Fresh engine state, as after a process restart."""
        cfg = self.config
        self.lora = LoraManager(cfg.lora_modules)
        publisher = None
        if self._zmq_endpoint:
            publisher = KVEventPublisher(
                self._zmq_endpoint,
                self.kv_events_topic,
                batch_size=cfg.event_batch_size,
                flush_interval=cfg.event_flush_interval / 1000.0,
                legacy_format=cfg.use_vllm_legacy_event_format,
                data_parallel_rank=cfg.data_parallel_rank,
                replay_endpoint=self._replay_endpoint,
                replay_queue_size=cfg.kv_events_replay_queue_size,
                connect=cfg.kv_events_connect,
            )
        self.publisher = publisher
        self.engine = Engine(cfg, self.clock, self.lora, publisher.publish if publisher else None)
        self.metrics = PodMetrics(
            cfg.model_name,
            CacheInfo(cfg.block_size, cfg.kv_cache_size, cfg.enable_kvcache),
            stats=lambda: self.engine.stats,
            gauges=lambda: self.engine.gauges(),
        )

    async def _come_up(self) -> None:
        assert self._runner is not None
        if self.publisher is not None:
            await self.publisher.start()
            # A "*" port is resolved once; a revived pod keeps its endpoints.
            self._zmq_endpoint = self.publisher.endpoint
            self._replay_endpoint = self.publisher.replay_endpoint
        sock = bind_listener(self.host, self.port)
        self.port = sock.getsockname()[1]
        if self.publisher is not None:
            self.publisher.topic = self.kv_events_topic.encode()  # the port is known only now
        self._site = web.SockSite(self._runner, sock)
        await self._site.start()
        if self.grpc_port is not None:
            await self._start_grpc(self.grpc_port)
        self.engine.start()
        self.alive = True
        self.started_wall = time.time()
        self._up_since = time.monotonic()

    async def _start_grpc(self, port: int) -> None:
        from llmepp_sim.grpc_server import GrpcFace  # grpc is imported only by pods that have the face

        face = GrpcFace(self)
        try:
            self.grpc_port = await face.start(self.host, port)
        except BaseException:
            assert self._site is not None
            await self._site.stop()
            self._site = None
            if self.publisher is not None:
                await self.publisher.close()
            raise
        self._grpc = face

    async def _go_down(self) -> None:
        self.alive = False
        if self._site is not None:
            await self._site.stop()
            self._site = None
        server = self._runner.server if self._runner is not None else None
        for connection in server.connections if server is not None else []:
            transport = connection.transport
            if transport is not None:
                transport.abort()
        if self._grpc is not None:
            await self._grpc.stop()  # cancels the calls in flight: their engine requests are aborted
            self._grpc = None
        await self.engine.stop()
        if self.publisher is not None:
            await self.publisher.close()

    # ------------------------------------------------------------------ runtime config
    def update_config(self, patch: Mapping[str, Any]) -> None:
        self.config = apply_runtime_patch(self.config, patch)
        self.engine.reconfigure(self.config)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "address": self.address,
            "grpc_address": self.grpc_address,
            "alive": self.alive,
            "ready": self.ready,
            "time_scale": self.clock.time_scale,
            "kv_events_endpoint": self.kv_events_endpoint,
            "kv_events_replay_endpoint": self.kv_events_replay_endpoint,
            "kv_events_topic": self.kv_events_topic,
            "config": pod_config_to_dict(self.config),
        }
