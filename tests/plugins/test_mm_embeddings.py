"""Encoder-cache affinity: media items from the parsers, the per-endpoint LRU, the scorer, and
requests repeating an image routed where it was encoded."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from helpers import endpoint, request

from llmepp.config.loader import build, load_config
from llmepp.datalayer.datastore import Datastore
from llmepp.datalayer.endpoint import EndpointSpec
from llmepp.director import Director, RoutingDecision
from llmepp.framework.datakeys import ENCODER_CACHE_MATCH_INFO, scoped
from llmepp.framework.plugin import registry
from llmepp.framework.scheduling import ProfileResult, SchedulingResult
from llmepp.observability.metrics import EppMetrics
from llmepp.request.parsers import parse_request


def chat(*urls: str, text: str = "what is in it?") -> bytes:
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}]
    parts += [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": parts}]}).encode()


def items(path: str, body: bytes) -> tuple[int, ...]:
    return parse_request({":path": path}, body, request_id="r").mm_items


def test_media_items_identify_what_was_sent_and_ignore_text() -> None:
    a, b = (
        items("/v1/chat/completions", chat("http://x/cat.png")),
        items("/v1/chat/completions", chat("http://x/dog.png")),
    )
    assert len(a) == len(b) == 1 and a != b
    assert items("/v1/chat/completions", chat("http://x/cat.png", text="other words")) == a
    assert len(items("/v1/chat/completions", chat("http://x/cat.png", "data:image/png;base64,AAAA"))) == 2
    anthropic = {
        "model": "m",
        "max_tokens": 4,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image", "source": {"type": "url", "url": "http://x/cat.png"}},
                    {"type": "text", "text": "?"},
                ],
            }
        ],
    }
    responses = {"model": "m", "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]}
    assert len(items("/v1/messages", json.dumps(anthropic).encode())) == 1
    assert len(items("/v1/responses", json.dumps(responses).encode())) == 1
    assert items("/v1/completions", b'{"model": "m", "prompt": "x"}') == ()


def test_a_media_uuid_is_the_item_identity_as_in_vllm() -> None:
    # vLLM takes a part's user-supplied `uuid` as the item's hash for its caches (the data may then be
    # left out): two parts with one uuid are one item whatever they send, and it is the item a generate
    # request names by that hash in features.mm_hashes.
    def part(url: str | None, uuid: Any = None, kind: str = "image_url") -> dict[str, Any]:
        ref: Any = {"url": url} if url is not None else None
        return {"type": kind, kind: ref, **({"uuid": uuid} if uuid is not None else {})}

    def chat_items(*parts: dict[str, Any], path: str = "/v1/chat/completions") -> tuple[int, ...]:
        body = {"model": "m", "messages": [{"role": "user", "content": ["?", *parts]}]}
        return items(path, json.dumps(body).encode())

    cat = chat_items(part("http://x/cat.png", "img-1"))
    assert cat == chat_items(part("http://y/other.png", "img-1")) == chat_items(part(None, "img-1"))
    assert cat != chat_items(part("http://x/cat.png", "img-2")) != chat_items(part("http://x/cat.png"))
    assert chat_items(part("http://x/cat.png"), part("http://x/dog.png", "img-1"))[1] == cat[0]
    generate = {"token_ids": [1], "features": {"mm_hashes": {"image": ["img-1"]}}}
    assert items("/inference/v1/generate", json.dumps(generate).encode()) == cat
    # vLLM reads a non-string uuid as str(uuid).
    assert chat_items(part("u", 7, "video_url")) == chat_items(part("v", "7", "video_url"))
    responses = {"model": "m", "input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": "http://z", "uuid": "img-1"}]}]}  # fmt: skip
    assert items("/v1/responses", json.dumps(responses).encode()) == cat


def producer(**params: Any) -> Any:
    return registry.build("mm-embeddings-cache-producer", "mm", params)


def result(primary: Any, encode: Any = None) -> SchedulingResult:
    profiles: dict[str, ProfileResult | None] = {
        "decode": ProfileResult(targets=[primary], candidates=[primary], totals=[1.0])
    }
    if encode is not None:
        profiles["encode"] = ProfileResult(targets=[encode], candidates=[encode], totals=[1.0])
    return SchedulingResult(primary_profile="decode", profiles=profiles)


def test_the_lru_counts_matches_records_on_the_encoder_and_is_bounded() -> None:
    p = producer(cacheSizeInMBPerServer=6)  # 3 items of 2 MB
    pods = [endpoint(0), endpoint(1), endpoint(2)]
    req = request(mm_items=(1, 2))
    p.pre_request(req, result(pods[0], encode=pods[2]))  # E/P/D: the encoder pod holds the embeddings
    p.produce(req, pods)
    info = req.data[scoped(ENCODER_CACHE_MATCH_INFO, "mm")]
    assert (info.total, info.matched) == (2, {pods[2]: 2})
    p.pre_request(request(mm_items=(3, 4)), result(pods[2]))  # no encode profile: the primary pick
    again = request(mm_items=(1, 2, 3, 4))
    p.produce(again, pods)
    assert again.data[scoped(ENCODER_CACHE_MATCH_INFO, "mm")].matched == {pods[2]: 3}  # item 1 was evicted
    p.endpoint_removed(pods[2])
    gone = request(mm_items=(3,))
    p.produce(gone, pods)
    assert gone.data[scoped(ENCODER_CACHE_MATCH_INFO, "mm")].matched == {}
    # As the reference: 1 MiB still holds one entry; <= 0 means the default (4096 MiB: 2048 entries).
    assert producer(cacheSizeInMBPerServer=1).capacity == 1
    assert producer(cacheSizeInMBPerServer=0).capacity == 2048


def test_an_item_sent_twice_counts_once_as_in_the_reference() -> None:
    """The same image in two turns of a conversation is one item (the reference: the fraction of the
    request's unique media hashes cached). Before: [A, A, B] with A cached scored 2/3, not 1/2."""
    p = producer()
    pods = [endpoint(0), endpoint(1)]
    p.pre_request(request(mm_items=(1,)), result(pods[0]))
    req = request(mm_items=(1, 1, 2))
    p.produce(req, pods)
    info = req.data[scoped(ENCODER_CACHE_MATCH_INFO, "mm")]
    assert (info.total, info.matched) == (2, {pods[0]: 1})


def test_an_endpoint_removed_while_its_request_was_scheduled_keeps_no_lru() -> None:
    # Its removal was notified before PreRequest: an LRU made for it then would never be dropped.
    p = producer()
    pod = endpoint(0)
    pod.removed = True
    p.endpoint_removed(pod)
    p.pre_request(request(mm_items=(1,)), result(pod))
    assert pod not in p.lrus


CONFIG = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: mm-embeddings-cache-scorer
- type: queue-scorer
schedulingProfiles:
- name: default
  plugins: [{pluginRef: mm-embeddings-cache-scorer, weight: 2}, {pluginRef: queue-scorer, weight: 1}]
"""


async def test_requests_repeating_an_image_go_where_it_was_encoded() -> None:
    datastore = Datastore()
    for i in range(4):
        datastore.upsert(EndpointSpec(name=f"p{i}", address=f"10.0.0.{i + 1}", port=8000))
    metrics = EppMetrics()
    components = build(load_config(CONFIG), datastore=datastore, metrics=metrics)
    assert "mm-embeddings-cache-producer" in components.plugins  # auto-created for the scorer
    director = Director(datastore, components.pipeline, metrics)
    homes: dict[str, Counter[str]] = {}
    for round_ in range(3):
        for image in ("cat", "dog", "fox", "owl", "eel"):
            req = parse_request({":path": "/v1/chat/completions"}, chat(f"http://x/{image}.png", text=f"q{round_}"),
                                request_id=f"{image}{round_}")  # fmt: skip
            decision = await director.handle_request(req, None)
            assert isinstance(decision, RoutingDecision)
            homes.setdefault(image, Counter())[decision.targets[0].name] += 1
    # Each image's later requests followed its first: one pod per image.
    assert all(len(pods) == 1 for pods in homes.values()), homes
    text_only = parse_request({":path": "/v1/completions"}, b'{"model": "m", "prompt": "x"}', request_id="t")
    await director.handle_request(text_only, None)  # no media: the scorer is neutral, nothing recorded
