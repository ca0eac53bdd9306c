"""Approximate prefix hashing (reference scheme) and the per-endpoint index."""

from __future__ import annotations

import struct

import xxhash
from helpers import endpoint, request
from hypothesis import given
from hypothesis import strategies as st

from llmepp.framework.datakeys import PREFIX_CACHE_MATCH_INFO, TOKENIZED_PROMPT, TokenizedPrompt, scoped
from llmepp.framework.scheduling import ProfileResult, SchedulingResult
from llmepp.plugins.producers.approx_prefix import ApproxPrefixCacheProducer
from llmepp.plugins.producers.prefix_index import PrefixIndex, block_hashes, prefix_seed
from llmepp.plugins.producers.token import estimate_tokens


def reference_hashes(prompt: bytes, block_tokens: int, model: str, salt: str) -> list[int]:
    """The reference's formula written out literally, token by token."""
    padded = prompt + b"\0" * (-len(prompt) % 4)
    tokens = [int.from_bytes(padded[i : i + 4], "little") for i in range(0, len(padded), 4)]
    h = xxhash.xxh64_intdigest((model + salt).encode())
    out = []
    for i in range(0, len(tokens), block_tokens):
        raw = b"".join(struct.pack("<I", t) for t in tokens[i : i + block_tokens])
        content = xxhash.xxh64_intdigest(raw)
        h = xxhash.xxh64_intdigest(struct.pack("<Q", content) + struct.pack("<Q", h))
        out.append(h)
    return out


@given(st.binary(max_size=3000), st.sampled_from([1, 4, 64]), st.text(max_size=8), st.text(max_size=4))
def test_block_hashes_follow_reference_formula(prompt: bytes, block_tokens: int, model: str, salt: str) -> None:
    got = block_hashes(estimate_tokens(prompt), block_tokens, prefix_seed(model, salt))
    assert got == reference_hashes(prompt, block_tokens, model, salt)


@given(st.binary(min_size=256, max_size=2000), st.binary(min_size=1, max_size=500), st.binary(max_size=500))
def test_shared_prefix_shares_leading_hashes(prefix: bytes, a: bytes, b: bytes) -> None:
    prefix = prefix[: len(prefix) // 256 * 256]  # whole 64-token blocks
    ha = block_hashes(estimate_tokens(prefix + a), 64, 7)
    hb = block_hashes(estimate_tokens(prefix + b), 64, 7)
    n = len(prefix) // 256
    assert ha[:n] == hb[:n]


def test_model_and_salt_change_every_hash() -> None:
    p = estimate_tokens(b"x" * 1000)
    base = block_hashes(p, 64, prefix_seed("m", ""))
    assert not set(base) & set(block_hashes(p, 64, prefix_seed("other", "")))
    assert not set(base) & set(block_hashes(p, 64, prefix_seed("m", "tenant-a")))


def test_max_blocks_caps_hashing() -> None:
    assert len(block_hashes(b"\1" * 4096, 64, 0, max_blocks=3)) == 3
    assert len(block_hashes(b"\1" * 4100, 64, 0)) == 17  # trailing partial block hashed


def test_index_counts_consecutive_blocks_per_endpoint() -> None:
    idx = PrefixIndex(100)
    a, b = endpoint(0), endpoint(1)
    idx.add(a, [1, 2, 3, 4])
    idx.add(b, [1, 2, 9])
    assert idx.match([1, 2, 3, 4, 5]) == {a: 4, b: 2}
    assert idx.match([1, 9, 3]) == {a: 1, b: 2}  # b holds 1 and 9 -> 2 contiguous; a stops at 9
    assert idx.match([7, 1, 2]) == {}


def test_index_lru_evicts_oldest_blocks() -> None:
    idx = PrefixIndex(3)
    a = endpoint(0)
    for h in (1, 2, 3):
        idx.add(a, [h])
    idx.add(a, [1])  # refresh 1
    idx.add(a, [4])  # evicts 2
    assert idx.match([1]) == {a: 1}
    assert idx.match([2]) == {}
    assert idx.blocks_of(a) == 3


def test_index_evicts_a_prompts_tail_before_its_head() -> None:
    """A match counts consecutive blocks from block 0, so evicting a prompt's head first leaves its
    remaining blocks unmatchable (dead entries) while the engine, which frees a request's blocks
    tail first, still serves the prefix. Partial eviction must cut the tail."""
    idx = PrefixIndex(4)
    a = endpoint(0)
    idx.add(a, [1, 2, 3])
    idx.add(a, [7, 8])  # one of 1, 2, 3 must go
    assert idx.match([1, 2, 3]) == {a: 2}
    assert idx.match([7, 8]) == {a: 2}
    # A prompt longer than the capacity keeps its first blocks, so it is found again.
    idx.add(a, list(range(100, 110)))
    assert idx.match(list(range(100, 110))) == {a: 4}
    assert idx.blocks_of(a) == 4


def test_index_drops_removed_endpoint() -> None:
    idx = PrefixIndex(10)
    a, b = endpoint(0), endpoint(1)
    idx.add(a, [1, 2])
    idx.add(b, [1, 2])
    idx.remove_endpoint(a)
    assert idx.match([1, 2]) == {b: 2}
    a.removed = True
    idx.add(a, [1, 2])  # late bookkeeping for a removed endpoint is ignored
    assert idx.match([1, 2]) == {b: 2}


def test_producer_learns_from_routing_and_sizes_the_lru_from_num_gpu_blocks() -> None:
    producer = ApproxPrefixCacheProducer("approx", ApproxPrefixCacheProducer.Params())
    key = scoped(PREFIX_CACHE_MATCH_INFO, "approx")
    # Engine reports 16 blocks of 16 tokens: the LRU holds 16 of our 64-token blocks (num_gpu_blocks
    # unconverted, the reference's sizing: 4x the KV tokens, see ApproxPrefixCacheProducer._capacity).
    a, b = endpoint(0, block_size=16, num_blocks=16), endpoint(1, block_size=16, num_blocks=16)
    prompt = b"abcd" * 64 * 10  # 10 blocks of 64 tokens
    req = request(prompt)
    req.data[TOKENIZED_PROMPT] = TokenizedPrompt(estimate_tokens(prompt))
    producer.produce(req, [a, b])
    info = req.data[key]
    assert info.block_size == 64 and info.total_blocks == 10 and info.hits == {}
    producer.pre_request(req, SchedulingResult("default", {"default": ProfileResult([a])}))
    req2 = request(prompt)
    req2.data[TOKENIZED_PROMPT] = TokenizedPrompt(estimate_tokens(prompt))
    producer.produce(req2, [a, b])
    assert req2.data[key].hits == {a: 10}
    # A 25-block prompt overflows a's 16-block capacity: only the newest 16 stay.
    big = b"wxyz" * 64 * 25
    req3 = request(big)
    req3.data[TOKENIZED_PROMPT] = TokenizedPrompt(estimate_tokens(big))
    producer.produce(req3, [a, b])
    producer.pre_request(req3, SchedulingResult("default", {"default": ProfileResult([a])}))
    assert producer.index.blocks_of(a) == 16


@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("add"), st.integers(0, 5), st.lists(st.integers(0, 12), max_size=6)),
            st.tuples(st.just("remove"), st.integers(0, 5), st.just([])),
            st.tuples(st.just("match"), st.just(0), st.lists(st.integers(0, 12), min_size=1, max_size=6)),
        ),
        max_size=60,
    )
)
def test_index_agrees_with_a_set_per_endpoint_model(ops: list[tuple[str, int, list[int]]]) -> None:
    """The bitmask index against the obvious model: each endpoint an LRU list of at most 4 hashes;
    endpoints that are removed and come back are new objects, as the datastore makes them."""
    idx = PrefixIndex(4)
    eps = {i: endpoint(i) for i in range(6)}
    model: dict[int, list[int]] = {}
    for op, e, hashes in ops:
        if op == "add":
            idx.add(eps[e], hashes)
            held = model.setdefault(e, [])
            for h in reversed(hashes[:4]):  # a prompt's head is its most recent block
                if h in held:
                    held.remove(h)
                held.append(h)
            del held[:-4]
        elif op == "remove":
            idx.remove_endpoint(eps[e])
            model.pop(e, None)
            eps[e] = endpoint(e)
        else:
            expected = {}
            for k, held in model.items():
                n = 0
                while n < len(hashes) and hashes[n] in held:
                    n += 1
                if n:
                    expected[eps[k]] = n
            assert idx.match(hashes) == expected
            assert len(idx) == len({h for held in model.values() for h in held})
