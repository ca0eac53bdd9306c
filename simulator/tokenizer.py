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
BPE). ``content`` is the message's string content, or for a list of content parts the ``text`` of every
``{"type": "text"}`` part joined with ``\\n`` (other part types are ignored); a missing/null content is
the empty string. Example: ``[{"role":"user","content":"Hi"}]`` renders to
``"<|user|>\\nHi\\n<|assistant|>\\n"``.

Because every message is rendered independently and appended, a conversation's rendering is a prefix of
the rendering of any continuation of that conversation (minus the final generation prompt), which is what
makes multi-turn prefix caching work.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

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


def message_text(content: Any) -> str:
    """The text of one chat message's ``content`` (string, list of parts, or null)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = [part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text"]
    return "\n".join(str(p) for p in parts)


def render_chat(messages: Sequence[dict[str, Any]]) -> str:
    """Apply the fixed chat template (see module docstring)."""
    rendered = [f"<|{m.get('role', '')}|>\n{message_text(m.get('content'))}\n" for m in messages]
    return "".join(rendered) + GENERATION_PROMPT


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
