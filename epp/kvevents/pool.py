"""One KV-event subscriber per endpoint, following the datastore as pods come and go.

`endpoint_added` starts a task for the endpoint: it restores the source from the store (a shared
index may already hold its chains), then runs a `Subscriber` against
``tcp://<address>:<socketPort + rank>`` (replay: ``tcp://<address>:<replaySocketPort + rank>``; `rank`
is the endpoint's data-parallel rank, its target port's position, 0 for most pods). A task that fails
unexpectedly is logged and restarted after a second; `endpoint_removed` cancels it and tells the
store the pod is gone. Endpoints are identified by `ip:port` (the index's pod id, as in llm-d).

Endpoints added before an event loop runs (unit tests building the config synchronously) are
started by the first `ensure_started()` call from the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import zmq.asyncio

from llmepp.datalayer.endpoint import Endpoint
from llmepp.kvevents.chain import SourceChains
from llmepp.kvevents.ingest import IndexStore, SourceIngest
from llmepp.kvevents.stats import KVEventStats, LogLimiter
from llmepp.kvevents.subscriber import Subscriber, SubscriberOptions

log = logging.getLogger(__name__)

RESTART_DELAY = 1.0


@dataclass(frozen=True, slots=True)
class PoolOptions:
    socket_port: int = 5557
    replay_socket_port: int = 0  # 0 = no replay
    max_concurrent_replays: int = 8
    subscriber: SubscriberOptions = field(default_factory=SubscriberOptions)


def tcp(address: str, port: int) -> str:
    host = f"[{address}]" if ":" in address else address
    return f"tcp://{host}:{port}"


class _Source:
    __slots__ = ("chains", "subscriber", "task")

    def __init__(self, chains: SourceChains) -> None:
        self.chains = chains
        self.task: asyncio.Task[None] | None = None
        self.subscriber: Subscriber | None = None


class SubscriberPool:
    def __init__(
        self,
        options: PoolOptions,
        store: IndexStore,
        new_chains: Callable[[], SourceChains],
        stats: KVEventStats,
    ) -> None:
        self.options = options
        self.store = store
        self.new_chains = new_chains
        self.stats = stats
        self._sources: dict[str, _Source] = {}
        self._endpoints: dict[str, Endpoint] = {}
        self._slots: asyncio.Semaphore | None = None
        self._ctx: zmq.asyncio.Context | None = None
        self._limiter = LogLimiter(log)
        self._closed = False
        # Removals still tearing down; a re-added endpoint waits for its old state to be gone.
        self._stopping: dict[str, asyncio.Task[None]] = {}

    def __len__(self) -> int:
        return len(self._sources)

    def subscriber(self, pod: str) -> Subscriber | None:
        src = self._sources.get(pod)
        return src.subscriber if src is not None else None

    def chains(self) -> list[SourceChains]:
        return [s.chains for s in self._sources.values()]

    # -- DatastoreListener ---------------------------------------------------------------------
    def endpoint_added(self, endpoint: Endpoint) -> None:
        pod = endpoint.hostport
        if pod in self._sources or self._closed:
            return
        self._endpoints[pod] = endpoint
        self._sources[pod] = _Source(self.new_chains())
        self._start(pod)

    def endpoint_removed(self, endpoint: Endpoint) -> None:
        pod = endpoint.hostport
        src = self._sources.pop(pod, None)
        self._endpoints.pop(pod, None)
        if src is None:
            return
        try:
            task = asyncio.get_running_loop().create_task(self._stop(pod, src), name=f"kv-stop-{pod}")
        except RuntimeError:
            return  # no loop: nothing was started
        self._stopping[pod] = task
        task.add_done_callback(lambda t: self._stopping.pop(pod, None) if self._stopping.get(pod) is t else None)

    def ensure_started(self) -> None:
        for pod, src in self._sources.items():
            if src.task is None:
                self._start(pod)

    async def aclose(self) -> None:
        self._closed = True
        sources, self._sources = self._sources, {}
        for src in sources.values():
            if src.task is not None:
                src.task.cancel()
        for src in sources.values():
            if src.task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await src.task

    # -- internals -----------------------------------------------------------------------------
    def _start(self, pod: str) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        src = self._sources[pod]
        src.task = loop.create_task(self._run(pod, src), name=f"kv-events-{pod}")

    async def _run(self, pod: str, src: _Source) -> None:
        o = self.options
        if self._slots is None:
            self._slots = asyncio.Semaphore(max(1, o.max_concurrent_replays))
        if self._ctx is None:
            self._ctx = zmq.asyncio.Context.instance()
        endpoint = self._endpoints[pod]
        previous = self._stopping.get(pod)
        if previous is not None:
            await asyncio.shield(previous)
        # Data-parallel ranks publish on consecutive ports (vLLM: port + rank).
        rank = endpoint.spec.rank
        port, replay_port = o.socket_port + rank, o.replay_socket_port + rank if o.replay_socket_port else 0
        if max(port, replay_port) > 65_535:
            log.error(
                "KV events of %s (data-parallel rank %d) would be on port %d, beyond 65535: not subscribed",
                pod, rank, max(port, replay_port),
            )  # fmt: skip
            return
        failed = False
        while True:
            try:
                if failed:
                    # Start over from a clean source: the stream is read again from the beginning.
                    await self.store.forget(pod, src.chains)
                    src.chains = self.new_chains()
                resume = await self.store.resume(pod, src.chains)
                sub = Subscriber(
                    pod,
                    tcp(endpoint.address, port),
                    tcp(endpoint.address, replay_port) if replay_port else "",
                    SourceIngest(pod, src.chains, self.store, self.stats),
                    options=o.subscriber,
                    stats=self.stats,
                    replay_slots=self._slots,
                    context=self._ctx,
                    resume=resume,
                    limiter=self._limiter,
                )
                src.subscriber = sub
                log.info("subscribed to KV events", extra={"pod": pod, "endpoint": sub.endpoint})
                await sub.run()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.stats.restarts += 1
                self._limiter.warning(f"restart:{pod}", "KV event subscriber for %s failed (%r); restarting", pod, e)
                failed = True
                await asyncio.sleep(RESTART_DELAY)

    async def _stop(self, pod: str, src: _Source) -> None:
        if src.task is not None:
            src.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await src.task
        try:
            await self.store.forget(pod, src.chains)
        except Exception:
            log.exception("forgetting KV state of %s failed", pod)
        log.info("unsubscribed from KV events", extra={"pod": pod})
