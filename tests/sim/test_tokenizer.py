"""The shipped tokenizer: reproducible, compact, not the EPP's 4-byte approximation; chat template; filler."""

from __future__ import annotations

import hashlib
from typing import Any

from llmepp_sim import build_tokenizer
from llmepp_sim.textgen import FillerStream, filler_vocabulary
from llmepp_sim.tokenizer import TOKENIZER_PATH, SimTokenizer, render_chat


def test_generator_reproduces_the_shipped_file_byte_for_byte() -> None:
    shipped = TOKENIZER_PATH.read_bytes()
    assert len(shipped) < 1_000_000
    regenerated = build_tokenizer.render().encode("utf-8")
    assert hashlib.sha256(regenerated).hexdigest() == hashlib.sha256(shipped).hexdigest()


def test_vocabulary_and_special_tokens() -> None:
    tokenizer = SimTokenizer()
    assert tokenizer.vocab_size == build_tokenizer.VOCAB_SIZE
    for role in ("system", "user", "assistant", "tool"):
        assert tokenizer.encode(f"<|{role}|>") == [tokenizer.token_id(f"<|{role}|>")]
    text = "Hello world, the model serves requests from the prefix cache."
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_token_counts_are_not_the_four_byte_approximation() -> None:
    tokenizer = SimTokenizer()
    common = " the request cache server model token prefix queue batch"
    rare = "xq7 zzkv qwp jjh 93821 ffwq"
    # Common words are single tokens (about 6 bytes each), rare strings shatter (about 2 bytes each).
    assert len(tokenizer.encode(common)) == 9 < len(common.encode()) // 4
    assert len(tokenizer.encode(rare)) > len(rare.encode()) // 4


def test_chat_template_is_exactly_the_documented_one() -> None:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]},
        {"role": "assistant", "content": None},
    ]
    assert render_chat(messages) == ("<|system|>\nBe brief.\n<|user|>\nHi\nthere\n<|assistant|>\n\n<|assistant|>\n")
    tokenizer = SimTokenizer()
    # A conversation's rendering (minus the generation prompt) prefixes its continuation's rendering.
    turn1 = render_chat(messages[:2]).removesuffix("<|assistant|>\n")
    turn2 = render_chat([*messages[:2], {"role": "assistant", "content": "ok"}, {"role": "user", "content": "more"}])
    assert turn2.startswith(turn1)
    ids1, ids2 = tokenizer.encode(turn1), tokenizer.encode(turn2)
    assert ids2[: len(ids1)] == ids1


def test_filler_tokens_are_single_tokens_and_retokenize_identically() -> None:
    tokenizer = SimTokenizer()
    vocab = filler_vocabulary(tokenizer)
    assert len(vocab) > 200
    stream = FillerStream(vocab, seed=1, prompt_ids=[1, 2, 3])
    tokens = [stream.next_token() for _ in range(50)]
    text = "".join(t.text for t in tokens)
    assert tokenizer.encode(text) == [t.token_id for t in tokens]
    again = FillerStream(vocab, seed=1, prompt_ids=[1, 2, 3])
    assert [again.next_token() for _ in range(50)] == tokens
    other = FillerStream(vocab, seed=2, prompt_ids=[1, 2, 3])
    assert [other.next_token() for _ in range(50)] != tokens
