"""Chained 64-bit block hashes: the prefix-cache keys of the simulated pods and of their KV events.

Exact definition (a precise-prefix EPP that wants to reproduce the pods' hashes must follow it):

* ``root = u64(sha256(b"llmepp-sim-root:" + hash_seed.encode()))`` where ``u64(d)`` is the digest's last
  8 bytes read big-endian (vLLM's ``int.from_bytes(digest, "big") & (2**64 - 1)`` convention).
* For the i-th *full* block of ``block_size`` token ids (a trailing partial block has no hash):
  ``h_i = u64(sha256(parent.to_bytes(8, "big") + tokens_as_big_endian_uint32 + extra))`` with
  ``parent = h_{i-1}`` (``root`` for the first block) and ``extra = b""`` for the base model or
  ``b"lora:" + adapter_name.encode()`` for a LoRA adapter (vLLM also salts by adapter).

Events carry ``parent_block_hash = None`` for a chain's first block, as vLLM does; only the pods' internal
chaining uses ``root``. Tokens are the ids of ``llmepp_sim.tokenizer`` after its chat template.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence


def _u64(digest: bytes) -> int:
    return int.from_bytes(digest[-8:], "big")


def root_hash(hash_seed: str) -> int:
    return _u64(hashlib.sha256(b"llmepp-sim-root:" + hash_seed.encode()).digest())


def extra_key(lora_name: str | None) -> bytes:
    return b"" if lora_name is None else b"lora:" + lora_name.encode()


def block_hash(parent: int, tokens: Sequence[int], extra: bytes = b"") -> int:
    payload = parent.to_bytes(8, "big") + struct.pack(f">{len(tokens)}I", *tokens) + extra
    return _u64(hashlib.sha256(payload).digest())


def extend_chain(
    hashes: list[int],
    token_ids: Sequence[int],
    block_size: int,
    root: int,
    extra: bytes = b"",
    first_block: int = 0,
) -> None:
    """Append the hashes of every full block of ``token_ids`` not yet in ``hashes`` (in place).

    ``token_ids`` may start at block ``first_block`` of the sequence (a window, to avoid copying a long
    prompt); ``hashes`` must already hold at least ``first_block`` hashes then.
    """
    if len(hashes) < first_block:
        raise ValueError(f"a token window from block {first_block} needs the {first_block} hashes before it")
    full_blocks = first_block + len(token_ids) // block_size
    parent = hashes[-1] if hashes else root
    for i in range(len(hashes), full_blocks):
        j = i - first_block
        parent = block_hash(parent, token_ids[j * block_size : (j + 1) * block_size], extra)
        hashes.append(parent)


def chain(token_ids: Sequence[int], block_size: int, hash_seed: str = "", lora_name: str | None = None) -> list[int]:
    """All full-block hashes of a token sequence."""
    hashes: list[int] = []
    extend_chain(hashes, token_ids, block_size, root_hash(hash_seed), extra_key(lora_name))
    return hashes
