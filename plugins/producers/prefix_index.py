"""Approximate prefix index: which endpoint probably caches which prompt block.

Block hashes (the reference's scheme, §5.1):
    seed   = xxh64(target_model ‖ cache_salt)
    c_i    = xxh64(raw uint32 token bytes of block i)          (trailing partial block included)
    h_i    = xxh64(LE64(c_i) ‖ LE64(h_{i−1})),  h_{−1} = seed

Index: hash → endpoints holding it, plus a per-endpoint LRU bounding what each endpoint is
assumed to hold (its KV capacity in blocks). Unlike the reference, a match is counted per
endpoint over *consecutive* blocks from the start, as the engine's prefix cache works.
"""

from __future__ import annotations

import struct
from collections import OrderedDict

import xxhash

from llmepp.bitslots import BitSlots, bits
from llmepp.datalayer.endpoint import Endpoint
from llmepp.framework.datakeys import TokenizedPrompt

_xxh64 = xxhash.xxh64_intdigest
_pack_pair = struct.Struct("<QQ").pack


def prefix_seed(model: str, cache_salt: str) -> int:
    return _xxh64((model + cache_salt).encode())


def block_hashes(token_bytes: bytes, block_tokens: int, seed: int, max_blocks: int = 0) -> list[int]:
    """Chained hashes of consecutive blocks of `block_tokens` uint32 tokens (max_blocks 0 = all)."""
    step = block_tokens * 4
    end = len(token_bytes)
    if max_blocks:
        end = min(end, max_blocks * step)
    view = memoryview(token_bytes)
    h = seed
    out: list[int] = []
    append = out.append
    for off in range(0, end, step):
        h = _xxh64(_pack_pair(_xxh64(view[off : off + step]), h))
        append(h)
    return out


def prompt_hashes(
    tokens: TokenizedPrompt, block_tokens: int, seed: int, max_blocks: int = 0
) -> tuple[list[int], tuple[int, ...]]:
    """The block hashes of a request's prompt and where each prompt's chain ends (() for one prompt). A batch's
    prompts are hashed each on its own from `seed` (the reference's "each prompt in a batch is hashed
    independently"): the engine computes and caches each as a request of its own."""
    if not tokens.ends:
        return block_hashes(tokens.token_bytes, block_tokens, seed, max_blocks), ()
    hashes: list[int] = []
    ends: list[int] = []
    for prompt in tokens.prompts():
        hashes += block_hashes(prompt, block_tokens, seed, max_blocks)
        ends.append(len(hashes))
    return hashes, tuple(ends)


class PrefixIndex:
    """hash → endpoints, with a per-endpoint LRU of `capacity(endpoint)` blocks.

    Holders are a bitmask over endpoint slots (llmepp.bitslots) rather than a set per hash: an empty Python set alone
    is ~200 bytes, which made a (endpoint, block) entry cost 349 bytes, 10.9 MB per endpoint at the
    reference's 31,250-block capacity; now 133-160 bytes (benchmarks/PLUGINS.md).
    """

    def __init__(self, default_capacity: int) -> None:
        self.default_capacity = default_capacity
        self._holders: dict[int, int] = {}  # block hash → bitmask of endpoint slots
        self._lru: dict[Endpoint, OrderedDict[int, None]] = {}
        self._slots: BitSlots[Endpoint] = BitSlots()

    def __len__(self) -> int:
        return len(self._holders)

    def match(self, hashes: list[int]) -> dict[Endpoint, int]:
        """Consecutive matched blocks from the start, per endpoint that matched at least one."""
        holders = self._holders
        alive = holders.get(hashes[0], 0) if hashes else 0
        if not alive:
            return {}
        hits: dict[Endpoint, int] = {}
        endpoint_of = self._slots.key_of
        get = holders.get
        for i in range(1, len(hashes)):
            held = get(hashes[i], 0)
            if held == alive:  # the usual case: the same holders block after block
                continue
            lost = alive & ~held
            if lost:
                for bit in bits(lost):
                    hits[endpoint_of(bit)] = i
                alive ^= lost
                if not alive:
                    return hits
        n = len(hashes)
        for bit in bits(alive):
            hits[endpoint_of(bit)] = n
        return hits

    def match_chains(self, chains: list[list[int]]) -> dict[Endpoint, int]:
        """A batch's prompts: each one's consecutive matched blocks, summed per endpoint (as the reference
        adds up its prompts' matches)."""
        if len(chains) == 1:
            return self.match(chains[0])
        hits: dict[Endpoint, int] = {}
        for chain in chains:
            for ep, n in self.match(chain).items():
                hits[ep] = hits.get(ep, 0) + n
        return hits

    def add(self, endpoint: Endpoint, hashes: list[int], capacity: int = 0) -> None:
        """Record that `endpoint` now holds these blocks (of one prompt, in prompt order).

        They are touched last block first, so block 0 is the most recent: eviction cuts a prompt's
        tail before its head, as the engine frees a request's blocks, and what survives still matches
        (a match is consecutive from block 0). Of a prompt longer than the capacity its head is kept."""
        if endpoint.removed:
            return
        lru = self._lru.get(endpoint)
        if lru is None:
            lru = self._lru[endpoint] = OrderedDict()
        bit = self._slots.bit(endpoint)
        holders = self._holders
        limit = capacity or self.default_capacity
        for h in reversed(hashes if len(hashes) <= limit else hashes[:limit]):
            if h in lru:
                lru.move_to_end(h)
                continue
            lru[h] = None
            holders[h] = holders.get(h, 0) | bit
        while len(lru) > limit:
            old, _ = lru.popitem(last=False)
            self._drop(old, bit)

    def remove_endpoint(self, endpoint: Endpoint) -> None:
        lru = self._lru.pop(endpoint, None)
        bit = self._slots.get(endpoint)
        if not bit:
            return
        for h in lru or ():
            self._drop(h, bit)
        self._slots.release(endpoint)

    def blocks_of(self, endpoint: Endpoint) -> int:
        lru = self._lru.get(endpoint)
        return len(lru) if lru else 0

    def _drop(self, h: int, bit: int) -> None:
        held = self._holders.get(h)
        if held is not None:
            held &= ~bit
            if held:
                self._holders[h] = held
            else:
                del self._holders[h]
