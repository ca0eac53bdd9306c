"""KV events over real ZeroMQ: frames, both payload encodings, truthfulness, replay after a gap."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import msgpack
import zmq
import zmq.asyncio

from llmepp_sim import blockhash
from llmepp_sim.kvevents import END_OF_REPLAY
from llmepp_sim.pod import SimPod

from .simkit import complete, pod, started, words

RECV_TIMEOUT = 2.0


def kv_pod(host: str, **overrides: Any) -> Any:
    bracketed = f"[{host}]" if ":" in host else host
    return pod(
        host=host,
        zmq_endpoint=f"tcp://{bracketed}:*",
        kv_events_replay_endpoint=f"tcp://{bracketed}:*",
        event_flush_interval=1.0,
        **overrides,
    )


async def subscribe(ctx: zmq.asyncio.Context, sim_pod: SimPod) -> zmq.asyncio.Socket:
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"kv@")
    sub.connect(sim_pod.kv_events_endpoint)
    await asyncio.sleep(0.2)  # ZMQ slow joiner: let the subscription reach the publisher
    return sub


async def receive(sub: zmq.asyncio.Socket, until: Any) -> list[tuple[bytes, int, Any]]:
    """Messages as (topic, seq, decoded batch) until ``until(messages)`` holds."""
    messages: list[tuple[bytes, int, Any]] = []
    while not until(messages):
        frames = await asyncio.wait_for(sub.recv_multipart(), RECV_TIMEOUT)
        assert len(frames) == 3
        topic, seq, payload = frames
        assert len(seq) == 8
        messages.append((topic, int.from_bytes(seq, "big"), msgpack.unpackb(payload, raw=False)))
    return messages


def events_of(messages: list[tuple[bytes, int, Any]]) -> list[Any]:
    return [event for _, _, batch in messages for event in batch[1]]


async def tokenize(http: aiohttp.ClientSession, url: str, prompt: str) -> list[int]:
    async with http.post(url + "/tokenize", json={"prompt": prompt}) as response:
        return list((await response.json())["tokens"])


async def test_map_format_events_match_what_the_engine_stored_and_evicted(http: aiohttp.ClientSession) -> None:
    cluster = await started([kv_pod("127.0.0.2", kv_cache_size=8)])
    ctx = zmq.asyncio.Context()
    try:
        sim_pod, url = cluster.pods[0], cluster.urls[0]
        sub = await subscribe(ctx, sim_pod)
        prompt = words(40, salt="first ")
        ids = await tokenize(http, url, prompt)
        assert 48 > len(ids) >= 40
        await complete(http, url, prompt, 2)
        messages = await receive(sub, lambda m: len(events_of(m)) >= 1)
        topic, seq, batch = messages[0]
        assert topic == b"kv@sim-0@sim-model"
        assert seq == 0
        ts, events, rank = batch
        assert isinstance(ts, float) and rank == 0
        stored = events[0]
        expected_hashes = blockhash.chain(ids, 16)
        assert (
            stored
            == {
                "type": "BlockStored",
                "block_hashes": expected_hashes[:2],  # only the two full blocks
                "parent_block_hash": None,
                "token_ids": ids[:32],
                "block_size": 16,
                "lora_id": None,
                "medium": "GPU",
                "lora_name": None,
            }
        )
        assert all(0 <= h < 2**64 for h in stored["block_hashes"])
        # An 8-block cache: more 3-block prompts evict the first prompt's blocks, tail first. Their partial
        # tail blocks hold no hash and are reused first (vLLM free_blocks), so it takes four.
        for i in range(4):
            await complete(http, url, words(40, salt=f"other{i} "), 2)
        messages = await receive(
            sub, lambda m: sum(len(e["block_hashes"]) for e in events_of(m) if e["type"] == "BlockRemoved") >= 2
        )
        assert [s for _, s, _ in messages] == list(range(1, 1 + len(messages)))
        removed = [h for e in events_of(messages) if e["type"] == "BlockRemoved" for h in e["block_hashes"]]
        assert removed[:2] == [expected_hashes[1], expected_hashes[0]]
        assert all(e["medium"] == "GPU" for e in events_of(messages) if e["type"] == "BlockRemoved")
        # And the engine agrees: the first prompt is no longer cached.
        assert (await complete(http, url, prompt, 2)).cached_tokens == 0
        sub.close()
    finally:
        ctx.destroy(linger=0)
        await cluster.stop()


async def test_legacy_array_format_and_decode_blocks(http: aiohttp.ClientSession) -> None:
    cluster = await started([kv_pod("127.0.0.3", use_vllm_legacy_event_format=True, kv_cache_size=8)])
    ctx = zmq.asyncio.Context()
    try:
        sim_pod, url = cluster.pods[0], cluster.urls[0]
        sub = await subscribe(ctx, sim_pod)
        prompt = words(20, salt="legacy ")
        ids = await tokenize(http, url, prompt)
        result = await complete(http, url, prompt, 40)  # decoding fills further blocks
        total = len(ids) + result.body["usage"]["completion_tokens"]
        # The last sampled token is never fed back, so its block is complete only if it was before it.
        expected_blocks = (total - 1) // 16
        messages = await receive(sub, lambda m: sum(len(e[1]) for e in events_of(m)) >= expected_blocks)
        tags = [e[0] for e in events_of(messages)]
        assert tags[:2] == ["BlockStored", "BlockStored"]
        prefill_event, decode_event = events_of(messages)[:2]
        _tag, hashes, parent, token_ids, block_size, lora_id, medium, lora_name = prefill_event
        assert (parent, block_size, lora_id, medium, lora_name) == (None, 16, None, "GPU", None)
        assert token_ids == ids[:16] and hashes == blockhash.chain(ids, 16)[:1]
        # Decode-filled blocks are cached and published too, chained to the prompt's last block.
        assert decode_event[2] == hashes[-1]
        all_stored = [h for e in events_of(messages) for h in e[1]]
        assert len(all_stored) == expected_blocks >= 3
        # Two more 4-block sequences through an 8-block cache evict the first one's blocks.
        for i in range(2):
            await complete(http, url, words(20, salt=f"evict{i} "), 40)
        messages = await receive(sub, lambda m: any(e[0] == "BlockRemoved" for e in events_of(m)))
        removed = next(e for e in events_of(messages) if e[0] == "BlockRemoved")
        assert len(removed) == 3 and removed[2] == "GPU"
        assert set(removed[1]) <= set(all_stored)
        sub.close()
    finally:
        ctx.destroy(linger=0)
        await cluster.stop()


async def test_batches_respect_event_batch_size(http: aiohttp.ClientSession) -> None:
    cluster = await started([kv_pod("127.0.0.4", event_batch_size=2, kv_cache_size=64)])
    ctx = zmq.asyncio.Context()
    try:
        sim_pod, url = cluster.pods[0], cluster.urls[0]
        sub = await subscribe(ctx, sim_pod)
        await asyncio.gather(*(complete(http, url, words(20, salt=f"b{i} "), 1) for i in range(5)))
        messages = await receive(sub, lambda m: len(events_of(m)) >= 5)
        assert all(len(batch[1]) <= 2 for _, _, batch in messages)
        assert [seq for _, seq, _ in messages] == list(range(len(messages)))
        sub.close()
    finally:
        ctx.destroy(linger=0)
        await cluster.stop()


async def test_replay_after_a_gap_via_dealer(http: aiohttp.ClientSession) -> None:
    cluster = await started([kv_pod("127.0.0.5", event_batch_size=1)])
    ctx = zmq.asyncio.Context()
    try:
        sim_pod, url = cluster.pods[0], cluster.urls[0]
        # Events published before anyone listens: a late subscriber sees a gap (first seq > 0).
        for i in range(3):
            await complete(http, url, words(20, salt=f"early{i} "), 1)
        await asyncio.sleep(0.05)
        sub = await subscribe(ctx, sim_pod)
        await complete(http, url, words(20, salt="late "), 1)
        (topic, first_seq, live_batch), *_ = await receive(sub, lambda m: len(m) >= 1)
        assert first_seq == 3
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(sim_pod.kv_events_replay_endpoint)
        await dealer.send_multipart([b"", (0).to_bytes(8, "big")])
        replayed: list[tuple[int, Any]] = []
        while True:
            frames = await asyncio.wait_for(dealer.recv_multipart(), RECV_TIMEOUT)
            assert frames[0] == b""
            if frames[2] == END_OF_REPLAY:
                assert frames[1] == b"" and frames[3] == b""
                break
            assert frames[1] == topic
            replayed.append((int.from_bytes(frames[2], "big"), msgpack.unpackb(frames[3], raw=False)))
        assert [seq for seq, _ in replayed] == [0, 1, 2, 3]
        assert replayed[3][1] == live_batch  # byte-identical payload to the live one
        assert all(batch[1][0]["type"] == "BlockStored" for _, batch in replayed)
        # A start past the buffer's end gets just the end marker.
        await dealer.send_multipart([b"", (99).to_bytes(8, "big")])
        frames = await asyncio.wait_for(dealer.recv_multipart(), RECV_TIMEOUT)
        assert frames == [b"", b"", END_OF_REPLAY, b""]
        dealer.close()
        sub.close()
    finally:
        ctx.destroy(linger=0)
        await cluster.stop()


async def test_reset_prefix_cache_publishes_all_blocks_cleared(http: aiohttp.ClientSession) -> None:
    cluster = await started([kv_pod("127.0.0.6")])
    ctx = zmq.asyncio.Context()
    try:
        sim_pod, url = cluster.pods[0], cluster.urls[0]
        sub = await subscribe(ctx, sim_pod)
        prompt = words(40, salt="reset ")
        await complete(http, url, prompt, 1)
        async with http.post(url + "/reset_prefix_cache") as response:
            assert response.status == 200
        messages = await receive(sub, lambda m: any(e["type"] == "AllBlocksCleared" for e in events_of(m)))
        assert events_of(messages)[-1] == {"type": "AllBlocksCleared"}
        assert (await complete(http, url, prompt, 1)).cached_tokens == 0
        sub.close()
    finally:
        ctx.destroy(linger=0)
        await cluster.stop()


async def test_admin_evict_publishes_block_removed_and_the_engine_agrees(http: aiohttp.ClientSession) -> None:
    cluster = await started([kv_pod("127.0.0.7", kv_cache_size=40)])
    ctx = zmq.asyncio.Context()
    try:
        sim_pod, url = cluster.pods[0], cluster.urls[0]
        sub = await subscribe(ctx, sim_pod)
        prompt = words(160, salt="evict ")
        await complete(http, url, prompt, 1)
        assert sim_pod.engine.pool.num_cached >= 10
        for bad in ({}, {"fraction": 2}, {"fraction": 0.5, "order": "mru"}, {"fraction": 0.5, "seed": "x"}):
            async with http.post(url + "/admin/evict", json=bad) as response:
                assert response.status == 400, bad
        async with http.post(url + "/admin/evict", json={"fraction": 1.0, "order": "random", "seed": 3}) as response:
            assert response.status == 200
            body = await response.json()
        assert body["evicted"] >= 10 and body["cached"] == 0
        messages = await receive(sub, lambda m: any(e["type"] == "BlockRemoved" for e in events_of(m)))
        removed = [h for e in events_of(messages) if e["type"] == "BlockRemoved" for h in e["block_hashes"]]
        assert len(removed) == body["evicted"]
        assert (await complete(http, url, prompt, 1)).cached_tokens == 0
        sub.close()
    finally:
        ctx.destroy(linger=0)
        await cluster.stop()


async def test_an_ipv6_pod_publishes_and_replays_on_ipv6(http: aiohttp.ClientSession) -> None:
    """A pod on ::1 binds its PUB and ROUTER sockets on tcp://[::1]:<port> (zmq.IPV6)."""
    cluster = await started([kv_pod("::1", event_batch_size=1)])
    ctx = zmq.asyncio.Context()
    try:
        sim_pod, url = cluster.pods[0], cluster.urls[0]
        assert url.startswith("http://[::1]:")
        assert sim_pod.kv_events_endpoint.startswith("tcp://[::1]:")
        assert sim_pod.kv_events_replay_endpoint.startswith("tcp://[::1]:")
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.IPV6, 1)
        sub.setsockopt(zmq.SUBSCRIBE, b"kv@")
        sub.connect(sim_pod.kv_events_endpoint)
        await asyncio.sleep(0.2)
        await complete(http, url, words(20, salt="v6 "), 1)
        (_, seq, _), *_ = await receive(sub, lambda m: len(m) >= 1)
        assert seq == 0
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.IPV6, 1)
        dealer.connect(sim_pod.kv_events_replay_endpoint)
        await dealer.send_multipart([b"", (0).to_bytes(8, "big")])
        frames = await asyncio.wait_for(dealer.recv_multipart(), RECV_TIMEOUT)
        assert int.from_bytes(frames[2], "big") == 0
        dealer.close()
        sub.close()
    finally:
        ctx.destroy(linger=0)
        await cluster.stop()
