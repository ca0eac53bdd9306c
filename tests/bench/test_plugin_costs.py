"""benchmarks.plugin_costs runs end to end on a small pool (its numbers are `benchmarks/PLUGINS.md`'s, not asserted)."""

from __future__ import annotations

import pytest

from benchmarks.plugin_costs import INDEX_CAPACITY, approx_index_memory, markdown, parser_costs, plugin_costs


def test_every_plugin_is_measured_and_the_report_renders() -> None:
    costs = plugin_costs(4)
    assert len(costs) > 20 and all(us > 0 for _, us in costs)
    memory = approx_index_memory((2,))
    ((n, per_entry, per_endpoint),) = memory
    # Two endpoints holding INDEX_CAPACITY distinct blocks each: a bitmask index costs ~130-160 B per entry;
    # the set-per-hash one it replaced cost ~350.
    assert n == 2 and 50 < per_entry < 250, per_entry
    assert per_endpoint == pytest.approx(per_entry * INDEX_CAPACITY / 1e6)
    base = {4: {"p50_us": 1.0, "p99_us": 2.0, "mean_us": 1.5}}
    parsers = parser_costs()
    assert {name.split(",")[0] for name, _ in parsers} >= {"openai-parser", "vllmgrpc-parser", "vertexai-parser"}
    assert all(us > 0 for _, us in parsers)
    text = markdown([4], {4: costs}, base, "cmd", memory, parsers)
    assert "## Approximate prefix index memory" in text and "| 2 |" in text
    assert "## Request parsers" in text and "| vllmgrpc-parser, Generate 100k token ids |" in text
