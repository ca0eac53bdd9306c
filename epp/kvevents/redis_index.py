"""The precise prefix index in Redis, shared by EPP replicas and surviving EPP restarts.

Selected by `indexerConfig.kvBlockIndexConfig.redisConfig.address` (llm-d's name), e.g.
``redis://127.0.0.1:6379``.

Layout (prefix `keyPrefix`, default ``epp:kv:``, which the producer follows with
``<blockSizeTokens>.<seed>.<tiers>:`` so that differently keyed configurations never share a stream
position or chain state; one Redis, not Redis Cluster — the scripts touch keys they compute):

    b:<key>      HASH  pod → gen·256 + tier mask      one per request key (keys.py), hex
                       "s|"pod → expiry (ms, Redis clock)   speculative entries
                       "l|" → pod                    the pod whose event last removed the key
    gen          HASH  pod → generation               bumped when a pod's cache is cleared
    src:<pod>    HASH  seq, lts, ts, og                last batch applied from the pod's publisher: its
                                                       number and timestamp, and the newest timestamp;
                                                       the non-prefix KV-cache groups (chain.py)
    eng:<pod>    HASH  engine hash → packed chain state (chain.EngineBlock), to resume after a restart; also
                       the kept positions of the last removed blocks (tiers 0; vLLM names them as parents)

Writes. Every replica subscribes to every pod (as with the in-memory index) and sends each decoded
batch to one Lua script, guarded by the source position: a batch is applied only if its sequence
number is past `src:<pod>`'s, so each batch lands exactly once, in stream order, whichever replica
delivers it first. Timestamps do not order batches (a publisher clock stepping back changes nothing);
they only tell, for a number not past ours, a late copy (not newer than any applied: refused) from a
restarted publisher (newer data under an older number). A restart is also taken from a subscriber
that found the publisher's batch under our last number to be another one (subscriber.py) and says
which batch it saw replaced: if `src:<pod>` still holds exactly that (seq, lts), whatever the clocks
say. A restart bumps the pod's generation (O(1): stale entries stop counting and are overwritten or
expire with `ttl`). `AllBlocksCleared` does the same, and its removals are applied as well, so the
pod becomes the last holder of each key it held (as in the in-memory index). So does the first batch of
a source Redis holds no position for: a new pod at an address an earlier one used must not inherit what
that one left in keys other pods keep alive. A failed write raises,
so the pool restarts the subscriber, which resumes from `src:<pod>` and replays what Redis is missing
(first checking that the publisher still has the batch `src:<pod>` ends with). A write that finds no
position where this replica wrote or resumed one (Redis restarted empty, or the pod was silent past
`ttl`) sends the replica's whole state of the pod instead (its chains hold it), so an empty Redis is
refilled by the next batch of each pod without a replay.

Reads. A lookup is one script call: it walks the prompt's keys from block 0 inside Redis and returns
per candidate pod the consecutive match and its tier-weighted sum. The keys travel as one string
(sliced only as far as the walk goes), and each block reads just the fields of the candidates still
matching (HMGET), so a cold prompt costs one read and a long match one small read per block
(100k tokens, full match: ~17 ms, benchmarks/PRECISE.md). It runs on the request path with
a deadline (`lookupTimeout`, default 50 ms); a slow or unreachable Redis means "no prefix data"
for that request, never a stalled request.

Consistency and staleness. Redis holds the batches applied so far by any replica: it lags a pod's
real cache by the event flush interval (vLLM / the simulator: a few ms) plus one script call.
Speculative entries written by one replica's routing decision are visible to every replica at once
(that is what makes two replicas send a burst of one prompt to one pod). A replica that restarts
finds the index, the chain state and the stream position in Redis and continues from there (with a
replay socket it fetches the batches published while it was down; without one, batches no replica
received are lost, as with a single EPP). A replica that misses batches another replica applied (its SUB
socket joined late, its queue overflowed) and cannot replay them takes the pod's chains and position from
Redis (`catch_up`, waiting up to CATCH_UP_WAIT for the batch just before the one in hand): each replica
computes a batch's changes from the state Redis holds, so whichever copy lands first is a right one (unless
the replica applying the batch before it is slower than that wait).
Entries of a pod removed from the pool are never candidates;
they expire with `ttl`, except its fields in keys other pods keep storing (a shared system prompt's),
which stay until those keys go: one field per departed pod per such key, of a generation no later pod
at that address counts. Its `src:` and `eng:` keys expire with `ttl` (refreshed by every batch applied:
a pod silent for longer is read again from the start of its publisher's buffer, as if new); `gen` (a
field per pod address ever seen) goes when no pod has written for `ttl`.
`ttl` (default 1h, refreshed by every store) bounds garbage; a prefix
the engine keeps longer than `ttl` without re-reporting it (vLLM < 0.33 does not re-report reused
blocks) drops out of the shared index early.
"""

from __future__ import annotations

import asyncio
import logging
import math
import struct
import urllib.parse
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions as redis_errors

from llmepp.framework.plugin import ConfigError
from llmepp.kvevents.chain import Delta, EngineBlock, SourceChains, pack_block, unpack_block
from llmepp.kvevents.subscriber import ResumePoint
from llmepp.kvevents.tiers import TierTable

log = logging.getLogger(__name__)

# How long a replica that missed batches waits for another replica to apply the one before the batch in hand.
CATCH_UP_WAIT = 0.2
# The start-up check's wait for a PING answer.
CHECK_TIMEOUT = 3.0
# RedisStore's write deadline (a stall shorter than this is waited out; resume waits 4x as long), and the
# client's per-command read timeout, above the longest deadline (lookups and speculation keep their own).
WRITE_TIMEOUT = 5.0
STORE_READ_TIMEOUT = WRITE_TIMEOUT * 4 + 1.0

_APPLY = """
local ts = tonumber(ARGV[2]); local seq = tonumber(ARGV[3])
local cur = redis.call('HMGET', KEYS[1], 'ts', 'seq', 'lts')
local cts = tonumber(cur[1]); local cseq = tonumber(cur[2])
local clear = ARGV[6] == '1'
local high = ARGV[2]
if not cseq then
  -- Redis holds no position for the pod. If this replica wrote or resumed one, Redis lost it (restarted
  -- empty, or the pod was silent past `ttl`): the caller sends its whole state instead of this batch.
  if tonumber(ARGV[9]) >= 0 then return -1 end
  -- A source new to Redis: whatever an earlier pod at this address left (in keys others keep alive)
  -- must not count for it.
  clear = true
else
  local replaced = ARGV[7] ~= '' and tonumber(ARGV[7]) == cseq and ARGV[8] == (cur[3] or cur[1])
  if replaced or (seq <= cseq and ts > cts) then
    clear = true  -- a restarted publisher: its own clock from here on
    -- which stream it replaced: a replica seeing the same restart later continues from here (catch_up)
    if ARGV[7] ~= '' then redis.call('HSET', KEYS[1], 'rf', ARGV[10])
    else redis.call('HDEL', KEYS[1], 'rf') end
  elseif seq <= cseq then
    return 0  -- applied already (another replica delivered it first)
  elseif ts < cts then
    high = cur[1]  -- the publisher's clock stepped back: numbers order batches, the newest time stays
  end
end
local pod = ARGV[1]
local gen
if clear then
  gen = redis.call('HINCRBY', KEYS[2], pod, 1)
  redis.call('UNLINK', KEYS[3])
else
  gen = tonumber(redis.call('HGET', KEYS[2], pod) or '0')
end
local ttl = tonumber(ARGV[4]); local bp = ARGV[5]
local i = 12
for _ = 1, tonumber(ARGV[11]) do
  local k = bp .. ARGV[i]; local m = tonumber(ARGV[i + 1]); i = i + 2
  if m > 0 then
    redis.call('HSET', k, pod, gen * 256 + m)
    -- ttl 0 (no expiry): a key a speculative entry created carries that entry's short expiry; drop it
    if ttl > 0 then redis.call('PEXPIRE', k, ttl) else redis.call('PERSIST', k) end
  elseif redis.call('HDEL', k, pod) == 1 then
    redis.call('HSET', k, 'l|', pod)
    -- HDEL of the last holder deleted the hash: the mark recreated it, without an expiry
    if ttl > 0 and redis.call('PTTL', k) < 0 then redis.call('PEXPIRE', k, ttl) end
  end
end
local ns = tonumber(ARGV[i]); i = i + 1
for _ = 1, ns do redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1]); i = i + 2 end
local nd = tonumber(ARGV[i]); i = i + 1
for _ = 1, nd do redis.call('HDEL', KEYS[3], ARGV[i]); i = i + 1 end
-- the non-prefix KV-cache groups (chain.py skips their removals; a resumed copy must too)
redis.call('HSET', KEYS[1], 'ts', high, 'seq', ARGV[3], 'lts', ARGV[2], 'og', ARGV[i])
if ttl > 0 then  -- a pod gone for good leaves its position and chain state for `ttl`, like its entries
  redis.call('PEXPIRE', KEYS[1], ttl); redis.call('PEXPIRE', KEYS[3], ttl)
  -- the generations go only when no pod has written for `ttl`: every entry they qualify is gone by then
  redis.call('PEXPIRE', KEYS[2], ttl)
end
return 1
"""

_LOOKUP = """
local bp = ARGV[1]; local nc = tonumber(ARGV[2])
local cand = {}; local alive = {}
for j = 1, nc do local p = ARGV[2 + j]; cand[p] = true; alive[j] = p end
local i = 3 + nc
local nw = tonumber(ARGV[i]); local w = {}
for j = 1, nw do w[j] = tonumber(ARGV[i + j]) end
i = i + nw + 1
local top = tonumber(ARGV[i]); local keys = ARGV[i + 1]
local t = redis.call('TIME'); local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local gens = {}  -- the candidates' only: the hash keeps a field for every pod that ever cleared
local g = redis.call('HMGET', KEYS[1], unpack(alive))
for j, p in ipairs(alive) do gens[p] = tonumber(g[j]) end
local function fields_of(pods)
  local f = {}
  for j, p in ipairs(pods) do f[2 * j - 1] = p; f[2 * j] = 's|' .. p end
  return f
end
local fields = fields_of(alive)
fields[#fields + 1] = 'l|'
local len = {}; local score = {}; local last = nil
local n = 0; local nblocks = #keys / 16
while n < nblocks and #alive > 0 do
  local v = redis.call('HMGET', bp .. string.sub(keys, n * 16 + 1, n * 16 + 16), unpack(fields))
  if n == 0 and v[#fields] and cand[v[#fields]] then last = v[#fields] end
  local still = nil  -- built only when a candidate drops out
  for j, p in ipairs(alive) do
    local wt = nil
    local spec = v[2 * j]
    if spec and tonumber(spec) > now then
      wt = top
    elseif v[2 * j - 1] then
      local m = tonumber(v[2 * j - 1]); local tm = m % 256
      if tm > 0 and (m - tm) / 256 == (gens[p] or 0) then wt = w[tm] or 0 end
    end
    if wt then
      score[p] = (score[p] or 0) + wt
      if still then still[#still + 1] = p end
    else
      len[p] = n
      if not still then still = {}; for q = 1, j - 1 do still[q] = alive[q] end end
    end
  end
  if still then alive = still end
  if still or n == 0 then fields = fields_of(alive) end
  n = n + 1
end
for _, p in ipairs(alive) do len[p] = n end
local out = {}
for p, l in pairs(len) do
  if l > 0 then out[#out + 1] = p; out[#out + 1] = l; out[#out + 1] = tostring(score[p]) end
end
if #out == 0 and last then out = {last, 0, '0'} end
return out
"""

_SPECULATE = """
local t = redis.call('TIME'); local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3]); local until_ms = now + ttl
local keys = ARGV[4]
for n = 0, #keys / 16 - 1 do
  local k = ARGV[1] .. string.sub(keys, n * 16 + 1, n * 16 + 16)
  local fresh = redis.call('EXISTS', k) == 0
  redis.call('HSET', k, ARGV[2], until_ms)
  if fresh then redis.call('PEXPIRE', k, ttl + 1000) end
end
return #keys / 16
"""


# Candidates per lookup script call (Redis's Lua unpacks at most ~8,000 values; two fields each).
LOOKUP_CHUNK = 2048


def redis_url(address: str) -> str:
    """llm-d accepts `redis://`, `valkey://` and bare `host:port`; redis-py wants a redis URL. A socket
    path (`/run/redis.sock`) becomes `unix://`. ValueError for what redis-py would read as something else
    (it drops a db that is not a number and connects to localhost:6379 when no host is given)."""
    address = address.strip()
    if not address:
        raise ValueError("empty; expected redis://<host>:<port>[/<db>], rediss://... or unix://<path>")
    if address.startswith("/"):
        address = "unix://" + address
    if address.startswith(("valkey://", "valkeys://")):
        address = "redis" + address[len("valkey") :]
    if "://" not in address:
        address = "redis://" + address
    url = urllib.parse.urlsplit(address)
    if url.scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"scheme {url.scheme!r}: expected redis://, rediss://, valkey://, valkeys:// or unix://")
    if url.scheme == "unix":
        if not url.path:
            raise ValueError(f"{address!r} names no socket path")
        return address
    try:
        url.port  # noqa: B018 - parsing it raises ValueError for a bad port
    except ValueError:
        raise ValueError(f"{address!r}: the port must be a number 0-65535") from None
    if not url.hostname:
        raise ValueError(f"{address!r} names no host")
    db = url.path.lstrip("/")
    if db and not (db.isascii() and db.isdigit()):
        raise ValueError(f"{address!r}: the database after the host must be a number, got {db!r}")
    return address


def connect(
    address: str, timeout: float = 2.0, *, field: str = "redisConfig.address", read_timeout: float | None = None
) -> aioredis.Redis:
    """A client for `address` (no connection yet); ConfigError naming `field` for an unusable address.
    `read_timeout` (default `timeout`): how long one command may wait for its answer; callers with their own
    deadlines (RedisStore) set it above the longest of them, or redis-py cuts those short."""
    try:
        url = redis_url(address)
    except ValueError as e:
        raise ConfigError(f"{field}: {e}") from None
    return aioredis.Redis.from_url(
        url, socket_timeout=timeout if read_timeout is None else read_timeout, socket_connect_timeout=timeout
    )


async def check_reachable(client: aioredis.Redis, field: str, owner: str) -> None:
    """Start-up check of a configured Redis: refused credentials or database (they never come right) are a
    ConfigError naming `field`; unreachable is only logged (it may be starting: each use retries)."""
    try:
        async with asyncio.timeout(CHECK_TIMEOUT):
            await client.ping()
    except (redis_errors.AuthenticationError, redis_errors.AuthenticationWrongNumberOfArgsError,
            redis_errors.NoPermissionError) as e:  # fmt: skip
        raise ConfigError(f"{field}: Redis refused the credentials: {e}") from None
    except redis_errors.ResponseError as e:  # e.g. "DB index is out of range"
        raise ConfigError(f"{field}: Redis refused the connection: {e}") from None
    except (redis_errors.ConnectionError, redis_errors.TimeoutError, TimeoutError, OSError) as e:
        log.warning("%s: Redis not reachable at start-up (%r); working without it until it answers", owner, e)


@dataclass(slots=True)
class RedisMatch:
    lengths: dict[str, int]
    weighted: dict[str, float]
    last: str | None = None  # no candidate holds block 0: the candidate that last held it

    def add(self, other: RedisMatch) -> None:
        """Another prompt of the same batch: as index.Match.add."""
        for pod, n in other.lengths.items():
            self.lengths[pod] = self.lengths.get(pod, 0) + n
        for pod, w in other.weighted.items():
            self.weighted[pod] = self.weighted.get(pod, 0.0) + w
        self.last = None if self.lengths else self.last or other.last


def _stream_id(position: tuple[int, float]) -> str:
    """A publisher's stream, named by its last batch (sequence, timestamp): what a restart replaced (`rf`)."""
    return f"{position[0]}|{position[1]!r}"


def _hex(k: int) -> str:
    return f"{k:016x}"


def _hex_run(keys: list[int]) -> str:
    """`_hex` of every key, concatenated (C-speed: pack big-endian, then bytes.hex)."""
    return struct.pack(f">{len(keys)}Q", *keys).hex()


class RedisStore:
    """Ingestion target (ingest.IndexStore) and lookup for the shared index."""

    def __init__(
        self,
        client: aioredis.Redis,
        tiers: TierTable,
        *,
        prefix: str = "epp:kv:",
        ttl: float = 3600.0,
        write_timeout: float = WRITE_TIMEOUT,
    ) -> None:
        self.client = client
        self.tiers = tiers
        self.prefix = prefix
        self.block_prefix = prefix + "b:"
        self.gen_key = prefix + "gen"
        self.ttl_ms = int(ttl * 1000)
        self.write_timeout = write_timeout
        self._apply = client.register_script(_APPLY)
        self._lookup = client.register_script(_LOOKUP)
        self._speculate = client.register_script(_SPECULATE)
        # Per pod, the last sequence number this replica saw Redis hold (written or resumed): Redis losing
        # it shows up at the next write.
        self._positions: dict[str, int] = {}
        # weight_of[mask] for masks 1..255 (Lua tables are 1-based: w[mask]).
        weights = tiers.weight_of[1:]
        self._weight_args: list[Any] = [len(weights), *(repr(w) for w in weights), repr(tiers.top)]

    # -- ingest.IndexStore -----------------------------------------------------------------------
    async def write(
        self,
        pod: str,
        chains: SourceChains,
        ts: float,
        seq: int,
        delta: Delta,
        replaces: tuple[int, float] | None = None,
    ) -> None:
        # Also called for batches without changes: the source position must advance for the
        # exactly-once guard and for resuming.
        # A clear bumps the pod's generation (its old entries stop counting at once), and its
        # removals still go through, so each key records the pod as its last holder, as the
        # in-memory index does.
        # Engine blocks (and removed blocks' kept positions) in their final state after this batch (the chains
        # object is already past it): saved, or deleted.
        sets: list[tuple[int, bytes]] = []
        dels: list[int] = []
        for h in dict.fromkeys(delta.engine_set + delta.engine_del):
            block = chains.saved(h)
            if block is None:
                dels.append(h)
            else:
                sets.append((h, pack_block(block)))
        expected = self._positions.get(pod, -1)
        groups = ",".join(map(str, chains.other_groups()))
        async with asyncio.timeout(self.write_timeout):
            applied = await self._write(pod, ts, seq, delta.clear_at >= 0, replaces, expected,
                                        delta.keys, delta.masks, sets, dels, groups)  # fmt: skip
            if applied == -1:
                # Redis lost the pod's position (restarted empty, or the pod was silent past `ttl`), and
                # with it what this replica wrote: the chains hold the pod's whole state, so send that.
                engine = chains.engine
                log.warning("Redis lost the KV state of %s; writing this replica's (%d blocks)", pod, len(engine))
                keys = list(chains.kmask)
                every = [(h, pack_block(b)) for h in [*engine, *chains.removed_kept()] if (b := chains.saved(h))]
                await self._write(pod, ts, seq, True, None, -1, keys, [chains.kmask[k] for k in keys],
                                  every, [], groups)  # fmt: skip
        self._positions[pod] = seq

    async def _write(
        self,
        pod: str,
        ts: float,
        seq: int,
        clear: bool,
        replaces: tuple[int, float] | None,
        expected: int,
        keys: list[int],
        masks: list[int],
        sets: list[tuple[int, bytes]],
        dels: list[int],
        groups: str,
    ) -> int:
        """One _APPLY call: 1 applied, 0 applied already (by another replica), -1 position lost."""
        args: list[Any] = [pod, repr(ts), seq, self.ttl_ms, self.block_prefix, "1" if clear else "0"]
        args += ["", ""] if replaces is None else [replaces[0], repr(replaces[1])]
        args.append(expected)
        args.append("" if replaces is None else _stream_id(replaces))
        args.append(len(keys))
        for i in range(len(keys)):
            args.append(_hex(keys[i]))
            args.append(masks[i])
        args.append(len(sets))
        for h, packed in sets:
            args.append(_hex(h))
            args.append(packed)
        args.append(len(dels))
        args.extend(_hex(h) for h in dels)
        args.append(groups)
        keys_ = [self.prefix + "src:" + pod, self.gen_key, self.prefix + "eng:" + pod]
        return int(await self._apply(keys=keys_, args=args))

    async def resume(self, pod: str, chains: SourceChains) -> ResumePoint | None:
        pipe = self.client.pipeline(transaction=True)
        pipe.hgetall(self.prefix + "src:" + pod)
        pipe.hgetall(self.prefix + "eng:" + pod)
        # One transaction: the position and the chain state it belongs to.
        async with asyncio.timeout(self.write_timeout * 4):
            replies: list[Any] = await pipe.execute()
        src: dict[bytes, bytes] = replies[0]
        eng: dict[bytes, bytes] = replies[1]
        if not src:
            self._positions.pop(pod, None)
            return None
        self._positions[pod] = int(src[b"seq"])
        blocks: dict[int, EngineBlock] = {int(h, 16): unpack_block(bytes(v)) for h, v in eng.items()}
        groups = [int(g) for g in src.get(b"og", b"").split(b",") if g]  # written by _APPLY: "", "1" or "1,3"
        chains.restore(blocks, groups)
        log.info("resumed KV state from Redis", extra={"pod": pod, "seq": int(src[b"seq"]), "blocks": len(blocks)})
        # `lts` is missing in positions written before it existed, when `ts` was always the last batch's.
        last = float(src[b"ts"])
        return ResumePoint(next_seq=int(src[b"seq"]) + 1, last_ts=last, anchor_ts=float(src.get(b"lts", src[b"ts"])))

    async def catch_up(
        self,
        pod: str,
        chains: SourceChains,
        start: int,
        until: int,
        restart_of: tuple[int, float] | None = None,
    ) -> ResumePoint | None:
        # Another replica may be a moment from applying the batch just before the one in hand: wait for it a
        # little (this source's task only), or we would write that one's successor from chains without it.
        key = self.prefix + "src:" + pod
        # After a publisher restart: only a position another replica reached past that same restart (which
        # that replica may be applying right now, as it may the batch before the one in hand).
        restart = None if restart_of is None else _stream_id(restart_of).encode()
        deadline = asyncio.get_running_loop().time() + CATCH_UP_WAIT
        while True:
            async with asyncio.timeout(self.write_timeout):
                seq, rf = await self.client.hmget(key, ["seq", "rf"])  # bytes: the client does not decode answers
            same_stream = restart is None or rf == restart
            if seq is not None and int(seq) >= until - 1 and same_stream:
                break
            if asyncio.get_running_loop().time() >= deadline:
                break
            await asyncio.sleep(0.01)
        if seq is None or int(seq) < start or not same_stream:
            return None  # Redis missed them too, or holds no state from the same restart
        point = await self.resume(pod, chains)
        if point is not None:
            log.info("caught up with the shared index", extra={"pod": pod, "missed": f"{start}..{until - 1}",
                                                                "seq": point.next_seq - 1})  # fmt: skip
        return point

    async def forget(self, pod: str, chains: SourceChains) -> None:
        # The shared entries stay: other replicas may still route to the pod; a pod gone for good
        # is never a candidate and its entries expire with `ttl`.
        chains.engine.clear()
        chains.kmask.clear()
        self._positions.pop(pod, None)

    # -- reads ----------------------------------------------------------------------------------
    async def lookup(self, keys: list[int], candidates: list[str]) -> RedisMatch:
        if not keys or not candidates:
            return RedisMatch({}, {})
        # The keys as one string of 16-hex-digit keys: one argument for Redis to parse, sliced
        # in the script only as far as the walk goes (a cold prompt reads one).
        run = _hex_run(keys)
        if len(candidates) <= LOOKUP_CHUNK:
            return self._match(await self._lookup_raw(run, candidates))
        # Redis's Lua passes at most ~8,000 values to one call (HMGET of 2 fields per candidate):
        # larger pools are looked up in chunks, pipelined; each pod's answer is its own.
        chunks = [candidates[i : i + LOOKUP_CHUNK] for i in range(0, len(candidates), LOOKUP_CHUNK)]
        parts = [self._match(raw) for raw in await asyncio.gather(*(self._lookup_raw(run, c) for c in chunks))]
        lengths = {pod: n for m in parts for pod, n in m.lengths.items()}
        weighted = {pod: w for m in parts for pod, w in m.weighted.items()}
        last = None if lengths else next((m.last for m in parts if m.last), None)
        return RedisMatch(lengths, weighted, last)

    async def lookup_batch(self, chains: list[list[int]], candidates: list[str]) -> RedisMatch:
        """A batch's prompts (the engine caches each on its own): each chain looked up from its root, the
        matches added up (RedisMatch.add), in one round trip (a pipeline of one script call per prompt)."""
        chains = [c for c in chains if c]
        if not chains or not candidates:
            return RedisMatch({}, {})
        if len(candidates) <= LOOKUP_CHUNK:
            pipe = self.client.pipeline(transaction=False)
            for c in chains:
                await self._lookup(keys=[self.gen_key], args=self._lookup_args(_hex_run(c), candidates), client=pipe)
            parts = [self._match(raw) for raw in await pipe.execute()]
        else:
            parts = list(await asyncio.gather(*(self.lookup(c, candidates) for c in chains)))
        m = parts[0]
        for part in parts[1:]:
            m.add(part)
        return m

    async def _lookup_raw(self, run: str, candidates: list[str]) -> list[Any]:
        raw: list[Any] = await self._lookup(keys=[self.gen_key], args=self._lookup_args(run, candidates))
        return raw

    def _lookup_args(self, run: str, candidates: list[str]) -> list[Any]:
        """The _LOOKUP script's arguments: the key prefix, the candidates, the tier weights, the keys as one run."""
        return [self.block_prefix, len(candidates), *candidates, *self._weight_args, run]

    @staticmethod
    def _match(raw: list[Any]) -> RedisMatch:
        lengths: dict[str, int] = {}
        weighted: dict[str, float] = {}
        for i in range(0, len(raw), 3):
            pod = raw[i].decode() if isinstance(raw[i], bytes) else str(raw[i])
            if not int(raw[i + 1]):  # the script's one (pod, 0, 0) triple: the last holder of block 0
                return RedisMatch({}, {}, pod)
            lengths[pod] = int(raw[i + 1])
            weighted[pod] = float(raw[i + 2])
        return RedisMatch(lengths, weighted)

    async def speculate(self, pod: str, keys: list[int], ttl: float) -> None:
        if not keys or ttl <= 0:
            return
        await self._speculate(args=[self.block_prefix, "s|" + pod, math.ceil(ttl * 1000), _hex_run(keys)])
