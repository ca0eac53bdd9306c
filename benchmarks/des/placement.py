"""How much group placement can decide the shared-prefix benchmark's light stages, in simulated time.

    .venv/bin/python -m benchmarks.des.placement [--seeds 1-12] [--quotas 18,18,18,21 17,17,17,24]
                                                 [--unpack-stage N] [--json P]

The live shared-prefix ladder (``benchmarks.des.precise``'s set-up: 4 pods, 75 groups, KV sized so the ideal
prompt footprint is 73% of the cluster's) with the built-in default profile, and the same profile with an
oracle added that places each new prefix group by a fixed quota of groups per pod (weight 100 on a group's
first, cold request only; every later request is the profile's own decision). Counting the answers' blocks,
which vLLM caches too, a group takes 68 blocks of a pod's 1,233: 18 groups fit, 19 do not, so the default's
even placement (18/19/19/19) leaves three pods over the edge, where the prompt list's fixed cycle is LRU's
worst case. A quota such as 18/18/18/21 piles the overflow onto one pod instead. The table shows what that
buys at light load and what the overloaded pod costs when load decides; the per-pod table shows the
over-edge pods' thrash (share of requests that hit their whole prompt) by stage. With ``--unpack-stage N``
each quota also runs packed-then-unpacked: from the first request of stage N (1 = the first after the
warm-up, whose cycle has placed every group) each group a pod holds beyond the fit (18) goes to a pod at or
under it, one group per pod, paying its full prefill there — the best case of a policy that packs while
load is light and spreads when it rises.

The oracle is a measuring device, not a policy: it knows the group count and the per-pod fit in advance.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
import yaml

from benchmarks.des.precise import live_schedule, options, seed_list
from benchmarks.des.sim import SimResult, simulate
from benchmarks.precise_routing import PROFILES, SCENARIOS
from benchmarks.workloads import FULL_RATES, Scale
from llmepp.datalayer.endpoint import Endpoint
from llmepp.framework.datakeys import PREFIX_CACHE_MATCH_INFO, PrefixMatchInfo
from llmepp.framework.plugin import PluginContext, PluginParams, registry
from llmepp.framework.scheduling import Scorer
from llmepp.request.types import InferenceRequest

QUOTA_WEIGHT = 100
FIT = 18  # groups a pod's KV holds, answers included (module docstring)


class GroupQuotaScorer(Scorer):
    """A new prefix group (no candidate holds its first block, seen for the first time) gets 1.0 on the
    endpoint with the fewest groups among those under their quota (endpoints in address order, quota i
    for the i-th), 0 elsewhere; every other request 0.5 everywhere (no say). From request number
    `unpackFrom` on (0: never), every request of a group beyond its pod's first FIT gets 1.0 on the pod it
    was moved to (pods at or under FIT in address order, one moved group each), 0 elsewhere."""

    type = "des-group-quota-scorer"
    consumes = frozenset({PREFIX_CACHE_MATCH_INFO})

    class Params(PluginParams):
        quotas: list[int]
        unpack_from: int = msgspec.field(default=0, name="unpackFrom")

    def __init__(self, name: str, params: Params) -> None:
        super().__init__(name, params)
        self.quotas = params.quotas
        self.unpack_from = params.unpack_from
        self.placed: dict[str, list[int]] = {}  # endpoint address -> first block hash of its groups, in order
        self.seen: set[int] = set()
        self.moved: dict[int, str] | None = None  # group -> its new endpoint, once unpacked
        self.key = ""

    def setup(self, ctx: PluginContext) -> None:
        self.key = ctx.producer_key(self, PREFIX_CACHE_MATCH_INFO, "", "prefixMatchInfoProducerName")

    def score(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        info: PrefixMatchInfo | None = request.data.get(self.key)
        no_say = [0.5] * len(endpoints)
        if info is None or not info.hashes:
            return no_say
        group = info.hashes[0]
        if 0 < self.unpack_from <= int(request.request_id):
            if self.moved is None:
                self.moved = self._unpack()
            target = self.moved.get(group)
        elif info.hits or group in self.seen:
            return no_say
        else:
            target = self._place(group, sorted(e.address for e in endpoints))
        if target is None:
            return no_say
        return [1.0 if e.address == target else 0.0 for e in endpoints]

    def _place(self, group: int, addresses: list[str]) -> str | None:
        groups = [len(self.placed.get(a, ())) for a in addresses]
        open_ = [i for i, a in enumerate(addresses) if groups[i] < self.quotas[i % len(self.quotas)]]
        if not open_:
            return None
        target = addresses[min(open_, key=lambda i: (groups[i], i))]
        self.placed.setdefault(target, []).append(group)
        self.seen.add(group)
        return target

    def _unpack(self) -> dict[int, str]:
        under = [a for a, groups in sorted(self.placed.items()) if len(groups) <= FIT]
        extra = [g for _, groups in sorted(self.placed.items()) for g in groups[FIT:]]
        return dict(zip(extra, under))


def _config(base: str, quotas: Sequence[int] | None, unpack_from: int = 0) -> str:
    if quotas is None:
        return base
    doc = yaml.safe_load(base)
    params: dict[str, Any] = {"quotas": list(quotas), "unpackFrom": unpack_from}
    doc["plugins"].append({"type": GroupQuotaScorer.type, "parameters": params})
    doc["schedulingProfiles"][0]["plugins"].append({"pluginRef": GroupQuotaScorer.type, "weight": QUOTA_WEIGHT})
    return yaml.safe_dump(doc, sort_keys=False)


def _per_pod(res: SimResult, block_size: int) -> dict[str, Any]:
    """Groups homed per pod, and per stage the full-prompt hits / requests of pods by their group count."""
    workload = res.schedule.workload
    homes: dict[int, Counter[int]] = {}
    for r in res.records:
        if r.pod >= 0:
            homes.setdefault(workload.prompt(r.index).group, Counter())[r.pod] += 1
    main = {g: c.most_common(1)[0][0] for g, c in homes.items()}
    per_pod = Counter(main.values())
    by_stage: list[list[int]] = []  # per stage: groups per pod, each group on the pod that served most of it then
    for stage in range(len(res.schedule.stages)):
        homes_now: dict[int, Counter[int]] = {}
        for r in res.records:
            if r.stage == stage and r.pod >= 0:
                homes_now.setdefault(workload.prompt(r.index).group, Counter())[r.pod] += 1
        counts = Counter(c.most_common(1)[0][0] for c in homes_now.values())
        by_stage.append([counts[p] for p in range(res.options.pods)])
    stages: list[dict[str, list[int]]] = []
    for stage in range(len(res.schedule.stages)):
        by_count: dict[str, list[int]] = {}
        for r in res.records:
            if r.stage != stage or r.ttft is None or r.pod < 0:
                continue
            cell = by_count.setdefault(str(per_pod[r.pod]), [0, 0])
            cell[0] += r.cached_tokens >= r.prompt_tokens // block_size * block_size
            cell[1] += 1
        stages.append(by_count)
    return {
        "groups_per_pod": [per_pod[p] for p in range(res.options.pods)],
        "groups_per_pod_by_stage": by_stage,
        "full_hits_by_group_count": stages,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.des.placement", description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=seed_list, default=list(range(1, 13)), help="e.g. 1-12 or 1,3")
    p.add_argument("--quotas", nargs="*", default=["18,18,18,21", "17,17,17,24"], help="groups per pod: 18,18,18,21")
    p.add_argument("--unpack-stage", type=int, default=None, help="also run each quota unpacked at this stage")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    if a.unpack_stage is not None and not 1 <= a.unpack_stage <= len(FULL_RATES):
        p.error(f"--unpack-stage must be a stage after the warm-up: 1 to {len(FULL_RATES)}")
    registry.register(GroupQuotaScorer)
    seeds: list[int] = a.seeds
    scale = Scale()
    base = PROFILES["default"]["approx"]
    qps = [r / 2 for r in FULL_RATES]
    variants: dict[str, tuple[list[int] | None, int | None]] = {"default": (None, None)}
    for q in a.quotas:
        variants[f"quota {q}"] = ([int(x) for x in q.split(",")], None)
        if a.unpack_stage is not None:
            at = f"{qps[a.unpack_stage - 1]:g} QPS"
            variants[f"quota {q}, unpacked at {at}"] = ([int(x) for x in q.split(",")], a.unpack_stage)
    runs: list[dict[str, Any]] = []
    for seed in seeds:
        sched, kv_blocks = live_schedule(scale, seed, FULL_RATES)
        for name, (quotas, unpack_stage) in variants.items():
            opts = options(scale, kv_blocks, base.read_text(), SCENARIOS[0], seed)
            unpack_from = 0
            if unpack_stage is not None:
                unpack_from = next(x.index for x in sched.arrivals if x.stage >= unpack_stage)
            opts.epp_config = _config(opts.epp_config or "", quotas, unpack_from)
            res = simulate(sched, opts)
            stages = [s for s in res.stages() if not s["warmup"]]
            runs.append({"seed": seed, "variant": name, "stages": stages, **_per_pod(res, scale.block_size)})
            print(f"seed {seed:2} {name:40} groups/pod {runs[-1]['groups_per_pod']}", flush=True)
    print(f"\nmedian over {len(seeds)} seeds: TTFT p90 s / hit rate per stage (QPS {', '.join(f'{q:g}' for q in qps)})")
    for name in variants:
        mine = [r for r in runs if r["variant"] == name]
        cells = []
        for k in range(len(qps)):
            ttft = statistics.median(r["stages"][k]["ttft_p90_s"] for r in mine)
            hit = statistics.median(r["stages"][k]["prefix_hit_rate"] for r in mine)
            cells.append(f"{ttft:6.2f}/{hit:4.2f}")
        print(f"  {name:40} " + "  ".join(cells))
    print("\nshare of requests hitting their whole prompt, by the pod's group count (all seeds; stage 0 = warm-up)")
    for name in variants:
        mine = [r for r in runs if r["variant"] == name]
        counts = sorted({c for r in mine for st in r["full_hits_by_group_count"] for c in st}, key=int)
        for c in counts:
            row = []
            for k in range(len(mine[0]["full_hits_by_group_count"])):
                hit, n = (sum(r["full_hits_by_group_count"][k].get(c, [0, 0])[i] for r in mine) for i in (0, 1))
                row.append(f"{hit / n:4.0%} of {n:4}" if n else "     -     ")
            print(f"  {name:40} {c:>2} groups: " + "  ".join(row))
    if a.json:
        a.json.write_text(json.dumps({"argv": argv, "seeds": seeds, "qps": qps, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
