"""Chat templates: a conversation (role, text per message) → the text the model server tokenizes.

Precise prefix routing needs the EPP's token ids to equal the engine's, so the template must be the
engine's. This build ships templates as named Python renderers (no Jinja engine is a dependency):

* `role-tags` (alias `llmepp-sim`): the simulator's template (llmepp_sim.tokenizer), per message
  ``<|{role}|>\\n{text}\\n``, then the generation prompt ``<|assistant|>\\n``.
* `plain`: the texts joined by "\\n", no roles and no generation prompt (for engines serving raw text).

A Jinja `chat_template` string from a model's tokenizer_config.json is not supported: tools, the
system-prompt rules and special tokens of real templates are out of reach without a Jinja engine.
Chat requests of such models tokenize with a mismatching template and simply do not match cached
prefixes (routing then falls back to the load scorers); completions are unaffected.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

Messages = Sequence[tuple[str, str]]


def role_tags(messages: Messages) -> str:
    return "".join(f"<|{role}|>\n{text}\n" for role, text in messages) + "<|assistant|>\n"


def plain(messages: Messages) -> str:
    return "\n".join(text for _, text in messages)


BUILTIN: dict[str, Callable[[Messages], str]] = {
    "role-tags": role_tags,
    "llmepp-sim": role_tags,
    "plain": plain,
}


def template(name: str) -> Callable[[Messages], str]:
    try:
        return BUILTIN[name]
    except KeyError:
        raise ValueError(f"unknown chat template {name!r}; built-in: {', '.join(sorted(BUILTIN))}") from None
