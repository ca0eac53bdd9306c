"""`decode-filter`, `prefill-filter`, `encode-filter`: keep endpoints by their P/D role label.

The role is the `llm-d.ai/role` label (reference `docs/disaggregation.md`): `encode`, `prefill`,
`decode`, `encode-prefill`, `encode-decode`, `prefill-decode`, `encode-prefill-decode`, and the
deprecated `both` (= prefill-decode).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from llmepp.datalayer.endpoint import Endpoint
from llmepp.framework.scheduling import Filter
from llmepp.request.types import InferenceRequest

ROLE_LABEL = "llm-d.ai/role"


class _RoleFilter(Filter):
    """Keeps endpoints whose role label is in `roles`; unlabeled ones per `keep_unlabeled`."""

    roles: ClassVar[frozenset[str]] = frozenset()
    keep_unlabeled: ClassVar[bool] = False

    def filter(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[Endpoint]:
        roles = self.roles
        if self.keep_unlabeled:
            # A missing label reads as None, which is never a role: test it explicitly.
            return [ep for ep in endpoints if (r := ep.spec.labels.get(ROLE_LABEL)) is None or r in roles]
        return [ep for ep in endpoints if ep.spec.labels.get(ROLE_LABEL) in roles]


class DecodeFilter(_RoleFilter):
    """Keeps endpoints that can decode.

    keep(e) = role(e) ∈ {decode, prefill-decode, both, encode-prefill-decode} or e has no
    `llm-d.ai/role` label.

    Why unlabeled pods are kept: a pool without any role labels is an ordinary aggregated pool
    where every pod decodes, so a P/D config still routes there (reference semantics).
    Parameters: none.
    """

    type = "decode-filter"
    roles = frozenset({"decode", "prefill-decode", "both", "encode-prefill-decode"})
    keep_unlabeled = True


class PrefillFilter(_RoleFilter):
    """Keeps endpoints that can run a remote prefill.

    keep(e) = role(e) ∈ {prefill, encode-prefill, prefill-decode, both, encode-prefill-decode}.

    Why unlabeled pods are dropped: sending a prefill-only request to a pod nobody declared as a
    prefiller would silently double the work on a decode pod. Parameters: none.
    """

    type = "prefill-filter"
    roles = frozenset({"prefill", "encode-prefill", "prefill-decode", "both", "encode-prefill-decode"})


class EncodeFilter(_RoleFilter):
    """Keeps endpoints that can run a multimodal encoder.

    keep(e) = role(e) ∈ {encode, encode-prefill, encode-prefill-decode}; unlabeled pods are
    dropped (encoders must be declared). Parameters: none.
    """

    type = "encode-filter"
    roles = frozenset({"encode", "encode-prefill", "encode-prefill-decode"})
