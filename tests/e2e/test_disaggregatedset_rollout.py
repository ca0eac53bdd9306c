"""`disaggregatedset-rollout-screener` end to end: a real Envoy, the `epp` program with the
reference's rollout config (prefill + decode profiles, always-disagg decider, a strict revision
header selector, `sum` revision gating over [prefill, decode]) and a P/D pool in mid-rollout:

    revision A: prefill-0..3, decode-0      weight 4 + 1 = 5  → share 5/7
    revision B: prefill-4,    decode-1      weight 1 + 1 = 2  → share 2/7

Each decode pod sits behind an `epp-pd-sidecar`; the revision labels come from the endpoints file.
Which pods the EPP paired is read per request from `x-epp-decision` (`--decision-header`), which
decode pod served it from the pod's own `x-inference-pod`, and how many prefills each pod ran from
its own /metrics. Without gating each profile picks uniformly: B would get 1/2 of the decodes (and
1/5 of the prefills, on other requests), outside the tolerance asserted below, and pairs would mix
revisions; the last test shows exactly that with `mode: disabled`."""

from __future__ import annotations

import asyncio
import math
import re
from collections import Counter
from collections.abc import AsyncIterator, Mapping

import aiohttp
import pytest
import pytest_asyncio

from llmepp.testing.pdstack import PDStack, PDStackOptions, scrape, total
from llmepp.testing.stack import with_file_discovery
from llmepp_sim.cluster import PodInfo

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

MODEL = "sim-model"
REV = "disaggregatedset.x-k8s.io/revision"
ROLE = "disaggregatedset.x-k8s.io/role"
SET = "disaggregatedset.x-k8s.io/name"
REVISIONS = {"prefill-0": "A", "prefill-1": "A", "prefill-2": "A", "prefill-3": "A", "prefill-4": "B",
             "decode-0": "A", "decode-1": "B"}  # fmt: skip
SHARE_B = 2 / 7  # sum gating: (1 + 1) / ((4 + 1) + (1 + 1))
UNGATED_B = 1 / 2  # decode pods picked uniformly: B holds 1 of 2
REQUESTS = 420
# 4.5 binomial standard deviations of the gated share at REQUESTS (≈ 0.099): a gated run fails it
# about once in 10^5, an ungated one (UNGATED_B, 0.214 away) essentially never passes it.
TOLERANCE = 4.5 * math.sqrt(SHARE_B * (1 - SHARE_B) / REQUESTS)
SIM = ["--time-scale", "20"]

CONFIG = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: disaggregatedset-rollout-screener
  name: rollout-screener
  parameters:
    scope:
      labelSelector: "disaggregatedset.x-k8s.io/name=revision-rollout"
    headerSelectors:
    - name: revision
      headerName: x-disagg-revision
      labelKey: disaggregatedset.x-k8s.io/revision
      mode: strict
    revisionGating:
      mode: __MODE__
      requireRoles:
        values: [prefill, decode]
- type: prefill-filter
- type: decode-filter
- type: weighted-random-picker
  name: picker
- type: always-disagg-pd-decider
- type: disagg-profile-handler
  parameters:
    deciders:
      prefill: always-disagg-pd-decider
schedulingProfiles:
- name: prefill
  plugins:
  - pluginRef: prefill-filter
  - pluginRef: picker
- name: decode
  plugins:
  - pluginRef: decode-filter
  - pluginRef: picker
"""
# The newer reference's e2e rollout config (its ConfigMap's disaggregation.yaml), `sum` gating.
NEWER_CONFIG = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: disaggregatedset-rollout-screener
  name: rollout-screener
  parameters:
    scope:
      labelSelector: "disaggregatedset.x-k8s.io/name=revision-rollout"
    revisionGating:
      revisionHeaderName: x-llm-d-disagg-revision
      revisionLabelKey: disaggregatedset.x-k8s.io/revision
      roleLabelKey: disaggregatedset.x-k8s.io/role
      mode: sum
      requiredRoles: [prefill, decode]
- type: prefill-filter
- type: decode-filter
- type: weighted-random-picker
  name: picker
- type: always-disagg-pd-decider
- type: disagg-profile-handler
  parameters:
    deciders:
      prefill: always-disagg-pd-decider
schedulingProfiles:
- name: prefill
  plugins:
  - pluginRef: prefill-filter
  - pluginRef: picker
- name: decode
  plugins:
  - pluginRef: decode-filter
  - pluginRef: picker
"""
NEWER_HEADER = "x-llm-d-disagg-revision"
DECISION = re.compile(r"(?:^|\| )([\w-]+): ([0-9.]+:[0-9]+);")


class RolloutStack(PDStack):
    """The P/D stack with every pod labelled as the DisaggregatedSet controller labels it."""

    def endpoint_labels(self, pod: PodInfo) -> dict[str, str]:
        return {**super().endpoint_labels(pod), REV: REVISIONS[pod.name], ROLE: pod.role, SET: "revision-rollout"}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack() -> AsyncIterator[RolloutStack]:
    options = PDStackOptions(
        prefill=5, decode=2, sim_args=SIM, first_host=222, epp_config=CONFIG.replace("__MODE__", "sum"),
        epp_args=["--decision-header"],
    )  # fmt: skip
    async with RolloutStack(options) as st:
        yield st


async def use_config(stack: RolloutStack, config: str) -> None:
    """Run the EPP on `config`, restarting it only when it runs another one (each test states the
    config it needs, so none has to restore the original afterwards)."""
    text = with_file_discovery(config, stack.endpoints_file)
    if stack.config_file.read_text() != text:
        stack.config_file.write_text(text)
        await stack.restart_epp()


class Routed:
    """One answered request: the revisions of the pods the EPP paired, and what the pods say."""

    def __init__(self, stack: RolloutStack, h: Mapping[str, str]) -> None:
        picks = dict(DECISION.findall(h["x-epp-decision"]))
        by_address = {stack.endpoint_address(p): p.name for p in stack.pods}
        self.decode_pod = by_address[picks["decode"]]
        self.prefill_pod = by_address[picks["prefill"]]
        self.served_by = h["x-inference-pod"]  # the decode model server that answered (via its sidecar)
        self.stamped = h.get("x-disagg-revision")
        self.stamped_newer = h.get(NEWER_HEADER)

    @property
    def decode(self) -> str:
        return REVISIONS[self.decode_pod]

    @property
    def prefill(self) -> str:
        return REVISIONS[self.prefill_pod]


async def send(
    stack: RolloutStack, http: aiohttp.ClientSession, n: int, headers: dict[str, str] | None = None
) -> list[Routed]:
    """`n` completions, 8 at a time; every one must succeed."""
    gate = asyncio.Semaphore(8)
    body = {"model": MODEL, "prompt": "revision rollout " * 20, "max_tokens": 2}

    async def one() -> Routed:
        async with gate, http.post(f"{stack.url}/v1/completions", json=body, headers=headers or {}) as resp:
            assert resp.status == 200, await resp.text()
            await resp.read()
            return Routed(stack, resp.headers)

    return list(await asyncio.gather(*(one() for _ in range(n))))


async def prefills(stack: RolloutStack, http: aiohttp.ClientSession) -> dict[str, float]:
    """Requests each prefill pod has completed (its own counter, not the EPP's account)."""
    out = {}
    for pod in stack.pods_with_role("prefill"):
        out[pod.name] = total(await scrape(http, f"{pod.url}/metrics"), "vllm:request_success_total")
    return out


async def test_no_request_mixes_revisions_and_the_share_follows_the_pod_weights(
    stack: RolloutStack, http: aiohttp.ClientSession
) -> None:
    await use_config(stack, CONFIG.replace("__MODE__", "sum"))
    epp = await scrape(http, stack.metrics_url)
    gauge = "llm_d_epp_disaggregatedset_revision_gating_share"
    assert total(epp, gauge, revision="A", mode="sum", plugin_name="rollout-screener") == pytest.approx(5 / 7)
    assert total(epp, gauge, revision="B", mode="sum", plugin_type="disaggregatedset-rollout-screener") == (
        pytest.approx(2 / 7)
    )
    # The window is discriminating: an ungated pool lands outside it.
    assert abs(UNGATED_B - SHARE_B) > TOLERANCE + 0.1

    before = await prefills(stack, http)
    routed = await send(stack, http, REQUESTS)
    mixed = [(r.prefill_pod, r.decode_pod) for r in routed if r.prefill != r.decode]
    assert not mixed
    for r in routed:
        assert r.served_by == r.decode_pod  # Envoy went where the EPP said
        assert r.stamped == r.decode  # the reference's response header: the served endpoint's revision
    share_b = sum(r.decode == "B" for r in routed) / REQUESTS
    assert abs(share_b - SHARE_B) <= TOLERANCE, (share_b, SHARE_B, TOLERANCE)

    # The pods' own counts agree: every request ran its prefill on a pod of its decode's revision.
    after = await prefills(stack, http)
    ran = {name: after[name] - before[name] for name in after}
    assert sum(ran.values()) == REQUESTS
    expected = Counter(r.prefill_pod for r in routed)
    assert ran == {name: float(expected[name]) for name in ran}
    assert ran["prefill-4"] == sum(r.decode == "B" for r in routed)


async def test_strict_revision_header_pins_and_unknown_revision_fails_closed(
    stack: RolloutStack, http: aiohttp.ClientSession
) -> None:
    await use_config(stack, CONFIG.replace("__MODE__", "sum"))
    for r in await send(stack, http, 24, {"x-disagg-revision": "B"}):
        assert (r.prefill_pod, r.decode_pod, r.stamped) == ("prefill-4", "decode-1", "B")
    for r in await send(stack, http, 24, {"x-disagg-revision": "A"}):
        assert r.prefill == r.decode == r.stamped == "A"

    counter = "llm_d_epp_disaggregatedset_strict_header_no_match_total"
    before = total(await scrape(http, stack.metrics_url), counter, selector="revision")
    body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
    async with http.post(f"{stack.url}/v1/completions", json=body, headers={"x-disagg-revision": "C"}) as resp:
        assert resp.status == 503, await resp.text()
    assert total(await scrape(http, stack.metrics_url), counter, selector="revision") == before + 1


async def test_control_without_gating_revisions_mix_and_the_share_leaves_the_window(
    stack: RolloutStack, http: aiohttp.ClientSession
) -> None:
    """The same pool and requests with `mode: disabled`: what the first test would see if gating did
    nothing (the EPP is restarted on the changed config)."""
    await use_config(stack, CONFIG.replace("__MODE__", "disabled"))
    routed = await send(stack, http, 300)
    assert sum(r.prefill != r.decode for r in routed) > 90  # ≈ 1/2 · 4/5 + 1/2 · 1/5 = 1/2 mixed
    share_b = sum(r.decode == "B" for r in routed) / len(routed)
    assert abs(share_b - SHARE_B) > TOLERANCE, share_b


async def test_newer_config_shape_on_the_same_pool(stack: RolloutStack, http: aiohttp.ClientSession) -> None:
    """The newer reference's config: one revision per request, its own header stamped and obeyed, its
    own no-match counter, and requests sharing `x-llm-d-revision-decision-id` on one revision."""
    await use_config(stack, NEWER_CONFIG)
    epp = await scrape(http, stack.metrics_url)
    gauge = "llm_d_epp_disaggregatedset_revision_gating_share"
    assert total(epp, gauge, revision="B", mode="sum") == pytest.approx(2 / 7)
    routed = await send(stack, http, 64)
    pinned = await send(stack, http, 16, {NEWER_HEADER: "B"})
    ignored = await send(stack, http, 8, {"x-disagg-revision": "C"})  # the older shape's header: not read
    # 24 requests all on one revision without coordination: (5/7)^24 + (2/7)^24 ≈ 3e-4.
    decided = await send(stack, http, 24, {"x-llm-d-revision-decision-id": "one-logical-request"})
    counter = "llm_d_epp_disaggregatedset_strict_revision_no_match_total"
    before = total(await scrape(http, stack.metrics_url), counter, plugin_name="rollout-screener")
    body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
    async with http.post(f"{stack.url}/v1/completions", json=body, headers={NEWER_HEADER: "C"}) as resp:
        assert resp.status == 503, await resp.text()
    after = total(await scrape(http, stack.metrics_url), counter, plugin_name="rollout-screener")
    for r in routed + ignored + decided:
        assert r.prefill == r.decode == r.stamped_newer and r.served_by == r.decode_pod
        assert r.stamped is None
    assert {r.decode for r in routed} == {"A", "B"}
    for r in pinned:
        assert (r.prefill_pod, r.decode_pod, r.stamped_newer) == ("prefill-4", "decode-1", "B")
    assert len({r.decode for r in decided}) == 1
    assert after == before + 1
