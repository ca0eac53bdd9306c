"""`redis-inflight-load-producer`: `inflight-load-producer` whose counts active-active EPP replicas share.

Why: in-flight counters are router-local — each replica sees only the requests it dispatched, so two
replicas behind one gateway each think a pod is half as busy as it is. This variant publishes its own
counters to Redis and adds every other live replica's to what consumers read.

How (no Redis round trip on the request path):

* every `syncInterval` (default 150 ms) a background task writes this replica's counters to the hash
  ``<keyPrefix>inflight:<replicaId>`` (field `ip:port` → "requests tokens") with a TTL of
  `replicaTTL` (default 2 s — the heartbeat: a replica that stops writing vanishes after it), and
  reads the other replicas' hashes (registry: the sorted set ``<keyPrefix>inflight-replicas``), summing
  them per pod into a local snapshot;
* consumers read a live view: remote snapshot + this replica's exact counters, so this replica's own
  dispatches count at once and the others' with at most one sync interval (+ a Redis round trip) of
  staleness. If Redis is unreachable for longer than `replicaTTL` the remote part is dropped (the
  view degrades to the router-local counts), never blocking a request. A failed exchange is counted
  (`llm_d_epp_inflight_sync_errors_total{producer_name}`, `sync_errors`) and logged at most every 10 s;
  another replica's field that does not parse is skipped (and counts below zero read as zero).

Parameters: those of `inflight-load-producer`, plus `redisConfig` {`address` redis://127.0.0.1:6379,
`keyPrefix` epp:}, `syncInterval` 150ms, `replicaTTL` 2s, `replicaId` (default host:pid:random).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry, Counter

from llmepp.datalayer.endpoint import Endpoint, InFlight
from llmepp.framework.plugin import PluginContext, PluginParams
from llmepp.observability.logging import LogLimiter
from llmepp.observability.metrics import PREFIX, per_registry
from llmepp.plugins.producers.inflight_load import InFlightLoadProducer
from llmepp.request.types import InferenceRequest
from llmepp.tasks import cancel_and_wait, raise_if_cancelled
from llmepp.units import parse_duration

log = logging.getLogger(__name__)


def _sync_errors_counter(registry: CollectorRegistry) -> Counter:
    return Counter(
        PREFIX + "inflight_sync_errors",
        "Failed exchanges of redis-inflight-load-producer counters with Redis (the view stays router-local).",
        ("producer_name",),
        registry=registry,
    )


class SharedRedisConfig(PluginParams):
    address: str = "redis://127.0.0.1:6379"
    key_prefix: str = "epp:"


class SharedLoads(Mapping[Endpoint, InFlight]):
    """This replica's counters plus the other replicas' last snapshot, per endpoint."""

    def __init__(self, producer: RedisInFlightLoadProducer) -> None:
        self._p = producer

    def __getitem__(self, ep: Endpoint) -> InFlight:
        local = self._p.loads.get(ep)
        remote = self._p.remote.get(self._p.pod(ep)) if self._p.remote else None
        if remote is None:
            if local is None:
                raise KeyError(ep)
            return local
        if local is None:
            return InFlight(remote[0], remote[1])
        return InFlight(local.requests + remote[0], local.tokens + remote[1])

    def __iter__(self) -> Iterator[Endpoint]:
        seen = set(self._p.loads)
        yield from seen
        for ep, pod in self._p.pods.items():
            if ep not in seen and pod in self._p.remote:
                yield ep

    def __len__(self) -> int:
        return sum(1 for _ in self)


class RedisInFlightLoadProducer(InFlightLoadProducer):
    """`inflight-load-producer` (same accounting, same InFlightLoad data key) shared through Redis.

        InFlightLoad(e) = this replica's counters(e) + Σ_{other live replicas r} snapshot_r(e)

    snapshot_r is at most `syncInterval` + one Redis round trip old; see the module docstring for the
    exchange. Parameters: the parent's, plus `redisConfig` {`address`, `keyPrefix` "epp:"},
    `syncInterval` 150ms, `replicaTTL` 2s, `replicaId` (default host:pid:random).
    """

    type = "redis-inflight-load-producer"

    class Params(InFlightLoadProducer.Params):
        redis_config: SharedRedisConfig | None = None
        sync_interval: str = "150ms"
        replica_ttl: str = msgspec.field(default="2s", name="replicaTTL")
        replica_id: str = ""

    def __init__(self, name: str, params: Params) -> None:
        super().__init__(name, params)
        cfg = params.redis_config or SharedRedisConfig()
        self.interval = parse_duration(params.sync_interval)
        self.replica_ttl = parse_duration(params.replica_ttl)
        if self.interval <= 0 or self.replica_ttl <= self.interval:
            raise ValueError("syncInterval must be > 0 and replicaTTL longer than syncInterval")
        self.replica = params.replica_id or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        from llmepp.kvevents.redis_index import connect  # redis is imported only when configured

        self.redis = connect(cfg.address, timeout=max(0.2, self.interval))
        self.hash_key = f"{cfg.key_prefix}inflight:{self.replica}"
        self.prefix = f"{cfg.key_prefix}inflight:"
        self.registry_key = f"{cfg.key_prefix}inflight-replicas"
        self.remote: dict[str, tuple[int, int]] = {}
        self.pods: dict[Endpoint, str] = {}
        self._view = SharedLoads(self)
        self.synced_at = 0.0  # monotonic time of the last successful exchange
        self._task: asyncio.Task[None] | None = None
        self._log = LogLimiter(log)
        self.sync_errors = 0  # failed exchanges (also llm_d_epp_inflight_sync_errors_total)
        # Written as this instance's heartbeat: another value found there means another live process
        # uses our replicaId (a `replicaId` in a config all replicas share), and nothing is shared.
        self._nonce = secrets.token_hex(8).encode()
        self.id_collisions = 0
        self._errors_metric: Counter | None = None

    def setup(self, ctx: PluginContext) -> None:
        super().setup(ctx)
        if ctx.metrics is not None:
            errors = per_registry(ctx.metrics.registry, "inflight_sync_errors", _sync_errors_counter)
            self._errors_metric = errors.labels(self.name)
        self._ensure_task()

    @property
    def view(self) -> SharedLoads:
        """This replica's counters plus the other replicas' last snapshot: what every consumer reads."""
        return self._view

    def pod(self, ep: Endpoint) -> str:
        pod = self.pods.get(ep)
        return pod if pod is not None else ep.hostport

    def endpoint_added(self, endpoint: Endpoint) -> None:
        super().endpoint_added(endpoint)
        self.pods[endpoint] = endpoint.hostport

    def endpoint_removed(self, endpoint: Endpoint) -> None:
        super().endpoint_removed(endpoint)
        self.pods.pop(endpoint, None)

    def produce(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> None:
        if self._task is None:
            self._ensure_task()
        request.data[self.key] = self.view

    async def check(self) -> None:
        from llmepp.kvevents.redis_index import check_reachable

        await check_reachable(self.redis, f"plugin {self.name!r}: redisConfig.address", self.name)

    async def aclose(self) -> None:
        task, self._task = self._task, None
        with contextlib.suppress(Exception):  # its failures were counted and logged as they happened
            await cancel_and_wait(task)
        with contextlib.suppress(Exception):
            await self.redis.delete(self.hash_key, self.hash_key + ":alive")
            await self.redis.zrem(self.registry_key, self.replica)
        await self.redis.aclose()

    # -- the exchange ------------------------------------------------------------------------------
    def _ensure_task(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._task = loop.create_task(self._run(), name=f"{self.name}-sync")

    async def _run(self) -> None:
        while True:
            try:
                async with asyncio.timeout(self.replica_ttl):
                    await self.sync_once()
                self.synced_at = time.monotonic()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.sync_errors += 1
                if self._errors_metric is not None:
                    self._errors_metric.inc()
                self._log.warning("sync", "%s: in-flight exchange with Redis failed: %r", self.name, e)
                if time.monotonic() - self.synced_at > self.replica_ttl:
                    self.remote = {}  # too old to trust: fall back to router-local counts
            raise_if_cancelled()  # redis-py may have swallowed aclose's cancellation
            await asyncio.sleep(self.interval)

    async def sync_once(self) -> None:
        """Publish this replica's counters, then read and sum every other live replica's."""
        ttl_ms = int(self.replica_ttl * 1000)
        mine = {self.pod(ep): f"{c.requests} {c.tokens}" for ep, c in self.loads.items() if c.requests or c.tokens}
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(self.hash_key)
        if mine:
            pipe.hset(self.hash_key, mapping=mine)  # type: ignore[arg-type]
        pipe.set(self.hash_key + ":alive", self._nonce, px=ttl_ms, get=True)
        pipe.pexpire(self.hash_key, ttl_ms)
        pipe.zadd(self.registry_key, {self.replica: time.time()})
        pipe.zrange(self.registry_key, 0, -1)
        replies: list[Any] = await pipe.execute()
        previous = replies[-4]  # the heartbeat before ours; on our first write, maybe a predecessor's
        if previous is not None and previous != self._nonce and self.synced_at:
            self.id_collisions += 1
            self._log.warning(
                "replica-id",
                "%s: another live EPP writes in-flight counts as replicaId %r: neither sees the other's load "
                "(give each replica its own replicaId, or leave it unset)",
                self.name, self.replica,
            )  # fmt: skip
        others = [r.decode() for r in replies[-1] if r.decode() != self.replica]
        if not others:
            self.remote = {}
            return
        pipe = self.redis.pipeline(transaction=False)
        for other in others:
            pipe.exists(self.prefix + other + ":alive")
            pipe.hgetall(self.prefix + other)
        got: list[Any] = await pipe.execute()
        remote: dict[str, tuple[int, int]] = {}
        dead = []
        bad = 0
        for i, other in enumerate(others):
            alive, counts = got[2 * i], got[2 * i + 1]
            if not alive:
                dead.append(other)
                continue
            for pod_b, value in counts.items():
                try:  # another build's (or a corrupt) field: skip it, not the whole exchange
                    req_s, tok_s = value.split()
                    req, tok = max(0, int(req_s)), max(0, int(tok_s))  # never below zero
                    pod = pod_b.decode()
                except (ValueError, UnicodeDecodeError):
                    bad += 1
                    continue
                r, t = remote.get(pod, (0, 0))
                remote[pod] = (r + req, t + tok)
        if bad:
            self._log.warning("malformed", "%s: skipped %d malformed in-flight entries in Redis", self.name, bad)
        if dead:
            await self.redis.zrem(self.registry_key, *dead)
        self.remote = remote
