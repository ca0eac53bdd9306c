"""Deterministic filler output: the tokens a simulated pod "generates".

Each generated token is one word from the tokenizer corpus' word list that the shipped BPE encodes as a
single token with its leading space (" cache", " request", ...). So ``completion_tokens`` equals the number
of filler words, and re-tokenising the generated text reproduces the same ids (multi-turn conversations
that append the assistant's answer keep hitting the prefix cache, as with a real model).

The sequence depends only on ``--seed`` and the prompt, so the same request yields the same text on every
pod and every run. There is no EOS: output always runs to ``max_tokens`` (``finish_reason = "length"``),
with or without ``ignore_eos``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from llmepp_sim.build_tokenizer import WORDS
from llmepp_sim.tokenizer import SimTokenizer


@dataclass(frozen=True, slots=True)
class FillerToken:
    token_id: int
    text: str


def filler_vocabulary(tokenizer: SimTokenizer) -> tuple[FillerToken, ...]:
    fillers = []
    for word in WORDS:
        if not word.isalpha():
            continue
        ids = tokenizer.encode(" " + word)
        if len(ids) == 1:
            fillers.append(FillerToken(ids[0], " " + word))
    return tuple(fillers)


class FillerStream:
    """The output tokens of one request, produced on demand."""

    __slots__ = ("_rng", "_vocab")

    def __init__(self, vocab: Sequence[FillerToken], seed: int, prompt_ids: Sequence[int]) -> None:
        # Ints and tuples of ints hash identically in every process (PYTHONHASHSEED only affects str).
        key = hash((seed, len(prompt_ids), tuple(prompt_ids[:16]), tuple(prompt_ids[-16:])))
        self._rng = random.Random(key)
        self._vocab = vocab

    def next_token(self) -> FillerToken:
        return self._vocab[self._rng.randrange(len(self._vocab))]
