"""Targeted reader for the Prometheus text exposition format (model-server /metrics pages).

A vLLM page is 20-100 KB, almost all histogram buckets the EPP never reads. Instead of
parsing every line, a `Selector` (compiled once from a spec like
`nv_trt_llm_request_metrics{request_type=waiting}`) finds its own lines with
`bytes.find` (C speed) and parses only those.

The text format requires all lines of a metric family to form one group after its
`# HELP` / `# TYPE` lines, so once the first sample line is found the group ends at the
next `# HELP` / `# TYPE` line; the rest of the page is never scanned. A page that splits a
family into two groups (invalid) yields only the first group.

Scraping the same server again, `Selector.locate(page, hint)` starts from where the metric
was last time (a server's pages keep their layout), so a lookup usually scans a few KB
instead of the page; EngineMapping keeps those hints per endpoint.

Everything that can go wrong with a page raises a `PromTextError` subclass; nothing else
escapes (property-tested with random bytes).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from types import MappingProxyType

__all__ = [
    "HINT_WINDOW",
    "InvalidSpec",
    "MalformedSeries",
    "MetricNotFound",
    "PromTextError",
    "Selector",
    "Series",
    "finite_value",
    "group_end",
    "largest_of",
    "latest_of",
]


class PromTextError(Exception):
    """A page could not provide a requested value. Counted as an extraction error, never fatal."""


class MetricNotFound(PromTextError):
    """No sample line matches the selector (family absent, or no series with the labels)."""


class MalformedSeries(PromTextError):
    """A sample line of the requested metric does not follow the text format."""


class InvalidSpec(ValueError):
    """A metric spec from the configuration is not `name` or `name{label=value,...}`."""


class Series:
    """One sample line: labels (parsed on first access), value and optional timestamp (ms)."""

    __slots__ = ("_block", "_labels", "timestamp_ms", "value")

    def __init__(self, block: bytes, value: float, timestamp_ms: int | None = None) -> None:
        self._block = block  # validated label text between the braces
        self._labels: Mapping[str, str] | None = None if block else _EMPTY
        self.value = value
        self.timestamp_ms = timestamp_ms

    @property
    def labels(self) -> Mapping[str, str]:
        """Label name -> unescaped value. Raises MalformedSeries if a value is not UTF-8."""
        if self._labels is None:
            try:
                text = self._block.decode()
            except UnicodeDecodeError:
                raise MalformedSeries("label value is not UTF-8") from None
            pairs = _LABEL_PAIRS.findall(text)
            labels = {k: (_STR_ESCAPE.sub(_unescape_str, v) if "\\" in v else v) for k, v in pairs}
            if len(labels) != len(pairs):  # which one would be meant? The reference's parser refuses it too
                raise MalformedSeries(f"duplicate label name in {text[:80]!r}")
            self._labels = labels
        return self._labels

    def __repr__(self) -> str:
        return f"Series({dict(self.labels)!r}, {self.value!r}, {self.timestamp_ms!r})"


_EMPTY: Mapping[str, str] = MappingProxyType({})

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = r"[a-zA-Z_][a-zA-Z0-9_]*"
# Unrolled `"(?:[^"\\]|\\.)*"`: twice as fast in `re`, which loops over a plain class quickly.
_LABEL_VALUE = r'"([^"\\]*(?:\\.[^"\\]*)*)"'
_PAIR = r"[ \t]*" + _LABEL_NAME + r"[ \t]*=[ \t]*" + _LABEL_VALUE.replace("(", "(?:", 1)
# The whole text between a sample's braces: pairs separated by commas, trailing comma allowed. Each run of
# blanks is matched by one quantifier only: a pair's trailing blanks and the block's last ones overlapping
# made a pod's `{a="b"<N blanks>x}` backtrack in O(N^2) (2 s of event loop per scrape at 32 KB).
_LABEL_BLOCK = re.compile(("(?:" + _PAIR + r"[ \t]*,)*(?:" + _PAIR + ")?[ \t]*").encode())
_LABEL_PAIRS = re.compile(r"(" + _LABEL_NAME + r")[ \t]*=[ \t]*" + _LABEL_VALUE)
# One matcher of a spec: quoted or bare value (the reference accepts both).
_SPEC_PAIR = re.compile(r"\s*(" + _LABEL_NAME + r')\s*(=~|!=|!~|=)\s*(?:"((?:[^"\\]|\\.)*)"|([^",}\s]+))\s*([,}])')
_STR_ESCAPE = re.compile(r"\\(.)")
# Bytes that can follow a metric name on its sample line (line ends: a bare name, malformed).
_NAME_END = frozenset(b" \t{\r\n")
# How far before its previous offset a metric is searched for first (see Selector.locate).
HINT_WINDOW = 4096


def _unescape_str(m: re.Match[str]) -> str:
    c = m.group(1)
    return "\n" if c == "n" else c if c in '\\"' else "\\" + c


def _parse_value(tok: bytes) -> float:
    # float() accepts Python-only spellings ("1_000", " 1"); the format does not.
    if b"_" in tok:
        raise MalformedSeries(f"bad sample value {tok[:40]!r}")
    try:
        return float(tok)
    except ValueError:
        raise MalformedSeries(f"bad sample value {tok[:40]!r}") from None


class Selector:
    """A compiled metric spec. Build once (config time); call per scrape."""

    __slots__ = ("_head", "_items", "_needle", "labels", "name", "spec")

    def __init__(self, name: str, labels: Mapping[str, str] | None = None) -> None:
        if not _METRIC_NAME.fullmatch(name):
            raise InvalidSpec(f"invalid metric name {name!r}")
        self.name = name
        self.labels: Mapping[str, str] = MappingProxyType(dict(labels or {}))
        self._items = tuple(self.labels.items())
        self._head = name.encode()
        self._needle = b"\n" + self._head
        inner = ",".join(f'{k}="{v}"' for k, v in self._items)
        self.spec = f"{name}{{{inner}}}" if inner else name

    @classmethod
    def parse(cls, spec: str) -> Selector:
        """`name` or `name{label=value, label2="value 2"}` (PromQL instant-selector subset)."""
        text = spec.strip()
        m = _METRIC_NAME.match(text)
        if m is None:
            raise InvalidSpec(f"metric spec {spec!r}: must start with a metric name")
        name, pos = m.group(), m.end()
        rest = text[pos:].strip()
        if not rest:
            return cls(name)
        if rest[0] != "{" or rest[-1] != "}":
            raise InvalidSpec(f"metric spec {spec!r}: expected `{{label=value,...}}` after the name")
        body = rest[1:]
        labels: dict[str, str] = {}
        i = 0
        if body.strip() == "}":
            return cls(name)
        while i < len(body):
            pm = _SPEC_PAIR.match(body, i)
            if pm is None:
                raise InvalidSpec(f"metric spec {spec!r}: cannot parse labels at {body[i:]!r}")
            key, op, quoted, bare, sep = pm.groups()
            if op != "=":
                raise InvalidSpec(f"metric spec {spec!r}: only `=` label matchers are supported, got {op!r}")
            if key in labels:
                raise InvalidSpec(f"metric spec {spec!r}: label {key!r} given twice")
            labels[key] = _STR_ESCAPE.sub(_unescape_str, quoted) if quoted is not None else bare
            i = pm.end()
            if sep == "}":
                if i != len(body):
                    raise InvalidSpec(f"metric spec {spec!r}: unexpected text after `}}`")
                break
        else:
            raise InvalidSpec(f"metric spec {spec!r}: missing `}}`")
        return cls(name, labels)

    # -- per scrape ----------------------------------------------------------------------
    def locate(self, page: bytes, hint: int = -1) -> int:
        """Offset of this metric's first sample line in `page`, or -1 if it has none.

        `hint` is the offset on the same server's previous page (-1: unknown). A server's
        pages keep their layout, so a search from a little before the hint finds the line
        without scanning the whole page. It is trusted only when a comment line (the
        family's HELP/TYPE) directly precedes it, i.e. it starts the family's group;
        otherwise the whole page is searched.
        """
        if hint >= 0:
            q = self._first_from(page, hint - HINT_WINDOW if hint > HINT_WINDOW else 0)
            if q == 0:
                return 0
            if q > 0 and page[page.rfind(b"\n", 0, q - 1) + 1] == 0x23:  # "#"
                return q
        return self._first_from(page, 0)

    def series_at(self, page: bytes, start: int, end: int = -1) -> list[Series]:
        """The matching sample lines of the group that starts at `start` (from `locate`) and
        ends at `end` (from `group_end`; computed when -1)."""
        if start < 0:
            return []
        if end < 0:
            end = group_end(page, start)
        out: list[Series] = []
        items, needle, n = self._items, self._needle, len(self._head)
        pos = start
        while True:
            nl = page.find(b"\n", pos, end)
            line_end = nl if nl >= 0 else end
            if line_end == pos + n or page[pos + n] in _NAME_END:
                s = _parse_line(page, pos + n, line_end)
                if not items or all(s.labels.get(k) == v for k, v in items):
                    out.append(s)
            if nl < 0:
                return out
            pos = page.find(needle, nl, end)
            if pos < 0:
                return out
            pos += 1

    def series(self, page: bytes) -> list[Series]:
        """All sample lines of this metric whose labels match, in page order."""
        return self.series_at(page, self.locate(page))

    def series_skipping_malformed(self, page: bytes) -> tuple[list[Series], int]:
        """Like `series`, but a malformed sample line (bad labels, value or timestamp, non-UTF-8 label
        text) is skipped and counted instead of failing the lookup: (matching series, lines skipped).

        For families with one series per device (a DCGM exporter's per-GPU gauges), where one bad
        line should not hide the other devices. Not on the scrape hot path (`series_at` is)."""
        start = self.locate(page)
        if start < 0:
            return [], 0
        end = group_end(page, start)
        out: list[Series] = []
        skipped = 0
        items, needle, n = self._items, self._needle, len(self._head)
        pos = start
        while True:
            nl = page.find(b"\n", pos, end)
            line_end = nl if nl >= 0 else end
            if line_end == pos + n or page[pos + n] in _NAME_END:
                try:
                    s = _parse_line(page, pos + n, line_end)
                    labels = s.labels  # parsed here, so a bad label text is skipped, not raised later
                    if all(labels.get(k) == v for k, v in items):
                        out.append(s)
                except MalformedSeries:
                    skipped += 1
            if nl < 0:
                return out, skipped
            pos = page.find(needle, nl, end)
            if pos < 0:
                return out, skipped
            pos += 1

    def latest(self, page: bytes) -> Series:
        """The matching series with the newest timestamp (first one on ties / none)."""
        return latest_of(self, self.series(page))

    def largest(self, page: bytes) -> Series:
        """The matching series with the largest value (info gauges whose value is a creation time)."""
        return largest_of(self, self.series(page))

    def value(self, page: bytes) -> float:
        """The value of `latest`, required to be finite (queue sizes, utilisation)."""
        return finite_value(self, self.series(page))

    def _first_from(self, page: bytes, lo: int) -> int:
        """Offset of the first line at or after `lo` starting with exactly this name, or -1."""
        head = self._head
        n = len(head)
        if lo == 0 and page.startswith(head) and (len(page) == n or page[n] in _NAME_END):
            return 0
        needle, size = self._needle, len(page)
        pos = page.find(needle, lo - 1 if lo > 0 else 0)  # the needle starts with the "\n" before lo
        while pos >= 0:
            pos += 1
            if size == pos + n or page[pos + n] in _NAME_END:
                return pos
            pos = page.find(needle, pos)
        return -1

    def __repr__(self) -> str:
        return f"Selector({self.spec!r})"


def latest_of(sel: Selector, found: list[Series]) -> Series:
    """The series with the newest timestamp (the first on ties or without timestamps)."""
    if not found:
        raise MetricNotFound(f"{sel.spec}: not found")
    best = found[0]
    if len(found) > 1:
        best_ts = best.timestamp_ms or 0
        for s in found[1:]:
            ts = s.timestamp_ms or 0
            if ts > best_ts:
                best, best_ts = s, ts
    return best


def largest_of(sel: Selector, found: list[Series]) -> Series:
    """The series with the largest value (NaN never wins)."""
    if not found:
        raise MetricNotFound(f"{sel.spec}: not found")
    best = found[0]
    for s in found[1:]:
        if s.value > best.value or math.isnan(best.value):
            best = s
    return best


def finite_value(sel: Selector, found: list[Series]) -> float:
    """`latest_of(...).value`, which must be finite (a queue size or utilisation)."""
    v = latest_of(sel, found).value
    if not math.isfinite(v):
        raise MalformedSeries(f"{sel.spec}: non-finite value {v}")
    return v


def group_end(page: bytes, start: int) -> int:
    """Where the family group containing `start` ends: the next HELP/TYPE line, or the page end."""
    pos = start
    while True:
        e = page.find(b"\n# ", pos)
        if e < 0:
            return len(page)
        if page.startswith(b"HELP ", e + 3) or page.startswith(b"TYPE ", e + 3):
            return e
        pos = e + 3


def _parse_line(page: bytes, pos: int, end: int) -> Series:
    """Parse `{labels} value [timestamp]` of one sample line, page[pos:end]."""
    block = b""
    if pos >= end:
        raise MalformedSeries("sample line has no value")
    if page[pos] in b" \t":  # blanks may separate the name from its labels (expfmt accepts `name {a="b"} 1`)
        p = pos + 1
        while p < end and page[p] in b" \t":
            p += 1
        if p < end and page[p] == 0x7B:
            pos = p
    if page[pos] == 0x7B:  # "{"
        # Values and timestamps never contain "}", so the last one on the line closes the labels.
        close = page.rfind(b"}", pos, end)
        if close < 0 or _LABEL_BLOCK.fullmatch(page, pos + 1, close) is None:
            raise MalformedSeries(f"bad labels in {page[pos : min(end, pos + 80)]!r}")
        block = page[pos + 1 : close]
        pos = close + 1
    rest = page[pos:end].split()
    if not rest or len(rest) > 2 or page[pos] not in b" \t":
        raise MalformedSeries(f"bad sample line tail {page[pos:end][:60]!r}")
    value = _parse_value(rest[0])
    ts: int | None = None
    if len(rest) == 2:
        try:
            if b"_" in rest[1]:
                raise ValueError
            ts = int(rest[1])
        except ValueError:
            raise MalformedSeries(f"bad timestamp {rest[1][:40]!r}") from None
    return Series(block, value, ts)
