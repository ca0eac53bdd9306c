"""The EPP's own KV-block keys ("request keys"), recomputed from token ids.

Why our own keys: the engine's block hashes depend on its hash algorithm, seed and block size
(sha256 over pickle/CBOR, a per-process seed for xxhash, ...). Recomputing keys from the token ids
that every `BlockStored` event carries lets the EPP hash prompts and events identically without
knowing any of that; the engine's hashes serve only as opaque handles (chain.py maps them to ours).

Definition (little-endian throughout, xxh64 = XXH64 with a 64-bit seed):

    root  = xxh64(utf8(model) [‖ 0x00 ‖ utf8(cache_salt)],  seed = xxh64(hashSeed) or 0)
    key_i = xxh64(LE uint32 token ids of full block i,      seed = key_{i−1}),  key_{−1} = root

`model` is the LoRA adapter name when the request / event is for an adapter (the adapter replaces
the base model, as in llm-d). Only full blocks of `blockSizeTokens` tokens get a key; a trailing
partial block has none. Chaining through the seed costs one xxh64 call per block (~0.1 µs for 16
tokens), so a 100k-token prompt hashes in well under a millisecond.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Sequence

import xxhash

xxh64 = xxhash.xxh64_intdigest

_BIG_ENDIAN_HOST = sys.byteorder == "big"


def seed_of(hash_seed: str) -> int:
    """The seed every root is hashed with (`tokenProcessorConfig.hashSeed`; "" → 0)."""
    return xxh64(hash_seed.encode()) if hash_seed else 0


def root_key(model: str, cache_salt: str = "", seed: int = 0) -> int:
    data = model.encode()
    if cache_salt:
        data += b"\x00" + cache_salt.encode()
    return xxh64(data, seed)


def tokens_to_bytes(ids: Sequence[int]) -> bytes:
    """Token ids as LE uint32 bytes (TokenizedPrompt's layout)."""
    arr = array("I", ids)
    if _BIG_ENDIAN_HOST:
        arr.byteswap()
    return arr.tobytes()


def block_keys(token_bytes: bytes, block_tokens: int, parent: int, max_blocks: int = 0) -> list[int]:
    """Chained keys of every full block (at most `max_blocks` when > 0)."""
    step = block_tokens * 4
    end = len(token_bytes) - len(token_bytes) % step
    if max_blocks:
        end = min(end, max_blocks * step)
    out: list[int] = []
    append = out.append
    h = xxh64
    key = parent
    for off in range(0, end, step):
        key = h(token_bytes[off : off + step], key)
        append(key)
    return out
