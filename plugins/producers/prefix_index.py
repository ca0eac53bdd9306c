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

from llmepp.datalayer.endpoint import Endpoint

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


class PrefixIndex:
    """hash → endpoints, with a per-endpoint LRU of `capacity(endpoint)` blocks."""

    def __init__(self, default_capacity: int) -> None:
        self.default_capacity = default_capacity
        self._holders: dict[int, set[Endpoint]] = {}
        self._lru: dict[Endpoint, OrderedDict[int, None]] = {}

    def __len__(self) -> int:
        return len(self._holders)

    def match(self, hashes: list[int]) -> dict[Endpoint, int]:
        """Consecutive matched blocks from the start, per endpoint that matched at least one."""
        holders = self._holders
        first = holders.get(hashes[0]) if hashes else None
        if not first:
            return {}
        alive = set(first)
        hits: dict[Endpoint, int] = {}
        i = 1
        for i in range(1, len(hashes)):
            held = holders.get(hashes[i])
            if not held:
                break
            if not alive <= held:
                for ep in alive - held:
                    hits[ep] = i
                alive &= held
                if not alive:
                    return hits
        else:
            i = len(hashes)
        for ep in alive:
            hits[ep] = i
        return hits

    def add(self, endpoint: Endpoint, hashes: list[int], capacity: int = 0) -> None:
        """Record that `endpoint` now holds these blocks (most recent last)."""
        if endpoint.removed:
            return
        lru = self._lru.get(endpoint)
        if lru is None:
            lru = self._lru[endpoint] = OrderedDict()
        holders = self._holders
        for h in hashes:
            if h in lru:
                lru.move_to_end(h)
                continue
            lru[h] = None
            held = holders.get(h)
            if held is None:
                holders[h] = {endpoint}
            else:
                held.add(endpoint)
        limit = capacity or self.default_capacity
        while len(lru) > limit:
            old, _ = lru.popitem(last=False)
            self._drop(old, endpoint)

    def remove_endpoint(self, endpoint: Endpoint) -> None:
        lru = self._lru.pop(endpoint, None)
        if lru:
            for h in lru:
                self._drop(h, endpoint)

    def blocks_of(self, endpoint: Endpoint) -> int:
        lru = self._lru.get(endpoint)
        return len(lru) if lru else 0

    def _drop(self, h: int, endpoint: Endpoint) -> None:
        held = self._holders.get(h)
        if held is not None:
            held.discard(endpoint)
            if not held:
                del self._holders[h]
