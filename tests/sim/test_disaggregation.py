"""Prefill/decode disaggregation through kv_transfer_params, both directions, end to end."""

from __future__ import annotations

import aiohttp
from helpers import on_a_punctual_loop

from .simkit import STEADY, complete, pod, running, words


async def test_prefill_then_remote_decode(http: aiohttp.ClientSession) -> None:
    async def measure() -> None:
        slow_prefill = {"prefill_time_per_token": 1.0, "prefill_overhead": 10.0, "inter_token_latency": 5.0}
        async with running(
            [
                pod("127.0.0.2", name="prefiller", role="prefill", **slow_prefill),
                pod(
                    "127.0.0.3",
                    name="decoder",
                    role="decode",
                    kv_cache_transfer_latency=5.0,
                    kv_cache_transfer_time_per_token=0.01,
                    **slow_prefill,
                ),
            ],
            time_scale=STEADY,
        ) as cluster:
            p_url, d_url = cluster.urls
            prompt = words(300)
            p_params = {"do_remote_decode": True, "do_remote_prefill": False}
            prefill = await complete(http, p_url, prompt, 50, kv_transfer_params=p_params)
            assert prefill.status == 200
            assert prefill.body["usage"]["completion_tokens"] == 1  # prefill only
            params = prefill.body["kv_transfer_params"]
            assert params["do_remote_prefill"] is True and params["do_remote_decode"] is False
            assert params["remote_engine_id"] == "prefiller"
            assert params["remote_host"] == "127.0.0.2" and params["remote_port"] == cluster.pods[0].port
            prompt_tokens = prefill.body["usage"]["prompt_tokens"]
            assert len(params["remote_block_ids"]) == -(-prompt_tokens // 16)
            assert prefill.total_wall * STEADY > 0.3  # it did the ~310 ms prefill

            decode = await complete(http, d_url, prompt, 20, stream=True, kv_transfer_params=params)
            assert decode.status == 200
            assert decode.body["usage"]["completion_tokens"] == 20
            # KV pulled in ~5 + 300 x 0.01 ms instead of a ~310 ms local prefill.
            assert decode.ttft_wall * STEADY < 0.15
            # The pulled blocks are now cached on the decode pod like locally computed ones.
            again = await complete(http, d_url, prompt, 1)
            assert again.cached_tokens > 0
            # For contrast: a plain request on the decode pod does prefill locally.
            plain = await complete(http, d_url, words(300, salt="plain "), 1, stream=True)
            assert plain.ttft_wall * STEADY > 0.3

    await on_a_punctual_loop(measure)


async def test_roles_refuse_the_other_side(http: aiohttp.ClientSession) -> None:
    async with running([pod("127.0.0.2", role="prefill"), pod("127.0.0.3", role="decode")]) as cluster:
        p_url, d_url = cluster.urls
        to_prefill = await complete(http, p_url, "x", 2, kv_transfer_params={"do_remote_prefill": True})
        to_decode = await complete(http, d_url, "x", 2, kv_transfer_params={"do_remote_decode": True})
        for result in (to_prefill, to_decode):
            assert result.status == 400
            assert result.body["error"]["param"] == "kv_transfer_params"
        # Plain requests work on both roles.
        assert (await complete(http, p_url, "x", 2)).status == 200
        assert (await complete(http, d_url, "x", 2)).status == 200
