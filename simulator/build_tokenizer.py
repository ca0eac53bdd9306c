"""Generates the simulator's shipped ``tokenizer.json`` (run: ``python -m llmepp_sim.build_tokenizer``).

The tokenizer is a small byte-level BPE (GPT-2 style pre-tokenisation, no normaliser, no BOS/EOS added)
trained with HF ``tokenizers`` on a corpus built here from a fixed word list and a fixed seed, so the
output is byte-for-byte reproducible (``tests/sim/test_tokenizer.py`` checks that re-running this script
reproduces the shipped file). It is deliberately *not* the EPP's "4 bytes per token" approximation:
common words are one token, rare words split into several byte pieces, so an approximate prefix router
stays approximate while a precise one (loading this same file) can match the pods' block hashes exactly.

Special tokens (added, never split): ``<|endoftext|>`` and one per chat role (see ``CHAT_ROLES``); the
chat template that uses them is documented in ``llmepp_sim.tokenizer``.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import random
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

VOCAB_SIZE = 4096
CORPUS_SEED = 20250601
CORPUS_SENTENCES = 20000
CHAT_ROLES = ("system", "user", "assistant", "tool")
SPECIAL_TOKENS = ["<|endoftext|>", *(f"<|{role}|>" for role in CHAT_ROLES)]
OUTPUT = Path(__file__).resolve().parent / "tokenizer.json"

# Everyday English plus the vocabulary of the prompts our benchmarks and tests send. The generated
# ("filler") words the simulated pods emit are drawn from this list as well (llmepp_sim.textgen).
WORDS = """
the of and to in is that it for was on are as with his they at be this from have or by one had not but
what all were when we there can an your which their said if do will each about how up out them then she
many some so these would other into has more her two like him see time could no make than first been its
who now people my made over did down only way find use may water long little very after words called
just where most know get through back much go good new write our me man too any day same right look
think also around another came come work three word must because does part even place well such here
take why things help put years different away again off went old number great tell men say small every
found still between name should home big give air line set own under read last never us left end along
while might next sound below saw something thought both few those always looked show large often
together asked house world going want school important until form food keep children feet land side
without boy once animals life enough took sometimes four head above kind began almost live page got
earth need far hand high year mother light parts country father let night following picture being study
second eyes soon times story boys since white days ever paper hard near sentence better best across
during today others however sure means knew try told young miles sun ways thing whole hear example heard
several change answer room sea against top turned learn point city play toward five using himself
usually money seen car morning given trees body family later order run model models token tokens
tokenizer request requests response server servers cache cached caching prefix prefill decode latency
throughput queue queues batch batches router routing endpoint endpoints pod pods cluster gateway envoy
metric metrics score scorer scheduler scheduling plugin plugins memory block blocks kernel attention
layer layers weights adapter adapters lora inference serving replica replicas load loaded balance
balancing policy policies request_id stream streaming chunk chunks event events hash hashes index system
user assistant tool question answer context document documents summary summarize explain describe list
table code function class return value values error errors python data file files config default please
thanks hello world example input output result results test tests value key keys state status
""".split()  # noqa: SIM905 - a word list reads better as text
PUNCTUATION = [".", ",", "?", "!", ":", ";", " -", " (", ")", '"', "'s", "\n"]
# English-like syllables: pseudo-words built from them teach BPE general sub-word merges, so text outside
# WORDS still averages roughly 3-4 characters per token instead of falling apart into single bytes.
SYLLABLES = """
a e i o u an en in on un ar er ir or ur al el il ol ul at et it ot ut as es is os us ab ac ad ag am ap
av ba be bi bo bu ca ce ci co cu da de di do du fa fe fi fo ga ge gi go ha he hi ho la le li lo lu ma me
mi mo mu na ne ni no nu pa pe pi po pu ra re ri ro ru sa se si so su ta te ti to tu va ve vi vo wa we wi
con com pro pre per dis mis sub tra tri str sta sto spe sch th ch sh ph wh qu ck ng nt nd st sp sk tr pl
tion sion ment ness able ible ing ed ly ous ive ity ize ise ful less ence ance est ist ism ure ary ory
""".split()  # noqa: SIM905 - a word list reads better as text
PSEUDO_WORDS = 3000


def corpus(seed: int = CORPUS_SEED, sentences: int = CORPUS_SENTENCES) -> Iterator[str]:
    """Deterministic pseudo-English: Zipf-weighted words, so frequent words merge into whole tokens first."""
    rng = random.Random(seed)
    pseudo = ["".join(rng.choices(SYLLABLES, k=rng.randint(1, 4))) for _ in range(PSEUDO_WORDS)]
    vocabulary = WORDS + pseudo
    # Cumulative weights computed once (choices() would redo it per call; the draws are identical).
    cum_weights = list(itertools.accumulate(1.0 / (rank + 1) ** 0.8 for rank in range(len(vocabulary))))
    for _ in range(sentences):
        n = rng.randint(4, 18)
        words = rng.choices(vocabulary, cum_weights=cum_weights, k=n)
        words[0] = words[0].capitalize()
        text = " ".join(words)
        if rng.random() < 0.3:
            text += f" {rng.randint(0, 9999)}"
        yield text + rng.choice(PUNCTUATION)
    for role in CHAT_ROLES:  # the chat template's framing, so it tokenises compactly
        yield f"<|{role}|>\n"


def build() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    return tokenizer


def render() -> str:
    return build().to_str(pretty=False) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    text = render()
    args.output.write_text(text, encoding="utf-8")
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    print(f"wrote {args.output} ({len(text)} bytes, sha256 {digest})")


if __name__ == "__main__":
    main()
