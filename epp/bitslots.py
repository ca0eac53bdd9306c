"""One bit per key, for the prefix indexes that keep "which endpoints hold this block" as an int bitmask.

A bitmask is a fraction of the memory of a set per block, and intersecting holders is one `&`. Bits of
released keys are reused, so masks stay as narrow as the number of live keys.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class BitSlots(Generic[K]):
    """key → a distinct single-bit int."""

    def __init__(self) -> None:
        self._bits: dict[K, int] = {}
        self._keys: dict[int, K] = {}
        self._free: list[int] = []  # bits of released keys

    def __len__(self) -> int:
        return len(self._bits)

    def bit(self, key: K) -> int:
        """The key's bit, allocated on first use."""
        b = self._bits.get(key)
        if b is None:
            # With no freed bit, the allocated ones are exactly bits 0 .. len - 1.
            b = self._free.pop() if self._free else 1 << len(self._bits)
            self._bits[key] = b
            self._keys[b] = key
        return b

    def get(self, key: K) -> int:
        """The key's bit, 0 when it has none."""
        return self._bits.get(key, 0)

    def key_of(self, bit: int) -> K:
        return self._keys[bit]

    def release(self, key: K) -> None:
        """Forget the key; its bit goes to the next new key."""
        b = self._bits.pop(key, None)
        if b is not None:
            del self._keys[b]
            self._free.append(b)


def bits(mask: int) -> Iterator[int]:
    """The single-bit ints set in `mask`, lowest first."""
    while mask:
        low = mask & -mask
        yield low
        mask ^= low
