"""vLLM KV-cache events → a precise prefix index (llm-d's `kvevents` + `kvblock`, §5.2 of the reference).

    wire.py        frames + msgpack payloads (both vLLM encodings) → typed events
    keys.py        the EPP's own block keys, recomputed from token ids
    tiers.py       device tiers (gpu, cpu, ...) and their match weights
    chain.py       per-source engine-hash → request-key mapping (parents, block-size ratios)
    index.py       in-memory key → pods index with tiers, LRU bound and speculative entries
    redis_index.py the same index shared in Redis (replicas and restarts see one index)
    ingest.py      a source's batches → chain changes → an index store (memory or Redis)
    subscriber.py  one publisher: SUB + sequence tracking + DEALER replay
    pool.py        one subscriber per discovered endpoint, following the datastore
    stats.py       counters exported as Prometheus metrics at scrape time, rate-limited logging

Nothing here runs inside a request: events are decoded and applied by per-publisher tasks on the
event loop, between requests; requests only read the index (`MemoryIndex.match`, `RedisStore.lookup`).
The consistency model across EPP replicas is described in redis_index.py and the README.
"""
