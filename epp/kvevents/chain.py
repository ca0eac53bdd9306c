"""One event source's engine-hash → request-key mapping (llm-d's engine/request key split).

Why: events name blocks by the engine's hash, requests by the EPP's key (keys.py). This module turns
a source's `BlockStored` / `BlockRemoved` / `AllBlocksCleared` into changes of "which tiers does this
pod hold request key k in", and nothing else; index.py / redis_index.py store those changes.

Per engine block the source remembers an `EngineBlock`:

* `keys` — the request keys whose last token lies in this engine block. Block sizes need not match:
  engine 64 / ours 16 gives 4 keys per engine block (1:many); engine 16 / ours 64 gives one key every
  4th engine block (many:1), the tokens in between wait in `pending`. A key is attributed to the
  engine block that completes it, so evicting that block removes it (vLLM evicts a sequence
  tail-first, so a key's earlier engine blocks go after it, never before, in practice).
* `last_key`, `pending` — the chain position after the block, so a later `BlockStored` whose
  `parent_block_hash` names this block continues the chain without the earlier tokens.
* `tiers` — the mediums holding it (GPU, CPU offload, ...).

A store whose parent was removed recently still continues the chain: a removed block's chain position
is kept in a small FIFO (`GHOSTS` per source). vLLM (and the simulator) do name removed parents: a
request holds its own copy of a block whose cached twin (same hash) was evicted, and later stores the
blocks after it (its generated tokens) with that hash as parent; the engine's own
lookups reach them again once the parent is cached again. An engine hash always stands for the same
tokens, so the kept position stays right until the source is cleared. A store whose parent is
unknown (removed long ago, or stored before we subscribed and never replayed) cannot be keyed and is
skipped (`orphans`). Request keys are reference counted per (key, tier) so two engine
blocks that map to the same key (duplicate stores, engine-only extra keys) keep it until both go. A
block stored again while held (vLLM >= 0.33 re-reports reused blocks) adds no reference, but its keys
go out again unchanged: stores order the in-memory index's LRU and refresh the shared index's expiry.

Offload tiers (CPU, storage) count announcements instead: vLLM's offloading connector with
`self_describing_kv_events` publishes each chunk of several GPU blocks with its per-block hashes, and
chunks of a prefix that diverges inside a chunk name the shared blocks once each; an evicted chunk's
removal names them too. So a block leaves such a tier at its last announcement's removal (`_copies`;
not persisted: a copy restored from Redis drops a shared block at the first). These stores carry no
extra keys (no cache_salt), so a block whose hash is known, held or recently removed, keeps its keys.
Without that option the connector names a chunk by its last block only (placeholders, no tokens):
with chunks of f > 1 GPU blocks, only every f-th block is marked as offloaded.

Hybrid models (HMA): every KV-cache group caches a request's blocks under the same engine hash. Only
full-attention groups hold a prefix; stores of other kinds (sliding window, mamba, ...) are skipped,
and so are removals from those groups (`BlockRemoved` names the group, not its kind: the group's kind
is learned from its stores), or a sliding window moving on would remove the prefix the full-attention
group still holds. A store whose token count is not blocks × block_size, or of a LoRA adapter whose
name is not sent (vLLM before `lora_name`), cannot be keyed (`unkeyable`).

Bound: at most `max_blocks` engine blocks per source (default = the index `size`); beyond that the
oldest are forgotten (and their keys removed), so a lost `BlockRemoved` cannot leak forever.
"""

from __future__ import annotations

import itertools
import struct
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from llmepp.kvevents.keys import root_key, tokens_to_bytes, xxh64
from llmepp.kvevents.tiers import TierTable
from llmepp.kvevents.wire import BlockRemoved, BlockStored, normalize_hash

# Removed engine blocks whose chain position is kept per source (~160 bytes each, PRECISE.md).
GHOSTS = 1024
# Cache kinds whose blocks hold a full prefix; sliding-window / chunked-local / mamba groups do not.
PREFIX_KINDS = frozenset({"full_attention", "mla_attention", "full", "mla"})
# Groups of other kinds remembered per source (vLLM has a handful of KV-cache groups).
MAX_GROUPS = 64


class EngineBlock:
    __slots__ = ("keys", "last_key", "pending", "tiers")

    def __init__(self, tiers: int, keys: tuple[int, ...], last_key: int, pending: bytes) -> None:
        self.tiers = tiers
        self.keys = keys
        self.last_key = last_key
        self.pending = pending


@dataclass(slots=True)
class Delta:
    """Index changes for one pod, in order: `masks[i]` is the new tier mask of `keys[i]` (0 = gone)."""

    keys: list[int] = field(default_factory=list)
    masks: list[int] = field(default_factory=list)
    # Set by a clear: the pod held nothing at position `clear_at` of the lists. The entries before it
    # include a removal of every key the pod held, so applying all entries in order is exact (and
    # records the pod as each key's last holder); a store that can drop a pod in O(1) (redis_index.py
    # bumps a generation) does that as well, so nothing stale outlives a removal it missed.
    clear_at: int = -1
    # Engine blocks created or changed / forgotten (a persistent store saves the chains with them).
    engine_set: list[int] = field(default_factory=list)
    engine_del: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.keys)


@dataclass(slots=True)
class ChainStats:
    orphans: int = 0  # stores whose parent block is unknown
    unknown_removals: int = 0  # removals of blocks never seen stored
    unknown_medium: int = 0  # events for a tier no config names
    skipped_kind: int = 0  # events for non-prefix cache groups (sliding window, ...)
    unkeyable: int = 0  # stores whose tokens cannot be attributed to their blocks, adapters without a name


class SourceChains:
    def __init__(
        self, block_tokens: int, seed: int, tiers: TierTable, max_blocks: int, stats: ChainStats | None = None
    ) -> None:
        self.step = block_tokens * 4
        self.seed = seed
        self.tiers = tiers
        self.max_blocks = max_blocks
        self.engine: dict[int, EngineBlock] = {}
        # Request key → tier mask this pod holds it in; extra references beyond the first per tier.
        self.kmask: dict[int, int] = {}
        self._extra: dict[tuple[int, int], int] = {}
        self._roots: dict[tuple[str, str], int] = {}
        # The tier whose re-stores are refreshes (GPU: one block per hash); (hash, other tier) → stores
        # beyond the first not yet removed.
        self._primary = tiers.bit(None)
        self._copies: dict[tuple[int, int], int] = {}
        # Removed engine hash → (last_key, pending, keys), oldest first.
        self._ghosts: OrderedDict[int, tuple[int, bytes, tuple[int, ...]]] = OrderedDict()
        # group_idx of KV-cache groups whose stores name a non-prefix kind: their removals are skipped.
        self._other_groups: set[int] = set()
        # Shareable: a producer keeps one running total over every source it ever had (Prometheus counters
        # must not drop when a pod leaves).
        self.stats = stats if stats is not None else ChainStats()

    def __len__(self) -> int:
        return len(self.engine)

    # -- events --------------------------------------------------------------------------------
    def stored(self, ev: BlockStored, model: str, delta: Delta) -> int:
        """Apply one BlockStored; returns the number of engine blocks it named."""
        n = len(ev.block_hashes)
        if ev.kv_cache_spec_kind is not None and ev.kv_cache_spec_kind not in PREFIX_KINDS:
            self.stats.skipped_kind += 1
            if ev.group_idx is not None and len(self._other_groups) < MAX_GROUPS:
                self._other_groups.add(ev.group_idx)
            return n
        if ev.kv_cache_spec_kind is not None and ev.group_idx is not None:
            self._other_groups.discard(ev.group_idx)  # a prefix group after all (a restarted engine)
        if not ev.token_ids and n:
            # Location-only: vLLM's offloading connector reports a chunk copied to CPU (or storage) as
            # BlockStored without tokens or parent (block_size its own, or 0). The blocks it names now
            # also live on that tier (llm-d: handleDeviceTierUpdate); it says nothing about tokens.
            tbit = self.tiers.bit(ev.medium)
            if not tbit:
                self.stats.unknown_medium += 1
            else:
                self._relocated(ev.block_hashes, tbit, delta)
            return n
        if (ev.block_size and len(ev.token_ids) != n * ev.block_size) or (ev.lora_id is not None and not ev.lora_name):
            self.stats.unkeyable += 1
            return n
        tbit = self.tiers.bit(ev.medium)
        if not tbit:
            self.stats.unknown_medium += 1
            return n
        engine = self.engine
        if ev.parent_block_hash is None:
            key = self._root(ev.lora_name or model, _cache_salt(ev))
            pending = b""
        else:
            ph = normalize_hash(ev.parent_block_hash)
            parent = engine.get(ph)
            if parent is not None:
                key, pending = parent.last_key, parent.pending
            else:
                ghost = self._ghosts.get(ph)
                if ghost is None:
                    self.stats.orphans += 1
                    return n
                key, pending = ghost[0], ghost[1]
        tokens = tokens_to_bytes(ev.token_ids)
        span = (ev.block_size or (len(ev.token_ids) // n if n else 0)) * 4
        step = self.step
        kmask = self.kmask
        out_keys, out_masks = delta.keys, delta.masks
        engine_set = delta.engine_set
        last = n - 1
        for j, raw in enumerate(ev.block_hashes):
            h = normalize_hash(raw)
            known = engine.get(h)
            if known is None and (ghost := self._ghosts.pop(h, None)) is not None:
                known = EngineBlock(0, ghost[2], ghost[0], ghost[1])  # removed recently: same tokens, same keys
            if known is not None:
                # Re-stored (vLLM >= 0.33 reports reused blocks) or stored on another tier.
                self._held_on(h, known, tbit, delta)
                key, pending = known.last_key, known.pending
                continue
            chunk = tokens[j * span : (j + 1) * span if j < last else len(tokens)]
            if pending:
                chunk = pending + chunk
            full = len(chunk) - len(chunk) % step
            if full == step and len(chunk) == step:
                # The common case: engine block == our block.
                key = xxh64(chunk, key)
                keys: tuple[int, ...] = (key,)
                pending = b""
            else:
                ks = []
                for off in range(0, full, step):
                    key = xxh64(chunk[off : off + step], key)
                    ks.append(key)
                keys = tuple(ks)
                pending = chunk[full:]
            engine[h] = EngineBlock(tbit, keys, key, pending)
            engine_set.append(h)
            for k in keys:
                m = kmask.get(k, 0)
                if m & tbit:
                    ek = (k, tbit)
                    self._extra[ek] = self._extra.get(ek, 0) + 1
                else:
                    kmask[k] = m | tbit
                    out_keys.append(k)
                    out_masks.append(m | tbit)
        if len(engine) > self.max_blocks:
            self._shed(delta)
        return n

    def removed(self, ev: BlockRemoved, delta: Delta) -> int:
        if ev.group_idx is not None and ev.group_idx in self._other_groups:
            self.stats.skipped_kind += 1
            return len(ev.block_hashes)
        tbit = self.tiers.bit(ev.medium)
        if not tbit:
            self.stats.unknown_medium += 1
            return len(ev.block_hashes)
        engine = self.engine
        for raw in ev.block_hashes:
            h = normalize_hash(raw)
            block = engine.get(h)
            if block is None or not block.tiers & tbit:
                self.stats.unknown_removals += 1
                continue
            if self._copies and self._dropped_copy(h, tbit):
                continue
            block.tiers &= ~tbit
            if block.tiers:
                delta.engine_set.append(h)
            else:
                del engine[h]
                delta.engine_del.append(h)
                ghosts = self._ghosts
                ghosts[h] = (block.last_key, block.pending, block.keys)
                ghosts.move_to_end(h)  # removed again: now the most recent removal
                if len(ghosts) > GHOSTS:
                    delta.engine_del.append(ghosts.popitem(last=False)[0])
            for k in block.keys:
                self._decref(k, tbit, delta.keys, delta.masks)
        return len(ev.block_hashes)

    def _relocated(self, hashes: list[int | bytes], tbit: int, delta: Delta) -> None:
        """Engine blocks now (also) held on tier `tbit`, named without tokens. A block removed from its
        other tiers in the meantime (the GPU evicts a block and its copy to CPU completes in one engine
        step) comes back from its kept position; one never keyed cannot be, and is skipped."""
        engine = self.engine
        for raw in hashes:
            h = normalize_hash(raw)
            block = engine.get(h)
            if block is None:
                ghost = self._ghosts.pop(h, None)
                if ghost is None:
                    self.stats.unkeyable += 1
                    continue
                block = EngineBlock(0, ghost[2], ghost[0], ghost[1])  # no tier yet: _held_on records it
            self._held_on(h, block, tbit, delta)
        if len(engine) > self.max_blocks:
            self._shed(delta)

    def _held_on(self, h: int, block: EngineBlock, tbit: int, delta: Delta) -> None:
        """Engine block `h` stored (again) on tier `tbit`. A new tier adds a reference to its keys; a tier it
        has already stores its keys again as they are (no new reference), so the index's LRU order and the
        shared index's expiry follow use, not first store. It becomes the most recently stored: the bound
        sheds from the front (dict order), so a reused prefix must not stay "oldest" while the engine uses it."""
        if block.tiers & tbit:
            if tbit != self._primary:
                hk = (h, tbit)
                self._copies[hk] = self._copies.get(hk, 0) + 1
            kmask = self.kmask
            for k in block.keys:
                m = kmask.get(k, 0)
                if m:
                    delta.keys.append(k)
                    delta.masks.append(m)
        else:
            block.tiers |= tbit
            delta.engine_set.append(h)
            for k in block.keys:
                self._incref(k, tbit, delta.keys, delta.masks)
        engine = self.engine
        engine.pop(h, None)
        engine[h] = block

    def clear(self, delta: Delta) -> None:
        """AllBlocksCleared or a publisher restart: the pod holds nothing any more."""
        keys = list(self.kmask)
        delta.keys.extend(keys)
        delta.masks.extend([0] * len(keys))
        delta.clear_at = len(delta.keys)
        delta.engine_set.clear()
        delta.engine_del.clear()
        self.engine.clear()
        self.kmask.clear()
        self._extra.clear()
        self._copies.clear()
        self._ghosts.clear()  # a restarted engine may hash differently

    # -- persistence (redis_index.py keeps a copy so a restarted EPP resumes the chains) ------------
    def saved(self, h: int) -> EngineBlock | None:
        """What a copy of the chains keeps for engine hash `h`: its block, a removed block's kept position
        (tiers 0: later stores may still name it as their parent), or None (forget it)."""
        block = self.engine.get(h)
        if block is not None:
            return block
        ghost = self._ghosts.get(h)
        return None if ghost is None else EngineBlock(0, ghost[2], ghost[0], ghost[1])

    def removed_kept(self) -> list[int]:
        """The removed blocks whose positions are kept (oldest first)."""
        return list(self._ghosts)

    def other_groups(self) -> list[int]:
        """The KV-cache groups learned to be of a non-prefix kind (a copy of the chains keeps them: their
        removals name only the group, and must still be skipped after a restore)."""
        return sorted(self._other_groups)

    def restore(self, blocks: dict[int, EngineBlock], other_groups: Iterable[int] = ()) -> None:
        """Rebuild from saved blocks (`saved`: their keys and tiers give every reference; tiers 0 are removed
        blocks' kept positions) and the saved non-prefix groups (`other_groups`)."""
        for g in other_groups:
            if len(self._other_groups) < MAX_GROUPS:
                self._other_groups.add(g)
        self.engine = {h: b for h, b in blocks.items() if b.tiers}
        self._ghosts = OrderedDict((h, (b.last_key, b.pending, b.keys)) for h, b in blocks.items() if not b.tiers)
        self.kmask.clear()
        self._extra.clear()
        self._copies.clear()
        scratch_keys: list[int] = []
        scratch_masks: list[int] = []
        for block in self.engine.values():
            tiers = block.tiers
            while tiers:
                tbit = tiers & -tiers
                tiers ^= tbit
                for k in block.keys:
                    self._incref(k, tbit, scratch_keys, scratch_masks)

    # -- internals -------------------------------------------------------------------------------
    def _root(self, model: str, salt: str) -> int:
        rk = (model, salt)
        root = self._roots.get(rk)
        if root is None:
            if len(self._roots) > 1024:
                self._roots.clear()
            root = self._roots[rk] = root_key(model, salt, self.seed)
        return root

    def _dropped_copy(self, h: int, tbit: int) -> bool:
        """One of several announcements of `h` on `tbit` removed: the tier still holds it."""
        hk = (h, tbit)
        c = self._copies.get(hk)
        if not c:
            return False
        if c == 1:
            del self._copies[hk]
        else:
            self._copies[hk] = c - 1
        return True

    def _incref(self, k: int, tbit: int, out_keys: list[int], out_masks: list[int]) -> None:
        m = self.kmask.get(k, 0)
        if m & tbit:
            ek = (k, tbit)
            self._extra[ek] = self._extra.get(ek, 0) + 1
            return
        self.kmask[k] = m | tbit
        out_keys.append(k)
        out_masks.append(m | tbit)

    def _decref(self, k: int, tbit: int, out_keys: list[int], out_masks: list[int]) -> None:
        extra = self._extra
        if extra:
            ek = (k, tbit)
            c = extra.get(ek)
            if c:
                if c == 1:
                    del extra[ek]
                else:
                    extra[ek] = c - 1
                return
        m = self.kmask.get(k, 0)
        if not m & tbit:
            return
        m &= ~tbit
        if m:
            self.kmask[k] = m
        else:
            del self.kmask[k]
        out_keys.append(k)
        out_masks.append(m)

    def _shed(self, delta: Delta) -> None:
        """Over the bound: forget the least recently stored engine blocks (dict order; a re-stored block
        moves to the end) down to 90% of it, so the cost is amortised over many stores."""
        engine = self.engine
        drop = list(itertools.islice(engine, len(engine) - self.max_blocks * 9 // 10))
        for h in drop:
            block = engine.pop(h)
            delta.engine_del.append(h)
            tiers = block.tiers
            while tiers:
                tbit = tiers & -tiers
                tiers ^= tbit
                if self._copies:
                    self._copies.pop((h, tbit), None)
                for k in block.keys:
                    self._decref(k, tbit, delta.keys, delta.masks)


def _cache_salt(ev: BlockStored) -> str:
    """vLLM puts a request's cache_salt in the first block's extra keys, after the LoRA name and the
    identifiers (plain strings too) of the multimodal items overlapping the block: the last plain string
    there that is neither the LoRA name nor an item that continues into the next block (an image's
    placeholders span many blocks; the salt is on block 0 only) is the salt."""
    extra: Any = ev.extra_keys
    if not extra or not isinstance(extra, list):
        return ""
    first = extra[0]
    if not isinstance(first, list | tuple):
        return ""
    second = extra[1] if len(extra) > 1 and isinstance(extra[1], list | tuple) else ()
    salt = ""
    for item in first:
        if isinstance(item, str) and item != ev.lora_name and item not in second:
            salt = item
    return salt


_BLOCK_HEAD = struct.Struct("<BQH")


def pack_block(block: EngineBlock) -> bytes:
    """An engine block as bytes (tiers, chain key, its request keys, pending tokens)."""
    n = len(block.keys)
    return _BLOCK_HEAD.pack(block.tiers, block.last_key, n) + struct.pack(f"<{n}Q", *block.keys) + block.pending


def unpack_block(data: bytes) -> EngineBlock:
    tiers, last_key, n = _BLOCK_HEAD.unpack_from(data)
    start = _BLOCK_HEAD.size
    keys = struct.unpack_from(f"<{n}Q", data, start)
    return EngineBlock(tiers, tuple(keys), last_key, bytes(data[start + 8 * n :]))
