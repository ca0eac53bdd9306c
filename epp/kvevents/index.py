"""In-memory precise prefix index: request key → the pods holding it, with tiers and speculation.

Layout, chosen for the lookup loop (one dict probe and a few int operations per prompt block):

* pods are bits: `bit(pod)` hands out 1, 2, 4, ...; a key's holders are one int mask
  (`_holders[key]`), so "which candidates still match" is `alive &= mask`;
* tiers: a (key, pod) pair not held on the best tier is listed in `_low[key][bit] = weight`; the
  lookup only looks there when the dict is non-empty (GPU-only pools never pay for tiers);
* speculative entries: `_spec[key]` mask, each (key, pod) with a deadline (a FIFO queue per TTL value:
  few distinct TTLs, so expiry stays a pop from the front);
* last holders: when a pod's event removes a key, `_last[key]` remembers that pod's bit (the most
  recent remover wins; the oldest are dropped beyond the keys held + `LAST_HOLDER_SLACK`, and `size`:
  evicted keys would accumulate otherwise). A prompt no candidate holds from block 0 reports the
  candidate that last held its first block (`Match.last`), so a prefix evicted at its home can go back
  there instead of displacing another pod's cache (no-hit-lru-scorer);
* bounds (llm-d's in-memory index): at most `size` keys, least recently stored evicted first
  (an OrderedDict); at most `podCacheSize` pods per key — a key that would exceed it drops its
  lowest-numbered other holder (not an LRU per key: holders are a bit mask without order).

Lookup (llm-d's LongestPrefixScorer): walk the prompt's keys from block 0, hashing each block only
when needed; a pod's match is the number of consecutive keys it holds from the start, and its score
is the sum of its best-tier weight over those keys. The walk stops at the first key no candidate
holds, so a miss costs one block of hashing.

Single-threaded by design: writes come from subscriber tasks and reads from the request path, both on
the event loop, never concurrently.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

from llmepp.bitslots import BitSlots
from llmepp.kvevents.chain import Delta
from llmepp.kvevents.keys import xxh64
from llmepp.kvevents.tiers import TierTable


@dataclass(slots=True)
class Match:
    """One lookup: per pod bit, consecutive matched blocks and their tier-weighted sum."""

    total_blocks: int
    lengths: dict[int, int]
    weighted: dict[int, float]
    last: int = 0  # no candidate holds block 0: the candidate bit that last held it (0: none)

    def add(self, other: Match) -> None:
        """Another prompt of the same batch (the engine caches each on its own): blocks and scores add up;
        a last holder is kept only while no prompt matched anywhere."""
        self.total_blocks += other.total_blocks
        for bit, n in other.lengths.items():
            self.lengths[bit] = self.lengths.get(bit, 0) + n
        for bit, w in other.weighted.items():
            self.weighted[bit] = self.weighted.get(bit, 0.0) + w
        self.last = 0 if self.lengths else self.last or other.last


LAST_HOLDER_SLACK = 65_536  # last holders kept beyond the number of keys held (~8 MB, PRECISE.md)
SPEC_QUEUE_SLACK = 1_024  # superseded speculative deadlines a queue may hold beyond twice the live entries


class MemoryIndex:
    def __init__(
        self,
        size: int,
        pod_cache_size: int,
        tiers: TierTable,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if size <= 0 or pod_cache_size <= 0:
            raise ValueError("size and podCacheSize must be > 0")
        self.size = size
        self.pod_cache_size = pod_cache_size
        self.tiers = tiers
        self.clock = clock
        self._holders: OrderedDict[int, int] = OrderedDict()
        self._low: dict[int, dict[int, float]] = {}
        self._spec: dict[int, int] = {}
        self._spec_until: dict[tuple[int, int], float] = {}
        self._spec_queues: dict[float, deque[tuple[float, int, int]]] = {}
        self._pods: BitSlots[str] = BitSlots()
        self._count: dict[int, int] = {}  # bit → keys held (to skip a scan on release)
        self._last: OrderedDict[int, int] = OrderedDict()  # removed key → bit of the pod that held it

    def __len__(self) -> int:
        return len(self._holders)

    @property
    def speculative_entries(self) -> int:
        return len(self._spec_until)

    # -- pods ------------------------------------------------------------------------------------
    def bit(self, pod: str) -> int:
        return self._pods.bit(pod)

    def bit_of(self, pod: str) -> int:
        return self._pods.get(pod)

    def pod_of(self, bit: int) -> str:
        return self._pods.key_of(bit)

    def release(self, pod: str) -> None:
        """Forget a pod entirely (endpoint removed): its entries go, its bit is reused later."""
        b = self._pods.get(pod)
        if not b:
            return
        if self._count.pop(b, 0):
            for k in [k for k, m in self._holders.items() if m & b]:
                self._unset(k, b)
        for k in [k for k, lb in self._last.items() if lb == b]:
            del self._last[k]
        for k in [k for k, m in self._spec.items() if m & b]:
            self._spec_until.pop((k, b), None)
            m = self._spec[k] & ~b
            if m:
                self._spec[k] = m
            else:
                del self._spec[k]
        self._pods.release(pod)

    # -- writes ----------------------------------------------------------------------------------
    def apply(self, pod: str, delta: Delta) -> None:
        """Apply a source's changes in order (a clear arrives as removals of everything it held)."""
        b = self.bit(pod)
        weight_of = self.tiers.weight_of
        top = self.tiers.top
        holders = self._holders
        low = self._low
        counts = self._count
        last = self._last
        for k, m in zip(delta.keys, delta.masks):
            cur = holders.get(k)
            if m:
                if cur is None:
                    holders[k] = b
                    counts[b] = counts.get(b, 0) + 1
                    if len(holders) > self.size:
                        self._evict_oldest()
                elif not cur & b:
                    nm = cur | b
                    if nm.bit_count() > self.pod_cache_size:
                        victim = nm & ~b
                        victim &= -victim
                        nm &= ~victim
                        counts[victim] = counts.get(victim, 1) - 1
                        lk = low.get(k)
                        if lk is not None and lk.pop(victim, None) is not None and not lk:
                            del low[k]
                    holders[k] = nm
                    holders.move_to_end(k)
                    counts[b] = counts.get(b, 0) + 1
                else:
                    holders.move_to_end(k)
                w = weight_of[m]
                if w != top:
                    lk = low.get(k)
                    if lk is None:
                        low[k] = {b: w}
                    else:
                        lk[b] = w
                elif low:
                    lk = low.get(k)
                    if lk is not None and lk.pop(b, None) is not None and not lk:
                        del low[k]
            elif cur is not None and cur & b:
                self._unset(k, b)
                counts[b] = counts.get(b, 1) - 1
                if k in last:
                    last.move_to_end(k)
                else:
                    limit = min(self.size, len(holders) + LAST_HOLDER_SLACK)
                    while len(last) >= limit:
                        last.popitem(last=False)
                last[k] = b

    def speculate(self, pod: str, keys: list[int], ttl: float) -> None:
        """Assume `pod` holds `keys` for the next `ttl` seconds (the routed request's prompt); a later
        call for the same key and pod replaces the deadline, shorter or longer."""
        if not keys or ttl <= 0:
            return
        b = self.bit(pod)
        until = self.clock() + ttl
        spec, spec_until = self._spec, self._spec_until
        # One FIFO per TTL value: deadlines within a queue never decrease, so expiry pops from the front.
        queue = self._spec_queues.get(ttl)
        if queue is None:
            queue = self._spec_queues[ttl] = deque()
        for k in keys:
            spec[k] = spec.get(k, 0) | b
            spec_until[(k, b)] = until
            queue.append((until, k, b))

    def expire(self) -> None:
        """Drop speculative entries past their deadline (called before every lookup)."""
        if not self._spec_until:
            for queue in self._spec_queues.values():
                queue.clear()  # only superseded deadlines left
            return
        now = self.clock()
        spec, spec_until = self._spec, self._spec_until
        for queue in self._spec_queues.values():
            while queue:
                until, k, b = queue[0]
                if spec_until.get((k, b)) != until:
                    queue.popleft()  # given another deadline since (e.g. held, then shortened to the TTL)
                    continue
                if until > now:
                    break
                queue.popleft()
                del spec_until[(k, b)]
                m = spec.get(k, 0) & ~b
                if m:
                    spec[k] = m
                else:
                    spec.pop(k, None)
        limit = 2 * len(spec_until) + SPEC_QUEUE_SLACK
        for queue in self._spec_queues.values():
            if len(queue) > limit:
                # Superseded deadlines wait behind a live one at the front (a request held for
                # speculativeMaxHold, e.g. a non-streaming one): drop them, keeping the order. Amortised
                # O(1): a pass keeps at most half of what it reads.
                kept = [e for e in queue if spec_until.get((e[1], e[2])) == e[0]]
                queue.clear()
                queue.extend(kept)

    # -- reads -----------------------------------------------------------------------------------
    def match(self, token_bytes: bytes, block_tokens: int, root: int, candidates: int, max_blocks: int = 0) -> Match:
        """Longest consecutive prefix per candidate pod (a bit mask of `bit()` values)."""
        self.expire()
        step = block_tokens * 4
        end = len(token_bytes) - len(token_bytes) % step
        if max_blocks:
            end = min(end, max_blocks * step)
        total = end // step
        lengths: dict[int, int] = {}
        weighted: dict[int, float] = {}
        if not candidates or not end:
            return Match(total, lengths, weighted)
        get = self._holders.get
        spec = self._spec
        low = self._low
        h = xxh64
        key = root
        alive = candidates
        n = 0
        if not spec and not low:
            # The common case (no speculation, one tier): the tightest loop.
            for off in range(0, end, step):
                key = h(token_bytes[off : off + step], key)
                m = get(key, 0) & alive
                if m != alive:
                    if n:
                        dropped = alive & ~m
                        while dropped:
                            bit = dropped & -dropped
                            dropped ^= bit
                            lengths[bit] = n
                    alive = m
                    if not alive:
                        break
                n += 1
        else:
            spec_get = spec.get
            penalty: dict[int, float] = {}
            top = self.tiers.top
            for off in range(0, end, step):
                key = h(token_bytes[off : off + step], key)
                m = (get(key, 0) | spec_get(key, 0)) & alive
                if m != alive:
                    if n:
                        dropped = alive & ~m
                        while dropped:
                            bit = dropped & -dropped
                            dropped ^= bit
                            lengths[bit] = n
                    alive = m
                    if not alive:
                        break
                if low:
                    lk = low.get(key)
                    if lk:
                        # A key speculated onto a pod counts as on its best tier there (the routed
                        # request loads it back), as in the shared index's lookup.
                        speculated = spec_get(key, 0)
                        for bit, w in lk.items():
                            if bit & alive and not bit & speculated:
                                penalty[bit] = penalty.get(bit, 0.0) + top - w
                n += 1
            while alive:
                bit = alive & -alive
                alive ^= bit
                lengths[bit] = n
            if not lengths:
                return Match(total, lengths, weighted, self._last.get(key, 0) & candidates)
            for bit, length in lengths.items():
                weighted[bit] = length * top - penalty.get(bit, 0.0)
            return Match(total, lengths, weighted)
        while alive:
            bit = alive & -alive
            alive ^= bit
            lengths[bit] = n
        if not lengths:  # no candidate holds block 0, whose key is `key`
            return Match(total, lengths, weighted, self._last.get(key, 0) & candidates)
        top = self.tiers.top
        for bit, length in lengths.items():
            weighted[bit] = length * top
        return Match(total, lengths, weighted)

    def holders(self, key: int) -> int:
        """A key's holders mask (real entries only); for tests and debugging."""
        return self._holders.get(key, 0)

    def last_holder(self, key: int) -> int:
        """The bit of the pod whose event last removed `key` (0: none remembered)."""
        return self._last.get(key, 0)

    # -- internals -------------------------------------------------------------------------------
    def _unset(self, k: int, b: int) -> None:
        holders = self._holders
        nm = holders[k] & ~b
        if nm:
            holders[k] = nm
        else:
            del holders[k]
        if self._low:
            lk = self._low.get(k)
            if lk is not None and lk.pop(b, None) is not None and not lk:
                del self._low[k]

    def _evict_oldest(self) -> None:
        k, m = self._holders.popitem(last=False)
        self._low.pop(k, None)
        while m:
            bit = m & -m
            m ^= bit
            self._count[bit] = self._count.get(bit, 1) - 1
