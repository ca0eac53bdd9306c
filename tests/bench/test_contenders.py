"""What a routing results file records about each contender and the source, so a run can be repeated exactly."""

from __future__ import annotations

import hashlib
import json
import re

from benchmarks.contenders import EppBehindEnvoy, EppReplicasBehindEnvoy, EvictionSpec, WithEviction, all_contenders
from benchmarks.routing import REPO, source_commit


def test_every_contender_records_a_json_setup_that_names_what_it_ran() -> None:
    setups = {c.name: c.setup() for c in all_contenders()}
    assert json.loads(json.dumps(setups)) == setups
    assert setups["envoy-round-robin"] == {"lb_policy": "ROUND_ROBIN"}
    epp = next(c for c in all_contenders() if c.name == "epp-default")
    assert isinstance(epp, EppBehindEnvoy)
    assert setups["epp-default"]["config"] == epp.config_text
    assert setups["epp-default"]["config_sha256"] == hashlib.sha256(epp.config_text.encode()).hexdigest()[:16]
    assert setups["epp-default"]["config_sha256"] != setups["epp-optimized-baseline"]["config_sha256"]
    smg = setups["smg-cache-aware"]
    assert smg["program"] == "smg" and "cache_aware" in smg["args"]
    assert smg["version"] is None or re.fullmatch(r"\d+(\.\d+)+.*", smg["version"])


def test_wrappers_add_what_they_change() -> None:
    replicas = EppReplicasBehindEnvoy("two", "plugins: []\n", "two replicas", replicas=2)
    evicting = WithEviction(replicas, EvictionSpec(fraction=0.3), 4.0, "evict", "evicting")
    setup = evicting.setup()
    assert setup["replicas"] == 2 and setup["config"] == "plugins: []\n"
    assert setup["eviction"]["fraction"] == 0.3 and setup["eviction"]["pod"] == 0


def test_the_source_commit_is_recorded_with_uncommitted_changes_marked() -> None:
    commit = source_commit()
    if (REPO / ".git").exists():
        assert commit is not None and re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", commit)
    else:
        assert commit is None
