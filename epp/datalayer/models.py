"""Which models each endpoint serves: its OpenAI-compatible `GET /v1/models`, polled.

`ModelsPoller` fetches every endpoint's list every `interval` seconds over one keep-alive
connection per endpoint (the scraper's client; the polling is `PagePoller`'s, shared with the DCGM
source) and stores the decoded tuple on `endpoint.models` (one attribute store; None until the
first good page). A failed fetch counts
`poll_errors{source_type}`, a page that is not a model list counts `extract_errors`; either
leaves the last good list in place. Readers: `models-responder` (pool-wide `/v1/models`, and
candidates restricted to the pods serving the requested model or adapter).
"""

from __future__ import annotations

from typing import Any, Protocol

import msgspec

from llmepp.datalayer.datastore import Datastore
from llmepp.datalayer.endpoint import Endpoint, ModelData
from llmepp.datalayer.pagepoll import PageError, PagePoller, PageSource
from llmepp.decoding import DECODE_ERRORS
from llmepp.observability.metrics import EppMetrics


class ModelsPageError(PageError):
    """A /v1/models answer that is not an OpenAI model list."""


class _Entry(msgspec.Struct):
    # vLLM also sends permission: ignored. root and max_model_len are kept when well-formed; another server's
    # odd values there must not cost the pod its whole list.
    id: str
    # JSON null reads as an absent field (the reference's Go decoder leaves a null field unset): servers
    # built on pydantic `Optional[...] = None` send null for these.
    object: str | None = "model"
    created: int | None = 0
    owned_by: str | None = ""
    parent: str | None = None
    root: Any = None
    max_model_len: Any = None


class _Page(msgspec.Struct):
    data: list[_Entry]


_decoder = msgspec.json.Decoder(_Page)


def parse_models_page(body: bytes) -> tuple[ModelData, ...]:
    """`{"object": "list", "data": [{"id": ..., "parent": ...}, ...]}` → the entries, in page order.
    Raises ModelsPageError naming what is wrong."""
    try:
        page = _decoder.decode(body)
    except DECODE_ERRORS as err:
        raise ModelsPageError(f"not a model list: {err}") from None
    models = []
    for i, entry in enumerate(page.data):
        if not entry.id:
            raise ModelsPageError(f"not a model list: empty id at `$.data[{i}].id`")
        root = entry.root if isinstance(entry.root, str) and entry.root else None
        length = entry.max_model_len
        length = length if type(length) is int and length > 0 else None
        models.append(
            ModelData(
                entry.id,
                entry.object if entry.object is not None else "model",
                entry.created or 0,
                entry.owned_by or "",
                entry.parent or None,
                root,
                length,
            )
        )
    return tuple(models)


class ModelsExtractor(Protocol):
    """What the poller needs from the extractor plugin (models-data-extractor)."""

    @property
    def type(self) -> str: ...

    def extract(self, body: bytes) -> tuple[ModelData, ...]: ...


class ModelsPoller(PagePoller):
    """A Datastore listener that fetches every endpoint's model list every `source.poll_interval`
    (the polling itself is `PagePoller`'s)."""

    what = "model list"

    def __init__(
        self,
        datastore: Datastore,
        metrics: EppMetrics,
        source: PageSource,
        extractor: ModelsExtractor,
        timeout: float = 1.0,
    ) -> None:
        super().__init__(datastore, metrics, source, extractor.type, timeout)
        self.extractor = extractor

    def store(self, endpoint: Endpoint, body: bytes) -> PageError | None:
        endpoint.models = self.extractor.extract(body)  # ModelsPageError: the last good list stays
        return None
