"""The targeted Prometheus text reader: specs, series lookup, malformed input, hints."""

from __future__ import annotations

import math
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmepp.datalayer.promtext import (
    InvalidSpec,
    MalformedSeries,
    MetricNotFound,
    PromTextError,
    Selector,
    Series,
)

from .vllm_page import vllm_page


def values(found: list[Series]) -> list[float]:
    return [s.value for s in found]


# -- specs --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("spec", "name", "labels"),
    [
        ("vllm:num_requests_waiting", "vllm:num_requests_waiting", {}),
        ("  m  ", "m", {}),
        ("m{}", "m", {}),
        ("nv_trt{request_type=waiting}", "nv_trt", {"request_type": "waiting"}),
        ('m{a="x y", b=z}', "m", {"a": "x y", "b": "z"}),
        (r'm{a="q\"uote\\back\nline"}', "m", {"a": 'q"uote\\back\nline'}),
        ('m{a="comma,brace}"}', "m", {"a": "comma,brace}"}),
    ],
)
def test_spec_parsing(spec: str, name: str, labels: dict[str, str]) -> None:
    sel = Selector.parse(spec)
    assert sel.name == name
    assert dict(sel.labels) == labels


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "must start with a metric name"),
        ("{a=b}", "must start with a metric name"),
        ("9lives", "must start with a metric name"),
        ("m{a!=b}", "only `=` label matchers"),
        ("m{a=~b.*}", "only `=` label matchers"),
        ("m{a=b", "expected `{label=value,...}`"),
        ("m{a=b}x", "expected `{label=value,...}`"),
        ("m{a=b,a=c}", "given twice"),
        ("m{=b}", "cannot parse labels"),
        ("m x", "expected `{label=value,...}`"),
    ],
)
def test_spec_errors_are_precise(spec: str, message: str) -> None:
    with pytest.raises(InvalidSpec, match=message.replace("{", r"\{").replace("}", r"\}").replace("*", r"\*")):
        Selector.parse(spec)


# -- lookup -------------------------------------------------------------------------------
PAGE = b"""# HELP m_by_reason Longer name that shares a prefix.
# TYPE m_by_reason gauge
m_by_reason{reason="a"} 100
# HELP m Test gauge.
# TYPE m gauge
m{engine="0",model="x"} 3
m{engine="1",model="y"} 4.5 1700000000000
# HELP other Something else.
# TYPE other counter
other_total 7
"""


def test_finds_exact_name_not_longer_names() -> None:
    assert values(Selector("m").series(PAGE)) == [3.0, 4.5]
    assert values(Selector("m_by_reason").series(PAGE)) == [100.0]
    assert values(Selector("other_total").series(PAGE)) == [7.0]


def test_label_selection_and_timestamps() -> None:
    found = Selector("m", {"engine": "1"}).series(PAGE)
    assert len(found) == 1
    assert found[0].value == 4.5
    assert found[0].timestamp_ms == 1700000000000
    assert dict(found[0].labels) == {"engine": "1", "model": "y"}
    assert Selector("m", {"engine": "2"}).series(PAGE) == []
    # The newest timestamp wins; a series without one counts as 0.
    assert Selector("m").latest(PAGE).value == 4.5


def test_first_series_wins_without_timestamps() -> None:
    page = b'q{a="1"} 1\nq{a="2"} 2\n'
    assert Selector("q").latest(page).value == 1.0


def test_largest_value_wins_and_nan_never_does() -> None:
    page = b'info{x="old"} NaN\ninfo{x="new"} 20\ninfo{x="mid"} 10\n'
    assert Selector("info").largest(page).labels["x"] == "new"


def test_first_line_no_trailing_newline_crlf_and_whitespace() -> None:
    assert Selector("a").value(b"a 1") == 1.0
    assert Selector("a").value(b'a{x="1"}\t2\r\nb 3\r\n') == 2.0
    assert Selector("b").value(b"a 1\r\nb   3   \r\n") == 3.0
    assert Selector("a").value(b'a{x="1",} 5\n') == 5.0  # trailing comma is legal
    assert Selector("a").value(b"a{} 6\n") == 6.0
    assert Selector("a").value(b'a{ x = "1" , y="2" } 7\n') == 7.0
    assert Selector("a").value(b'a {x="1"} 8\n') == 8.0  # blanks before the labels (Prometheus' expfmt)
    assert Selector.parse("a{x=1}").value(b'a\t {x="1"} 9\n') == 9.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [(b"NaN", math.nan), (b"+Inf", math.inf), (b"-Inf", -math.inf), (b"1e3", 1000.0), (b"-0.5", -0.5)],
)
def test_special_values(text: bytes, expected: float) -> None:
    v = Selector("g").latest(b"g " + text + b"\n").value
    assert (math.isnan(v) and math.isnan(expected)) or v == expected


def test_value_requires_finite() -> None:
    with pytest.raises(MalformedSeries, match="non-finite"):
        Selector("g").value(b"g NaN\n")
    with pytest.raises(MalformedSeries, match="non-finite"):
        Selector("g").value(b"g +Inf\n")


def test_escaped_label_values() -> None:
    page = b'g{path="C:\\\\dir",quote="say \\"hi\\"",nl="a\\nb",brace="}"} 1\n'
    labels = Selector("g").latest(page).labels
    assert labels == {"path": "C:\\dir", "quote": 'say "hi"', "nl": "a\nb", "brace": "}"}
    assert Selector("g", {"quote": 'say "hi"'}).value(page) == 1.0


def test_help_and_type_lines_are_not_samples() -> None:
    page = b"# HELP g g 5\n# TYPE g gauge\n# g 6\ng 7\n"
    assert values(Selector("g").series(page)) == [7.0]


def test_family_group_ends_at_next_help_or_type() -> None:
    # The format requires one group per family; a second group is not read.
    page = b"# TYPE g gauge\ng 1\n# TYPE h gauge\nh 2\ng 3\n"
    assert values(Selector("g").series(page)) == [1.0]
    # Plain comments inside a group do not end it.
    assert values(Selector("g").series(b"g 1\n# note\ng 2\n")) == [1.0, 2.0]


def test_missing_metric() -> None:
    with pytest.raises(MetricNotFound, match="vllm:nope: not found"):
        Selector("vllm:nope").value(vllm_page())
    with pytest.raises(MetricNotFound):
        Selector("m", {"engine": "9"}).latest(PAGE)


@pytest.mark.parametrize(
    "line",
    [
        b"g 1.2.3",
        b"g",
        b"g ",
        b"g 1 2 3",
        b"g 1_000",
        b"g 1 12_3",
        b"g 1 1.5",
        b'g{a="unterminated} 1',
        b"g{a=bare} 1",
        b'g{a="x"}1',
        b'g{a="x" b="y"} 1',
        b'g{9a="x"} 1',
        b'g{a="x"',
        b'g{a="\xff\xfe"} 1',
        b"g{} abc",
    ],
)
def test_malformed_lines_raise_malformed_series(line: bytes) -> None:
    with pytest.raises(MalformedSeries):
        s = Selector("g").latest(b"# TYPE g gauge\n" + line + b"\n")
        s.labels  # noqa: B018 - labels are decoded on first access


def test_realistic_vllm_page() -> None:
    page = vllm_page(waiting=7, running=21, kv_usage=0.25, running_adapters="a,b")
    assert Selector("vllm:num_requests_waiting").value(page) == 7
    assert Selector("vllm:num_requests_running").value(page) == 21
    assert Selector("vllm:kv_cache_usage_perc").value(page) == 0.25
    assert Selector("vllm:cache_config_info").latest(page).labels["num_gpu_blocks"] == "74272"
    assert Selector("vllm:request_success_total", {"finished_reason": "length"}).value(page) == 4321.0
    assert values(Selector("vllm:request_success_total").series(page)) == [4321.0] * 4


# -- hints --------------------------------------------------------------------------------
def test_locate_with_hint_matches_full_search_when_layout_shifts() -> None:
    a = vllm_page(waiting=1, running=2)
    b = vllm_page(waiting=123456, running=987654321, model="some/much-longer-model-name-than-before")
    for name in ("vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "vllm:cache_config_info"):
        sel = Selector(name)
        hint = sel.locate(a)
        assert hint > 0
        assert sel.locate(b, hint) == sel.locate(b)
        assert sel.locate(b, 0) == sel.locate(b)
        assert sel.locate(b, len(b) + 10_000) == sel.locate(b)


def test_locate_hint_inside_a_group_falls_back_to_the_group_start() -> None:
    page = b'# TYPE g gauge\ng{a="1"} 1\ng{a="2"} 2\ng{a="3"} 3\n'
    sel = Selector("g")
    second = page.index(b'g{a="2"}')
    start = sel.locate(page)
    assert sel.locate(page, second) == start
    assert values(sel.series_at(page, sel.locate(page, second))) == [1.0, 2.0, 3.0]


def test_locate_absent() -> None:
    assert Selector("zzz").locate(PAGE) == -1
    assert Selector("zzz").locate(PAGE, 40) == -1
    assert Selector("zzz").series_at(PAGE, -1) == []


# -- property tests -----------------------------------------------------------------------
_LOWER = "abcdefghijklmnopqrstuvwxyz"
metric_names = st.builds(
    lambda a, b: a + b, st.sampled_from("abcm"), st.text(alphabet=_LOWER[:6] + "0_:", max_size=10)
)  # few letters, so names often share prefixes (the case that matters)
label_names = st.builds(lambda a, b: a + b, st.sampled_from("_aBz"), st.text(alphabet="abcXYZ019_", max_size=6))
label_values = st.text(max_size=12)
sample_values = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(10**12), max_value=10**12).map(float),
)
timestamps = st.one_of(st.none(), st.integers(min_value=-(2**40), max_value=2**40))
space = st.sampled_from([" ", "\t", "  "])


def escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_value(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(v)


@st.composite
def series_lists(draw: st.DrawFn) -> list[tuple[dict[str, str], float, int | None, str]]:
    n = draw(st.integers(min_value=1, max_value=4))
    out = []
    for _ in range(n):
        labels = draw(st.dictionaries(label_names, label_values, max_size=4))
        out.append((labels, draw(sample_values), draw(timestamps), draw(space)))
    return out


@st.composite
def pages(draw: st.DrawFn) -> tuple[bytes, dict[str, list[tuple[dict[str, str], float, int | None, str]]]]:
    names = draw(st.lists(metric_names, min_size=1, max_size=6, unique=True))
    families = {name: draw(series_lists()) for name in names}
    lines: list[str] = []
    for name, series in families.items():
        if draw(st.booleans()):
            lines.append(f"# HELP {name} {escape(draw(st.text(max_size=20)))}")
        lines.append(f"# TYPE {name} {draw(st.sampled_from(['gauge', 'counter', 'untyped']))}")
        for labels, value, ts, sep in series:
            body = ",".join(f'{k}="{escape(v)}"' for k, v in labels.items())
            text = name + (f"{{{body}}}" if body or draw(st.booleans()) else "") + sep + render_value(value)
            if ts is not None:
                text += f" {ts}"
            lines.append(text)
        noise = st.sampled_from(["", "# just a comment", "#", "# EOF-ish note"])
        lines.extend(draw(noise) for _ in range(draw(st.integers(min_value=0, max_value=2))))
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    return (newline.join(lines) + draw(st.sampled_from(["", newline]))).encode(), families


Expected = list[tuple[dict[str, str], float, int | None, str]]
Generated = tuple[bytes, dict[str, Expected]]


def same(found: list[Series], expected: Expected) -> bool:
    if len(found) != len(expected):
        return False
    for s, (labels, value, ts, _) in zip(found, expected):
        if dict(s.labels) != labels or s.timestamp_ms != ts:
            return False
        if not (s.value == value or (math.isnan(s.value) and math.isnan(value))):
            return False
    return True


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pages())
def test_round_trip_every_family(generated: Generated) -> None:
    page, families = generated
    for name, expected in families.items():
        sel = Selector(name)
        assert same(sel.series(page), expected)
        # A label filter taken from one of the series selects exactly the matching ones.
        for labels, *_ in expected:
            for k, v in list(labels.items())[:1]:
                want = [e for e in expected if e[0].get(k) == v]
                assert same(Selector(name, {k: v}).series(page), want)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pages(), pages())
def test_hints_from_another_page_never_change_results(a: Generated, b: Generated) -> None:
    for name in [*a[1], *b[1]]:
        sel = Selector(name)
        hint = sel.locate(a[0])
        assert sel.locate(b[0], hint) == sel.locate(b[0])


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400), st.sampled_from(["g", "vllm:num_requests_waiting", "a_b:c"]))
def test_random_bytes_raise_only_promtext_errors(data: bytes, name: str) -> None:
    sel = Selector(name)
    for page in (data, name.encode() + data, b"junk\n" + name.encode() + data + b"\n" + name.encode() + data):
        try:
            for s in sel.series(page):
                _ = s.labels
            sel.latest(page)
            sel.largest(page)
            sel.value(page)
        except PromTextError:
            pass


@settings(max_examples=100, deadline=None)
@given(
    st.dictionaries(label_names, label_values, min_size=1, max_size=3),
    st.data(),
)
def test_a_label_name_given_twice_is_malformed_not_resolved(labels: dict[str, str], data: st.DataObject) -> None:
    # `m{request_type="waiting",request_type="scheduled"} 5` read as {request_type: scheduled}: the
    # last duplicate won, so a `{request_type=scheduled}` selector took the value of an invalid series
    # the reference's parser rejects. It is a malformed line: an error, or a counted skip.
    name = data.draw(st.sampled_from(sorted(labels)))
    other = data.draw(label_values)
    pairs = [*(f'{k}="{escape(v)}"' for k, v in labels.items()), f'{name}="{escape(other)}"']
    pairs = data.draw(st.permutations(pairs))
    page = f'# TYPE m gauge\nm{{{",".join(pairs)}}} 5\nm{{ok="1"}} 7\n'.encode()
    with pytest.raises(MalformedSeries, match="duplicate"):
        Selector("m", {name: other}).latest(page)
    with pytest.raises(MalformedSeries, match="duplicate"):
        for s in Selector("m").series(page):
            _ = s.labels
    assert [(dict(s.labels), s.value) for s in Selector("m").series_skipping_malformed(page)[0]] == [({"ok": "1"}, 7.0)]
    assert Selector("m").series_skipping_malformed(page)[1] == 1


@pytest.mark.parametrize("tail", [b"x} 1", b",x} 1", b'  ,  b="2"   x} 1'])
def test_a_long_run_of_blanks_in_a_label_block_costs_linear_time(tail: bytes) -> None:
    """A pod's `{a="1"<N blanks>x}`: the label-block regex matched the blanks with two overlapping
    quantifiers and backtracked in O(N^2): 2 s of event loop per 50 ms scrape at 32 KB. At 1 MB that
    would be about half an hour; linear, it is milliseconds (the bound leaves three orders of margin)."""
    from llmepp.datalayer.endpoint import EndpointMetrics
    from llmepp.datalayer.engines import BUILTIN_ENGINES, EngineMapping

    page = (
        b"# TYPE vllm:num_requests_waiting gauge\n"
        + b'vllm:num_requests_waiting{model_name="m"'
        + b" " * (1 << 20)
        + tail
        + b"\n# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running 0\n"
    )
    mapping = EngineMapping(next(s for s in BUILTIN_ENGINES if s.name == "vllm"))
    started = time.process_time()
    _, error = mapping.extract(page, EndpointMetrics(), time.monotonic(), mapping.new_memo())
    assert error is not None  # the line is refused, as it must be
    assert time.process_time() - started < 10.0
