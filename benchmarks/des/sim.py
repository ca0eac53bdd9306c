"""The discrete-event simulation: the real EPP pipeline routing to the real simulator engines, in virtual time.

Everything runs on one ``VirtualTimeLoop`` (``benchmarks.des.vloop``):

* **Pods** are ``llmepp_sim.engine.Engine`` instances, unchanged, each running its own asyncio step loop on
  a ``VirtualClock``. Only the HTTP layer of ``SimPod`` is left out; what its request handler does before
  ``engine.submit`` (context-length check, ``FillerStream``, ``SimRequest``) is repeated here.
* **The EPP** is ``llmepp.config.loader.build`` + ``llmepp.director.Director`` with a real ``Datastore`` of
  one ``Endpoint`` per pod. Each arrival is parsed by ``llmepp.request.parsers.parse_request`` from the
  same JSON body the live client sends, routed with ``await director.handle_request``, and completed with
  ``response_first_chunk`` / ``response_complete`` at the engine's first-token and finish events, as the
  ext_proc stream does.
* **Metrics refresh** plays the live collector: every ``refresh_interval`` of simulated time each
  endpoint's ``EndpointMetrics`` is replaced by a snapshot of its engine (waiting, running, KV usage,
  block size and count), the pool split into the collector's ``SUB_TICKS`` staggered slots.
  ``refresh_interval = 0`` is an oracle: every endpoint is refreshed right before each routing decision.
* **Clients** are open-loop: requests arrive at the schedule's times whatever the cluster does; a request
  not finished ``request_timeout`` after arrival, or without a first token ``first_token_timeout`` after it,
  is cancelled (the engine aborts it, the EPP sees a client disconnect), like the live load generator.
  With ``drain_between_stages`` each stage starts when every request of the one before has finished, as
  the live routing benchmarks' ladder does (inference-perf's stages); the arrival times then count from
  each stage's actual start.

* **KV events** (when the config has a ``precise-prefix-cache-producer``): each engine's block pool reports
  its stored / removed blocks to a sink that batches them like the live publisher, encodes them in vLLM's
  wire format and, ``kv_event_delay`` later, hands the batch to every replica's producer through the same
  ``SourceIngest`` its ZeroMQ subscriber feeds (discovery is switched off; the index reads the loop's clock,
  so speculative entries lapse in simulated time).
* **Scenarios** of the live precise benchmark: ``eviction`` (part of one pod's prefix cache evicted
  periodically behind the EPP's back, ``Engine.evict_cached`` as ``POST /admin/evict`` does) and
  ``replicas`` (independent EPPs built from the same config, arrivals alternating between them as Envoy's
  round robin over the ext_proc cluster does; each replica sees only its own requests, and every replica
  consumes all KV events).

What is not modelled: network, Envoy and EPP processing time (routing takes zero simulated time unless
``request_latency`` adds a fixed delay before it), scrape round trips, flow control's wall-clock timers,
ZeroMQ loss and replay.

Speed-ups that do not change behaviour: a shared prompt's token list and prompt block hashes are computed
once and handed to each ``SimRequest`` (the engine only hashes blocks it has no hash for yet), and RNGs of
the EPP's plugins are seeded so a run is reproducible.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import logging
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from benchmarks.des.policies import policy_config
from benchmarks.des.results import QueueSample, RequestRecord, stage_metrics
from benchmarks.des.vloop import VirtualClock, VirtualTimeLoop, run
from benchmarks.des.workload import MODEL, Arrival, Prompt, Schedule, request_body
from llmepp.config.loader import build, load_config
from llmepp.datalayer.collector import SUB_TICKS
from llmepp.datalayer.datastore import Datastore
from llmepp.datalayer.endpoint import Endpoint, EndpointMetrics, EndpointSpec
from llmepp.director import Director, RoutingDecision
from llmepp.errors import RequestError
from llmepp.kvevents.ingest import SourceIngest
from llmepp.kvevents.wire import Message, decode_batch
from llmepp.observability.metrics import EppMetrics
from llmepp.plugins.producers.precise_prefix import PrecisePrefixCacheProducer
from llmepp.request.parsers import parse_request
from llmepp.request.types import InferenceRequest, ResponseInfo, TerminationCause, Usage
from llmepp_sim import blockhash
from llmepp_sim.config import PodConfig, pod_config_from_dict, pod_config_to_dict
from llmepp_sim.engine import Engine, RequestTooLarge, SimRequest
from llmepp_sim.kvwire import KVEvent, encode_batch
from llmepp_sim.lora import LoraManager
from llmepp_sim.profiles import load_profile
from llmepp_sim.textgen import FillerStream, FillerToken, filler_vocabulary
from llmepp_sim.tokenizer import shared_tokenizer

log = logging.getLogger(__name__)

# Prompt tokens whose parse, token list and hashes are memoised: ~19 bytes per token (~400 MB when full).
PROMPT_CACHE_TOKENS = 20_000_000
REPO = Path(__file__).resolve().parents[2]
EPOCH = 1000.0  # virtual time of the run's start (update_time 0.0 means "never scraped" to the EPP)
HEADERS = {":path": "/v1/completions", ":method": "POST", "content-type": "application/json"}


@dataclass(frozen=True)
class Eviction:
    """Evict ``fraction`` of pod ``pod``'s KV capacity from its prefix cache every ``every`` simulated seconds,
    behind the EPP's back (the live benchmark's ``POST /admin/evict``; round ``k`` uses seed ``seed + k``)."""

    pod: int = 0
    fraction: float = 0.2
    every: float = 30.0
    order: str = "lru"
    seed: int = 1


@dataclass
class SimOptions:
    pods: int = 8
    policy: str = "default"  # a name from policies.NAMED or a config file path
    epp_config: str | None = None  # EndpointPickerConfig YAML; overrides ``policy``
    profile: str | None = "qwen3-32b-h100-tp2"  # simulator latency profile (name or path)
    pod_overrides: dict[str, Any] = field(default_factory=dict)  # PodConfig fields on top of the profile
    refresh_interval: float = 0.050  # s of simulated time; 0 = fresh metrics at every decision
    request_timeout: float = 300.0  # s after arrival
    # s after arrival without a first token before the request fails ("ttft-timeout"; the live loadgen's
    # read timeout); None: only `request_timeout`.
    first_token_timeout: float | None = None
    # s from a request's arrival to its routing decision: the client -> gateway -> EPP -> pod path, which is
    # otherwise not modelled (0 = routing and delivery are instantaneous). Counted in TTFT.
    request_latency: float = 0.0
    seed: int = 0
    model: str = MODEL
    replicas: int = 1  # EPP replicas; arrivals alternate between them
    # s of simulated time from a pod's block change to the EPP applying it: the live publisher's flush
    # interval (5 ms wall) at time scale 4, plus delivery.
    kv_event_delay: float = 0.025
    eviction: Eviction | None = None
    # Each stage waits for the previous one's requests to finish (the live ladder, `benchmarks.loadgen`):
    # the pods idle between stages, and anything on a wall-clock cadence (evictions) keeps running there.
    drain_between_stages: bool = False

    def pod_config(self) -> PodConfig:
        values: dict[str, Any] = pod_config_to_dict(PodConfig())
        if self.profile:
            values.update(load_profile(self.profile))
        values.update({k.replace("-", "_"): v for k, v in self.pod_overrides.items()})
        config = pod_config_from_dict(values)
        config.validate()
        return config

    def config_text(self) -> str:
        return self.epp_config if self.epp_config is not None else policy_config(self.policy)


@dataclass
class SimResult:
    options: SimOptions
    schedule: Schedule
    records: list[RequestRecord]
    samples: list[QueueSample]
    wall_seconds: float
    simulated_seconds: float
    loop_iterations: int
    pod_stats: list[dict[str, Any]]
    epp_wall_seconds: float = 0.0
    kv_events: list[dict[str, int]] = field(default_factory=list)  # per replica's precise producer
    evictions: list[int] = field(default_factory=list)  # blocks evicted per round
    stage_starts: list[float] = field(default_factory=list)  # s since the run's start, as the stages began

    def stages(self) -> list[dict[str, Any]]:
        return stage_metrics(self.records, self.schedule, self.samples, self.stage_starts)

    def speed(self) -> dict[str, float]:
        wall = max(self.wall_seconds, 1e-9)
        return {
            "wall_s": self.wall_seconds,
            "simulated_s": self.simulated_seconds,
            "sim_s_per_wall_s": self.simulated_seconds / wall,
            "requests": len(self.records),
            "requests_per_wall_s": len(self.records) / wall,
            "output_tokens": sum(r.output_tokens for r in self.records),
            "output_tokens_per_wall_s": sum(r.output_tokens for r in self.records) / wall,
            "loop_iterations": self.loop_iterations,
            "epp_us_per_request": self.epp_wall_seconds / max(1, len(self.records)) * 1e6,
        }

    def to_json(self) -> dict[str, Any]:
        o = self.options
        return {
            "mode": "des",
            "pods": o.pods,
            "policy": o.policy if o.epp_config is None else "custom",
            "profile": o.profile,
            "pod_config": {k: v for k, v in pod_config_to_dict(o.pod_config()).items() if k in _REPORTED_POD_FIELDS},
            "refresh_interval_s": o.refresh_interval,
            "request_latency_s": o.request_latency,
            "request_timeout_s": o.request_timeout,
            "seed": o.seed,
            "replicas": o.replicas,
            "kv_event_delay_s": o.kv_event_delay,
            "eviction": None if o.eviction is None else dataclasses.asdict(o.eviction),
            "drain_between_stages": o.drain_between_stages,
            "workload": self.schedule.workload.describe(),
            "stages": self.stages(),
            "speed": self.speed(),
            "pods_detail": self.pod_stats,
            "kv_events": self.kv_events,
            "evictions": self.evictions,
        }


_REPORTED_POD_FIELDS = {
    "max_num_seqs", "max_model_len", "time_to_first_token", "prefill_overhead", "prefill_time_per_token",
    "inter_token_latency", "time_factor_under_load", "kv_cache_size", "block_size", "enable_kvcache",
}  # fmt: skip


class _Pod:
    __slots__ = ("config", "endpoints", "engine", "index")

    def __init__(self, index: int, config: PodConfig, engine: Engine, endpoints: list[Endpoint]) -> None:
        self.index = index
        self.config = config
        self.engine = engine
        self.endpoints = endpoints  # one per EPP replica (each has its own datastore, as live)


class Simulation:
    """One run of a schedule through one policy on ``options.pods`` simulated pods."""

    def __init__(self, loop: VirtualTimeLoop, schedule: Schedule, options: SimOptions) -> None:
        self.loop = loop
        self.schedule = schedule
        self.options = options
        self.t0 = loop.time()
        base = options.pod_config()
        clock = VirtualClock(loop)
        tokenizer = shared_tokenizer()
        self.fillers: tuple[FillerToken, ...] = filler_vocabulary(tokenizer)
        # One datastore per EPP replica, as live (each process discovers the pods itself): the director's in-flight
        # counters (`endpoint.inflight`) are per replica.
        self.datastores = [Datastore() for _ in range(max(1, options.replicas))]
        self.pods: list[_Pod] = []
        self.feeds: list[_EventFeed] = []
        config_text, kv_events = _des_config(options.config_text())
        for i in range(options.pods):
            config = dataclasses.replace(base, name=f"sim-{i}", host=_address(i), port=8000)
            feed = _EventFeed(loop, f"kv@{config.name}@{options.model}".encode(), base.event_batch_size,
                              options.kv_event_delay)  # fmt: skip
            engine = Engine(config, clock, LoraManager(config.lora_modules), feed if kv_events else None)
            spec = EndpointSpec(
                name=config.name, address=config.host, port=config.port, labels={"llm-d.ai/role": "both"}
            )
            endpoints = []
            for datastore in self.datastores:
                datastore.upsert(spec)
                endpoint = datastore.get(config.name)
                assert endpoint is not None
                endpoints.append(endpoint)
            self.pods.append(_Pod(i, config, engine, endpoints))
            self.feeds.append(feed)
        self._by_hostport = {p.endpoints[0].hostport: p for p in self.pods}
        self.directors: list[Director] = []
        self.producers: list[PrecisePrefixCacheProducer] = []
        for r in range(max(1, options.replicas)):
            metrics = EppMetrics()
            with _quiet(PrecisePrefixCacheProducer.__module__):  # its "discoverPods is false" warning: on purpose
                components = build(load_config(config_text), datastore=self.datastores[r], metrics=metrics)
            director = Director(self.datastores[r], components.pipeline, metrics)
            _seed_rngs([*components.plugins.values(), director], options.seed, replica=r)
            precise = [p for p in components.plugins.values() if isinstance(p, PrecisePrefixCacheProducer)]
            # Metrics freshness checks, and the precise index's speculative entries lapsing, in simulated time.
            _virtual_clocks([*components.plugins.values(), components.pipeline.admission, *(p.index for p in precise)],
                            loop)  # fmt: skip
            for plugin in precise:
                self.producers.append(plugin)
                for pod, feed in zip(self.pods, self.feeds):
                    feed.ingests.append(plugin.in_process_source(pod.endpoints[r]))
            self.directors.append(director)
        self.evicted: list[int] = []  # blocks per eviction round
        self.stage_starts: list[float] = []  # s since t0
        self._slots: list[list[_Pod]] = [self.pods[s::SUB_TICKS] for s in range(SUB_TICKS)]
        self._block_size = base.block_size
        self._hash_seed = base.hash_seed
        self._root_hash = blockhash.root_hash(base.hash_seed)
        self._prompt_cache: dict[int, tuple[InferenceRequest, list[int], list[int]]] = {}
        self._prompt_cache_tokens = 0
        self._group_hashes: dict[int, list[int]] = {}
        self.records: list[RequestRecord] = []
        self.samples: list[QueueSample] = []
        self.epp_wall = 0.0  # wall seconds spent in director.handle_request (the EPP's own CPU cost)

    # ------------------------------------------------------------------ the run
    async def run(self) -> None:
        for pod in self.pods:
            pod.engine.start()
        self._refresh_all()
        background = [self.loop.create_task(self._refresher(), name="des-metrics-refresh")]
        if self.options.eviction is not None:
            background.append(self.loop.create_task(self._evictor(self.options.eviction), name="des-evict"))
        tasks: set[asyncio.Task[None]] = set()
        # A request task that raised (a plugin's bug, say) would otherwise vanish: not an error, not a TTFT.
        failures: list[BaseException] = []

        def done(task: asyncio.Task[None]) -> None:
            tasks.discard(task)
            if not task.cancelled() and (exc := task.exception()) is not None:
                failures.append(exc)

        by_stage: list[list[Arrival]] = [[] for _ in self.schedule.stages]
        for arrival in self.schedule.arrivals:
            by_stage[arrival.stage].append(arrival)
        shift = 0.0  # how much later than planned the current stage starts
        try:
            for planned, arrivals in zip(self.schedule.stage_starts, by_stage, strict=True):
                if self.options.drain_between_stages:
                    while tasks:
                        await asyncio.wait(list(tasks))
                    shift = self.loop.time() - self.t0 - planned  # starts when the last one ends, as live
                self.stage_starts.append(planned + shift)
                for arrival in arrivals:
                    delay = self.t0 + arrival.time + shift - self.loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    task = self.loop.create_task(self._serve(arrival))
                    tasks.add(task)
                    task.add_done_callback(done)
            while tasks:
                await asyncio.wait(list(tasks))
            if failures:
                raise RuntimeError(f"{len(failures)} simulated requests failed inside the DES") from failures[0]
            # Let the last stage's queue samples cover its whole window.
            end = self.t0 + self.schedule.end + shift
            if self.loop.time() < end:
                await asyncio.sleep(end - self.loop.time())
        finally:
            for task in background:
                task.cancel()
            for pod in self.pods:
                await pod.engine.stop()

    async def _serve(self, arrival: Arrival) -> None:
        loop = self.loop
        workload = self.schedule.workload
        prompt = workload.prompt(arrival.index)
        rec = RequestRecord(arrival.index, arrival.stage, loop.time() - self.t0)
        self.records.append(rec)
        arrived = loop.time()
        if self.options.request_latency > 0:
            await asyncio.sleep(self.options.request_latency)
        try:
            request, prompt_ids, hashes = self._prompt(prompt, arrival.index, loop.time())
            if self.options.refresh_interval <= 0:
                self._refresh_all()
            director = self.directors[arrival.index % len(self.directors)]
            t0 = time.perf_counter()
            decision = await director.handle_request(request, None)
            self.epp_wall += time.perf_counter() - t0
            assert isinstance(decision, RoutingDecision)  # no responder is configured
        except RequestError as e:
            rec.error = f"epp-{e.status}"
            return
        pod = self._by_hostport[decision.targets[0].hostport]
        rec.pod = pod.index
        info = ResponseInfo(status=200, streaming=True)
        sim_request: SimRequest | None = None
        first_seen = False
        try:
            max_tokens = prompt.output_len
            rec.prompt_tokens = len(prompt_ids)
            if len(prompt_ids) + max_tokens > pod.config.max_model_len:
                rec.error = "context-length"
                info.status = 400
                return
            sim_request = SimRequest(
                request_id=str(arrival.index),
                prompt_ids=prompt_ids,
                max_tokens=max_tokens,
                filler=FillerStream(self.fillers, pod.config.seed, prompt_ids),
            )
            sim_request.block_hashes = list(hashes)
            try:
                pod.engine.submit(sim_request)
            except RequestTooLarge:
                rec.error = "too-large"
                info.status = 400
                sim_request = None
                return
            deadline = arrived + self.options.request_timeout
            first_by = self.options.first_token_timeout
            async with asyncio.timeout_at(deadline if first_by is None else min(deadline, arrived + first_by)) as t:
                await sim_request.wait(0)
                t.reschedule(deadline)
                first_seen = True
                info.first_byte_at = loop.time()
                director.response_first_chunk(request, info)
                await sim_request.wait_finished()
            if sim_request.finish_reason == "abort":
                rec.error = "aborted"
                info.cause = TerminationCause.ERROR
                return
            first = sim_request.first_token_time
            last = sim_request.finish_time
            assert first is not None and last is not None
            n = len(sim_request.output_ids)
            rec.ttft = first - arrived
            rec.itl = (last - first) / (n - 1) if n > 1 else None
            rec.output_tokens = n
            rec.cached_tokens = sim_request.num_cached_tokens or 0
            rec.finished = last - self.t0
            info.usage = Usage(len(prompt_ids), n, rec.cached_tokens, len(prompt_ids) + n)
        except TimeoutError:
            rec.error = "timeout" if first_seen else "ttft-timeout"
            info.cause = TerminationCause.CLIENT_DISCONNECT
        finally:
            if sim_request is not None:
                pod.engine.abort(sim_request)  # no-op once finished; frees the seat of a timed-out request
            info.finished_at = loop.time()
            director.response_complete(request, info, decision)

    def _prompt(self, prompt: Prompt, index: int, arrived: float) -> tuple[InferenceRequest, list[int], list[int]]:
        """The parsed request, the prompt's token list and its full-block hashes (for ``SimRequest``).

        The request is ``parse_request`` of the JSON body the live client sends. Parsing is a pure function
        of headers and body, and every request of a prompt has the same body (request id and arrival time
        are not in it), so a repeated prompt reuses its first parse with fresh per-request state
        (``fresh_copy``; ``tests/des`` checks it equals a real parse). Block hashes are what the engine would
        compute itself (``blockhash.chain``): a group's shared prefix is hashed once, then each prompt's rest.
        The memo is filled until it holds ``PROMPT_CACHE_TOKENS`` tokens and then stops growing (not an LRU:
        workloads cycle through their prompts, where an LRU smaller than the cycle never hits).
        """
        if not prompt.shared:
            ids = prompt.token_ids()
            body = request_body(prompt, self.options.model)
            return parse_request(HEADERS, body, request_id=str(index), received_at=arrived), ids, []
        entry = self._prompt_cache.get(prompt.key)
        if entry is not None:
            template, ids, hashes = entry
            return fresh_copy(template, str(index), arrived), ids, hashes
        ids = prompt.token_ids()
        body = request_body(prompt, self.options.model)
        request = parse_request(HEADERS, body, request_id=str(index), received_at=arrived)
        hashes = self._prefix_hashes(prompt)
        blockhash.extend_chain(hashes, ids, self._block_size, self._root_hash)
        if self._prompt_cache_tokens + len(ids) <= PROMPT_CACHE_TOKENS:
            self._prompt_cache[prompt.key] = (request, ids, hashes)
            self._prompt_cache_tokens += len(ids)
        return request, ids, hashes

    def _prefix_hashes(self, prompt: Prompt) -> list[int]:
        """A copy of the hashes of the full blocks inside the prompt's shared prefix (memoised per group)."""
        hashes = self._group_hashes.get(prompt.group)
        if hashes is None:
            bs = self._block_size
            prefix = list(prompt.prefix[: len(prompt.prefix) // bs * bs])
            hashes = self._group_hashes[prompt.group] = blockhash.chain(prefix, bs, self._hash_seed)
        return list(hashes)

    async def _evictor(self, spec: Eviction) -> None:
        engine = self.pods[spec.pod].engine
        while True:
            await asyncio.sleep(spec.every)
            self.evicted.append(engine.evict_cached(spec.fraction, spec.order, spec.seed + len(self.evicted)))

    # ------------------------------------------------------------------ metrics refresh
    def _refresh(self, pod: _Pod, now: float) -> None:
        engine = pod.engine
        config = pod.config
        metrics = EndpointMetrics(
            waiting_queue_size=len(engine.waiting),
            running_requests_size=len(engine.running),
            kv_cache_usage_percent=engine.pool.usage(),
            max_active_models=config.max_loras,
            cache_block_size=config.block_size,
            cache_num_blocks=config.kv_cache_size,
            update_time=now,
        )
        for endpoint in pod.endpoints:
            endpoint.metrics = metrics

    def _refresh_all(self) -> None:
        now = self.loop.time()
        for pod in self.pods:
            self._refresh(pod, now)

    def _sample(self) -> None:
        n = len(self.pods)
        self.samples.append(
            QueueSample(
                time=self.loop.time() - self.t0,
                waiting=sum(len(p.engine.waiting) for p in self.pods) / n,
                running=sum(len(p.engine.running) for p in self.pods) / n,
                kv_usage=sum(p.engine.pool.usage() for p in self.pods) / n,
            )
        )

    async def _refresher(self) -> None:
        """The live collector's schedule: slot ``k`` of ``SUB_TICKS`` every ``interval / SUB_TICKS``."""
        interval = self.options.refresh_interval
        sample_every = interval if interval > 0 else 0.05
        if interval <= 0:
            while True:  # oracle mode: refreshed per decision; only sample the queues here
                self._sample()
                await asyncio.sleep(sample_every)
        period = interval / SUB_TICKS
        tick = 0
        while True:
            tick += 1
            await asyncio.sleep(max(0.0, self.t0 + tick * period - self.loop.time()))
            now = self.loop.time()
            slot = tick % SUB_TICKS
            for pod in self._slots[slot]:
                self._refresh(pod, now)
            if slot == 0:
                self._sample()

    def pod_stats(self) -> list[dict[str, Any]]:
        out = []
        for pod in self.pods:
            s = pod.engine.stats
            out.append(
                {
                    "pod": pod.config.name,
                    "requests": sum(s.finished.values()),
                    "prompt_tokens": s.prompt_tokens,
                    "generation_tokens": s.generation_tokens,
                    "prefix_cache_hit_rate": s.prefix_cache_hits / s.prefix_cache_queries
                    if s.prefix_cache_queries
                    else None,
                    "preemptions": s.preemptions,
                }
            )
        return out


def fresh_copy(template: InferenceRequest, request_id: str, received_at: float) -> InferenceRequest:
    """A parsed request with ``template``'s parsed fields and fresh per-request state.

    Containers are copied (plugins may write to a request's dicts and lists), the scheduling outcome and
    per-request plugin data start empty.
    """
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(template):
        value = getattr(template, f.name)
        if isinstance(value, list | dict | set):
            changes[f.name] = copy.copy(value)
    changes.update(
        request_id=request_id, received_at=received_at, data={}, upstream_headers={}, scheduling=None,
        pending_tokens=None,
    )  # fmt: skip
    return dataclasses.replace(template, **changes)


class _EventFeed:
    """One pod's KV-event publisher in simulated time, batching as the live one does: a full batch
    (``batch_size`` events) goes at once, a partial one ``delay`` after its first change (the flush). Each
    is encoded in vLLM's wire format, decoded by the EPP's decoder and handed to every replica's
    ``SourceIngest``."""

    def __init__(self, loop: VirtualTimeLoop, topic: bytes, batch_size: int, delay: float) -> None:
        self.loop = loop
        self.topic = topic
        self.batch_size = batch_size
        self.delay = delay
        self.ingests: list[SourceIngest] = []
        self._pending: list[KVEvent] = []
        self._timer: asyncio.TimerHandle | None = None
        self._seq = 0

    def __call__(self, events: Sequence[KVEvent]) -> None:
        self._pending.extend(events)
        size = self.batch_size
        while len(self._pending) >= size:
            self._send(self._pending[:size])
            del self._pending[:size]
        if self._pending and self._timer is None:
            self._timer = self.loop.call_later(self.delay, self._flush)

    def _flush(self) -> None:
        self._timer = None
        if self._pending:
            pending, self._pending = self._pending, []
            self._send(pending)

    def _send(self, events: list[KVEvent]) -> None:
        payload = encode_batch(self.loop.time(), events, 0, False)
        msg, batch = Message(self.topic, self._seq, payload), decode_batch(payload)
        self._seq += 1
        for ingest in self.ingests:  # tasks run in creation order: each source's batches stay in sequence
            self.loop.create_task(ingest.on_batch(msg, batch))


def _des_config(text: str) -> tuple[str, bool]:
    """The config as the DES runs it, and whether it consumes KV events: precise producers take their events
    from the DES, not from ZeroMQ subscriptions to the pods (``discoverPods`` off), and a relative tokenizer
    path is the repo's."""
    doc = yaml.safe_load(text)
    if not isinstance(doc, dict) or not isinstance(doc.get("plugins"), list):
        return text, False
    kv_events = False
    for plugin in doc["plugins"]:
        params = plugin.get("parameters") or {}
        if plugin.get("type") in ("precise-prefix-cache-producer", "precise-prefix-cache-scorer"):
            params.setdefault("kvEventsConfig", {})["discoverPods"] = False
            kv_events = True
        tokenizer = params.get("tokenizer")
        if plugin.get("type") == "token-producer" and isinstance(tokenizer, dict) and tokenizer.get("path"):
            path = Path(tokenizer["path"])
            if not path.is_absolute():
                tokenizer["path"] = str(REPO / path)
        plugin["parameters"] = params
    return yaml.safe_dump(doc, sort_keys=False), kv_events


def _address(i: int) -> str:
    return f"10.{i // 62500 % 256}.{i // 250 % 250}.{i % 250 + 1}"


def _virtual_clocks(objects: Sequence[Any], loop: VirtualTimeLoop) -> None:
    """Point plugins that read ``time.monotonic`` through a swappable ``clock`` / ``_clock`` attribute at the
    loop's clock: the DES stamps metrics (``update_time``) and requests (``received_at``) with simulated time,
    and a freshness check against the wall clock would read every endpoint stale (or fresh) for ever."""
    for obj in objects:
        for attr in ("clock", "_clock"):
            if getattr(obj, attr, None) is time.monotonic:
                setattr(obj, attr, loop.time)


def _seed_rngs(objects: Sequence[Any], seed: int, replica: int = 0) -> None:
    """Seed every plugin's tie-breaking RNG (pickers, filters, the director) for reproducible runs; each EPP
    replica draws its own sequence (replica 0 the one a single EPP always drew)."""
    prefix = f"des:{seed}" if replica == 0 else f"des:{seed}:replica{replica}"
    for i, obj in enumerate(objects):
        rng = getattr(obj, "_rng", None)
        if isinstance(rng, random.Random):
            rng.seed(f"{prefix}:{i}:{getattr(obj, 'name', type(obj).__name__)}")


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Errors only from one logger while the block runs (its level restored after)."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def simulate(schedule: Schedule, options: SimOptions) -> SimResult:
    """Run ``schedule`` through the DES and return the records and speed figures."""

    async def main(loop: VirtualTimeLoop) -> Simulation:
        sim = Simulation(loop, schedule, options)
        await sim.run()
        return sim

    wall0 = time.perf_counter()
    holder: dict[str, Any] = {}

    async def wrapped(loop: VirtualTimeLoop) -> None:
        holder["sim"] = await main(loop)
        holder["iterations"] = loop.iterations
        holder["elapsed"] = loop.time() - EPOCH

    run(wrapped, start=EPOCH)
    wall = time.perf_counter() - wall0
    sim: Simulation = holder["sim"]
    return SimResult(
        options=options,
        schedule=schedule,
        records=sorted(sim.records, key=lambda r: r.index),
        samples=sim.samples,
        wall_seconds=wall,
        simulated_seconds=holder["elapsed"],
        loop_iterations=holder["iterations"],
        pod_stats=sim.pod_stats(),
        epp_wall_seconds=sim.epp_wall,
        kv_events=[
            {
                "stored": p.stats.block_stored,
                "removed": p.stats.block_removed,
                "orphans": p.chain_totals.orphans,
                "unknown_removals": p.chain_totals.unknown_removals,
                "index_keys": len(p.index),
            }
            for p in sim.producers
        ],
        evictions=sim.evicted,
        stage_starts=sim.stage_starts,
    )
