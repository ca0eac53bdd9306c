"""The engine model of one simulated vLLM pod: continuous batching over a prefix-cached KV pool.

One asyncio task per pod plays vLLM's scheduler loop, on simulated time (``llmepp_sim.clock``):

* **Admission** (FIFO): a waiting request is admitted while fewer than ``max_num_seqs`` are running and
  the KV pool can hold its whole sequence (the longest cached prefix is reused; the rest is allocated,
  evicting LRU cached-free blocks). A request that does not fit stops admission (head-of-line, as vLLM);
  a request whose LoRA adapter cannot get a slot is skipped and keeps its place.
* **Arrival**: a request arrives when its HTTP/gRPC request does (``submit(arrival=...)``), before the
  simulator's own host work (body parsing, tokenisation, the engine loop's wake-up), which takes wall time
  and so, at time scale S, S times as much simulated time. The prefill is scheduled from the arrival, as a
  real engine's would be: on first admission, the simulated time since the arrival is credited against
  ``time_to_first_token + prefill_overhead`` (the overhead stands for that work), but never from before the
  engine last lacked or freed capacity (a finish, abort or preemption, or a pass that left requests
  waiting), so a request is never admitted earlier than it could have been. Host time beyond the overhead
  makes the request late; it is never credited against GPU work.
* **Prefill**: ``time_to_first_token + prefill_overhead`` (+ LoRA load wait) is a fixed delay, then
  ``uncached_tokens x prefill_time_per_token`` of GPU work. Requests prefilling at the same time share
  the GPU's prefill throughput equally (processor sharing): two concurrent prefills each progress at half
  speed. A decode-side P/D request replaces all of this with ``kv_cache_transfer_latency +
  uncached_tokens x kv_cache_transfer_time_per_token`` (network, not shared). The prefill produces the
  first token. Its full prompt blocks enter the prefix cache (``BlockStored``) when it is admitted, as vLLM
  caches a step's blocks when it schedules the step: a same-prefix request admitted meanwhile reuses them,
  but starts its own prefill work only once they are computed (``KV_WAIT``), as vLLM runs it in a later
  engine step than the one computing them.
* **Decode**: all decoding requests advance in lockstep, one token per step; a step lasts
  ``inter_token_latency x f(n)`` with ``f`` rising linearly from 1 at one running request to
  ``time_factor_under_load`` at ``max_num_seqs``. Every ``block_size`` tokens a request needs one more KV
  block (filled blocks are cached and published too, as vLLM does); if none is free the most recently
  admitted request is preempted (blocks released, requeued at the front, recomputed later).

The loop sleeps until the next event (a fixed delay ending, a prefill finishing, a decode step) and does
not run at all while the pod is idle. Streaming handlers are woken per token via ``SimRequest.wait``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import random
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass, field

from llmepp_sim import blockhash
from llmepp_sim.clock import SimClock
from llmepp_sim.config import PodConfig
from llmepp_sim.kvcache import BlockPool, EventSink
from llmepp_sim.lora import LoraAdapter, LoraManager
from llmepp_sim.metrics import EngineGauges, EngineStats
from llmepp_sim.textgen import FillerStream

log = logging.getLogger(__name__)
EPS = 1e-7  # simulated seconds; float slack when deciding that a phase has ended
MAX_DECODE_DEBT_STEPS = 8
MS = 1e-3


class Phase(enum.Enum):
    WAITING = "waiting"
    FIXED = "fixed"  # overhead / LoRA load / KV transfer: a pure delay, not shared
    KV_WAIT = "kv_wait"  # its cache hit includes blocks another request's prefill is still computing
    PREFILL = "prefill"  # GPU prefill work, shared among concurrent prefills
    DECODE = "decode"
    FINISHED = "finished"


class RequestKind(enum.Enum):
    NORMAL = "normal"
    PREFILL_ONLY = "prefill_only"  # kv_transfer_params.do_remote_decode: P side of P/D
    REMOTE_PREFILL = "remote_prefill"  # kv_transfer_params.do_remote_prefill: D side of P/D


@dataclass(eq=False)
class SimRequest:
    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    filler: FillerStream
    kind: RequestKind = RequestKind.NORMAL
    lora: LoraAdapter | None = None
    # --- progress, owned by the engine
    phase: Phase = Phase.WAITING
    output_ids: list[int] = field(default_factory=list)
    output_text: list[str] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    stored_blocks: int = 0  # leading blocks of block_ids already in the prefix cache
    num_cached_tokens: int | None = None  # prefix-cache hit at first admission (reported in usage)
    fixed_left: float = 0.0
    work_left: float = 0.0
    transferred: bool = False  # remote-prefill KV already pulled (not again after a preemption)
    arrival_time: float = 0.0  # simulated; when the request reached the server (set by Engine.submit)
    admitted_time: float | None = None  # when its prefill was scheduled from (first admission)
    first_token_time: float | None = None
    last_token_time: float | None = None
    finish_time: float | None = None
    finish_reason: str | None = None
    # Aborted through vLLM's abort API (``abort_ids``), not by a shutdown: answered like any finished
    # request, with finish_reason "abort".
    aborted_by_request: bool = False
    remote_block_ids: list[int] = field(default_factory=list)
    # Prefix-cache blocks are cached when a request is scheduled, before its prefill computes them: the
    # requests whose prefill computes blocks this one's cache hit reuses, and those reusing this one's.
    computing: bool = False
    kv_owners: list[SimRequest] = field(default_factory=list)
    kv_dependents: list[SimRequest] = field(default_factory=list)
    _waiter: asyncio.Future[None] | None = None
    _done_waiter: asyncio.Future[None] | None = None

    @property
    def finished(self) -> bool:
        return self.phase is Phase.FINISHED

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def all_token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_range(self, start: int, stop: int) -> list[int]:
        """``all_token_ids()[start:stop]`` without copying the whole sequence."""
        n = len(self.prompt_ids)
        if start >= n:
            return self.output_ids[start - n : stop - n]
        if stop <= n:
            return self.prompt_ids[start:stop]
        return self.prompt_ids[start:] + self.output_ids[: stop - n]

    def notify(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def notify_finished(self) -> None:
        self.notify()
        waiter = self._done_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait_finished(self) -> None:
        """Return once the request has finished (woken once, not per token)."""
        while not self.finished:
            self._done_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._done_waiter
            finally:
                self._done_waiter = None

    async def wait(self, tokens_seen: int) -> None:
        """Return once more than ``tokens_seen`` tokens exist or the request has finished."""
        while len(self.output_ids) <= tokens_seen and not self.finished:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None


class RequestTooLarge(ValueError):
    """The sequence can never fit in this pod's KV cache."""


class Engine:
    def __init__(self, config: PodConfig, clock: SimClock, lora: LoraManager, sink: EventSink | None) -> None:
        self.config = config
        self.clock = clock
        self.lora = lora
        self.pool = BlockPool(config.kv_cache_size, config.block_size, sink)
        self.stats = EngineStats(max_model_len=config.max_model_len)
        self.waiting: deque[SimRequest] = deque()
        self.running: list[SimRequest] = []
        self._root_hash = blockhash.root_hash(config.hash_seed)
        self._computing: dict[int, SimRequest] = {}  # block id -> the request whose prefill computes it
        self._next_decode_at: float | None = None
        self._last_decode_at: float | None = None  # when the last lockstep decode step ran
        self._last_advance = clock.now()
        # Simulated time before which no admission may be backdated: capacity last changed or was lacking.
        self._admission_floor = clock.now()
        self._wake_future: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._task is None:
            self._last_advance = self.clock.now()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="sim-engine")

    async def stop(self) -> None:
        self.abort_all()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def reconfigure(self, config: PodConfig) -> None:
        """Apply runtime knobs now: a larger ``max_num_seqs`` admits waiting requests at once, not at the
        next engine event (which may be a long prefill or decode step away)."""
        self.config = config
        self._kick()

    def abort_all(self) -> None:
        for request in [*self.running, *self.waiting]:
            self.abort(request)

    # ------------------------------------------------------------------ requests
    def check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        needed = math.ceil((prompt_tokens + max_tokens) / self.config.block_size)
        if needed > self.pool.num_blocks:
            raise RequestTooLarge(
                f"the request needs {needed} KV blocks ({prompt_tokens} prompt + {max_tokens} output tokens) "
                f"but the KV cache holds {self.pool.num_blocks} blocks of {self.config.block_size} tokens"
            )

    def submit(self, request: SimRequest, arrival: float | None = None) -> None:
        """Queue ``request``. ``arrival`` (simulated, ``clock.now()`` when the request reached the server,
        before its host work) defaults to now; the prefill is scheduled from it (see the module docstring)."""
        self.check_fits(len(request.prompt_ids), request.max_tokens)
        now = self.clock.now()
        request.arrival_time = now if arrival is None else min(arrival, now)
        request.phase = Phase.WAITING
        self.waiting.append(request)
        self._kick()

    def abort(self, request: SimRequest) -> None:
        if request.finished:
            return
        if request.phase is Phase.WAITING:
            self.waiting.remove(request)
        else:
            self._kv_computed(request)
            self.running.remove(request)
            self.pool.free(request.block_ids)
            request.block_ids = []
        self._finish(request, "abort", self.clock.now(), release=False)
        self._kick()

    def abort_ids(self, request_ids: Collection[str]) -> int:
        """Abort every waiting or running request whose id is in ``request_ids`` (vLLM's out-of-band abort);
        the number aborted. Unknown or finished ids are ignored."""
        wanted = set(request_ids)
        matches = [r for r in (*self.running, *self.waiting) if r.request_id in wanted]
        for request in matches:
            request.aborted_by_request = True
            self.abort(request)
        return len(matches)

    def reset_prefix_cache(self) -> bool:
        return self.pool.clear_cached()

    def evict_cached(self, fraction: float, order: str = "lru", seed: int | None = None) -> int:
        """Evict `fraction` of the KV capacity from the prefix cache (cached-but-free blocks only)."""
        count = int(self.pool.num_blocks * fraction)
        return self.pool.evict(count, random.Random(seed) if order == "random" else None)

    def gauges(self) -> EngineGauges:
        return EngineGauges(
            running=len(self.running),
            waiting=len(self.waiting),
            kv_cache_usage=self.pool.usage(),
            running_lora_adapters=sorted({r.lora.name for r in self.running if r.lora}),
            waiting_lora_adapters=sorted({r.lora.name for r in self.waiting if r.lora}),
            max_loras=self.config.max_loras,
        )

    # ------------------------------------------------------------------ the step loop
    def _kick(self) -> None:
        future = self._wake_future
        if future is not None and not future.done():
            future.set_result(None)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = self.clock.now()
            try:
                self._advance(now)
                self._schedule(now)
            except Exception:
                # A bug must not leave every client of the pod hanging: fail what is in flight, keep going.
                log.exception("engine step failed; aborting in-flight requests")
                self.abort_all()
                continue
            next_event = self._next_event(now)
            delay = None if next_event is None else max(0.0, next_event - self.clock.now())
            if delay is not None and delay <= EPS:
                continue
            future = loop.create_future()
            self._wake_future = future
            timer = None if delay is None else loop.call_later(self.clock.to_wall(delay), _resolve, future)
            try:
                await future
            finally:
                self._wake_future = None
                if timer is not None:
                    timer.cancel()

    def _advance(self, now: float) -> None:
        elapsed = now - self._last_advance
        self._last_advance = now
        if self._next_decode_at is not None and now >= self._next_decode_at - EPS:
            self._decode_step(now)
        if elapsed < 0:
            return
        # elapsed == 0 still runs the passes below: a request admitted with no fixed delay and no prefill work
        # (all prefill latencies 0) is parked in FIXED with fixed_left 0 and completes here. Returning early
        # left it there for ever on a clock that cannot move while this loop spins (the DES's virtual time).
        prefilling = [r for r in self.running if r.phase is Phase.PREFILL]
        share = elapsed / len(prefilling) if prefilling else 0.0
        for request in prefilling:
            if request.phase is not Phase.PREFILL:  # preempted by an earlier request's block demand
                continue
            request.work_left -= share
            if request.work_left <= EPS:
                self._prefill_done(request, now)
        for request in [r for r in self.running if r.phase is Phase.FIXED]:
            if request.phase is not Phase.FIXED:
                continue
            request.fixed_left -= elapsed
            if request.fixed_left <= EPS and request.kv_owners and self._kv_pending(request):
                request.phase = Phase.KV_WAIT
            elif request.fixed_left <= EPS:
                # The loop woke late: credit the overshoot to the prefill work (at the share it would have
                # had), so timer lateness at the phase change does not add to the TTFT.
                overshoot = -min(0.0, request.fixed_left)
                request.work_left -= overshoot / (len(prefilling) + 1)
                if request.work_left > EPS:
                    request.phase = Phase.PREFILL
                    prefilling.append(request)
                else:
                    self._prefill_done(request, now)

    def _next_event(self, now: float) -> float | None:
        candidates: list[float] = []
        if self._next_decode_at is not None:
            candidates.append(self._next_decode_at)
        prefilling = [r.work_left for r in self.running if r.phase is Phase.PREFILL]
        if prefilling:
            candidates.append(now + min(prefilling) * len(prefilling))
        candidates.extend(now + r.fixed_left for r in self.running if r.phase is Phase.FIXED)
        return min(candidates) if candidates else None

    def _step_time(self) -> float:
        cfg = self.config
        n = len(self.running)
        span = max(1, cfg.max_num_seqs - 1)
        factor = 1.0 + (cfg.time_factor_under_load - 1.0) * min(1.0, max(0, n - 1) / span)
        return cfg.inter_token_latency * MS * factor

    def _decode_step(self, now: float) -> None:
        due = self._next_decode_at
        assert due is not None
        self._last_decode_at = now
        for request in [r for r in self.running if r.phase is Phase.DECODE]:
            if request.phase is Phase.DECODE:  # an earlier request's preemption may have requeued it
                self._emit_token(request, now)
        if not any(r.phase is Phase.DECODE for r in self.running):
            self._next_decode_at = None
            return
        step = self._step_time()
        # Keep the cadence anchored to the schedule so timer lateness does not accumulate (a late step is
        # followed by a prompt one), but forget debts older than a few steps: after a long stall of the
        # host, bursting dozens of tokens would distort ITL more than dropping the debt does.
        self._next_decode_at = due + step if due + step > now - MAX_DECODE_DEBT_STEPS * step else now + step

    # ------------------------------------------------------------------ admission
    def _schedule(self, now: float) -> None:
        cfg = self.config
        running_loras = {r.lora.name for r in self.running if r.lora}
        index = 0
        while index < len(self.waiting) and len(self.running) < cfg.max_num_seqs:
            request = self.waiting[index]
            if request.lora and not self.lora.can_run(request.lora.name, running_loras, cfg.max_loras):
                index += 1
                continue
            if not self._allocate(request):
                break
            del self.waiting[index]
            self.running.append(request)
            if request.lora:
                running_loras.add(request.lora.name)
            self._start_prefill(request, now, running_loras)
        if self.waiting:
            # Requests were refused at `now`: a request reaching the engine later was not admissible before.
            self._admission_floor = max(self._admission_floor, now)

    def _allocate(self, request: SimRequest) -> bool:
        bs = self.config.block_size
        tokens = request.all_token_ids()
        extra = blockhash.extra_key(request.lora.name if request.lora else None)
        blockhash.extend_chain(request.block_hashes, tokens, bs, self._root_hash, extra)
        hits: list[int] = []
        if self.config.enable_kvcache:
            # vLLM always recomputes the last prompt token, so a fully cached prompt reuses one block less.
            hits = self.pool.cached_prefix(request.block_hashes[: (len(tokens) - 1) // bs])
        num_new = math.ceil(len(tokens) / bs) - len(hits)
        if not self.pool.can_allocate(num_new, hits):
            return False
        self.pool.touch(hits)
        request.kv_owners = self._owners_of(hits, request) if self._computing else []
        request.block_ids = hits + self.pool.allocate(num_new)
        request.stored_blocks = len(hits)
        cached_tokens = len(hits) * bs
        if request.num_cached_tokens is None:  # first admission
            request.num_cached_tokens = cached_tokens
            # As vLLM's exported counters: no query with prefix caching off, and a recompute after a
            # preemption counts apart (its preempted_* stats, not exported), so it cannot inflate the hit rate.
            if self.config.enable_kvcache:
                self.stats.prefix_cache_queries += len(tokens)
                self.stats.prefix_cache_hits += cached_tokens
        return True

    def _start_prefill(self, request: SimRequest, now: float, running_loras: set[str]) -> None:
        cfg = self.config
        first_admission = request.admitted_time is None
        credit = 0.0
        uncached = request.num_tokens - request.stored_blocks * cfg.block_size
        pulls_remote_kv = request.kind is RequestKind.REMOTE_PREFILL and not request.transferred
        if pulls_remote_kv:
            # The KV is pulled from the prefill pod (only the blocks not already cached here).
            request.fixed_left = (cfg.kv_cache_transfer_latency + uncached * cfg.kv_cache_transfer_time_per_token) * MS
            request.work_left = 0.0
            request.transferred = True
        else:
            overhead = (cfg.time_to_first_token + cfg.prefill_overhead) * MS
            if first_admission:
                # Host time since the arrival (parsing, tokenising, waking this loop) ran inside the overhead.
                since = now - max(request.arrival_time, self._admission_floor)
                credit = min(overhead, max(0.0, since))
            request.fixed_left = overhead - credit
            request.work_left = uncached * cfg.prefill_time_per_token * MS
        if first_admission:
            request.admitted_time = now - credit
            if pulls_remote_kv:
                # vLLM: num_cached_tokens = local hits + the KV the connector loads (the whole prompt but its
                # last token, which the decode side computes): what usage.cached_tokens reports.
                request.num_cached_tokens = max(request.num_cached_tokens or 0, len(request.prompt_ids) - 1)
        if request.lora:
            request.fixed_left += self.lora.acquire(
                request.lora.name, running_loras, cfg.max_loras, now, cfg.lora_load_latency * MS
            )
        if not pulls_remote_kv:
            # vLLM caches (and publishes) the full blocks of the tokens it schedules when it schedules them
            # (allocate_slots -> cache_blocks), not when the forward pass ends: a request with the same prefix
            # admitted while this one is still prefilling reuses them. Remote KV is cached once it has arrived
            # (vLLM's delay_cache_blocks), in _prefill_done.
            stored = request.stored_blocks
            self._store_full_blocks(request)
            if request.stored_blocks > stored and request.work_left > EPS:
                request.computing = True
                for block in request.block_ids[stored : request.stored_blocks]:
                    self._computing[block] = request
        if request.fixed_left > EPS:
            request.phase = Phase.FIXED
        elif request.kv_owners and self._kv_pending(request):
            request.phase = Phase.KV_WAIT
        elif request.work_left > EPS:
            request.phase = Phase.PREFILL
        else:
            request.phase = Phase.FIXED
            request.fixed_left = 0.0  # completes on the next pass, after admission settles

    def _owners_of(self, hits: list[int], request: SimRequest) -> list[SimRequest]:
        owners: list[SimRequest] = []
        for block in hits:
            owner = self._computing.get(block)
            if owner is not None and owner is not request and all(o is not owner for o in owners):
                owners.append(owner)
                owner.kv_dependents.append(request)
        return owners

    @staticmethod
    def _kv_pending(request: SimRequest) -> bool:
        return any(owner.computing for owner in request.kv_owners)

    def _kv_computed(self, request: SimRequest) -> None:
        """``request`` no longer computes the blocks it stored at admission (its prefill ended, or it was
        preempted or aborted): requests waiting for them start their own prefill work, as vLLM runs them in
        the engine step after the one that computed those blocks.

        A request preempted or aborted mid-prefill counts as having computed them: vLLM finishes a step it
        scheduled, and the simulator does not split a prefill into steps."""
        if request.computing:
            request.computing = False
            for block in request.block_ids[: request.stored_blocks]:
                if self._computing.get(block) is request:
                    del self._computing[block]
        dependents, request.kv_dependents = request.kv_dependents, []
        for dependent in dependents:
            if dependent.phase is Phase.KV_WAIT and not self._kv_pending(dependent):
                # Its prefill work starts now; with none left, the loop's next pass (at once) completes it.
                dependent.phase = Phase.PREFILL

    def _prefill_done(self, request: SimRequest, now: float) -> None:
        self._kv_computed(request)
        stats = self.stats
        if request.first_token_time is None:
            stats.prompt_tokens += len(request.prompt_ids)
            stats.request_prompt_tokens.observe(len(request.prompt_ids))
        self._store_full_blocks(request)
        request.phase = Phase.DECODE
        if self._next_decode_at is not None and (self._last_decode_at is None or self._last_decode_at < now - EPS):
            # vLLM runs a prefill inside an engine step: its first token comes out with the running batch's
            # tokens at the end of that step, and the next one a whole step later. Finishing between two ticks
            # and emitting now would make the first inter-token gap anything from 0 to one step.
            return
        self._emit_token(request, now)
        if request.phase is Phase.DECODE and self._next_decode_at is None:
            self._next_decode_at = now + self._step_time()
            self._last_decode_at = now  # the step that carried this prefill ends now

    # ------------------------------------------------------------------ tokens and blocks
    def _emit_token(self, request: SimRequest, now: float) -> None:
        token = request.filler.next_token()
        request.output_ids.append(token.token_id)
        request.output_text.append(token.text)
        stats = self.stats
        stats.generation_tokens += 1
        if request.first_token_time is None:
            request.first_token_time = now
            stats.ttft.observe(now - request.arrival_time)
        elif request.last_token_time is not None:
            stats.itl.observe(now - request.last_token_time)
        request.last_token_time = now
        if len(request.output_ids) >= request.max_tokens or request.kind is RequestKind.PREFILL_ONLY:
            self.running.remove(request)
            self._finish(request, "length", now, release=True)
            return
        self._ensure_blocks(request)
        request.notify()

    def _ensure_blocks(self, request: SimRequest) -> None:
        bs = self.config.block_size
        num_tokens = len(request.prompt_ids) + len(request.output_ids)
        if num_tokens <= len(request.block_ids) * bs and num_tokens // bs <= request.stored_blocks:
            return  # per-token fast path: the last block has room and no block just filled up
        needed = math.ceil(num_tokens / bs) - len(request.block_ids)
        while needed > 0:
            if self.pool.num_free == 0:
                victim = self.running[-1]
                self._preempt(victim)
                if victim is request:
                    return
                continue
            request.block_ids += self.pool.allocate(1)
            needed -= 1
        self._store_full_blocks(request)

    def _store_full_blocks(self, request: SimRequest) -> None:
        bs = self.config.block_size
        full = min(request.num_tokens // bs, len(request.block_ids))
        start = request.stored_blocks
        if full <= start:
            return
        # Only the blocks to hash or store are copied (not the whole sequence, every block_size tokens).
        first = min(start, len(request.block_hashes))
        tokens = request.token_range(first * bs, full * bs)
        lora = request.lora
        blockhash.extend_chain(
            request.block_hashes, tokens, bs, self._root_hash, blockhash.extra_key(lora.name if lora else None),
            first_block=first,
        )  # fmt: skip
        if self.config.enable_kvcache:
            self.pool.store(
                request.block_ids[start:full],
                request.block_hashes[start:full],
                request.block_hashes[start - 1] if start else None,
                tokens[(start - first) * bs : (full - first) * bs],
                lora_id=lora.lora_id if lora else None,
                lora_name=lora.name if lora else None,
            )
        request.stored_blocks = full

    def _preempt(self, request: SimRequest) -> None:
        self._admission_floor = max(self._admission_floor, self._last_advance)  # blocks freed (in a pass)
        self._kv_computed(request)
        self.running.remove(request)
        self.pool.free(request.block_ids)
        request.block_ids = []
        request.stored_blocks = 0
        request.phase = Phase.WAITING
        self.waiting.appendleft(request)
        self.stats.preemptions += 1
        self._kick()

    def _finish(self, request: SimRequest, reason: str, now: float, release: bool) -> None:
        self._admission_floor = max(self._admission_floor, now)  # a seat (and maybe blocks) freed
        if release:
            if request.kind is RequestKind.PREFILL_ONLY:
                request.remote_block_ids = list(request.block_ids)
            self.pool.free(request.block_ids)
            request.block_ids = []
        request.phase = Phase.FINISHED
        request.finish_reason = reason
        request.finish_time = now
        stats = self.stats
        stats.finished[reason] = stats.finished.get(reason, 0) + 1
        stats.e2e.observe(now - request.arrival_time)
        if request.admitted_time is not None:
            stats.queue_time.observe(request.admitted_time - request.arrival_time)
            if request.first_token_time is not None:
                stats.prefill_time.observe(request.first_token_time - request.admitted_time)
                stats.decode_time.observe(now - request.first_token_time)
        stats.request_generation_tokens.observe(len(request.output_ids))
        request.notify_finished()
        self._kick()


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
