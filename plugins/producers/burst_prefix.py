"""`burst-prefix-cache-producer`: co-locates a burst of requests that share a prompt (RL rollouts).

The problem: the N samples of one prompt (an RL rollout group, best-of-N, a fan-out) arrive at
once; every pod's cache is still cold for that prompt, so a cache-state producer scores them all 0
and load balancing scatters them: the prompt is prefilled on N pods instead of one. This producer
holds requests for a short window, decides where each group goes jointly, and publishes
PrefixCacheMatchInfo steering every member of a group to its pod; `prefix-cache-scorer` reads it:

    plugins:
    - type: burst-prefix-cache-producer
      parameters: {windowDurationMs: 100}
    - type: prefix-cache-scorer
      parameters: {prefixMatchInfoProducerName: burst-prefix-cache-producer}

Window: the first request to arrive opens a batch and a timer of `windowDurationMs`; requests
arriving meanwhile join it. The batch is sealed when the timer fires, or at once when it holds
`maxBatchSize` requests (the next request opens a new batch). So a request waits at most the window,
plus the assignment (O(batch · blocks), on the event loop). A request that is cancelled while it
waits (client gone, producer timeout) leaves the batch at once; an empty batch drops its timer.
Requests without a tokenized prompt never wait and get no data. The director's timeout for this
producer is the window + 300 ms (`produce_timeout`).

Assignment, per sealed batch (B = `blockSizeTokens`, m = `minColocateBlocks`, k = `maxPerReplica`):

1. Blocks: each prompt's tokens (from the token producer) are hashed in blocks of B tokens, chained
   and seeded by model + cache_salt (`prefix_index.prompt_hashes`, the approximate producer's scheme),
   at most `maxPrefixTokensToMatch / B` blocks (0: 2048 blocks); a batch of prompts: each prompt's chain
   in turn.
2. Units: requests with identical block chains form a group; a group of ≥ 2 is a unit. With m > 0 a
   lone request is a unit too when it shares ≥ m leading blocks with another request of the batch
   (equal hash of block m). Every other request gets no affinity (match info with no hits: 0 on
   every endpoint, other scorers decide). Units sharing block m form a prefix family.
3. Order: groups before lone requests, then more blocks first, then bigger first, then arrival.
4. Placement: a unit's members go, k at a time (all at once when k = −1), each chunk to one
   endpoint among the candidates all its members share, never two chunks of a unit on one endpoint;
   members left over once every endpoint has a chunk get no affinity (so at most k per endpoint).
   A chunk's cost on endpoint e is, with `balanceBy: requests`, its member count; with `tokens`, the
   unit's prompt tokens not already placed on e in this batch: tokens − (leading blocks held on e)·B,
   at least 0 (a prefix is prefilled once per endpoint). The chunk goes to the endpoint minimising
   (load(e) + cost, requests placed on e, waiting + running requests scraped from e, a position
   rotating per batch) — with m > 0, among the endpoints already holding a unit of its prefix family
   whose load is still under the fair share ⌈Σ unit costs / endpoints⌉ when there is one
   (co-location bounded by balance), else among all.
5. Publish: PrefixCacheMatchInfo(block_size = B, total_blocks = T, hits = {assigned: T}) — a full
   match on the assigned endpoint, 0 elsewhere, so with the scorer's default `matchLengthWeight` 0
   the assigned endpoint scores 1 and every other 0.

Co-location is decided within one window: warm-cache reuse across windows is the persistent
(approximate / precise) prefix producers' job, which may run alongside under another name.

Parameters (reference defaults): `windowDurationMs` 100 (1..10000), `maxPerReplica` −1 (−1 or ≥ 1),
`blockSizeTokens` 64, `maxPrefixTokensToMatch` 0, `minColocateBlocks` 0 (0: only identical prompts
are grouped), `maxBatchSize` 1000 (−1: unlimited), `balanceBy` requests | tokens.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from llmepp.datalayer.endpoint import Endpoint
from llmepp.framework.datakeys import (
    PREFIX_CACHE_MATCH_INFO,
    TOKENIZED_PROMPT,
    PrefixMatchInfo,
    TokenizedPrompt,
    scoped,
)
from llmepp.framework.plugin import PluginParams
from llmepp.framework.requestcontrol import DataProducer
from llmepp.plugins.producers.prefix_index import prefix_seed, prompt_hashes
from llmepp.request.types import InferenceRequest

log = logging.getLogger(__name__)

UNLIMITED = -1
DEFAULT_MAX_PREFIX_BLOCKS = 2048
# Added to the window for the director's timeout, so a request waiting for its batch is not cut off.
PRODUCE_TIMEOUT_MARGIN = 0.3
BALANCE_BY = ("requests", "tokens")


@dataclass(eq=False, slots=True)
class BurstMember:
    """One request of a batch: its prompt's block hashes, token count and candidate endpoints."""

    hashes: list[int]
    tokens: int
    candidates: Sequence[Endpoint]


@dataclass(eq=False, slots=True)
class _Unit:
    members: list[int]  # indexes into the batch
    hashes: list[int]
    tokens: int
    group: bool  # identical prompts (else a lone request sharing a prefix)
    eligible: list[Endpoint]
    family: int | None  # hash of block m (prefix family), None when m == 0


def _eligible(members: list[BurstMember]) -> list[Endpoint]:
    """The candidates every member shares, in the first member's order."""
    first = members[0].candidates
    if all(m.candidates is first for m in members):
        return list(first)
    shared = set(first)
    for m in members[1:]:
        shared &= set(m.candidates)
    return [ep for ep in first if ep in shared]


def _leading_held(hashes: list[int], held: set[int]) -> int:
    n = 0
    for h in hashes:
        if h not in held:
            break
        n += 1
    return n


def assign(
    batch: Sequence[BurstMember],
    *,
    max_per_replica: int = UNLIMITED,
    min_colocate_blocks: int = 0,
    balance_by: str = "requests",
    block_size: int = 64,
    offset: int = 0,
) -> list[Endpoint | None]:
    """The endpoint each request of a sealed batch is steered to (None: no affinity); the module
    docstring gives the rules. Pure: the same batch gives the same answer."""
    result: list[Endpoint | None] = [None] * len(batch)
    m = min_colocate_blocks
    groups: dict[tuple[int, int], list[int]] = {}
    family_size: dict[int, int] = {}
    for i, member in enumerate(batch):
        if not member.hashes:
            continue
        groups.setdefault((len(member.hashes), member.hashes[-1]), []).append(i)
        if m and len(member.hashes) >= m:
            key = member.hashes[m - 1]
            family_size[key] = family_size.get(key, 0) + 1
    units: list[_Unit] = []
    for idxs in groups.values():
        first = batch[idxs[0]]
        family = first.hashes[m - 1] if m and len(first.hashes) >= m else None
        if len(idxs) < 2 and (family is None or family_size[family] < 2):
            continue  # a lone request sharing nothing: no affinity
        eligible = _eligible([batch[i] for i in idxs])
        units.append(_Unit(idxs, first.hashes, first.tokens, len(idxs) > 1, eligible, family))
    if not units:
        return result
    units.sort(key=lambda u: (not u.group, -len(u.hashes), -len(u.members), u.members[0]))

    by_tokens = balance_by == "tokens"
    endpoints: dict[Endpoint, int] = {}  # every eligible endpoint → first-seen position
    for u in units:
        for ep in u.eligible:
            endpoints.setdefault(ep, len(endpoints))
    n = len(endpoints)
    if not n:
        return result
    total = sum(u.tokens if by_tokens else len(u.members) for u in units)
    fair = math.ceil(total / n)
    load: dict[Endpoint, float] = dict.fromkeys(endpoints, 0.0)
    placed: dict[Endpoint, int] = dict.fromkeys(endpoints, 0)
    held: dict[Endpoint, set[int]] = {ep: set() for ep in endpoints}
    homes: dict[int, list[Endpoint]] = {}  # prefix family → the endpoints holding a unit of it

    def cost(u: _Unit, chunk: int, ep: Endpoint) -> float:
        if not by_tokens:
            return float(chunk)
        return float(max(0, u.tokens - _leading_held(u.hashes, held[ep]) * block_size))

    def rank(ep: Endpoint) -> tuple[float, int]:
        metrics = ep.metrics
        return metrics.waiting_queue_size + metrics.running_requests_size, (endpoints[ep] - offset) % n

    for u in units:
        k = len(u.members) if max_per_replica == UNLIMITED else max_per_replica
        used: set[Endpoint] = set()
        for start in range(0, len(u.members), k):
            chunk = u.members[start : start + k]
            options = [ep for ep in u.eligible if ep not in used]
            if not options:
                break  # every endpoint holds k of this unit already: the rest get no affinity
            holders = homes.get(u.family, []) if u.family is not None else []
            preferred = [ep for ep in holders if load[ep] < fair and ep in options]
            size = len(chunk)
            target = min(preferred or options, key=lambda ep: (load[ep] + cost(u, size, ep), placed[ep], *rank(ep)))
            load[target] += cost(u, size, target)
            placed[target] += size
            held[target].update(u.hashes)
            used.add(target)
            if u.family is not None and target not in holders:
                homes.setdefault(u.family, []).append(target)
            for i in chunk:
                result[i] = target
    return result


@dataclass(eq=False, slots=True)
class _Entry:
    member: BurstMember
    future: asyncio.Future[Endpoint | None]


@dataclass(eq=False, slots=True)
class _Batch:
    entries: list[_Entry] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None
    sealed: bool = False


class BurstPrefixCacheProducer(DataProducer):
    """Holds requests for a window and steers requests sharing a prompt to one endpoint per group
    (formula and algorithm: the module docstring)."""

    type = "burst-prefix-cache-producer"
    produces = frozenset({PREFIX_CACHE_MATCH_INFO})
    consumes = frozenset({TOKENIZED_PROMPT})

    class Params(PluginParams):
        window_duration_ms: int = 100
        max_per_replica: int = UNLIMITED
        block_size_tokens: int = 64
        max_prefix_tokens_to_match: int = 0
        min_colocate_blocks: int = 0
        max_batch_size: int = 1000
        balance_by: str = "requests"

        def __post_init__(self) -> None:
            if not 1 <= self.window_duration_ms <= 10000:
                raise ValueError(f"windowDurationMs must be in 1..10000 (got {self.window_duration_ms})")
            if self.max_per_replica != UNLIMITED and self.max_per_replica < 1:
                raise ValueError(f"maxPerReplica must be -1 (unlimited) or >= 1 (got {self.max_per_replica})")
            if self.block_size_tokens <= 0:
                raise ValueError(f"blockSizeTokens must be > 0 (got {self.block_size_tokens})")
            if self.max_prefix_tokens_to_match < 0:
                raise ValueError(f"maxPrefixTokensToMatch must be >= 0 (got {self.max_prefix_tokens_to_match})")
            if 0 < self.max_prefix_tokens_to_match < self.block_size_tokens:
                raise ValueError("maxPrefixTokensToMatch must be 0 or >= blockSizeTokens")
            if self.min_colocate_blocks < 0:
                raise ValueError(f"minColocateBlocks must be >= 0 (got {self.min_colocate_blocks})")
            if self.max_batch_size != UNLIMITED and self.max_batch_size < 1:
                raise ValueError(f"maxBatchSize must be -1 (unlimited) or >= 1 (got {self.max_batch_size})")
            if self.balance_by not in BALANCE_BY:
                raise ValueError(f"balanceBy must be one of {', '.join(BALANCE_BY)} (got {self.balance_by!r})")

    def __init__(self, name: str = "", params: Params | None = None) -> None:
        p = params if params is not None else self.Params()
        super().__init__(name, p)
        self.window = p.window_duration_ms / 1000.0
        self.produce_timeout = self.window + PRODUCE_TIMEOUT_MARGIN
        self.block_size = p.block_size_tokens
        tokens_cap = p.max_prefix_tokens_to_match
        self.max_blocks = tokens_cap // p.block_size_tokens if tokens_cap else DEFAULT_MAX_PREFIX_BLOCKS
        self.key = scoped(PREFIX_CACHE_MATCH_INFO, self.name)
        self._batch: _Batch | None = None
        self._batches = 0  # sealed so far: rotates the tie-break between equal endpoints

    async def produce(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> None:
        tokens: TokenizedPrompt | None = request.data.get(TOKENIZED_PROMPT)
        if tokens is None or not tokens.token_bytes or not endpoints:
            return
        seed = prefix_seed(request.target_model or request.model, request.cache_salt)
        hashes, ends = prompt_hashes(tokens, self.block_size, seed, self.max_blocks)
        loop = asyncio.get_running_loop()
        entry = _Entry(BurstMember(hashes, tokens.count, endpoints), loop.create_future())
        batch = self._batch
        if batch is None:
            batch = self._batch = _Batch()
            batch.timer = loop.call_later(self.window, self._seal, batch)
        batch.entries.append(entry)
        limit = self.params.max_batch_size
        if limit != UNLIMITED and len(batch.entries) >= limit:
            self._seal(batch)
        try:
            assigned = await entry.future
        except BaseException:  # cancelled, or the coroutine closed (GeneratorExit) by a transport dropping it
            self._withdraw(batch, entry)
            raise
        total = len(hashes)
        hits = {assigned: total} if assigned is not None and assigned in endpoints else {}
        request.data[self.key] = PrefixMatchInfo(
            block_size=self.block_size, total_blocks=total, hits=hits, hashes=hashes, chain_ends=ends
        )

    def _withdraw(self, batch: _Batch, entry: _Entry) -> None:
        """A cancelled request leaves its batch; an emptied batch stops its timer."""
        if batch.sealed:
            return
        batch.entries.remove(entry)
        if not batch.entries:
            batch.sealed = True
            if batch.timer is not None:
                batch.timer.cancel()
            if self._batch is batch:
                self._batch = None

    def _seal(self, batch: _Batch) -> None:
        """Assign the batch and release its requests; later requests start a new batch."""
        if batch.sealed:
            return
        batch.sealed = True
        if batch.timer is not None:
            batch.timer.cancel()
        if self._batch is batch:
            self._batch = None
        live = [e for e in batch.entries if not e.future.done()]
        p = self.params
        # An endpoint discovery removed while the window was open must not be assigned: the director drops it
        # from the candidates, and its group would be left with no affinity at all. One pruned copy per distinct
        # candidate list, so members that shared one still share one (assign's fast path).
        pruned: dict[int, Sequence[Endpoint]] = {}
        for e in live:
            cands = e.member.candidates
            kept = pruned.get(id(cands))
            if kept is None:
                kept = pruned[id(cands)] = (
                    [ep for ep in cands if not ep.removed] if any(ep.removed for ep in cands) else cands
                )
            e.member.candidates = kept
        try:
            targets = assign(
                [e.member for e in live],
                max_per_replica=p.max_per_replica,
                min_colocate_blocks=p.min_colocate_blocks,
                balance_by=p.balance_by,
                block_size=self.block_size,
                offset=self._batches,
            )
        except Exception:  # never leave a request waiting: no affinity for the batch instead
            log.exception("%s: assignment failed; the batch gets no affinity", self.name)
            targets = [None] * len(live)
        self._batches += 1
        for entry, target in zip(live, targets, strict=True):
            entry.future.set_result(target)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "%s: batch of %d sealed", self.name, len(live),
                extra={"steered": sum(t is not None for t in targets), "endpoints": len({t for t in targets if t})},
            )  # fmt: skip
