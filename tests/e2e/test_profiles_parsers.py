"""README claims, end to end (real Envoy + `epp` + simulated pods):

- `header-profile-handler` | profile handler | "runs the profile named by a header" (EPP-Profile; unknown
  name: 400 naming the profiles, per the plugin's docstring).
- Request parsers: "A configured list without a fallback answers unclaimed paths 400."
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from llmepp.testing.stack import Stack, StackOptions
from llmepp_sim.cluster import PodInfo

from .answers import Answer, post_json

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

MODEL = "sim-model"
CONFIG = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: openai-parser
- {type: label-selector-filter, name: group-a, parameters: {matchLabels: {group: a}}}
- {type: label-selector-filter, name: group-b, parameters: {matchLabels: {group: b}}}
- {type: header-profile-handler, parameters: {defaultProfile: pa}}
- type: queue-scorer
requestHandler:
  parsers:
  - pluginRef: openai-parser
schedulingProfiles:
- name: pa
  plugins: [{pluginRef: group-a}, {pluginRef: queue-scorer}]
- name: pb
  plugins: [{pluginRef: group-b}, {pluginRef: queue-scorer}]
"""


class GroupStack(Stack):
    """Pods 0-1 are labelled group=a, pods 2-3 group=b."""

    def endpoint_labels(self, pod: PodInfo) -> dict[str, str]:
        index = next(i for i, p in enumerate(self.pods) if p.name == pod.name)
        return {**super().endpoint_labels(pod), "group": "a" if index < 2 else "b"}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack() -> AsyncIterator[Stack]:
    async with GroupStack(StackOptions(pods=4, first_host=24, epp_config=CONFIG)) as st:
        yield st


async def post(
    http: aiohttp.ClientSession, stack: Stack, path: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> Answer:
    return await post_json(http, f"{stack.url}{path}", body, headers)


def group(stack: Stack, g: str) -> set[str]:
    return {p.name for p in (stack.pods[:2] if g == "a" else stack.pods[2:])}


async def test_the_header_names_the_profile_that_runs(stack: Stack, http: aiohttp.ClientSession) -> None:
    body = {"model": MODEL, "prompt": "which profile", "max_tokens": 2}
    for header, g in (({"EPP-Profile": "pb"}, "b"), ({"epp-profile": " pa "}, "a"), ({}, "a")):
        seen: Counter[str] = Counter()
        for _ in range(8):
            status, h, text = await post(http, stack, "/v1/completions", body, header)
            assert status == 200, (header, text)
            seen[h["x-inference-pod"]] += 1
        assert set(seen) <= group(stack, g), (header, seen)


async def test_an_unknown_profile_is_a_400_naming_the_profiles(stack: Stack, http: aiohttp.ClientSession) -> None:
    body = {"model": MODEL, "prompt": "which profile", "max_tokens": 2}
    status, _, text = await post(http, stack, "/v1/completions", body, {"EPP-Profile": "nope"})
    assert status == 400, (status, text)
    assert "pa" in text and "pb" in text, text


async def test_a_parser_list_without_fallback_answers_unclaimed_paths_400(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    body = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    status, h, text = await post(http, stack, "/v1/messages", body)
    assert status == 400, (status, text)
    assert h.get("content-type", "").startswith("application/json"), h
    assert "/v1/messages" in text, text
    assert "x-inference-pod" not in h  # never reached a pod
    # The claimed paths still work.
    status, h, text = await post(http, stack, "/v1/chat/completions", body)
    assert status == 200, text
