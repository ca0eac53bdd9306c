"""One KV-event subscriber per endpoint, following the datastore as pods come and go.

`endpoint_added` starts a task for the endpoint: it restores the source from the store (a shared
index may already hold its chains), then runs a `Subscriber` against
``tcp://<address>:<socketPort + rank>`` (replay: ``tcp://<address>:<replaySocketPort + rank>``; `rank`
is the endpoint's data-parallel rank, its target port's position, 0 for most pods). A task that fails
unexpectedly is logged and restarted after a second; `endpoint_removed` cancels it and tells the
store the pod is gone. Endpoints are identified by `ip:port` (the index's pod id, as in llm-d).

Global-socket mode (`bind_endpoint`, the reference's `kvEventsConfig.zmqEndpoint`): the pods connect
their PUB sockets to one SUB socket the pool binds (vLLM connects to an endpoint without a wildcard
host), and each message goes to the source its topic names, ``kv@<pod>@<model>`` with `<pod>` the
endpoint's ip:port, name or IP (several endpoints on one IP, data-parallel ranks, are told apart by the
batch's rank). Each source still runs in its own task, fed through a bounded queue, with the same
sequence tracking and replay (from ``tcp://<address>:<replaySocketPort + rank>`` if configured); a
message for a pod the pool does not know is counted (`unknown_sources`) and skipped.

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

from llmepp.datalayer.endpoint import Endpoint, join_hostport
from llmepp.kvevents.chain import SourceChains
from llmepp.kvevents.ingest import IndexStore, SourceIngest
from llmepp.kvevents.stats import KVEventStats
from llmepp.kvevents.subscriber import Subscriber, SubscriberOptions, sub_socket
from llmepp.kvevents.wire import MalformedMessage, Message, decode_batch, parse_frames
from llmepp.observability.logging import LogLimiter
from llmepp.tasks import cancel_and_wait, raise_if_cancelled

log = logging.getLogger(__name__)

RESTART_DELAY = 1.0


@dataclass(frozen=True, slots=True)
class PoolOptions:
    socket_port: int = 5557
    replay_socket_port: int = 0  # 0 = no replay
    max_concurrent_replays: int = 8
    subscriber: SubscriberOptions = field(default_factory=SubscriberOptions)
    # Global-socket mode: bind this endpoint; every pod connects to it (module docstring).
    bind_endpoint: str = ""


SOURCE_QUEUE = 10_000  # messages a source may have waiting in global-socket mode (then: a gap)
MAX_TOPIC_SHOWN = 256  # bytes of an unknown topic a log line shows


def tcp(address: str, port: int) -> str:
    """The ZeroMQ endpoint of `address` at `port` (`tcp://[fd00::1]:5557` for IPv6)."""
    return f"tcp://{join_hostport(address, port)}"


class _Source:
    __slots__ = ("chains", "queue", "subscriber", "task")

    def __init__(self, chains: SourceChains, queue: asyncio.Queue[Message] | None) -> None:
        self.chains = chains
        self.task: asyncio.Task[None] | None = None
        self.subscriber: Subscriber | None = None
        self.queue = queue  # global-socket mode: what the bound socket received for this source


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
        # ip:port -> every endpoint of the pool at it, oldest first. Discovery can hold two for a moment while it
        # applies one change (a name moving onto the address another name leaves in the same change): the
        # address's source reads the newest's sockets (`at[-1]`), and stops only when the last one is removed.
        self._at: dict[str, list[Endpoint]] = {}
        self._slots: asyncio.Semaphore | None = None
        self._ctx: zmq.asyncio.Context | None = None
        self._limiter = LogLimiter(log)
        self._closed = False
        # Removals still tearing down; a re-added endpoint waits for its old state to be gone.
        self._stopping: dict[str, asyncio.Task[None]] = {}
        # Global-socket mode: the bound socket's task, and topic pod id -> pod(s), rebuilt on change.
        self._receiver: asyncio.Task[None] | None = None
        self._ids: dict[str, list[str]] | None = None

    def __len__(self) -> int:
        return len(self._sources)

    def subscriber(self, pod: str) -> Subscriber | None:
        src = self._sources.get(pod)
        return src.subscriber if src is not None else None

    def chains(self) -> list[SourceChains]:
        return [s.chains for s in self._sources.values()]

    # -- DatastoreListener ---------------------------------------------------------------------
    def endpoint_added(self, endpoint: Endpoint) -> None:
        if self._closed:
            return
        pod = endpoint.hostport
        at = self._at.setdefault(pod, [])
        if any(ep is endpoint for ep in at):
            return
        previous = at[-1] if at else None
        at.append(endpoint)
        self._follow(pod, previous, endpoint)

    def endpoint_removed(self, endpoint: Endpoint) -> None:
        pod = endpoint.hostport
        at = self._at.get(pod, [])
        if not any(ep is endpoint for ep in at):
            return
        owned = at[-1] is endpoint
        at[:] = [ep for ep in at if ep is not endpoint]
        if at:
            if owned:
                self._follow(pod, endpoint, at[-1])
            return
        del self._at[pod]
        self._ids = None
        self._stop_source(pod)

    def _follow(self, pod: str, previous: Endpoint | None, endpoint: Endpoint) -> None:
        """The address's source now reads `endpoint`'s sockets, not `previous`'s: the same rank's (the same server)
        keeps its subscription and state, another rank's starts over on its own socket once the old one stopped."""
        self._ids = None
        if previous is not None and pod in self._sources:
            if previous.spec.rank == endpoint.spec.rank:
                return
            self._stop_source(pod)
        if self._closed:
            return
        queue: asyncio.Queue[Message] | None = asyncio.Queue(SOURCE_QUEUE) if self.options.bind_endpoint else None
        self._sources[pod] = _Source(self.new_chains(), queue)
        self._start(pod)

    def _stop_source(self, pod: str) -> None:
        src = self._sources.pop(pod, None)
        if src is None:
            return
        previous = self._stopping.get(pod)  # removed, re-added and removed again before that stop ended
        try:
            task = asyncio.get_running_loop().create_task(self._stop(pod, src, previous), name=f"kv-stop-{pod}")
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
        receiver, self._receiver = self._receiver, None
        sources, self._sources = self._sources, {}
        with contextlib.suppress(Exception):
            await cancel_and_wait(receiver)
        with contextlib.suppress(Exception):
            await cancel_and_wait(*(src.task for src in sources.values()))

    # -- internals -----------------------------------------------------------------------------
    def _start(self, pod: str) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        src = self._sources[pod]
        src.task = loop.create_task(self._run(pod, src), name=f"kv-events-{pod}")
        if self.options.bind_endpoint and self._receiver is None:
            self._receiver = loop.create_task(self._receive(), name="kv-events-bound-socket")

    async def _run(self, pod: str, src: _Source) -> None:
        o = self.options
        if self._slots is None:
            self._slots = asyncio.Semaphore(max(1, o.max_concurrent_replays))
        if self._ctx is None:
            self._ctx = zmq.asyncio.Context.instance()
        endpoint = self._at[pod][-1]
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
                raise_if_cancelled()  # a Redis store's client may have swallowed the task's cancellation
                sub = Subscriber(
                    pod,
                    o.bind_endpoint or tcp(endpoint.address, port),
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
                if src.queue is None:
                    await sub.run()
                else:
                    while True:
                        await sub.handle(await src.queue.get())
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.stats.restarts += 1
                self._limiter.warning(f"restart:{pod}", "KV event subscriber for %s failed (%r); restarting", pod, e)
                failed = True
                await asyncio.sleep(RESTART_DELAY)

    # -- global-socket mode --------------------------------------------------------------------------
    async def _receive(self) -> None:
        """Bind the pool's SUB socket and hand each message to the source its topic names."""
        o = self.options
        if self._ctx is None:
            self._ctx = zmq.asyncio.Context.instance()
        while True:
            sock = sub_socket(self._ctx, o.subscriber, o.bind_endpoint)
            try:
                sock.bind(o.bind_endpoint)
                log.info("KV events: listening for publishers", extra={"endpoint": o.bind_endpoint})
                while True:
                    self._dispatch(await sock.recv_multipart())
                    await asyncio.sleep(0)  # a ready recv does not yield; let requests run
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.stats.restarts += 1
                self._limiter.warning("bind", "KV events: socket %s failed (%r); retrying", o.bind_endpoint, e)
                await asyncio.sleep(RESTART_DELAY)
            finally:
                sock.close(linger=0)

    def _dispatch(self, frames: list[bytes]) -> None:
        self.stats.messages += 1
        try:
            msg = parse_frames(frames)
        except MalformedMessage as e:
            self.stats.malformed_frames += 1
            self._limiter.warning("frames:bound", "KV events: malformed message: %s", e)
            return
        pod = self._source_of(msg)
        src = self._sources.get(pod) if pod else None
        if src is None or src.queue is None:
            self.stats.unknown_sources += 1
            # One key for the site: the topic is the publisher's choice (any size, a new one per message).
            topic = msg.topic
            shown = topic[:MAX_TOPIC_SHOWN]
            self._limiter.warning(
                "unknown-topic",
                "KV events for topic %r%s: no such endpoint in the pool; skipped",
                shown,
                f" (+{len(topic) - len(shown)} bytes)" if len(topic) > len(shown) else "",
            )
            return
        try:
            src.queue.put_nowait(msg)
        except asyncio.QueueFull:
            self.stats.queue_drops += 1  # the source sees the gap and replays it (or counts it lost)

    def _source_of(self, msg: Message) -> str | None:
        """The pod (ip:port) a topic ``kv@<id>@<model>`` names: <id> is its ip:port, name or IP."""
        parts = msg.topic.split(b"@", 2)
        if len(parts) < 2:
            return None
        ids = self._ids
        if ids is None:
            ids = self._ids = {}
            for pod, at in self._at.items():
                ep = at[-1]
                for key in dict.fromkeys((pod, ep.name, ep.address)):
                    ids.setdefault(key, []).append(pod)
        pods = ids.get(parts[1].decode("utf-8", "replace"))
        if not pods:
            return None
        if len(pods) == 1:
            return pods[0]
        # One IP, several data-parallel ranks: the batch says which.
        try:
            rank = decode_batch(msg.payload).data_parallel_rank or 0
        except MalformedMessage:
            return pods[0]  # the source counts it as unreadable
        return next((p for p in pods if self._at[p][-1].spec.rank == rank), None)

    async def _stop(self, pod: str, src: _Source, previous: asyncio.Task[None] | None) -> None:
        """Ends `src` and forgets the pod; after `previous` (an earlier stop of the pod), so stops end in
        order and a source started after this one (it waits for this stop) finds every forget done."""
        if previous is not None:
            await asyncio.shield(previous)
        with contextlib.suppress(Exception):
            await cancel_and_wait(src.task)
        try:
            await self.store.forget(pod, src.chains)
        except Exception:
            log.exception("forgetting KV state of %s failed", pod)
        log.info("unsubscribed from KV events", extra={"pod": pod})
