"""Workloads for the DES and its live validation: token-exact prompts and Poisson arrivals over a QPS ladder.

Prompts are lists of token ids of the simulator's tokenizer, sent as completions ``"prompt": [ids]``: the
EPP's parser packs them as 4-byte pseudo-tokens (so its prefix hashing sees exactly the token sequence) and
the simulated pod uses them verbatim (no tokenisation, so the live run and the DES see identical prompts at
no tokenising cost). Ids are drawn from the simulator's filler vocabulary (words the BPE encodes as one
token), so a decoded prompt is ordinary text that re-encodes to the same ids.

``SharedPrefix`` follows inference-perf's ``shared_prefix`` generator (the llm-d canonical workload:
``num_groups`` system prompts of ``system_prompt_len`` random tokens, each followed by
``prompts_per_group`` distinct questions of ``question_len`` tokens; the prompt list is shuffled once and
requests cycle through it in order). ``NoSharing`` gives every request its own random prompt.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from llmepp_sim.textgen import filler_vocabulary
from llmepp_sim.tokenizer import shared_tokenizer

MODEL = "sim-model"
_encode = msgspec.json.Encoder().encode


def _vocabulary() -> list[int]:
    return sorted({f.token_id for f in filler_vocabulary(shared_tokenizer())})


@dataclass(frozen=True)
class Prompt:
    """One distinct prompt: a shared ``prefix`` (a group's system prompt; empty without sharing) + ``suffix``.

    Token ids are the vocabulary's own ``int`` objects, so a prompt costs 8 bytes per token and the lists
    built from it (``token_ids()``, one per request) share them instead of allocating 32-byte ints.
    """

    key: int  # unique per distinct prompt
    group: int  # prompts of one group share ``prefix``
    prefix: tuple[int, ...]
    suffix: tuple[int, ...]
    shared: bool  # sent more than once (worth memoising)
    output_len: int  # the request's max_tokens (generation ignores EOS, so also its output length)

    def token_ids(self) -> list[int]:
        return [*self.prefix, *self.suffix]

    def __len__(self) -> int:
        return len(self.prefix) + len(self.suffix)


def _tokens(rng: random.Random, vocab: list[int], k: int) -> tuple[int, ...]:
    return tuple(rng.choices(vocab, k=k))


class SharedPrefix:
    def __init__(
        self,
        num_groups: int = 150,
        prompts_per_group: int = 5,
        system_prompt_len: int = 6000,
        question_len: int = 1200,
        output_len: int = 1000,
        seed: int = 0,
    ) -> None:
        self.num_groups = num_groups
        self.prompts_per_group = prompts_per_group
        self.system_prompt_len = system_prompt_len
        self.question_len = question_len
        self.output_len = output_len
        self.seed = seed
        self._prompts: list[Prompt] | None = None

    def prompt(self, index: int) -> Prompt:
        """The prompt of the ``index``-th request."""
        if self._prompts is None:
            rng = random.Random(f"shared-prefix:{self.seed}")
            vocab = _vocabulary()
            prompts: list[Prompt] = []
            for g in range(self.num_groups):
                system = _tokens(rng, vocab, self.system_prompt_len)
                for _ in range(self.prompts_per_group):
                    question = _tokens(rng, vocab, self.question_len)
                    prompts.append(Prompt(len(prompts), g, system, question, True, self.output_len))
            rng.shuffle(prompts)
            self._prompts = prompts
        return self._prompts[index % len(self._prompts)]

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "shared-prefix",
            "num_groups": self.num_groups,
            "prompts_per_group": self.prompts_per_group,
            "system_prompt_len": self.system_prompt_len,
            "question_len": self.question_len,
            "output_len": self.output_len,
            "seed": self.seed,
        }


class NoSharing:
    """Every request has its own random prompt: no prefix is ever reused.

    ``prompt_len`` and ``output_len`` are token counts, or ``(low, high)`` ranges each request draws from
    uniformly (the live no-sharing workload's varied lengths: rotating requests over pods balances their
    count, not their prefill work). Prompts are generated on demand from ``(seed, index)`` and not kept, so
    long runs stay small.
    """

    def __init__(
        self, prompt_len: int | tuple[int, int] = 1000, output_len: int | tuple[int, int] = 200, seed: int = 0
    ) -> None:
        self.prompt_len = length_range(prompt_len, "prompt_len")
        self.output_len = length_range(output_len, "output_len")
        self.seed = seed
        self._vocab: list[int] | None = None

    def prompt(self, index: int) -> Prompt:
        if self._vocab is None:
            self._vocab = _vocabulary()
        rng = random.Random(f"no-sharing:{self.seed}:{index}")
        (p_lo, p_hi), (o_lo, o_hi) = self.prompt_len, self.output_len
        # Fixed lengths draw nothing, so their prompts are the ones seeds gave before ranges existed.
        n = p_lo if p_lo == p_hi else rng.randint(p_lo, p_hi)
        out = o_lo if o_lo == o_hi else rng.randint(o_lo, o_hi)
        return Prompt(index, index, (), _tokens(rng, self._vocab, n), False, out)

    def describe(self) -> dict[str, Any]:
        return {"kind": "no-sharing", "prompt_len": self.prompt_len, "output_len": self.output_len, "seed": self.seed}


def length_range(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    """A token count or a ``(low, high)`` range as a range; ValueError naming `name` unless 0 < low <= high."""
    lo, hi = (value, value) if isinstance(value, int) else value
    if not 0 < lo <= hi:
        raise ValueError(f"{name}: expected a positive count or a range low <= high, got {value!r}")
    return lo, hi


Workload = SharedPrefix | NoSharing


@dataclass(frozen=True)
class Stage:
    qps: float
    duration: float  # seconds (simulated in the DES, wall x time_scale live)
    warmup: bool = False  # reported, but excluded from comparisons


def ladder(qps: Sequence[float], duration: float, warmup: Stage | None = None) -> list[Stage]:
    stages = [warmup] if warmup is not None else []
    return stages + [Stage(q, duration) for q in qps]


@dataclass(frozen=True)
class Arrival:
    index: int  # request number, also the request id and the workload's prompt index
    time: float  # seconds from the start of the run
    stage: int


@dataclass
class Schedule:
    """When each request arrives (the same list drives the DES and the live client)."""

    workload: Workload
    stages: list[Stage]
    arrivals: list[Arrival] = field(default_factory=list)

    @property
    def stage_starts(self) -> list[float]:
        starts, t = [], 0.0
        for s in self.stages:
            starts.append(t)
            t += s.duration
        return starts

    @property
    def end(self) -> float:
        return sum(s.duration for s in self.stages)


def schedule(workload: Workload, stages: Sequence[Stage], seed: int = 0) -> Schedule:
    """Poisson arrivals at each stage's rate (stages back to back, no drain in between)."""
    rng = random.Random(f"arrivals:{seed}")
    out = Schedule(workload, list(stages))
    t0 = 0.0
    for k, stage in enumerate(stages):
        t = t0
        while stage.qps > 0:
            t += rng.expovariate(stage.qps)
            if t >= t0 + stage.duration:
                break
            out.arrivals.append(Arrival(len(out.arrivals), t, k))
        t0 += stage.duration
    return out


def request_body(prompt: Prompt, model: str = MODEL) -> bytes:
    """The completions request both the DES and the live client send (streaming, usage included)."""
    return _encode(
        {
            "model": model,
            "prompt": prompt.token_ids(),
            "max_tokens": prompt.output_len,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,
        }
    )
