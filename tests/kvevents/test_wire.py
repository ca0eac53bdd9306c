"""Wire format: both vLLM event encodings, frames, replay replies, tolerance to junk."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmepp.kvevents.wire import (
    MASK64,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    MalformedMessage,
    decode_batch,
    normalize_hash,
    parse_frames,
    parse_replay_reply,
    parse_topic,
)
from llmepp_sim import kvwire

u64 = st.integers(min_value=0, max_value=MASK64)
# vLLM sends ints by default, 32-byte digests with VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0.
block_hash = st.one_of(u64, st.binary(min_size=8, max_size=32))
opt_str = st.one_of(st.none(), st.text(max_size=12))
medium = st.sampled_from([None, "GPU", "CPU"])


@st.composite
def stored(draw: st.DrawFn) -> dict[str, Any]:
    n = draw(st.integers(1, 4))
    bs = draw(st.sampled_from([1, 4, 16]))
    return {
        "type": "BlockStored",
        "block_hashes": draw(st.lists(block_hash, min_size=n, max_size=n)),
        "parent_block_hash": draw(st.one_of(st.none(), block_hash)),
        "token_ids": draw(st.lists(st.integers(0, 2**32 - 1), min_size=n * bs, max_size=n * bs)),
        "block_size": bs,
        "lora_id": draw(st.one_of(st.none(), st.integers(0, 100))),
        "medium": draw(medium),
        "lora_name": draw(opt_str),
        "extra_keys": draw(st.one_of(st.none(), st.lists(st.lists(st.text(max_size=4), max_size=2), max_size=2))),
        "group_idx": draw(st.one_of(st.none(), st.integers(0, 3))),
        "kv_cache_spec_kind": draw(st.sampled_from([None, "full_attention", "sliding_window"])),
        "kv_cache_spec_sliding_window": draw(st.one_of(st.none(), st.integers(1, 4096))),
    }


@st.composite
def removed(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "type": "BlockRemoved",
        "block_hashes": draw(st.lists(block_hash, min_size=1, max_size=4)),
        "medium": draw(medium),
        "group_idx": draw(st.one_of(st.none(), st.integers(0, 3))),
    }


event = st.one_of(stored(), removed(), st.just({"type": "AllBlocksCleared"}))

STORED_ORDER = ["block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium", "lora_name",
                "extra_keys", "group_idx", "kv_cache_spec_kind", "kv_cache_spec_sliding_window"]  # fmt: skip
REMOVED_ORDER = ["block_hashes", "medium", "group_idx"]


def to_map(ev: dict[str, Any], omit_none: bool) -> dict[str, Any]:
    """vLLM >= 0.24: a map; msgspec's omit_defaults leaves unset optional fields out."""
    return {k: v for k, v in ev.items() if not (omit_none and v is None)}


def to_array(ev: dict[str, Any], keep: int) -> list[Any]:
    """vLLM <= 0.23: a tagged array; older releases stop after fewer fields (`keep` of them)."""
    order = {"BlockStored": STORED_ORDER, "BlockRemoved": REMOVED_ORDER}.get(ev["type"], [])
    fields = [ev[k] for k in order]
    return [ev["type"], *fields[: max(1, keep) if order else 0]]


def expected(ev: dict[str, Any], kept: set[str] | None = None) -> Any:
    """The typed event the decoder must produce (fields not sent fall back to defaults)."""

    def f(name: str, default: Any = None) -> Any:
        return ev[name] if kept is None or name in kept else default

    if ev["type"] == "BlockStored":
        return BlockStored(
            block_hashes=ev["block_hashes"], parent_block_hash=f("parent_block_hash"), token_ids=f("token_ids", []),
            block_size=f("block_size", 0), lora_id=f("lora_id"), medium=f("medium"), lora_name=f("lora_name"),
            extra_keys=f("extra_keys"), group_idx=f("group_idx"), kv_cache_spec_kind=f("kv_cache_spec_kind"),
            kv_cache_spec_sliding_window=f("kv_cache_spec_sliding_window"),
        )  # fmt: skip
    if ev["type"] == "BlockRemoved":
        return BlockRemoved(block_hashes=ev["block_hashes"], medium=f("medium"), group_idx=f("group_idx"))
    return AllBlocksCleared()


def same(got: Any, exp: Any) -> bool:
    """Field-wise equality (array-shaped events decode to subclasses of the map types)."""
    return isinstance(got, type(exp)) and all(getattr(got, n) == getattr(exp, n) for n in exp.__struct_fields__)


@settings(max_examples=150, deadline=None)
@given(events=st.lists(event, max_size=6), omit_none=st.booleans(), ts=st.floats(0, 2e9), rank=st.integers(0, 7))
def test_map_encoding_roundtrip(events: list[dict[str, Any]], omit_none: bool, ts: float, rank: int) -> None:
    payload = msgpack.packb([ts, [to_map(e, omit_none) for e in events], rank], use_bin_type=True)
    batch = decode_batch(payload)
    assert batch.ts == ts and batch.data_parallel_rank == rank and batch.skipped == 0
    assert len(batch.events) == len(events)
    assert all(same(got, expected(e)) for got, e in zip(batch.events, events))


@settings(max_examples=150, deadline=None)
@given(events=st.lists(event, max_size=6), keep=st.integers(1, 11), ts=st.floats(0, 2e9))
def test_legacy_array_encoding_roundtrip(events: list[dict[str, Any]], keep: int, ts: float) -> None:
    # Keep at least the fields every legacy release had (BlockStored: 7 incl. medium; BlockRemoved: 1).
    payload = msgpack.packb([ts, [to_array(e, max(keep, 3)) for e in events], 0], use_bin_type=True)
    batch = decode_batch(payload)
    assert len(batch.events) == len(events) and batch.skipped == 0
    for got, e in zip(batch.events, events):
        order = {"BlockStored": STORED_ORDER, "BlockRemoved": REMOVED_ORDER}.get(e["type"], [])
        assert same(got, expected(e, set(order[: max(keep, 3)])))


@settings(max_examples=50, deadline=None)
@given(events=st.lists(event, min_size=1, max_size=4), junk=st.sampled_from([["Nope", 1], {"type": "Nope"}, 7]))
def test_unknown_events_are_skipped_and_counted(events: list[dict[str, Any]], junk: Any) -> None:
    wire = [to_map(e, True) for e in events]
    wire.insert(len(wire) // 2, junk)
    batch = decode_batch(msgpack.packb([1.0, wire, 0], use_bin_type=True))
    assert batch.skipped == 1
    assert all(same(got, expected(e)) for got, e in zip(batch.events, events))


def test_unknown_map_keys_and_extra_array_fields_are_ignored() -> None:
    new_map = {"type": "BlockStored", "block_hashes": [5], "token_ids": [1, 2], "block_size": 2,
               "locality": "local", "ownership": "own", "session_id": "s", "lookahead_token_ids": [3]}  # fmt: skip
    new_array = ["BlockRemoved", [5], "GPU", 0, "future-field", 42]
    batch = decode_batch(msgpack.packb([1.0, [new_map, new_array], None]))
    stored_ev, removed_ev = batch.events
    assert isinstance(stored_ev, BlockStored) and stored_ev.block_hashes == [5] and stored_ev.token_ids == [1, 2]
    assert isinstance(removed_ev, BlockRemoved) and removed_ev.medium == "GPU"
    assert batch.data_parallel_rank is None


@pytest.mark.parametrize("legacy", [False, True])
def test_simulator_encoding_decodes(legacy: bool) -> None:
    events: list[kvwire.KVEvent] = [
        kvwire.BlockStored([1, 2], None, list(range(32)), 16, lora_name="ad"),
        kvwire.BlockRemoved([2], "CPU"),
        kvwire.AllBlocksCleared(),
    ]
    batch = decode_batch(kvwire.encode_batch(3.5, events, 1, legacy))
    a, b, c = batch.events
    assert isinstance(a, BlockStored) and a.block_hashes == [1, 2] and a.token_ids == list(range(32))
    assert a.lora_name == "ad" and a.medium == "GPU" and a.block_size == 16
    assert isinstance(b, BlockRemoved) and b.medium == "CPU"
    assert isinstance(c, AllBlocksCleared)
    assert batch.ts == 3.5 and batch.data_parallel_rank == 1


@pytest.mark.parametrize("payload", [b"", b"\xc1", msgpack.packb({"a": 1}), msgpack.packb(["ts", [], 0])])
def test_malformed_envelope_raises(payload: bytes) -> None:
    with pytest.raises(MalformedMessage):
        decode_batch(payload)


@given(digest=st.binary(min_size=8, max_size=32))
def test_bytes_hash_is_the_int_form(digest: bytes) -> None:
    # vLLM's int form: int.from_bytes(digest, "big") & (2**64 - 1).
    assert normalize_hash(digest) == int.from_bytes(digest, "big") & MASK64


def test_negative_and_large_ints_fold_to_u64() -> None:
    assert normalize_hash(-1) == MASK64
    assert normalize_hash(2**64 + 5) == 5


def test_frames() -> None:
    msg = parse_frames([b"kv@p@m", (7).to_bytes(8, "big"), b"x"])
    assert (msg.topic, msg.seq, msg.payload) == (b"kv@p@m", 7, b"x")
    with pytest.raises(MalformedMessage):
        parse_frames([b"kv@p@m", b"x"])
    with pytest.raises(MalformedMessage):
        parse_frames([b"kv@p@m", b"\x00" * 4, b"x"])
    assert parse_topic(b"kv@10.0.0.1:8000@meta/llama") == ("10.0.0.1:8000", "meta/llama")
    assert parse_topic(b"kv@pod") == ("pod", "")


def test_replay_replies_both_shapes_and_end_marker() -> None:
    seq = (4).to_bytes(8, "big")
    end = (-1).to_bytes(8, "big", signed=True)
    new = parse_replay_reply([b"", b"kv@p@m", seq, b"payload"])  # vLLM >= 0.26, with delimiter
    old = parse_replay_reply([seq, b"payload"])  # <= 0.25, delimiter already stripped
    assert new is not None and old is not None
    assert (new.topic, new.seq, new.payload) == (b"kv@p@m", 4, b"payload")
    assert (old.topic, old.seq, old.payload) == (b"", 4, b"payload")
    assert parse_replay_reply([b"", b"", end, b""]) is None
    assert parse_replay_reply([end, b""]) is None
    with pytest.raises(MalformedMessage):
        parse_replay_reply([b"", b"a", b"b", b"c", b"d"])


@pytest.mark.parametrize(
    "bad",
    [
        {"token_ids": [-1] * 4},  # not a token id: LE uint32 cannot hold it (OverflowError downstream)
        {"token_ids": [2**32] * 4},
        {"token_ids": [2**63] * 4},
        {"block_size": -4},
    ],
)
@pytest.mark.parametrize("legacy", [False, True])
def test_field_values_no_engine_sends_make_the_event_unreadable(bad: dict[str, Any], legacy: bool) -> None:
    """Values of the right msgpack type but outside what an engine can send are skipped and counted
    with the event, like a wrong type: keying them would raise (a token id beyond uint32) and take the
    whole source down, again on every replay of the batch."""
    good = {"type": "BlockStored", "block_hashes": [1], "parent_block_hash": None, "token_ids": [1, 2, 3, 4],
            "block_size": 4, "lora_id": None, "medium": "GPU", "lora_name": None}  # fmt: skip
    events = [good, {**good, **bad}, good]
    wire = [to_array({**dict.fromkeys(STORED_ORDER), **e}, 7) for e in events] if legacy else events
    batch = decode_batch(msgpack.packb([1.0, wire, 0], use_bin_type=True))
    assert batch.skipped == 1 and len(batch.events) == 2


@pytest.mark.parametrize("legacy", [False, True])
def test_a_string_that_is_not_utf8_skips_its_event(legacy: bool) -> None:
    """msgspec raises UnicodeDecodeError (not a DecodeError) for such a string: it escaped decode_batch and
    took the source down, as the deep nesting below did."""
    good = {"type": "BlockStored", "block_hashes": [1], "parent_block_hash": None, "token_ids": [1, 2, 3, 4],
            "block_size": 4, "lora_id": None, "medium": "GPU", "lora_name": None}  # fmt: skip
    events = [good, {**good, "lora_name": "x"}, good]
    wire = [to_array({**dict.fromkeys(STORED_ORDER), **e}, 7) for e in events] if legacy else events
    payload = msgpack.packb([1.0, wire, 0], use_bin_type=True)
    assert payload.count(b"\xa1x") == 1
    batch = decode_batch(payload.replace(b"\xa1x", b"\xa1\xff"))  # the one-byte string "x" becomes 0xff
    assert batch.skipped == 1 and len(batch.events) == 2
    junk = msgpack.packb([1.0, [good, "r"], 0], use_bin_type=True).replace(b"\xa1r", b"\xa1\xff")
    batch = decode_batch(junk)  # an event that is such a string
    assert batch.skipped == 1 and len(batch.events) == 1


@pytest.mark.parametrize("ts", [float("inf"), float("-inf"), float("nan")])
def test_a_non_finite_timestamp_is_malformed(ts: float) -> None:
    """The (timestamp, seq) order is what tells duplicates from restarts; an infinite timestamp would
    make every later batch look old (the shared index's guard would refuse them for good)."""
    with pytest.raises(MalformedMessage):
        decode_batch(msgpack.packb([ts, [], 0]))


def _deep(depth: int = 5_000) -> bytes:
    """A msgpack value nested `depth` arrays deep (msgspec gives up with RecursionError)."""
    return b"\x91" * depth + b"\x01"


def test_deep_nesting_is_malformed_not_a_recursion_error() -> None:
    """msgspec raises RecursionError (not a DecodeError) past its nesting limit: it escaped decode_batch,
    killed the source's task, and the pool's restart replayed the same batch from 0, forever. Even the
    tolerant path cannot step over such an event (msgspec.Raw parses it too): the batch is malformed."""
    deep_extra = (
        b"\x85"
        + b"".join(msgpack.packb(x) for x in ("type", "BlockStored", "block_hashes", [1], "token_ids", [1, 2]))
        + msgpack.packb("block_size") + msgpack.packb(2)
        + msgpack.packb("extra_keys") + _deep()
    )  # fmt: skip
    ts, rank = msgpack.packb(1.5), msgpack.packb(0)
    for parts in (
        [_deep(), b"\x90", rank],
        [ts, _deep(), rank],
        [ts, b"\x90", _deep()],
        [ts, b"\x91" + deep_extra, rank],
    ):
        with pytest.raises(MalformedMessage):
            decode_batch(b"\x93" + b"".join(parts))
