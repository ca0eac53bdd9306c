"""`request-attribute-reporter`: values computed from a response's usage, reported to Envoy as dynamic metadata."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import cel
import msgspec

from llmepp.framework.plugin import ConfigError, PluginParams
from llmepp.framework.requestcontrol import ResponseMetadataProcessor
from llmepp.request.types import InferenceRequest, ResponseInfo, Usage

log = logging.getLogger(__name__)


class AttributeKey(PluginParams):
    name: str
    namespace: str = "envoy.lb"


class Attribute(PluginParams):
    key: AttributeKey
    expression: str
    condition: str = ""


class RequestAttributeReporterParams(PluginParams):
    attributes: list[Attribute] = msgspec.field(default_factory=list)


class _Compiled:
    __slots__ = ("condition", "expression", "failures", "key")

    def __init__(self, i: int, attribute: Attribute) -> None:
        if not attribute.key.name:
            raise ConfigError(f"parameters.attributes[{i}].key: name must not be empty")
        # An empty namespace is the default one, as in the reference.
        self.key = attribute.key if attribute.key.namespace else AttributeKey(attribute.key.name)
        self.expression = _compile(attribute.expression, f"parameters.attributes[{i}].expression")
        condition = attribute.condition
        self.condition = _compile(condition, f"parameters.attributes[{i}].condition") if condition else None
        self.failures = 0


def _compile(source: str, field: str) -> Any:
    try:
        return cel.compile(source)
    except ValueError as e:
        raise ConfigError(f"{field}: not a CEL expression: {e}") from None


def usage_context(usage: Usage | None) -> dict[str, Any]:
    """The CEL variables: `usage` in the OpenAI shape, whatever API answered (absent fields: no usage).
    Numbers are doubles, as in the reference (its `usage` is a google.protobuf.Struct)."""
    if usage is None:
        return {"usage": {}}
    return {
        "usage": {
            "prompt_tokens": float(usage.prompt_tokens),
            "completion_tokens": float(usage.completion_tokens),
            "total_tokens": float(usage.total_tokens),
            "prompt_tokens_details": {"cached_tokens": float(usage.cached_tokens)},
        }
    }


class RequestAttributeReporter(ResponseMetadataProcessor):
    """Each attribute: when `condition` (CEL, bool; none = always) holds, `expression` (CEL, a number; a double
    is truncated to an integer, as the reference's int64(v)) is set as `key.namespace` (envoy.lb) / `key.name` in
    Envoy's dynamic metadata on the answer to the response's last message, e.g. `usage.prompt_tokens +
    usage.completion_tokens` as the request's cost for a token-based rate limit, billing, or the access log
    (`%DYNAMIC_METADATA(envoy.lb:name)%`).

    Variables: `usage.prompt_tokens`, `.completion_tokens`, `.total_tokens`,
    `.prompt_tokens_details.cached_tokens`: doubles, as in the reference (its `usage` is a protobuf Struct), so
    a reference config's `usage.prompt_tokens * 0.25 + usage.completion_tokens * 1.0` works unchanged (CEL
    does not mix types: an integer literal needs a `.0`). They are the usage the model server reported, read
    from OpenAI, Anthropic and vLLM answers alike; `usage` is empty when it reported none, so `has()` is false.
    An expression that fails or is not a finite number reports nothing for that request (logged on the first
    failure, then every 1000th). Expressions are compiled at start-up: a syntax error names the attribute.
    """

    type = "request-attribute-reporter"
    Params = RequestAttributeReporterParams

    def __init__(self, name: str = "", params: RequestAttributeReporterParams | None = None) -> None:
        super().__init__(name, params)
        if not self.params.attributes:
            raise ConfigError("parameters.attributes: at least one attribute is required")
        self._attributes = [_Compiled(i, a) for i, a in enumerate(self.params.attributes)]

    def response_metadata(
        self, request: InferenceRequest, response: ResponseInfo
    ) -> Mapping[str, Mapping[str, Any]] | None:
        context = usage_context(response.usage)
        out: dict[str, dict[str, Any]] = {}
        for attr in self._attributes:
            try:
                if attr.condition is not None and attr.condition.execute(context) is not True:
                    continue
                value = attr.expression.execute(context)
            except Exception as e:  # a user's expression: whatever it raises, this request reports nothing
                self._failed(attr, f"evaluation failed: {type(e).__name__}: {e}")
                continue
            if isinstance(value, float) and math.isfinite(value):
                value = int(value)  # the reference truncates a double result (int64(doubleVal))
            if not isinstance(value, int) or isinstance(value, bool):
                self._failed(attr, f"expression gave {type(value).__name__} {value!r}, not a number")
                continue
            out.setdefault(attr.key.namespace, {})[attr.key.name] = value
        return out or None

    def _failed(self, attr: _Compiled, why: str) -> None:
        attr.failures += 1
        if attr.failures % 1000 == 1:
            log.warning(
                "%s: attribute %s/%s not reported (%d times so far): %s",
                self.name, attr.key.namespace, attr.key.name, attr.failures, why,
            )  # fmt: skip
