"""Client-chosen identifiers that key state outliving a request (sessions, flows, rollout decisions)."""

from __future__ import annotations

import hashlib

MAX_ID_CHARS = 256


def bounded_id(value: str) -> str:
    """`value`, or "sha256:" + the hex digest of its UTF-8 when it is longer than MAX_ID_CHARS: a client does not
    choose the size of the state its id keys (a header may hold ~60 KiB). The same id always gives the same value."""
    if len(value) <= MAX_ID_CHARS:
        return value
    return "sha256:" + hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()
