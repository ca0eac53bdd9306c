"""Per-engine metric mapping: which series of a model server's page feed `EndpointMetrics`.

`EngineSpecs` is the configuration (spec strings, reference names); `EngineMapping`
compiles it once into `Selector`s and turns a scraped page into a new `EndpointMetrics`.
Semantics follow the reference extractor: every configured field is looked up; a field
that is missing or malformed (not finite; negative; a count past int64) keeps its previous
value and is reported; the result carries a fresh `update_time` if at least one field was
read. LoRA info is optional (servers without LoRA don't expose it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from llmepp.datalayer.endpoint import EndpointMetrics
from llmepp.datalayer.promtext import (
    InvalidSpec,
    MalformedSeries,
    PromTextError,
    Selector,
    Series,
    finite_value,
    group_end,
    largest_of,
    latest_of,
)

__all__ = ["ABSENT_RECHECK", "BUILTIN_ENGINES", "EngineMapping", "EngineSpecs", "ExtractionFailed", "PageMemo"]


class ExtractionFailed(PromTextError):
    """One or more configured metrics could not be read from a page; `problems` says which."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class CustomMetricSpec:
    """A scalar metric stored as endpoint attribute `attribute_key`; a missing required one is an
    extraction error, a missing optional one is left out of that scrape's attributes."""

    attribute_key: str
    metric_spec: str
    optional: bool = False


@dataclass(frozen=True, slots=True)
class EngineSpecs:
    """Spec strings (`name` or `name{label=value}`) for one engine; empty = not read."""

    name: str
    queued_requests: str = ""
    running_requests: str = ""
    kv_usage: str = ""
    lora: str = ""
    # Info gauge whose labels carry the block size and block count (vLLM style) ...
    cache_info: str = ""
    cache_block_size_label: str = "block_size"
    cache_num_blocks_label: str = "num_gpu_blocks"
    # ... or plain gauges holding them (SGLang, TensorRT-LLM).
    cache_block_size: str = ""
    cache_num_blocks: str = ""
    custom: tuple[CustomMetricSpec, ...] = ()


# Reference `extractor/metrics/factories.go`. SGLang's cache geometry comes from the
# `page_size` / `num_pages` gauges there (the newer servers dropped `cache_config_info`).
BUILTIN_ENGINES: tuple[EngineSpecs, ...] = (
    EngineSpecs(
        name="vllm",
        queued_requests="vllm:num_requests_waiting",
        running_requests="vllm:num_requests_running",
        kv_usage="vllm:kv_cache_usage_perc",
        lora="vllm:lora_requests_info",
        cache_info="vllm:cache_config_info",
    ),
    EngineSpecs(
        name="sglang",
        queued_requests="sglang:num_queue_reqs",
        running_requests="sglang:num_running_reqs",
        kv_usage="sglang:token_usage",
        # The reference's mapping (older servers: labels of an info gauge) or the newer servers' gauges.
        cache_info="sglang:cache_config_info",
        cache_block_size_label="page_size",
        cache_num_blocks_label="num_pages",
        cache_block_size="sglang:page_size",
        cache_num_blocks="sglang:num_pages",
    ),
    EngineSpecs(
        name="trtllm-serve",
        queued_requests="trtllm_num_requests_waiting",
        running_requests="trtllm_num_requests_running",
        kv_usage="trtllm_kv_cache_utilization",
        cache_block_size="trtllm_kv_cache_tokens_per_block",
        cache_num_blocks="trtllm_kv_cache_max_blocks",
    ),
    EngineSpecs(
        name="triton-tensorrt-llm",
        queued_requests="nv_trt_llm_request_metrics{request_type=waiting}",
        running_requests="nv_trt_llm_request_metrics{request_type=scheduled}",
        kv_usage="nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=fraction}",
        cache_block_size="nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=tokens_per}",
        cache_num_blocks="nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=max}",
    ),
    EngineSpecs(
        name="triton",
        queued_requests="nv_inference_pending_request_count",
        running_requests="nv_inference_exec_count",
    ),
)


# Order of EngineMapping.selectors (and of an endpoint's hint list).
_FIELDS = (
    "queued_requests", "running_requests", "kv_usage", "lora", "cache_info", "cache_block_size", "cache_num_blocks",
)  # fmt: skip
_QUEUED, _RUNNING, _KV, _LORA, _CACHE_INFO, _BLOCK_SIZE, _NUM_BLOCKS = range(len(_FIELDS))
# An optional family (LoRA info) missing from a page is looked for again only on every
# this-many-th page of that server (1 s at 50 ms): an exporter's set of families is fixed
# while it runs, and scanning a whole page for an absent name costs more than the rest.
ABSENT_RECHECK = 20


def _compile(specs: EngineSpecs, field: str) -> Selector | None:
    text: str = getattr(specs, field)
    if not text:
        return None
    try:
        return Selector.parse(text)
    except InvalidSpec as e:
        raise InvalidSpec(f"engine {specs.name!r}: {field}: {e}") from None


# Counts (queue, running, cache geometry, max_lora) are int64 in the reference. A negative one, one past
# int64 or a negative KV usage is a broken exporter, as NaN is: an extraction error, the field keeps its
# previous value. (Downstream, a negative block count became a negative prefix-index LRU capacity, a
# negative queue a load-aware score past its 0.5 cap and a 1 / (1 + q) division by zero.)
_COUNT_END = 2.0**63  # floats below it truncate to at most 2**63 - 1
_MAX_COUNT = 2**63 - 1


def _count(sel: Selector, found: list[Series]) -> int:
    """The latest value as a count: finite, in [0, 2**63) (a fraction is truncated, as the reference)."""
    v = finite_value(sel, found)
    if not 0.0 <= v < _COUNT_END:
        raise MalformedSeries(f"{sel.spec}: value {v} is not a count")
    return int(v)


def _label_int(labels: Mapping[str, str], key: str, default: int) -> int:
    raw = labels.get(key, "")
    if not raw:
        return default
    try:
        n = int(raw)
    except ValueError:
        raise MalformedSeries(f"label {key}={raw[:40]!r} is not an integer") from None
    if not 0 <= n <= _MAX_COUNT:
        raise MalformedSeries(f"label {key}={raw[:40]!r} is not a count")
    return n


def _adapters(csv: str) -> frozenset[str]:
    if not csv:
        return frozenset()
    return frozenset(a for a in (x.strip() for x in csv.split(",")) if a)


class PageMemo:
    """One endpoint's lookup state: per selector, the offset of its lines on the server's last
    page (-1 unknown, < -1 optional family absent: countdown to the next search) and the
    bytes and parse result of its line group."""

    __slots__ = ("groups", "offsets", "series")

    def __init__(self, size: int) -> None:
        self.offsets = [-1] * size
        self.groups: list[bytes | None] = [None] * size
        self.series: list[list[Series]] = [[] for _ in range(size)]


class EngineMapping:
    """Compiled selectors for one engine. Immutable; shared by every endpoint of that engine."""

    __slots__ = ("block_label", "blocks_label", "custom", "geometry_either", "name", "optional", "selectors", "specs")

    def __init__(self, specs: EngineSpecs) -> None:
        """Raises InvalidSpec naming the engine and field."""
        self.specs = specs
        self.name = specs.name
        # Indexed by the _QUEUED.._NUM_BLOCKS constants (None = not configured), then one per custom metric.
        custom: list[Selector] = []
        for i, c in enumerate(specs.custom):
            try:
                custom.append(Selector.parse(c.metric_spec))
            except InvalidSpec as e:
                raise InvalidSpec(f"engine {specs.name!r}: customMetrics[{i}].metricSpec: {e}") from None
        self.selectors: tuple[Selector | None, ...] = (*(_compile(specs, f) for f in _FIELDS), *custom)
        self.custom = tuple((len(_FIELDS) + i, c) for i, c in enumerate(specs.custom))
        # Cache geometry from an info gauge's labels or from plain gauges, whichever the server has
        # (SGLang changed from the first to the second): the info gauge is then optional.
        sels = self.selectors
        self.geometry_either = sels[_CACHE_INFO] is not None and (
            sels[_BLOCK_SIZE] is not None or sels[_NUM_BLOCKS] is not None
        )
        # Families a page may lack without it being an error: looked for again only now and then.
        self.optional = frozenset(
            (_LORA, *((_CACHE_INFO,) if self.geometry_either else ()), *(i for i, c in self.custom if c.optional))
        )
        self.block_label = specs.cache_block_size_label or "block_size"
        self.blocks_label = specs.cache_num_blocks_label or "num_gpu_blocks"

    def new_memo(self) -> PageMemo:
        """Per-endpoint lookup state for `extract`."""
        return PageMemo(len(self.selectors))

    def _find(self, i: int, page: bytes, memo: PageMemo | None) -> list[Series]:
        sel = self.selectors[i]
        assert sel is not None
        if memo is None:
            return sel.series(page)
        h = memo.offsets[i]
        if h < -1:  # optional family absent from recent pages: look again every ABSENT_RECHECK
            memo.offsets[i] = h + 1
            return []
        start = sel.locate(page, h)
        if start < 0:
            # Only an optional family (LoRA info) is skipped for a while: a missing required
            # one is an error, and a garbage page must not delay recognising the next good one.
            memo.offsets[i] = -ABSENT_RECHECK if i in self.optional else -1
            return []
        memo.offsets[i] = start
        end = group_end(page, start)
        group = page[start:end]
        if group == memo.groups[i]:
            return memo.series[i]  # same bytes as last time: same result
        found = sel.series_at(page, start, end)
        memo.groups[i] = group
        memo.series[i] = found
        return found

    def extract(
        self, page: bytes, previous: EndpointMetrics, now: float, memo: PageMemo | None = None
    ) -> tuple[EndpointMetrics | None, ExtractionFailed | None]:
        """New metrics from `page` (None if nothing could be read) and what went wrong, if anything.

        `memo` (from `new_memo`, one per endpoint) remembers where each metric was on that
        server's previous page and what its lines parsed to, so most lookups scan a few KB
        and unchanged lines (cache_config_info: ~30 labels, constant) are not re-parsed.
        Never raises: every page problem ends up in the returned ExtractionFailed.
        """
        waiting = previous.waiting_queue_size
        running = previous.running_requests_size
        kv = previous.kv_cache_usage_percent
        active = previous.active_models
        waiting_models = previous.waiting_models
        max_active = previous.max_active_models
        block_size = previous.cache_block_size
        num_blocks = previous.cache_num_blocks
        problems: list[str] | None = None
        updated = False
        sels = self.selectors
        # The common path (every metric present and sane) raises nothing; exceptions are
        # only paid for on broken pages.
        if (sel := sels[_QUEUED]) is not None:
            try:
                waiting = _count(sel, self._find(_QUEUED, page, memo))
                updated = True
            except PromTextError as e:
                problems = [f"queued requests: {e}"]
        if (sel := sels[_RUNNING]) is not None:
            try:
                running = _count(sel, self._find(_RUNNING, page, memo))
                updated = True
            except PromTextError as e:
                problems = [*(problems or ()), f"running requests: {e}"]
        if (sel := sels[_KV]) is not None:
            try:
                usage = finite_value(sel, self._find(_KV, page, memo))
                if usage < 0.0:
                    raise MalformedSeries(f"{sel.spec}: value {usage} is not a utilisation")
                kv = usage
                updated = True
            except PromTextError as e:
                problems = [*(problems or ()), f"kv usage: {e}"]
        if (sel := sels[_LORA]) is not None:
            try:  # _find parses the family's lines: a malformed one raises MalformedSeries
                found = self._find(_LORA, page, memo)
                if found:  # absent = LoRA disabled on this server: not an error (reference behaviour)
                    labels = largest_of(sel, found).labels
                    max_active = _label_int(labels, "max_lora", 0)
                    active = _adapters(labels.get("running_lora_adapters", ""))
                    waiting_models = _adapters(labels.get("waiting_lora_adapters", ""))
                    updated = True
            except PromTextError as e:
                problems = [*(problems or ()), f"lora info: {e}"]
        info_read = False
        if (sel := sels[_CACHE_INFO]) is not None:
            try:
                found = self._find(_CACHE_INFO, page, memo)
                if found or not self.geometry_either:  # absent with gauges configured: read those instead
                    labels = latest_of(sel, found).labels
                    block_size = _label_int(labels, self.block_label, 0)
                    num_blocks = _label_int(labels, self.blocks_label, num_blocks)
                    updated = info_read = True
            except PromTextError as e:
                problems = [*(problems or ()), f"cache info: {e}"]
        if (sel := sels[_BLOCK_SIZE]) is not None and not info_read:
            try:
                block_size = _count(sel, self._find(_BLOCK_SIZE, page, memo))
                updated = True
            except PromTextError as e:
                problems = [*(problems or ()), f"cache block size: {e}"]
        if (sel := sels[_NUM_BLOCKS]) is not None and not info_read:
            try:
                num_blocks = _count(sel, self._find(_NUM_BLOCKS, page, memo))
                updated = True
            except PromTextError as e:
                problems = [*(problems or ()), f"cache block count: {e}"]
        attributes = previous.attributes
        if self.custom:
            attributes = dict(attributes)
            for i, c in self.custom:
                try:
                    found = self._find(i, page, memo)
                    if not found and c.optional:
                        attributes.pop(c.attribute_key, None)  # not reported on this scrape
                        continue
                    attributes[c.attribute_key] = finite_value(sels[i], found)  # type: ignore[arg-type]
                    updated = True
                except PromTextError as e:
                    problems = [*(problems or ()), f"custom metric {c.attribute_key}: {e}"]
        error = ExtractionFailed(problems) if problems else None
        if not updated:
            return None, error
        return (
            EndpointMetrics(
                waiting, running, kv, active, waiting_models, max_active, block_size, num_blocks, now, attributes
            ),
            error,
        )

    def __repr__(self) -> str:
        return f"EngineMapping({self.name!r})"
