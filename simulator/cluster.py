"""Running many simulated pods: in-process (asyncio or a background thread) or as an ``epp-sim`` subprocess.

In-process, on the caller's event loop::

    async with SimCluster([PodConfig(host="127.0.0.2", port=0), PodConfig(host="127.0.0.3", port=0)],
                          time_scale=10) as cluster:
        urls = cluster.urls            # ["http://127.0.0.2:41234", "http://127.0.0.3:39877"]
        await cluster.pods[0].kill(duration=1.0)

From synchronous code (own loop in a daemon thread)::

    with ThreadedSimCluster(configs, time_scale=10) as cluster:
        cluster.addresses

As a subprocess (what ``make run`` and benchmarks use to keep the simulator's CPU off their own loop)::

    with SimProcess(["--pods", "2", "--port", "0", "--time-scale", "10"]) as proc:
        proc.addresses                  # parsed from the ready line
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TypeVar

from llmepp.testing.lifetime import die_with_parent
from llmepp_sim.clock import SimClock
from llmepp_sim.config import PodConfig, SimConfig
from llmepp_sim.pod import SimPod
from llmepp_sim.textgen import filler_vocabulary
from llmepp_sim.tokenizer import shared_tokenizer

T = TypeVar("T")
READY_PREFIX = "epp-sim: ready "
POD_LINE_PREFIX = "epp-sim: pod "


def named(configs: Sequence[PodConfig]) -> list[PodConfig]:
    """Copies with every unnamed pod called ``sim-<index>``."""
    return [c if c.name else dataclasses.replace(c, name=f"sim-{i}") for i, c in enumerate(configs)]


class SimCluster:
    def __init__(self, pods: Sequence[PodConfig] | SimConfig, *, time_scale: float | None = None) -> None:
        if isinstance(pods, SimConfig):
            config = dataclasses.replace(pods, pods=named(pods.pods))
            if time_scale is not None:
                config.time_scale = time_scale
        else:
            config = SimConfig(pods=named(pods), time_scale=1.0 if time_scale is None else time_scale)
        config.validate()
        self.config = config
        self.clock = SimClock(config.time_scale)
        tokenizer = shared_tokenizer()
        fillers = filler_vocabulary(tokenizer)
        self.pods = [SimPod(c, self.clock, tokenizer, fillers) for c in config.pods]

    @property
    def addresses(self) -> list[str]:
        return [p.address for p in self.pods]

    @property
    def urls(self) -> list[str]:
        return [p.url for p in self.pods]

    def pod(self, name: str) -> SimPod:
        for pod in self.pods:
            if pod.name == name:
                return pod
        raise KeyError(name)

    async def start(self) -> None:
        try:
            for pod in self.pods:
                await pod.start()
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        await asyncio.gather(*(pod.stop() for pod in self.pods), return_exceptions=True)

    async def __aenter__(self) -> SimCluster:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    def pod_lines(self) -> list[str]:
        return [
            f"{POD_LINE_PREFIX}{p.name} http={p.address} role={p.config.role} "
            f"kv-events={p.kv_events_endpoint or '-'} replay={p.kv_events_replay_endpoint or '-'} "
            f"topic={p.kv_events_topic if p.kv_events_endpoint else '-'}"
            + (f" grpc={p.grpc_address}" if p.grpc_address else "")
            for p in self.pods
        ]

    def ready_line(self) -> str:
        return READY_PREFIX + ",".join(self.addresses)


class ThreadedSimCluster:
    """A ``SimCluster`` on its own event loop in a daemon thread, for synchronous callers."""

    def __init__(self, pods: Sequence[PodConfig] | SimConfig, *, time_scale: float | None = None) -> None:
        self._args = (pods, time_scale)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.cluster: SimCluster | None = None

    def start(self, timeout: float = 30.0) -> ThreadedSimCluster:
        started: concurrent.futures.Future[None] = concurrent.futures.Future()
        loop = asyncio.new_event_loop()
        self._loop = loop

        def run() -> None:
            asyncio.set_event_loop(loop)

            async def boot() -> None:
                pods, time_scale = self._args
                self.cluster = SimCluster(pods, time_scale=time_scale)
                await self.cluster.start()

            try:
                loop.run_until_complete(boot())
            except BaseException as exc:
                started.set_exception(exc)
                return
            started.set_result(None)
            loop.run_forever()

        self._thread = threading.Thread(target=run, name="epp-sim", daemon=True)
        self._thread.start()
        started.result(timeout)
        return self

    def call(self, fn: Callable[[], Awaitable[T]], timeout: float | None = 30.0) -> T:
        """Run ``fn()`` (a coroutine function) on the cluster's loop, e.g. ``call(lambda: pod.kill(1))``."""
        assert self._loop is not None

        async def wrapper() -> T:
            return await fn()

        return asyncio.run_coroutine_threadsafe(wrapper(), self._loop).result(timeout)

    @property
    def pods(self) -> list[SimPod]:
        assert self.cluster is not None
        return self.cluster.pods

    @property
    def addresses(self) -> list[str]:
        assert self.cluster is not None
        return self.cluster.addresses

    @property
    def urls(self) -> list[str]:
        assert self.cluster is not None
        return self.cluster.urls

    def stop(self, timeout: float = 30.0) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if self.cluster is not None:
            asyncio.run_coroutine_threadsafe(self.cluster.stop(), loop).result(timeout)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        loop.close()
        self._loop = self._thread = None

    def __enter__(self) -> ThreadedSimCluster:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


@dataclass(frozen=True)
class PodInfo:
    """One pod as announced on a subprocess' stdout."""

    name: str
    address: str
    role: str
    kv_events_endpoint: str
    kv_events_replay_endpoint: str
    kv_events_topic: str
    grpc_address: str = ""  # host:port of the pod's gRPC face; "" = none

    @property
    def url(self) -> str:
        return f"http://{self.address}"


_POD_LINE = re.compile(
    r"^epp-sim: pod (?P<name>\S+) http=(?P<address>\S+) role=(?P<role>\S+) kv-events=(?P<kv>\S+) "
    r"replay=(?P<replay>\S+) topic=(?P<topic>\S+)(?: grpc=(?P<grpc>\S+))?$"
)


def parse_pod_line(line: str) -> PodInfo | None:
    match = _POD_LINE.match(line.strip())
    if match is None:
        return None
    dash = lambda value: "" if value == "-" else value  # noqa: E731
    return PodInfo(
        match["name"],
        match["address"],
        match["role"],
        dash(match["kv"]),
        dash(match["replay"]),
        dash(match["topic"]),
        match["grpc"] or "",
    )


class SimProcess:
    """``epp-sim`` in a child process; ``start()`` returns once its ready line has been printed."""

    def __init__(self, args: Sequence[str], *, env: dict[str, str] | None = None, ready_timeout: float = 30.0) -> None:
        self.args = [sys.executable, "-m", "llmepp_sim", *args]
        self._env = {**os.environ, **(env or {})}
        self._ready_timeout = ready_timeout
        self.process: subprocess.Popen[str] | None = None
        self.pods: list[PodInfo] = []
        self.output: list[str] = []
        self._drain: threading.Thread | None = None

    @property
    def addresses(self) -> list[str]:
        return [p.address for p in self.pods]

    @property
    def urls(self) -> list[str]:
        return [p.url for p in self.pods]

    def start(self) -> SimProcess:
        ready = self._spawn()
        try:
            ready.result(self._ready_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    async def start_async(self) -> SimProcess:
        """`start` for an event loop: the fork on the loop's thread (so the pods die with this process, see
        `die_with_parent`), the wait without blocking the loop."""
        ready = self._spawn()
        try:
            async with asyncio.timeout(self._ready_timeout):
                await asyncio.wrap_future(ready)
        except BaseException:
            await asyncio.to_thread(self.stop)
            raise
        return self

    def _spawn(self) -> concurrent.futures.Future[None]:
        """The process, and a future done once its ready line has been printed."""
        self.process = subprocess.Popen(
            die_with_parent(self.args), stdout=subprocess.PIPE, text=True, env=self._env, start_new_session=True
        )
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()

        def read() -> None:
            assert self.process is not None and self.process.stdout is not None
            for line in self.process.stdout:
                self.output.append(line.rstrip("\n"))
                info = parse_pod_line(line)
                if info is not None:
                    self.pods.append(info)
                if line.startswith(READY_PREFIX) and not ready.done():
                    ready.set_result(None)
            if not ready.done():
                ready.set_exception(RuntimeError(f"epp-sim exited before ready: {self.output[-20:]}"))

        self._drain = threading.Thread(target=read, name="epp-sim-stdout", daemon=True)
        self._drain.start()
        return ready

    def stop(self, timeout: float = 10.0) -> int | None:
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout)
        if self._drain is not None:
            self._drain.join(timeout)
        return process.returncode

    def __enter__(self) -> SimProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
