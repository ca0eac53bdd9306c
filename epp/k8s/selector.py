"""Kubernetes label-selector syntax, checked before the API server sees it (`--endpoint-selector`).

A port of k8s.io/apimachinery's `labels.Parse` (lexer, parser, requirement validation), so a
selector is refused at start-up exactly when the API server would answer every list with 400:

    selector     requirement (',' requirement)*  |  (nothing)
    requirement  key | '!' key | key ('=' | '==' | '!=') value | key ('in' | 'notin') '(' values ')'
                 | key ('>' | '<') integer
    key          [prefix '/'] name: prefix a lowercase DNS subdomain (≤ 253), name ≤ 63 characters of
                 [A-Za-z0-9] with '-', '_', '.' inside
    value        empty, or ≤ 63 characters like a name

Whitespace separates tokens and is otherwise ignored; `in` / `notin` are keywords only where an
operator goes (`in=notin` is a valid selector). The error messages follow the Go ones, with the
offending key or value named.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["Requirement", "SelectorError", "parse_selector"]


class SelectorError(ValueError):
    """The selector is not valid label-selector syntax; the message says where and why."""


@dataclass(frozen=True, slots=True)
class Requirement:
    key: str
    operator: str  # "exists", "!", "=", "==", "!=", "in", "notin", ">", "<"
    values: tuple[str, ...]  # in the order written (duplicates dropped)


# -- lexer ---------------------------------------------------------------------------------------------
_WHITESPACE = " \t\r\n"
_SPECIAL = "=!(),><"
_IDENT, _IN, _NOTIN, _END = "identifier", "in", "notin", "end"  # token kinds besides the symbols below
_SYMBOLS = ("!=", "==", "!", "(", ")", ",", "=", ">", "<")  # longest first: `!=` before `!`


def _tokens(text: str) -> list[tuple[str, str]]:
    """(kind, literal) pairs; the kind of a symbol is the symbol itself."""
    out: list[tuple[str, str]] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch in _WHITESPACE:
            i += 1
        elif ch in _SPECIAL:
            symbol = next(s for s in _SYMBOLS if text.startswith(s, i))
            out.append((symbol, symbol))
            i += len(symbol)
        else:
            start = i
            while i < n and text[i] not in _WHITESPACE and text[i] not in _SPECIAL:
                i += 1
            word = text[start:i]
            out.append((word if word in (_IN, _NOTIN) else _IDENT, word))
    out.append((_END, ""))
    return out


# -- validation (k8s.io/apimachinery/pkg/util/validation) ----------------------------------------------
_NAME_MAX = 63
_PREFIX_MAX = 253
_NAME_RE = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS_LABEL_RE = re.compile(_DNS_LABEL)
_DNS_SUBDOMAIN_RE = re.compile(rf"{_DNS_LABEL}(\.{_DNS_LABEL})*")
_NAME_RULE = (
    "must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric "
    "character (e.g. 'MyName', 'my.name', '123-abc')"
)


def dns_name_problem(name: str, *, label: bool) -> str | None:
    """Why `name` is not a DNS-1123 label (`label`: a namespace's name, at most 63 characters) or subdomain (most
    objects' names, at most 253), or None. The API server refuses such names: checked at start-up, the error
    names the flag that gave one."""
    limit, pattern = (_NAME_MAX, _DNS_LABEL_RE) if label else (_PREFIX_MAX, _DNS_SUBDOMAIN_RE)
    if len(name) > limit:
        return f"must be no more than {limit} characters"
    if not pattern.fullmatch(name):
        dots = "" if label else " or '.'"
        return (f"must be a lowercase RFC 1123 {'label' if label else 'subdomain'}: lower case alphanumeric "
                f"characters, '-'{dots}, starting and ending with an alphanumeric character")  # fmt: skip
    return None


def _key_problem(key: str) -> str | None:
    """Why `key` is not a qualified name (IsQualifiedName), or None."""
    parts = key.split("/")
    if len(parts) > 2:
        return f"a qualified name {_NAME_RULE}, with an optional DNS subdomain prefix and '/' (e.g. 'example.com/x')"
    problems = []
    if len(parts) == 2:
        prefix = parts[0]
        if not prefix:
            problems.append("prefix part must be non-empty")
        elif len(prefix) > _PREFIX_MAX:
            problems.append(f"prefix part must be no more than {_PREFIX_MAX} characters")
        elif not _DNS_SUBDOMAIN_RE.fullmatch(prefix):
            problems.append(
                "prefix part must be a lowercase DNS subdomain: lower case alphanumeric characters, '-' or '.', "
                "starting and ending with an alphanumeric character (e.g. 'example.com')"
            )
    name = parts[-1]
    if not name:
        problems.append("name part must be non-empty")
    elif len(name) > _NAME_MAX:
        problems.append(f"name part must be no more than {_NAME_MAX} characters")
    elif not _NAME_RE.fullmatch(name):
        problems.append(f"name part {_NAME_RULE}")
    return "; ".join(problems) or None


def _value_problem(value: str) -> str | None:
    """Why `value` is not a label value (IsValidLabelValue), or None. Empty is valid."""
    if len(value) > _NAME_MAX:
        return f"must be no more than {_NAME_MAX} characters"
    if value and not _NAME_RE.fullmatch(value):
        return "a label value must be empty or " + _NAME_RULE.replace("(e.g. 'MyName'", "(e.g. 'MyValue'")
    return None


def _is_int64(value: str) -> bool:
    """strconv.ParseInt(value, 10, 64) succeeds (a label value cannot start with a sign: digits only)."""
    return value.isascii() and value.isdigit() and int(value) <= 2**63 - 1


# -- parser (labels.Parse) -----------------------------------------------------------------------------
class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = _tokens(text)
        self.pos = 0

    def lookahead(self, values: bool = True) -> tuple[str, str]:
        """The next token; where values (or keys) go, `in` / `notin` are plain identifiers."""
        kind, literal = self.tokens[self.pos]
        if values and kind in (_IN, _NOTIN):
            kind = _IDENT
        return kind, literal

    def consume(self, values: bool = True) -> tuple[str, str]:
        token = self.lookahead(values)
        if self.pos < len(self.tokens) - 1:
            self.pos += 1
        return token

    def parse(self) -> list[Requirement]:
        requirements: list[Requirement] = []
        while True:
            kind, literal = self.lookahead()
            if kind == _END:
                return requirements
            if kind not in (_IDENT, "!"):
                raise SelectorError(f"found {_show(literal)}, expected: !, identifier, or 'end of string'")
            requirements.append(self.requirement())
            kind, literal = self.consume()
            if kind == _END:
                return requirements
            if kind != ",":
                raise SelectorError(f"found {_show(literal)}, expected: ',' or 'end of string'")
            kind, literal = self.lookahead()
            if kind not in (_IDENT, "!"):
                raise SelectorError(f"found {_show(literal)}, expected: identifier after ','")

    def requirement(self) -> Requirement:
        kind, literal = self.consume()
        negated = kind == "!"
        if negated:
            kind, literal = self.consume()
        if kind != _IDENT:
            raise SelectorError(f"found {_show(literal)}, expected: identifier")
        key = literal
        problem = _key_problem(key)
        if problem:
            raise SelectorError(f"key {key!r}: {problem}")
        if self.lookahead()[0] in (_END, ","):
            return Requirement(key, "!" if negated else "exists", ())
        if negated:
            raise SelectorError(f"found {_show(key)}, expected: ',' or 'end of string' ('!{key}' stands alone)")
        kind, literal = self.consume(values=False)
        if kind in (_IN, _NOTIN):
            values = self.set_values()
        elif kind in ("=", "==", "!=", ">", "<"):
            values = self.exact_value()
        else:
            raise SelectorError(f"found {_show(literal)}, expected: =, ==, !=, in, notin, >, <")
        if kind in (">", "<") and not _is_int64(values[0]):
            raise SelectorError(
                f"key {key!r}: for 'Gt', 'Lt' operators, the value must be an integer (got {values[0]!r})"
            )
        for value in values:
            problem = _value_problem(value)
            if problem:
                raise SelectorError(f"key {key!r}: value {value!r}: {problem}")
        return Requirement(key, kind, values)

    def set_values(self) -> tuple[str, ...]:
        kind, literal = self.consume()
        if kind != "(":
            raise SelectorError(f"found {_show(literal)}, expected: '('")
        kind, literal = self.lookahead()
        if kind == ")":  # `in ()`: the one empty value
            self.consume()
            return ("",)
        if kind not in (_IDENT, ","):
            raise SelectorError(f"found {_show(literal)}, expected: ',', ')' or identifier")
        values = self.identifiers()
        kind, literal = self.consume()
        if kind != ")":  # not reached: identifiers() stops only before ')'
            raise SelectorError(f"found {_show(literal)}, expected: ')'")
        return values

    def identifiers(self) -> tuple[str, ...]:
        """Go's parseIdentifiersList, quirks included: `(,x)`, `(x,)` and `(x,,y)` hold an empty value."""
        values: dict[str, None] = {}
        while True:
            kind, literal = self.consume()
            if kind == _IDENT:
                values[literal] = None
                kind, literal = self.lookahead()
                if kind == ",":
                    continue
                if kind == ")":
                    return tuple(values)
                raise SelectorError(f"found {_show(literal)}, expected: ',' or ')'")
            if kind == ",":
                if not values:
                    values[""] = None
                kind, _ = self.lookahead()
                if kind == ")":
                    values[""] = None
                    return tuple(values)
                if kind == ",":
                    self.consume()
                    values[""] = None
                continue
            raise SelectorError(f"found {_show(literal)}, expected: ',', or identifier")

    def exact_value(self) -> tuple[str, ...]:
        kind, literal = self.lookahead()
        if kind in (_END, ","):
            return ("",)
        kind, literal = self.consume()
        if kind == _IDENT:
            return (literal,)
        raise SelectorError(f"found {_show(literal)}, expected: identifier")


def _show(literal: str) -> str:
    return f"{literal!r}" if literal else "end of selector"


def parse_selector(text: str) -> list[Requirement]:
    """The requirements of `text` (none for an empty selector, which selects everything); SelectorError
    when the API server would refuse it."""
    return _Parser(text).parse()
