"""The simulated model's tokenizer and chat template (shared contract with the EPP's precise prefix routing).

Tokenizer: ``tokenizer.json`` next to this module, a 4096-entry byte-level BPE produced by
``python -m llmepp_sim.build_tokenizer`` (deterministic). Load it with HF ``tokenizers``:
``Tokenizer.from_file(path)`` and ``encode(text, add_special_tokens=False)``; no BOS/EOS is added, no
normaliser runs. ``TOKENIZER_PATH`` is the file's location.

Completions: the prompt string is encoded as is; a prompt given as token ids is used verbatim.

Chat completions: messages become text with a fixed template, then that text is encoded. For each message,
in order::

    <|{role}|>\\n{content}\\n

followed by the generation prompt ``<|assistant|>\\n``. ``role`` is the message's role verbatim (system,
user, assistant, tool, ...; roles outside ``CHAT_ROLES`` are not special tokens and simply get split by
BPE). ``content`` is the message's string content, or for a list of content parts the text of its text
parts joined with ``\\n``, as vLLM joins them for a template over string content: plain string parts and the
``TEXT_PART_FIELDS`` field of a ``text``, ``input_text``, ``output_text``, ``refusal`` or ``thinking`` part
(a part with empty or null text, and other part types, are skipped); a missing/null content is the empty
string. Example: ``[{"role":"user","content":"Hi"}]`` renders to
``"<|user|>\\nHi\\n<|assistant|>\\n"``.

Because every message is rendered independently and appended, a conversation's rendering is a prefix of
the rendering of any continuation of that conversation (minus the final generation prompt), which is what
makes multi-turn prefix caching work.

A pod configured with ``chat_template`` (a ``.jinja`` file or a ``tokenizer_config.json`` with a
``chat_template`` string) renders chat requests with that Jinja template instead, as vLLM does for a
template over string content: sandboxed Jinja with ``trim_blocks`` and ``lstrip_blocks``, ``tojson``
without HTML escaping, ``raise_exception``; context = ``bos_token`` / ``eos_token`` of the config (the
``tokenizer_config.json`` next to a ``.jinja`` file), the request's ``chat_template_kwargs``, ``messages``
(content as text, as above), ``tools`` as sent, ``add_generation_prompt`` (default true).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

CHAT_ROLES = ("system", "user", "assistant", "tool")
GENERATION_PROMPT = "<|assistant|>\n"
# Encoding costs ~2 us per token of CPU; longer texts go to a worker thread (HF tokenizers releases the
# GIL) so a 7k-token prompt does not stall every pod on the event loop for tens of milliseconds.
THREAD_THRESHOLD_CHARS = 4096


def _tokenizer_path() -> Path:
    # The strict editable install symlinks this module; resolving finds the shipped file in the source
    # folder. A regular install ships it as package data next to the module.
    local = Path(__file__).resolve().parent / "tokenizer.json"
    if local.exists():
        return local
    return Path(str(resources.files("llmepp_sim").joinpath("tokenizer.json")))


TOKENIZER_PATH = _tokenizer_path()


# vllm/entrypoints/chat_utils.py, MM_PARSER_MAP: the part types whose content is text, and its field.
TEXT_PART_FIELDS = {"text": "text", "input_text": "text", "output_text": "text", "thinking": "thinking",
                    "refusal": "refusal"}  # fmt: skip


def message_text(content: Any) -> str:
    """The text of one chat message's ``content`` (string, list of parts, or null)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    # vLLM (chat_utils._parse_chat_message_content_parts) drops a part whose text is falsy (missing, null, "");
    # a typed part with a uuid is parsed as a media part, not as text.
    texts = []
    for part in content:
        text: Any
        if isinstance(part, str):
            text = part
        elif isinstance(part, dict) and part.get("uuid") is None and isinstance(kind := part.get("type"), str):
            field = TEXT_PART_FIELDS.get(kind)
            text = part.get(field) if field else None
        else:
            continue
        if text:
            texts.append(str(text))
    return "\n".join(texts)


def render_chat(messages: Sequence[dict[str, Any]]) -> str:
    """Apply the fixed chat template (see module docstring)."""
    rendered = [f"<|{m.get('role', '')}|>\n{message_text(m.get('content'))}\n" for m in messages]
    return "".join(rendered) + GENERATION_PROMPT


def render_body(body: dict[str, Any]) -> str:
    """The fixed template over a chat body's ``messages``."""
    return render_chat(body["messages"])


ChatRenderer = Callable[[dict[str, Any]], str]


def jinja_renderer(path: str) -> ChatRenderer:
    """A model's Jinja chat template from ``path`` (see the module docstring). Raises ValueError."""
    p = Path(path)
    try:
        config_path = p if p.suffix == ".json" else p.parent / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        if not isinstance(config, dict):
            raise ValueError(f"{config_path} is not a JSON object")
        source = config.get("chat_template") if p.suffix == ".json" else p.read_text()
    except (OSError, ValueError) as e:
        raise ValueError(f"chat_template {path!r}: {e}") from None
    if not isinstance(source, str):
        raise ValueError(f"chat_template {path!r}: no chat_template string")
    special = {}
    for key in ("bos_token", "eos_token"):
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            special[key] = value
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda v, indent=None: json.dumps(v, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = _raise
    try:
        template = env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat_template {path!r}, line {e.lineno}: {e.message}") from None

    def render(body: dict[str, Any]) -> str:
        messages = [{**m, "content": message_text(m.get("content"))} for m in body["messages"]]
        context = {**special, **(body.get("chat_template_kwargs") or {})}
        context.update(messages=messages, tools=body.get("tools"),
                       add_generation_prompt=body.get("add_generation_prompt", True))  # fmt: skip
        try:
            return template.render(context)
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template: {e}") from None
        except Exception as e:  # the template ran into what the client sent (as vLLM, the client's error)
            raise ValueError(f"chat template: {type(e).__name__}: {e}") from None

    return render


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)


class SimTokenizer:
    """Thin wrapper so the rest of the simulator never touches HF objects directly."""

    def __init__(self, path: Path = TOKENIZER_PATH) -> None:
        self._tokenizer = Tokenizer.from_file(str(path))
        self.vocab_size = self._tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tokenizer.decode(list(ids), skip_special_tokens=False))

    def token_id(self, token: str) -> int | None:
        result = self._tokenizer.token_to_id(token)
        return None if result is None else int(result)

    def encode_chat(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        return self.encode(render_chat(messages))

    async def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a prompt (ids pass through); long texts are encoded off the event loop."""
        if not isinstance(prompt, str):
            return prompt
        if len(prompt) < THREAD_THRESHOLD_CHARS:
            return self.encode(prompt)
        return await asyncio.to_thread(self.encode, prompt)


_shared: SimTokenizer | None = None


def shared_tokenizer() -> SimTokenizer:
    """One tokenizer per process: HF tokenizers are thread-safe and loading costs ~10 ms."""
    global _shared
    if _shared is None:
        _shared = SimTokenizer()
    return _shared
