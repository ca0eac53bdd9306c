"""KV-cache events and their vLLM wire encodings (msgpack).

An ``EventBatch`` is the msgpack array ``[ts: float, events: list, data_parallel_rank: int]``. Events are
encoded in vLLM's current **map** format (vLLM >= 0.24)::

    {"type": "BlockStored", "block_hashes": [int...], "parent_block_hash": int | None, "token_ids": [...],
     "block_size": 16, "lora_id": int | None, "medium": "GPU", "lora_name": str | None}
    {"type": "BlockRemoved", "block_hashes": [int...], "medium": "GPU"}
    {"type": "AllBlocksCleared"}

or, with ``legacy=True``, vLLM <= 0.23's tagged arrays::

    ["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium, lora_name]
    ["BlockRemoved", block_hashes, medium]
    ["AllBlocksCleared"]

Block hashes are unsigned 64-bit ints (``llmepp_sim.blockhash``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

MEDIUM_GPU = "GPU"


@dataclass(frozen=True, slots=True)
class BlockStored:
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    lora_name: str | None = None
    medium: str = MEDIUM_GPU


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    block_hashes: list[int]
    medium: str = MEDIUM_GPU


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    pass


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


def event_to_wire(event: KVEvent, legacy: bool) -> Any:
    if isinstance(event, BlockStored):
        if legacy:
            return [
                "BlockStored",
                event.block_hashes,
                event.parent_block_hash,
                event.token_ids,
                event.block_size,
                event.lora_id,
                event.medium,
                event.lora_name,
            ]
        return {
            "type": "BlockStored",
            "block_hashes": event.block_hashes,
            "parent_block_hash": event.parent_block_hash,
            "token_ids": event.token_ids,
            "block_size": event.block_size,
            "lora_id": event.lora_id,
            "medium": event.medium,
            "lora_name": event.lora_name,
        }
    if isinstance(event, BlockRemoved):
        if legacy:
            return ["BlockRemoved", event.block_hashes, event.medium]
        return {"type": "BlockRemoved", "block_hashes": event.block_hashes, "medium": event.medium}
    return ["AllBlocksCleared"] if legacy else {"type": "AllBlocksCleared"}


def encode_batch(ts: float, events: Sequence[KVEvent], data_parallel_rank: int, legacy: bool) -> bytes:
    wire = [ts, [event_to_wire(e, legacy) for e in events], data_parallel_rank]
    return bytes(msgpack.packb(wire, use_bin_type=True))


def event_from_wire(raw: Any) -> KVEvent:
    """Decode either shape (used by tests and the fidelity tooling; the EPP has its own decoder)."""
    if isinstance(raw, dict):
        kind = raw.get("type")
        if kind == "BlockStored":
            return BlockStored(
                block_hashes=list(raw["block_hashes"]),
                parent_block_hash=raw.get("parent_block_hash"),
                token_ids=list(raw.get("token_ids", [])),
                block_size=int(raw.get("block_size", 0)),
                lora_id=raw.get("lora_id"),
                lora_name=raw.get("lora_name"),
                medium=raw.get("medium") or MEDIUM_GPU,
            )
        if kind == "BlockRemoved":
            return BlockRemoved(list(raw["block_hashes"]), raw.get("medium") or MEDIUM_GPU)
        if kind == "AllBlocksCleared":
            return AllBlocksCleared()
        raise ValueError(f"unknown KV event {raw!r}")
    tag, *fields = raw
    if tag == "BlockStored":
        hashes, parent, tokens, block_size, lora_id, medium, lora_name = (fields + [None] * 6)[:7]
        return BlockStored(list(hashes), parent, list(tokens), int(block_size), lora_id, lora_name, medium or "GPU")
    if tag == "BlockRemoved":
        return BlockRemoved(list(fields[0]), (fields[1] if len(fields) > 1 else None) or MEDIUM_GPU)
    if tag == "AllBlocksCleared":
        return AllBlocksCleared()
    raise ValueError(f"unknown KV event {raw!r}")


def decode_batch(payload: bytes) -> tuple[float, list[KVEvent], int]:
    ts, events, rank = msgpack.unpackb(payload, raw=False)
    return float(ts), [event_from_wire(e) for e in events], int(rank)
