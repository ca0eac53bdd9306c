"""What a plugin author following the README's "Writing a plugin" section and the public API (`llmepp`) writes:
an async `setup` is refused like any async sync-hook, a subclass of a plugin with deprecated aliases registers
under its own type only, and `PluginContext.producer_key` finds the tokenized prompt."""

from __future__ import annotations

import logging
import textwrap
import warnings
from collections.abc import Sequence
from pathlib import Path

import pytest
from helpers import request

from llmepp import (
    TOKENIZED_PROMPT,
    ConfigError,
    Endpoint,
    InferenceRequest,
    PluginContext,
    PluginRegistry,
    Scorer,
    TokenizedPrompt,
)
from llmepp.config.loader import build, load_config
from llmepp.director import RoutingDecision

from .test_plugin_api import installed
from .test_plugin_failures import director, registry_with

# -- 1. an `async def setup` is silently never run ------------------------------------------------------------


class AsyncSetupScorer(Scorer):
    """Opens its client in setup (the Plugin.setup docstring: "start background work") as an async def."""

    type = "author-async-setup-scorer"

    async def setup(self, ctx: PluginContext) -> None:  # type: ignore[override]
        self.weights = {"default": 1.0}

    def score(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        return [self.weights["default"]] * len(endpoints)


def test_an_async_setup_is_a_config_error_not_silently_skipped() -> None:
    """README: "a hook written as `async def` elsewhere is a start-up error (it would never run)": `setup` (and
    `wiring`, `validate_profiles`) are called synchronously too; as coroutines they would be dropped and the
    plugin never set up."""
    reg = registry_with(AsyncSetupScorer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(ConfigError, match="setup"):
            build(load_config(f"plugins:\n- type: {AsyncSetupScorer.type}\n"), plugin_registry=reg)


# -- 2. subclassing a plugin that has a deprecated alias -------------------------------------------------------


class RenamedScorer(Scorer):
    """The README: "A renamed plugin keeps its old type string working with `aliases = ("old-name",)`"."""

    type = "author-renamed-scorer"
    aliases = ("author-old-scorer",)

    def score(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        return [1.0] * len(endpoints)


class RenamedScorerVariant(RenamedScorer):
    """A variant of it, under a type string of its own (no alias of its own)."""

    type = "author-renamed-scorer-variant"

    def score(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        return [0.5] * len(endpoints)


def test_a_subclass_of_a_plugin_with_aliases_registers() -> None:
    """A class's `aliases` are its own: a variant under a type string of its own does not claim its parent's
    deprecated name (which would clash with the parent's registration)."""
    reg = PluginRegistry()
    reg.register(RenamedScorer)
    reg.register(RenamedScorerVariant)
    assert reg.get("author-renamed-scorer-variant") is RenamedScorerVariant
    assert reg.get("author-old-scorer") is RenamedScorer


SUBCLASS_PACKAGE = textwrap.dedent(
    '''
    from llmepp.plugins.filters.label_selector import LabelSelectorFilter

    class TenantSelector(LabelSelectorFilter):
        """label-selector-filter, under a type string of its own."""

        type = "tenant-selector-filter"
    '''
)


def test_a_subclass_of_a_built_in_by_entry_point_logs_no_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The documented route (an entry point naming a subclass of a built-in that has a deprecated alias) loads
    without an error at every start-up."""
    entry_point = "tenant = tenant_plugins:TenantSelector"
    with installed(tmp_path, "tenant_plugins", SUBCLASS_PACKAGE, entry_point), caplog.at_level(logging.ERROR):
        reg = PluginRegistry()
        assert reg.get("tenant-selector-filter") is not None
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


# -- 3. consuming the exported TOKENIZED_PROMPT the way PluginContext.producer_key documents ----------------


class PromptLengthScorer(Scorer):
    """Prefers short prompts on endpoint 0 (a toy): reads the token producer's TokenizedPrompt, resolving
    the key as `PluginContext.producer_key` says a consumer does ("The `request.data` key a consumer reads
    `data_key` from")."""

    type = "author-prompt-length-scorer"
    consumes = frozenset({TOKENIZED_PROMPT})

    def setup(self, ctx: PluginContext) -> None:
        self.key = ctx.producer_key(self, TOKENIZED_PROMPT, "", "tokenProducerName")
        self.seen: list[TokenizedPrompt | None] = []

    def score(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        tokens: TokenizedPrompt | None = request.data.get(self.key)
        self.seen.append(tokens)
        return [1.0] * len(endpoints)


async def test_producer_key_finds_the_tokenized_prompt() -> None:
    """The token producer (auto-created for the declared `consumes`) writes TOKENIZED_PROMPT unscoped (one
    tokenization per request): `producer_key` answers that key, so the author's scorer sees the tokens."""
    d, c = director(f"plugins:\n- type: {PromptLengthScorer.type}\n", registry_with(PromptLengthScorer))
    assert "token-producer" in c.plugins  # auto-created, as the README says
    req = request(b"hello world, a prompt of some length")
    assert isinstance(await d.handle_request(req, None), RoutingDecision)
    assert req.data.get(TOKENIZED_PROMPT) is not None  # the producer did run
    scorer = c.plugins[PromptLengthScorer.type]
    assert isinstance(scorer, PromptLengthScorer)
    assert scorer.seen and scorer.seen[0] is not None, f"read {scorer.key!r}; data keys: {sorted(req.data)}"
