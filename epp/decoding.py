"""What decoding untrusted JSON or MessagePack (request bodies, pods' pages and events) can raise.

msgspec raises its DecodeError (ValidationError included) for malformed or mistyped input, but a plain
UnicodeDecodeError for a string whose bytes are not UTF-8, and RecursionError past its nesting limit (~1000):
a site that answers 400 or skips what does not decode must catch all three. Either one left uncaught was a 500
for a request body, and killed a KV-event source's task (whose restart replayed the same batch, forever).
"""

from __future__ import annotations

import msgspec

DECODE_ERRORS: tuple[type[Exception], ...] = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)
