"""Fetches one HTTP page per endpoint on a fixed period and hands each body to a `store` step.

The shared machinery of the data sources that are not the metrics scrape: `models-data-source`
(`/v1/models`, `ModelsPoller`) and `dcgm-data-source` (the NVIDIA DCGM exporter, `DcgmPoller`).
They poll far less often than the 50 ms metrics scrape, so one sleep loop for the whole pool is
enough (the metrics collector's per-slot staggering would buy nothing at a one-second period).

Per endpoint: one keep-alive `ScrapeClient` (the scraper's client, so no Task or Future per
fetch), created when the datastore adds the endpoint and fetched at once, re-targeted when its
spec changes in place, closed when it is removed. A fetch still outstanding is never doubled up;
one past its deadline is expired (reported as a timeout).

Outcomes: a failed fetch counts `poll_errors{source_type}`; a page `store` rejects (raises
`PageError`) or only partly uses (returns one) counts `extract_errors{source_type, extractor_type}`.
Logging per endpoint goes through `FailureStreak`: WARNING with the reason on the first failure,
DEBUG while it keeps failing, INFO when it recovers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from abc import ABC, abstractmethod
from typing import Protocol

from llmepp.datalayer.datastore import Datastore
from llmepp.datalayer.endpoint import Endpoint, EndpointSpec
from llmepp.datalayer.httpscrape import ScrapeClient, ScrapeError, ScrapeTarget
from llmepp.observability.metrics import EppMetrics
from llmepp.observability.streak import FailureStreak
from llmepp.tasks import cancel_and_wait

log = logging.getLogger(__name__)

__all__ = ["PageError", "PagePoller", "PageSource"]


class PageError(ValueError):
    """A fetched page that cannot be used (or only partly): the message says what is wrong."""


class PageSource(Protocol):
    """What the poller needs from the source plugin (models-data-source, dcgm-data-source)."""

    @property
    def type(self) -> str: ...

    @property
    def poll_interval(self) -> float: ...

    def target_for(self, spec: EndpointSpec) -> ScrapeTarget: ...


class _EndpointPage:
    __slots__ = ("client", "endpoint", "poller", "spec", "streak")

    def __init__(self, poller: PagePoller, endpoint: Endpoint) -> None:
        self.poller = poller
        self.endpoint = endpoint
        self.spec = endpoint.spec
        self.streak = FailureStreak(log, {"endpoint": endpoint.name})
        self.client: ScrapeClient | None = None
        self.retarget()

    def retarget(self) -> None:
        """(Re)build the client for the current spec; none when the source has no target for it."""
        p = self.poller
        target = p.target_for(self.spec)
        if self.client is not None:
            if target == self.client.target:
                return
            self.client.close()
            self.client = None
        if target is None:
            log.warning(
                "%s: %s; endpoint skipped until its spec changes",
                p.what,
                p.no_target,
                extra={"endpoint": self.endpoint.name, "source": p.source.type},
            )
            return
        self.client = ScrapeClient(target, self.on_result, p.timeout)

    def on_result(self, body: bytes | None, err: ScrapeError | None) -> None:
        ep = self.endpoint
        client = self.client
        if ep.removed or client is None:
            return
        p = self.poller
        if err is not None:
            p._poll_errors.inc()
            self.streak.failed(f"{p.what} fetch failed", err, client.target)
            return
        assert body is not None
        try:
            problem = p.store(ep, body)
        except PageError as e:
            problem = e
        if problem is not None:
            p._extract_errors.inc()
            self.streak.failed(f"{p.what} unusable", problem, client.target)
            return
        self.streak.succeeded(f"{p.what} fetch", client.target)


class PagePoller(ABC):
    """A Datastore listener that fetches every endpoint's page every `source.poll_interval` seconds.

    Subclasses implement `store`: turn the body into what the endpoint keeps, raising PageError for
    a page they cannot use (the endpoint keeps its last good value) or returning one for a page
    they used only in part (the value is applied, the page still counts as an extraction error)."""

    # What is fetched, for logs ("model list", "DCGM page"), and why `target_for` may give no target.
    what = "page"
    no_target = "no address to fetch it from"

    def __init__(
        self,
        datastore: Datastore,
        metrics: EppMetrics,
        source: PageSource,
        extractor_type: str,
        timeout: float = 1.0,
    ) -> None:
        self.datastore = datastore
        self.source = source
        self.interval = source.poll_interval
        # Not capped at the period: a tick skips a fetch still in flight and expires it only past its
        # deadline, so a server slower than a short interval still gets its page read (the reference's
        # dispatch timeout is 1 s whatever the interval).
        self.timeout = timeout
        self._poll_errors = metrics.poll_errors.labels(source_type=source.type)
        self._extract_errors = metrics.extract_errors.labels(source_type=source.type, extractor_type=extractor_type)
        self._states: dict[Endpoint, _EndpointPage] = {}
        self._task: asyncio.Task[None] | None = None

    @abstractmethod
    def store(self, endpoint: Endpoint, body: bytes) -> PageError | None:
        """Apply one fetched page to `endpoint`; see the class docstring."""

    def target_for(self, spec: EndpointSpec) -> ScrapeTarget | None:
        """Where to fetch an endpoint's page; None when it has no such place (it is skipped)."""
        return self.source.target_for(spec)

    async def start(self) -> None:
        if self._task is not None:
            return
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"{self.source.type}-poller")
        self.datastore.add_listener(self)

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        with contextlib.suppress(ValueError):
            self.datastore.remove_listener(self)
        await cancel_and_wait(task)
        for state in self._states.values():
            if state.client is not None:
                state.client.close()
        self._states.clear()

    # -- DatastoreListener ---------------------------------------------------------------
    def endpoint_added(self, endpoint: Endpoint) -> None:
        if endpoint not in self._states:
            state = self._states[endpoint] = _EndpointPage(self, endpoint)
            if state.client is not None:
                state.client.start()  # a new pod's page is known within one round trip

    def endpoint_removed(self, endpoint: Endpoint) -> None:
        state = self._states.pop(endpoint, None)
        if state is not None and state.client is not None:
            state.client.close()

    # -- polling -------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.poll(time.monotonic())
            except Exception:  # a bug must not stop polling
                log.exception("%s poller tick failed", self.source.type)

    def poll(self, now: float) -> None:
        """Start a fetch for every endpoint not still waiting on one (expiring those past their deadline)."""
        for state in list(self._states.values()):
            client = state.client
            if client is not None and client.busy:
                if now >= client.deadline:
                    client.expire()  # reports ScrapeTimeout through on_result
                continue
            if state.endpoint.spec is not state.spec:  # labels or address changed in place
                state.spec = state.endpoint.spec
                state.retarget()
                client = state.client
            if client is not None:
                client.start(now)
