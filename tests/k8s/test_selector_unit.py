"""--endpoint-selector is checked at start-up with Kubernetes' own label-selector rules (labels.Parse):
before, a selector the API server rejects made every list answer 400 and the EPP never got ready."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmepp.app import App
from llmepp.framework.plugin import ConfigError
from llmepp.k8s.selector import Requirement, SelectorError, parse_selector
from llmepp.settings import Settings

# -- the grammar, as strategies (valid selectors only) ---------------------------------------------
_NAME = st.from_regex(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?", fullmatch=True)
_DNS_LABEL = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?", fullmatch=True)
_PREFIX = st.lists(_DNS_LABEL, min_size=1, max_size=4).map(".".join).filter(lambda p: len(p) <= 253)
KEYS = st.one_of(_NAME, st.tuples(_PREFIX, _NAME).map("/".join))
VALUES = st.one_of(st.just(""), _NAME)
WS = st.sampled_from(["", " ", "  ", "\t", "\n", " \r\n "])
WS1 = st.sampled_from([" ", "  ", "\t", "\n"])  # where the lexer needs a separator (a key before `in`)


@st.composite
def requirements(draw: st.DrawFn) -> tuple[str, str]:
    """One requirement of any operator, and its key."""
    key = draw(KEYS)
    return _requirement(draw, key), key


def _requirement(draw: st.DrawFn, key: str) -> str:
    kind = draw(st.sampled_from(["exists", "not-exists", "=", "==", "!=", "in", "notin", ">", "<"]))
    w = lambda: draw(WS)  # noqa: E731
    if kind == "exists":
        return key
    if kind == "not-exists":
        return f"!{w()}{key}"
    if kind in ("=", "==", "!="):
        return f"{key}{w()}{kind}{w()}{draw(VALUES)}"
    if kind in (">", "<"):
        return f"{key}{w()}{kind}{w()}{draw(st.integers(0, 2**63 - 1))}"
    values = draw(st.lists(_NAME, min_size=0, max_size=4))
    inner = f"{w()},{w()}".join(values)
    return f"{key}{draw(WS1)}{kind}{w()}({w()}{inner}{w()})"


@st.composite
def selectors(draw: st.DrawFn) -> tuple[str, list[str]]:
    """A selector and the keys of its requirements, in order."""
    parts = draw(st.lists(requirements(), min_size=1, max_size=5))
    text = draw(WS) + f"{draw(WS)},{draw(WS)}".join(text for text, _ in parts) + draw(WS)
    return text, [key for _, key in parts]


@given(selectors())
def test_every_selector_of_the_grammar_is_accepted(case: tuple[str, list[str]]) -> None:
    selector, keys = case
    assert [r.key for r in parse_selector(selector)] == keys


# -- examples ---------------------------------------------------------------------------------------
VALID = {
    "app=vllm": [Requirement("app", "=", ("vllm",))],
    "a=b,c!=d,e in (x,y),f notin (z),g,!h": [
        Requirement("a", "=", ("b",)), Requirement("c", "!=", ("d",)), Requirement("e", "in", ("x", "y")),
        Requirement("f", "notin", ("z",)), Requirement("g", "exists", ()), Requirement("h", "!", ()),
    ],
    "  app == vllm ,  llm-d.ai/role in(decode,prefill)  ": [
        Requirement("app", "==", ("vllm",)), Requirement("llm-d.ai/role", "in", ("decode", "prefill")),
    ],
    "app=": [Requirement("app", "=", ("",))],
    "a in ()": [Requirement("a", "in", ("",))],
    "gpu>3,mem<16": [Requirement("gpu", ">", ("3",)), Requirement("mem", "<", ("16",))],
    "in=notin": [Requirement("in", "=", ("notin",))],  # keywords are identifiers where identifiers go
    "A.b_c-D=x_Y.z-1": [Requirement("A.b_c-D", "=", ("x_Y.z-1",))],
    "a" * 63 + "=" + "b" * 63: [Requirement("a" * 63, "=", ("b" * 63,))],
}  # fmt: skip


@pytest.mark.parametrize("selector", list(VALID))
def test_valid_selectors(selector: str) -> None:
    assert parse_selector(selector) == VALID[selector]


INVALID = {
    "app=Bad Value": "found 'Value', expected: ',' or 'end of string'",
    "app=vllm,": "expected: identifier after ','",
    ",app": "expected: !, identifier, or 'end of string'",
    "app in (a b)": "expected: ',' or ')'",
    "app in a": "expected: '('",
    "app in (a": "expected: ',' or ')'",
    "app notin": "expected: '('",
    "!app=x": "expected: ',' or 'end of string'",
    "app=a=b": "expected: ',' or 'end of string'",
    "-app=x": "key '-app': name part must consist of alphanumeric characters",
    "app-=x": "key 'app-'",
    "Example.com/app=x": "key 'Example.com/app': prefix part",
    "/app=x": "key '/app': prefix part must be non-empty",
    "a/b/c=x": "key 'a/b/c': a qualified name",
    "app/=x": "key 'app/': name part must be non-empty",
    "a" * 64 + "=x": "name part must be no more than 63 characters",
    "x" * 251 + ".io/app=x": "prefix part must be no more than 253 characters",
    "app=" + "v" * 64: "must be no more than 63 characters",
    "app=-v": "value '-v'",
    "app in (ok,bad!)": "expected: ',' or ')'",
    "app in (ok,-bad)": "value '-bad'",
    "gpu>x": "for 'Gt', 'Lt' operators, the value must be an integer",
    "gpu>": "for 'Gt', 'Lt' operators, the value must be an integer",
    "gpu<99999999999999999999": "the value must be an integer",
    "app=ä": "value 'ä'",
    "app x": "found 'x', expected: =, ==, !=, in, notin, >, <",
    "(app)": "expected: !, identifier, or 'end of string'",
    "!": "found end of selector, expected: identifier",
    "app in (x,,)": "found ')', expected: ',', or identifier",  # labels.Parse's own quirk
}


@pytest.mark.parametrize("selector", list(INVALID))
def test_invalid_selectors_say_what_is_wrong(selector: str) -> None:
    with pytest.raises(SelectorError) as info:
        parse_selector(selector)
    assert INVALID[selector] in str(info.value)


def test_an_invalid_selector_is_a_start_up_error_naming_the_flag() -> None:
    with pytest.raises(ConfigError, match=r"--endpoint-selector 'app=Bad Value': .*found 'Value'"):
        App(Settings(endpoint_selector="app=Bad Value", endpoint_target_ports=(8000,)))
    with pytest.raises(ConfigError, match=r"--endpoint-selector '  ': no requirements"):
        App(Settings(endpoint_selector="  ", endpoint_target_ports=(8000,)))


def test_an_empty_selector_is_the_flag_unset() -> None:
    """As in the reference (`opts.EndpointSelector == ""`): `--endpoint-selector=` with --pool-name is pool mode."""
    app = App(Settings(pool_name="llama", pool_name_set=True, endpoint_selector=""))
    assert app.kube is not None and app.kube.target.pool_mode
    with pytest.raises(ConfigError, match="--pool-name or --endpoint-selector"):
        App(Settings(endpoint_selector=""))


def test_the_command_exits_2_naming_the_flag() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "llmepp", "--endpoint-selector", "app in (a", "--endpoint-target-ports", "8000",
         "--metrics-port", "0", "--log-format", "text"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "--endpoint-selector 'app in (a'" in proc.stderr and "expected: ',' or ')'" in proc.stderr
