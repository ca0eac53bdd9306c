"""Which models each endpoint serves: its OpenAI-compatible `GET /v1/models`, polled.

`ModelsPoller` fetches every endpoint's list every `interval` seconds over one keep-alive
connection per endpoint (the scraper's client) and stores the decoded tuple on `endpoint.models`
(one attribute store; None until the first good page). A failed fetch counts
`poll_errors{source_type}`, a page that is not a model list counts `extract_errors`; either
leaves the last good list in place. Readers: `models-responder` (pool-wide `/v1/models`, and
candidates restricted to the pods serving the requested model or adapter).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Protocol

import msgspec

from llmepp.datalayer.datastore import Datastore
from llmepp.datalayer.endpoint import Endpoint, EndpointSpec, ModelData
from llmepp.datalayer.httpscrape import ScrapeClient, ScrapeError, ScrapeTarget
from llmepp.datalayer.streak import FailureStreak
from llmepp.observability.metrics import EppMetrics

log = logging.getLogger(__name__)


class ModelsPageError(ValueError):
    """A /v1/models answer that is not an OpenAI model list."""


class _Entry(msgspec.Struct):
    # vLLM adds root, max_model_len, permission: ignored.
    id: str
    object: str = "model"
    created: int = 0
    owned_by: str = ""
    parent: str | None = None


class _Page(msgspec.Struct):
    data: list[_Entry]


_decoder = msgspec.json.Decoder(_Page)


def parse_models_page(body: bytes) -> tuple[ModelData, ...]:
    """`{"object": "list", "data": [{"id": ..., "parent": ...}, ...]}` → the entries, in page order.
    Raises ModelsPageError naming what is wrong."""
    try:
        page = _decoder.decode(body)
    except msgspec.DecodeError as err:
        raise ModelsPageError(f"not a model list: {err}") from None
    models = []
    for i, entry in enumerate(page.data):
        if not entry.id:
            raise ModelsPageError(f"not a model list: empty id at `$.data[{i}].id`")
        models.append(ModelData(entry.id, entry.object, entry.created, entry.owned_by, entry.parent or None))
    return tuple(models)


class ModelsSource(Protocol):
    """What the poller needs from the source plugin (models-data-source)."""

    @property
    def type(self) -> str: ...

    @property
    def poll_interval(self) -> float: ...

    def target_for(self, spec: EndpointSpec) -> ScrapeTarget: ...


class ModelsExtractor(Protocol):
    """What the poller needs from the extractor plugin (models-data-extractor)."""

    @property
    def type(self) -> str: ...

    def extract(self, body: bytes) -> tuple[ModelData, ...]: ...


class _EndpointModels:
    __slots__ = ("client", "endpoint", "poller", "spec", "streak")

    def __init__(self, poller: ModelsPoller, endpoint: Endpoint) -> None:
        self.poller = poller
        self.endpoint = endpoint
        self.spec = endpoint.spec
        self.streak = FailureStreak(log, endpoint.name)
        self.client = ScrapeClient(poller.source.target_for(self.spec), self.on_result, poller.timeout)

    def on_result(self, body: bytes | None, err: ScrapeError | None) -> None:
        ep = self.endpoint
        if ep.removed:
            return
        p = self.poller
        if err is not None:
            p._poll_errors.inc()
            self.streak.failed("model list fetch failed", err, self.client.target)
            return
        assert body is not None
        try:
            ep.models = p.extractor.extract(body)
        except ModelsPageError as e:
            p._extract_errors.inc()
            self.streak.failed("model list unusable", e, self.client.target)
            return
        self.streak.succeeded("model list fetch", self.client.target)


class ModelsPoller:
    """A Datastore listener that fetches every endpoint's model list every `source.poll_interval`."""

    def __init__(
        self,
        datastore: Datastore,
        metrics: EppMetrics,
        source: ModelsSource,
        extractor: ModelsExtractor,
        timeout: float = 1.0,
    ) -> None:
        self.datastore = datastore
        self.source = source
        self.extractor = extractor
        self.interval = source.poll_interval
        self.timeout = min(timeout, self.interval)
        self._poll_errors = metrics.poll_errors.labels(source_type=source.type)
        self._extract_errors = metrics.extract_errors.labels(source_type=source.type, extractor_type=extractor.type)
        self._states: dict[Endpoint, _EndpointModels] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._task is not None:
            return
        self._task = asyncio.get_running_loop().create_task(self._run(), name="models-poller")
        self.datastore.add_listener(self)

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        with contextlib.suppress(ValueError):
            self.datastore.remove_listener(self)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        for state in self._states.values():
            state.client.close()
        self._states.clear()

    # -- DatastoreListener ---------------------------------------------------------------
    def endpoint_added(self, endpoint: Endpoint) -> None:
        if endpoint not in self._states:
            state = self._states[endpoint] = _EndpointModels(self, endpoint)
            state.client.start()  # a new pod's models are known within one round trip

    def endpoint_removed(self, endpoint: Endpoint) -> None:
        state = self._states.pop(endpoint, None)
        if state is not None:
            state.client.close()

    # -- polling -------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.poll(time.monotonic())
            except Exception:  # a bug must not stop polling
                log.exception("models poller tick failed")

    def poll(self, now: float) -> None:
        """Start a fetch for every endpoint not still waiting on one (expiring those past their deadline)."""
        for state in list(self._states.values()):
            client = state.client
            if client.busy:
                if now >= client.deadline:
                    client.expire()  # reports ScrapeTimeout through on_result
                continue
            if state.endpoint.spec is not state.spec:  # labels or address changed in place
                state.spec = state.endpoint.spec
                target = self.source.target_for(state.spec)
                if target != client.target:
                    client.close()
                    client = state.client = ScrapeClient(target, state.on_result, self.timeout)
            client.start(now)
