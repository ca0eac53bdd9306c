"""vLLM KV-event wire format: ZeroMQ frames and msgpack payloads → typed events.

PUB frames (one message per batch):  ``[topic, seq (8 bytes big-endian), payload]``; the topic is
``kv@<pod>@<model>`` by llm-d convention.

Payload: the msgpack array ``[ts: float, events: list, data_parallel_rank: int | None]``. Each event
is, depending on the vLLM version:

* vLLM >= 0.24 — a **map** with a ``"type"`` key: ``{"type": "BlockStored", "block_hashes": [...], ...}``;
  optional fields may be absent.
* vLLM <= 0.23 — a **tagged array**: ``["BlockStored", block_hashes, parent_block_hash, token_ids,
  block_size, lora_id, medium, lora_name, extra_keys, group_idx, kv_cache_spec_kind,
  kv_cache_spec_sliding_window]``, ``["BlockRemoved", block_hashes, medium, group_idx]``,
  ``["AllBlocksCleared"]``; older releases stop after fewer fields.

Unknown map keys and extra trailing array fields are ignored (newer vLLM adds fields); an event of an
unknown type is skipped and counted, never fatal. Block hashes arrive as unsigned ints (vLLM's default,
``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1``) or as digests (bytes); both normalise to the digest's last
8 bytes read big-endian, which is what the int form is.

Replay replies (DEALER side, after the empty delimiter): ``[topic, seq, payload]`` (vLLM >= 0.26) or
``[seq, payload]`` (<= 0.25); the end marker has seq ``-1`` (eight 0xff bytes) and an empty payload.

Speed: a well-formed batch decodes in one msgspec call (~1.5 µs per 16-token block); only a batch
that fails the typed decoder is re-decoded event by event to skip what cannot be read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec

from llmepp.decoding import DECODE_ERRORS

MASK64 = 0xFFFF_FFFF_FFFF_FFFF
END_OF_REPLAY_SEQ = -1
_END_SEQ_BYTES = (-1).to_bytes(8, "big", signed=True)


class MalformedMessage(ValueError):
    """A frame set or payload that cannot be read; the caller counts it and moves on."""


# Values no engine sends make the event unreadable (skipped and counted) rather than fail later: token
# ids are keyed as LE uint32 (keys.tokens_to_bytes raises beyond that), block sizes are counts.
TokenId = Annotated[int, msgspec.Meta(ge=0, le=0xFFFF_FFFF)]
Count = Annotated[int, msgspec.Meta(ge=0)]


# -- events (map encoding, vLLM >= 0.24) -------------------------------------------------------
class BlockStored(msgspec.Struct, tag="BlockStored", tag_field="type"):
    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None = None
    token_ids: list[TokenId] = []
    block_size: Count = 0
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: Any = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None


class BlockRemoved(msgspec.Struct, tag="BlockRemoved", tag_field="type"):
    block_hashes: list[int | bytes]
    medium: str | None = None
    group_idx: int | None = None


class AllBlocksCleared(msgspec.Struct, tag="AllBlocksCleared", tag_field="type"):
    pass


# -- the same events as tagged arrays (vLLM <= 0.23); subclasses, so isinstance checks cover both --
class _BlockStoredArray(BlockStored, array_like=True, tag="BlockStored"):
    pass


class _BlockRemovedArray(BlockRemoved, array_like=True, tag="BlockRemoved"):
    pass


class _AllBlocksClearedArray(AllBlocksCleared, array_like=True, tag="AllBlocksCleared"):
    pass


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared
_MapEvent = BlockStored | BlockRemoved | AllBlocksCleared
_ArrayEvent = _BlockStoredArray | _BlockRemovedArray | _AllBlocksClearedArray


class _MapBatch(msgspec.Struct, array_like=True):
    ts: float
    events: list[_MapEvent]
    data_parallel_rank: int | None = None


class _ArrayBatch(msgspec.Struct, array_like=True):
    ts: float
    events: list[_ArrayEvent]
    data_parallel_rank: int | None = None


class _RawBatch(msgspec.Struct, array_like=True):
    ts: float
    events: list[msgspec.Raw]
    data_parallel_rank: int | None = None


_MAP_BATCH = msgspec.msgpack.Decoder(_MapBatch)
_ARRAY_BATCH = msgspec.msgpack.Decoder(_ArrayBatch)
_RAW_BATCH = msgspec.msgpack.Decoder(_RawBatch)
_MAP_EVENT = msgspec.msgpack.Decoder(_MapEvent)
_ARRAY_EVENT = msgspec.msgpack.Decoder(_ArrayEvent)


@dataclass(slots=True)
class EventBatch:
    ts: float
    events: list[KVEvent]
    data_parallel_rank: int | None
    # Events skipped because their type is unknown or their fields unreadable.
    skipped: int = 0


def decode_batch(payload: bytes) -> EventBatch:
    """One payload → its events. Raises MalformedMessage when not even the batch envelope reads."""
    # Fast paths: the whole batch in one typed call, map encoding first (current vLLM).
    for decoder in (_MAP_BATCH, _ARRAY_BATCH):
        try:
            b = decoder.decode(payload)
        except DECODE_ERRORS:
            continue
        if not math.isfinite(b.ts):
            break  # the tolerant path reports it
        return EventBatch(b.ts, list(b.events), b.data_parallel_rank)
    # Tolerant path: read the envelope, then each event on its own.
    try:
        raw = _RAW_BATCH.decode(payload)
    except DECODE_ERRORS as e:
        raise MalformedMessage(f"event batch: {e}") from None
    if not math.isfinite(raw.ts):
        # (ts, seq) orders batches: an infinite ts would make every later batch look like a duplicate.
        raise MalformedMessage(f"event batch: timestamp {raw.ts}")
    events: list[KVEvent] = []
    skipped = 0
    for item in raw.events:
        event = _decode_event(bytes(item))
        if event is None:
            skipped += 1
        else:
            events.append(event)
    return EventBatch(raw.ts, events, raw.data_parallel_rank, skipped)


def _decode_event(data: bytes) -> KVEvent | None:
    if not data:
        return None
    marker = data[0]
    is_map = 0x80 <= marker <= 0x8F or marker in (0xDE, 0xDF)
    try:
        event: KVEvent = (_MAP_EVENT if is_map else _ARRAY_EVENT).decode(data)
    except DECODE_ERRORS:
        return None
    return event


def normalize_hash(h: int | bytes) -> int:
    """An engine block hash as vLLM's int form: the digest's last 8 bytes, big-endian, unsigned."""
    if isinstance(h, bytes):
        return int.from_bytes(h[-8:], "big")
    return h & MASK64


@dataclass(frozen=True, slots=True)
class Message:
    topic: bytes
    seq: int
    payload: bytes


def parse_frames(frames: list[bytes]) -> Message:
    """A PUB message: exactly ``[topic, seq(8B BE), payload]``."""
    if len(frames) != 3:
        raise MalformedMessage(f"expected 3 frames, got {len(frames)}")
    topic, seq, payload = frames
    if len(seq) != 8:
        raise MalformedMessage(f"sequence frame has {len(seq)} bytes, expected 8")
    return Message(bytes(topic), int.from_bytes(seq, "big"), bytes(payload))


def parse_replay_reply(frames: list[bytes]) -> Message | None:
    """One replay reply as the DEALER sees it (leading empty delimiter optional).

    Returns the batch, or None for the end marker. Accepts ``[topic, seq, payload]`` (vLLM >= 0.26)
    and ``[seq, payload]`` (older).
    """
    if frames and not frames[0] and len(frames) in (3, 4):
        frames = frames[1:]
    if len(frames) == 3:
        topic, seq, payload = frames
    elif len(frames) == 2:
        topic = b""
        seq, payload = frames
    else:
        raise MalformedMessage(f"replay reply with {len(frames)} frames")
    if len(seq) != 8:
        raise MalformedMessage(f"replay sequence frame has {len(seq)} bytes, expected 8")
    if seq == _END_SEQ_BYTES:
        return None
    if not payload:
        raise MalformedMessage("replay reply without payload")
    return Message(bytes(topic), int.from_bytes(seq, "big"), bytes(payload))


def replay_request(start_seq: int) -> list[bytes]:
    """What a DEALER sends to the replay ROUTER: empty delimiter + start sequence."""
    return [b"", start_seq.to_bytes(8, "big")]


def parse_topic(topic: bytes) -> tuple[str, str]:
    """``kv@<pod>@<model>`` → (pod, model); missing parts are empty strings."""
    text = topic.decode("utf-8", "replace")
    parts = text.split("@", 2)
    pod = parts[1] if len(parts) > 1 else ""
    model = parts[2] if len(parts) > 2 else ""
    return pod, model
