"""llmepp.bitslots: one bit per key, freed bits reused, masks decomposed."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmepp.bitslots import BitSlots, bits


def test_bits_are_distinct_stable_and_reused_after_release() -> None:
    slots: BitSlots[str] = BitSlots()
    a, b, c = slots.bit("a"), slots.bit("b"), slots.bit("c")
    assert (a, b, c) == (1, 2, 4) and slots.bit("a") == a and len(slots) == 3
    assert slots.key_of(b) == "b" and slots.get("zzz") == 0
    slots.release("b")
    assert slots.get("b") == 0 and len(slots) == 2
    with pytest.raises(KeyError):
        slots.key_of(b)
    assert slots.bit("d") == b  # the freed bit, not a wider one
    assert slots.bit("e") == 8
    slots.release("nobody")  # unknown keys are a no-op


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 20)), max_size=80))
def test_live_keys_always_hold_distinct_single_bits(ops: list[tuple[bool, int]]) -> None:
    slots: BitSlots[int] = BitSlots()
    live: set[int] = set()
    for add, key in ops:
        if add:
            slots.bit(key)
            live.add(key)
        else:
            slots.release(key)
            live.discard(key)
        owned = [slots.get(k) for k in live]
        assert len(set(owned)) == len(live) and all(b and b & (b - 1) == 0 for b in owned)
        assert all(slots.key_of(slots.get(k)) == k for k in live)


def test_bits_of_a_mask_lowest_first() -> None:
    assert list(bits(0)) == [] and list(bits(0b101001)) == [1, 8, 32]
    assert list(bits(1 << 300)) == [1 << 300]
