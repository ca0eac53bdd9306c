"""A local Hugging Face `tokenizer.json`, loaded offline, encoding to TokenizedPrompt bytes.

The file is read from the configured path, never fetched from a hub. `encode` returns the ids as
little-endian uint32 bytes (TokenizedPrompt's layout), with the special tokens the tokenizer's
post-processor adds (a BOS) when `add_special_tokens`, as vLLM's completions endpoint encodes by default.

Cost (measured on the simulator's 4096-entry BPE, 2-core AMD EPYC): ~0.6 µs per token for short
prompts, 1.5–2 µs per token at 100k tokens. `encode_many` hands texts longer than
`thread_threshold` characters to a small thread pool, which encodes them with the batch API: it
releases the GIL while encoding (`Tokenizer.encode` holds it for the whole call, so in a thread it
would stall the event loop just the same), so a long prompt does not stall every other request.
Prompts of LONG_CHARS or more have a thread of their own, so encodes the director gave up on cannot hold
the threads ordinary prompts need. `in_worker` runs other tokenization work on the same pool (the token
producer renders a long chat's template there, then encodes it with `encode_released`: one thread hop for
both).

Like transformers (hence vLLM), encoding never truncates or pads, whatever `tokenizer.json` configures.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from tokenizers import Encoding, Tokenizer

from llmepp.kvevents.keys import tokens_to_bytes

# Two workers: a long prompt at a time per core; more would only queue behind the GIL-free work.
WORKERS = 2
_EXECUTOR = concurrent.futures.ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="tokenize")
# Jobs that may wait for a worker. More are refused (WorkersBusy): a job queued behind that many long ones
# would start after its request's producer budget (400 ms) has long passed, only to hold a worker then.
MAX_QUEUED = 16
# Prompts this long (~64k tokens, about 0.25 s of encoding here) take a lane of their own. The director stops
# waiting for a prompt at its 400 ms budget, but a running encode cannot be stopped: two abandoned encodes of
# multi-megabyte bodies would hold both workers for seconds, and every ordinary prompt needing a worker would
# be routed without prefix data meanwhile. In their own lane they only delay each other.
LONG_CHARS = 256 * 1024
LONG_QUEUED = 2
_LONG_EXECUTOR = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize-long")
_in_flight = 0  # jobs submitted and not finished (a job whose caller gave up still counts until it ends)
_long_in_flight = 0
_in_flight_lock = threading.Lock()
T = TypeVar("T")


class WorkersBusy(RuntimeError):
    """The tokenization threads are busy and MAX_QUEUED jobs wait for them already."""


def in_worker(fn: Callable[..., T], *args: object, chars: int = 0) -> asyncio.Future[T]:
    """`fn(*args)` submitted to the tokenization threads (a prompt of `chars` >= LONG_CHARS on the long lane), its
    result to await; WorkersBusy at once when WORKERS + MAX_QUEUED jobs are pending (1 + LONG_QUEUED on the long
    lane). A future, not a coroutine: one that is never awaited (its caller cancelled first) is no error."""
    global _in_flight, _long_in_flight
    long = chars >= LONG_CHARS
    with _in_flight_lock:
        if long:
            if _long_in_flight >= 1 + LONG_QUEUED:
                raise WorkersBusy(f"the long-prompt tokenization thread is busy and {LONG_QUEUED} prompts wait for it")
            _long_in_flight += 1
        else:
            if _in_flight >= WORKERS + MAX_QUEUED:
                raise WorkersBusy(f"all {WORKERS} tokenization threads are busy and {MAX_QUEUED} jobs wait for them")
            _in_flight += 1
    job = (_LONG_EXECUTOR if long else _EXECUTOR).submit(fn, *args)
    # Run or cancelled (a caller's cancellation cancels a job still queued).
    job.add_done_callback(_long_done if long else _done)
    return asyncio.wrap_future(job)


def _done(_: object) -> None:
    global _in_flight
    with _in_flight_lock:
        _in_flight -= 1


def _long_done(_: object) -> None:
    global _long_in_flight
    with _in_flight_lock:
        _long_in_flight -= 1


class HFTokenizer:
    def __init__(self, path: str | Path, *, add_special_tokens: bool = False, thread_threshold: int = 4096) -> None:
        p = Path(path)
        if not p.is_file():
            what = "is a directory, not a tokenizer.json" if p.is_dir() else "does not exist"
            raise ValueError(f"tokenizer file {str(p)!r} {what}")
        try:
            self._tokenizer = Tokenizer.from_file(str(p))
        except Exception as e:  # the library raises a bare Exception on a bad file
            raise ValueError(f"tokenizer file {str(p)!r} cannot be loaded: {e}") from None
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        # encode_batch_fast: ids only (no offsets); tokenizers >= 0.20.
        self._encode_batch = getattr(self._tokenizer, "encode_batch_fast", self._tokenizer.encode_batch)
        self.path = p
        self.add_special_tokens = add_special_tokens
        self.thread_threshold = thread_threshold

    def has_token(self, text: str) -> bool:
        return self._tokenizer.token_to_id(text) is not None

    def ids(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=self.add_special_tokens).ids)

    def encode(self, text: str, special: bool | None = None, truncate: int | None = None) -> bytes:
        """`special` overrides `add_special_tokens` (chat prompts: False, their template has them). `truncate`:
        vLLM's `truncate_prompt_tokens` (see `_truncated`)."""
        add = self.add_special_tokens if special is None else special
        if truncate is None:
            return tokens_to_bytes(self._tokenizer.encode(text, add_special_tokens=add).ids)
        return self._truncated(self._tokenizer.encode(text, add_special_tokens=False), add, truncate)

    def encode_many(
        self, texts: list[str], special: bool | None = None, truncate: int | None = None
    ) -> list[bytes] | asyncio.Future[list[bytes]]:
        """Each text encoded as `encode` does (its special tokens, its truncation): at once while they add up to
        fewer than `thread_threshold` characters (no task, no thread hop), else a future of their encoding in a
        worker thread. Measured by their total length: a batch of many short prompts is as long as one long prompt."""
        chars = sum(map(len, texts))
        if chars < self.thread_threshold:
            return [self.encode(text, special, truncate) for text in texts]
        return in_worker(self.encode_many_released, texts, special, truncate, chars=chars)

    def encode_many_released(
        self, texts: list[str], special: bool | None = None, truncate: int | None = None
    ) -> list[bytes]:
        """Each text encoded as `encode` does, in one batch call (the batch API encodes without the GIL)."""
        add = self.add_special_tokens if special is None else special
        if truncate is None:
            return [tokens_to_bytes(e.ids) for e in self._encode_batch(texts, add_special_tokens=add)]
        return [self._truncated(e, add, truncate) for e in self._encode_batch(texts, add_special_tokens=False)]

    def encode_released(self, text: str, special: bool | None = None, truncate: int | None = None) -> bytes:
        """`encode` for a worker thread: the batch API encodes without the GIL."""
        return self.encode_many_released([text], special, truncate)[0]

    def _truncated(self, encoding: Encoding, add: bool, truncate: int) -> bytes:
        """As vLLM encodes with `truncate_prompt_tokens` N (transformers' `truncation=True, max_length=N`, on the
        left for generate models): the tokenizer keeps room for the special tokens it adds, so a completion with
        BOS is [BOS] + the text's last N - 1 tokens."""
        room = self._tokenizer.num_special_tokens_to_add(False) if add else 0
        encoding.truncate(max(truncate - room, 0), direction="left")
        if add:
            encoding = self._tokenizer.post_process(encoding, add_special_tokens=True)
        return tokens_to_bytes(encoding.ids)
