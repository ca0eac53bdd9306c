"""Request control: what happens between a parsed request and a routing decision.

    handle_request:  header processors → responders (may answer it here) → admission (flow control)
                     → candidates (pool ∩ subset hint) → screeners → data producers → admitters
                     → scheduler (profiles: filter → score → pick) → in-flight accounting
                     → pre-request plugins → RoutingDecision
    handle_bodyless: responders (may answer it here) → candidates → screeners → a random one of them
    response_headers / response_complete: response plugins and in-flight release.

From admission to in-flight accounting a request is on its way to an endpoint but counted on none:
flow control counts it as pending (flowcontrol.interfaces.PendingLoad) until `release_pending`.

The ext_proc stream (server/extproc.py) owns the protocol; this module owns the policy.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import msgspec

from llmepp.datalayer.datastore import Datastore
from llmepp.datalayer.endpoint import Endpoint, split_hostport
from llmepp.errors import BadRequest, NoEndpoints, PreconditionFailed, RequestError
from llmepp.framework.datakeys import PrefixMatchInfo, prompt_tokens
from llmepp.framework.plugin import Plugin
from llmepp.framework.requestcontrol import (
    Admitter,
    DataProducer,
    DirectResponse,
    FirstResponseChunkProcessor,
    PreRequest,
    RequestHeaderProcessor,
    Responder,
    ResponseCompleteProcessor,
    ResponseHeaderProcessor,
    ResponseMetadataProcessor,
    Screener,
)
from llmepp.framework.scheduling import ProfileResult, SchedulingResult
from llmepp.observability.logging import LogLimiter
from llmepp.observability.metrics import EppMetrics
from llmepp.observability.plugin_timing import PluginTimers
from llmepp.request.types import InferenceRequest, ResponseInfo, TerminationCause
from llmepp.scheduling.scheduler import Scheduler

if TYPE_CHECKING:
    from llmepp.observability.tracing import RequestTracing

log = logging.getLogger(__name__)

# Each producer gets this long (reference: 400 ms); a late producer is logged, not fatal.
PRODUCER_TIMEOUT = 0.4


@dataclass(slots=True)
class RoutingDecision:
    """Where a request goes and what to change on its way."""

    targets: list[Endpoint]
    # Value of x-gateway-destination-endpoint and envoy.lb metadata: "ip:port[,ip:port...]".
    destination: str
    # Body to send upstream; None means unchanged.
    body: bytes | None = None
    # Request headers to set upstream (plugins' request.upstream_headers).
    headers: dict[str, str] = field(default_factory=dict)
    result: SchedulingResult | None = None
    # {ip:port: score} of the primary profile, only with --emit-endpoint-scores.
    scores: dict[str, float] | None = None
    # Prompt tokens charged to the primary target's in-flight load until completion.
    inflight_tokens: int = 0


class ModelRewrite(Protocol):
    """Chooses `request.target_model` (Kubernetes mode: InferenceModelRewrite rules, k8s/modelrewrite.py)."""

    def rewrite(self, request: InferenceRequest) -> None: ...


class Admission(Protocol):
    """Admission control before scheduling: returns when the request may be scheduled, raises a
    RequestError (429 / 503) when it must not. Flow control waits here in its queues; a client
    that disconnects cancels the waiting task, which must free its place."""

    async def admit(self, request: InferenceRequest, pool: Sequence[Endpoint]) -> None: ...

    def release_pending(self, request: InferenceRequest) -> None:
        """Once per `admit` that returned, when the request is no longer on its way to an endpoint: charged to
        one's in-flight counts, or failed / cancelled before. Until then in-flight-based flow control counts it
        (flowcontrol.interfaces.PendingLoad)."""

    def request_completed(self, request: InferenceRequest) -> None:
        """An admitted request is over (routed and finished, or never routed): its capacity is free."""


@dataclass(slots=True)
class Pipeline:
    """The configured plugins, in the order the director calls them (built by config.loader)."""

    scheduler: Scheduler
    admission: Admission | None = None
    header_processors: list[RequestHeaderProcessor] = field(default_factory=list)
    responders: list[Responder] = field(default_factory=list)
    screeners: list[Screener] = field(default_factory=list)
    producers: list[DataProducer] = field(default_factory=list)
    admitters: list[Admitter] = field(default_factory=list)
    pre_request: list[PreRequest] = field(default_factory=list)
    response_header: list[ResponseHeaderProcessor] = field(default_factory=list)
    first_response_chunk: list[FirstResponseChunkProcessor] = field(default_factory=list)
    response_metadata: list[ResponseMetadataProcessor] = field(default_factory=list)
    response_complete: list[ResponseCompleteProcessor] = field(default_factory=list)


class Director:
    def __init__(
        self,
        datastore: Datastore,
        pipeline: Pipeline,
        metrics: EppMetrics,
        *,
        subset_filter: bool = True,
        emit_scores: bool = False,
        decision_header: bool = False,
        rewriter: ModelRewrite | None = None,
        tracing: RequestTracing | None = None,
    ) -> None:
        self.datastore = datastore
        self.tracing = tracing
        self.rewriter = rewriter
        self.metrics = metrics
        self.subset_filter = subset_filter
        self.emit_scores = emit_scores
        self.decision_header = decision_header
        self._scheduler_e2e = metrics.scheduler_e2e
        self._rng = random.Random()
        self._timers = PluginTimers(metrics.plugin_duration)
        self._producers: list[tuple[DataProducer, bool]] = []
        self._timeout_log = LogLimiter(log, interval=30.0)
        # A plugin failing on every request: one line (with its traceback) per extension point and plugin per 30 s.
        self._failures = LogLimiter(log, interval=30.0)
        self.use_pipeline(pipeline)

    def use_pipeline(self, pipeline: Pipeline) -> None:
        """Route new requests with `pipeline` (a config reload); requests already past admission finish
        with the one they started with."""
        self.pipeline = pipeline
        # Sync and async producers are told apart once, not per request.
        self._producers = [(p, inspect.iscoroutinefunction(p.produce)) for p in pipeline.producers]

    # -- request path ------------------------------------------------------------------
    def candidates(self, subset: Sequence[str] | None) -> Sequence[Endpoint]:
        """The pool, narrowed by Envoy's subset hint (matched on IP only, like the reference; an IPv6
        entry is `[ip]:port`), less the endpoints whose server stopped answering while others answer;
        NoEndpoints when that leaves none."""
        endpoints = self._located(subset)
        if not endpoints:
            raise NoEndpoints()
        return endpoints

    def _located(self, subset: Sequence[str] | None) -> Sequence[Endpoint]:
        endpoints = self.datastore.endpoints
        if subset is not None and self.subset_filter:
            ips = {split_hostport(hp)[0] for hp in subset}
            endpoints = tuple(ep for ep in endpoints if ep.address in ips)
        return self.datastore.reachable(endpoints)

    async def handle_request(
        self, request: InferenceRequest, subset: Sequence[str] | None
    ) -> RoutingDecision | DirectResponse:
        tracing = self.tracing
        if tracing is None:
            return await self._handle_request(request, subset)
        tracing.start(request)
        try:
            decision = await self._handle_request(request, subset)
        except BaseException as e:
            tracing.fail(request, e)
            raise
        if isinstance(decision, DirectResponse):
            tracing.end(request, ResponseInfo(status=decision.status))
        else:
            tracing.routed(request, decision.destination)
        return decision

    def _process_headers(self, pipeline: Pipeline, request: InferenceRequest) -> None:
        # A plugin bug (anything but a RequestError, which is a plugin's answer) skips that plugin for the
        # request, logged once per 30 s, as a failing producer or scorer does: not a 500 for every request.
        for processor in pipeline.header_processors:
            try:
                processor.process_headers(request)
            except RequestError:
                raise
            except Exception:
                self._plugin_failed(
                    "RequestHeaderProcessor", processor, "RequestHeaderProcessor %s failed; skipped for the request"
                )

    async def _handle_request(
        self, request: InferenceRequest, subset: Sequence[str] | None
    ) -> RoutingDecision | DirectResponse:
        self._process_headers(self.pipeline, request)
        for responder in self.pipeline.responders:
            try:
                answer = responder.respond(request)
            except RequestError:
                raise
            except Exception:
                self._plugin_failed("Responder", responder, "Responder %s failed; skipped for the request")
                continue
            if answer is not None:
                return answer
        if self.rewriter is not None:
            self.rewriter.rewrite(request)  # InferenceModelRewrite: sets target_model
        # Re-encode before anything is charged, so a body that cannot be rewritten holds nothing.
        body = self._rewritten_body(request)
        admission = self.pipeline.admission
        admitted_at = 0.0
        if admission is not None:
            # Before candidates (as the reference): flow control may hold the request while the
            # pool is empty (scale from zero), and candidates are fresh after any queue wait.
            if self.tracing is not None:
                admitted_at = time.monotonic()
            # The request's candidates as the reference locates them (subset hint applied, possibly
            # none): legacy admission sheds on their saturation; flow control reads its own pool.
            await admission.admit(request, self._located(subset))
            # Admitted: until it is charged to its endpoint below, flow control counts it as pending
            # (in-flight saturation must see it while producers await); `finally` ends that.
        pipeline = self.pipeline  # one pipeline per request from here on, whatever a reload swaps in
        try:
            if admission is not None and self.tracing is not None:
                attributes = {"llm_d.epp.priority": request.priority, "llm_d.epp.fairness_id": request.fairness_id}
                self.tracing.stage(request, "llm_d.epp.admission", admitted_at, attributes)
            candidates = self._screened(pipeline, request, subset)
            timers = self._timers if self._timers.request_sampled() else None  # one request in 16
            start = 0.0
            waited = False
            for producer, is_async in self._producers:
                if timers is not None:
                    start = time.perf_counter()
                if is_async:
                    await self._await_producer(producer, producer.produce(request, candidates))  # type: ignore[arg-type]
                    waited = True
                else:
                    try:
                        produced = producer.produce(request, candidates)
                    except RequestError:
                        raise
                    except Exception:  # as the reference: a producer failure does not fail the request
                        self._plugin_failed("DataProducer", producer, "data producer %s failed")
                    else:
                        # A plain def that returns an awaitable (an async def behind a decorator, or work that
                        # must wait): awaited too. A done future is the result of work finished at once.
                        if isinstance(produced, asyncio.Future) and produced.done():
                            self._produced(producer, produced)
                        elif produced is not None and inspect.isawaitable(produced):
                            await self._await_producer(producer, produced)
                            waited = True
                if timers is not None:
                    timers.observe("DataProducer", producer, time.perf_counter() - start)
            if waited:
                candidates = _still_in_pool(candidates)
            for admitter in pipeline.admitters:
                if timers is not None:
                    start = time.perf_counter()
                try:
                    admitter.admit(request, candidates)  # refuses with a RequestError
                except RequestError:
                    raise
                except Exception:  # fails open: a broken admitter must not refuse every request
                    self._plugin_failed("Admitter", admitter, "Admitter %s failed; skipped for the request")
                if timers is not None:
                    timers.observe("Admitter", admitter, time.perf_counter() - start)

            t0 = time.perf_counter()
            scheduled_at = time.monotonic() if self.tracing is not None else 0.0
            try:
                result = pipeline.scheduler.schedule(request, candidates, timers)
            except RequestError:
                # Timed like a success (the reference observes both in one defer): the histogram's count is
                # every attempt's.
                self._scheduler_e2e.observe(time.perf_counter() - t0)
                self.metrics.scheduler_attempt("failure", request.target_model, None).inc()
                raise
            self._scheduler_e2e.observe(time.perf_counter() - t0)
            picked = result.targets
            self.metrics.scheduler_attempt("success", request.target_model, picked[0] if picked else None).inc()
            if self.tracing is not None:
                attributes = {
                    "llm_d.epp.primary_profile": result.primary_profile,
                    "llm_d.epp.candidates": len(candidates),
                }
                self.tracing.stage(request, "llm_d.epp.scheduling", scheduled_at, attributes)

            request.scheduling = result
            if log.isEnabledFor(logging.DEBUG):
                self._log_decision(request, result)
            if "prefer" in request.headers and _if_available(request) and not _cached_blocks(request, picked[0]):
                # Conditional decode (a coordinator's): only where the prompt's prefix is already cached.
                raise PreconditionFailed(f"Prefer: if-available: {picked[0].name} holds none of the prompt's prefix")
            targets = picked
            tokens = prompt_tokens(request)
            decision = RoutingDecision(
                targets=targets,
                # A profile handler may route the targets through another port of their pod (data parallel).
                destination=",".join(result.destinations()) if result.destination_port else _join(targets),
                body=body,
                headers=request.upstream_headers,
                result=result,
                scores=self._scores(result) if self.emit_scores else None,
                inflight_tokens=tokens,
            )
            inflight = targets[0].inflight
        except BaseException:
            if admission is not None:
                # Admitted, never routed: no response will complete it. Release it now (in-flight
                # eviction stops tracking it; the flow controller may dispatch in its place).
                admission.request_completed(request)
            raise
        finally:
            if admission is not None:
                # No longer pending, however the block above ended: routed, it is charged to its
                # endpoint just below, with no await in between for saturation to be read.
                admission.release_pending(request)
        inflight.requests += 1
        inflight.tokens += tokens
        try:
            errors: list[tuple[PreRequest, Exception]] | None = None  # allocated on a failure only
            for plugin in pipeline.pre_request:
                if timers is not None:
                    start = time.perf_counter()
                try:
                    plugin.pre_request(request, result)
                except Exception as e:  # as the reference: every PreRequest plugin runs, errors are joined
                    if not isinstance(e, RequestError):
                        self._plugin_failed("PreRequest", plugin, "pre-request plugin %s failed")
                    errors = [*(errors or ()), (plugin, e)]
                if timers is not None:
                    timers.observe("PreRequest", plugin, time.perf_counter() - start)
            if errors:
                raise _pre_request_error(errors)
        except BaseException as e:
            # Its span ends with the error, as every refusal's (response_complete would end it as a
            # response with no status); then what it holds is released, exactly as a finished one's.
            if self.tracing is not None:
                self.tracing.fail(request, e)
            self.response_complete(request, ResponseInfo(cause=TerminationCause.ERROR), decision)
            raise
        return decision

    def handle_bodyless(
        self, request: InferenceRequest, subset: Sequence[str] | None
    ) -> RoutingDecision | DirectResponse:
        """GET /v1/models and friends: a responder's answer, else any candidate the screeners keep (e.g.
        not a cluster whose EPP reports no ready endpoints) will do; NoEndpoints when they keep none."""
        tracing = self.tracing
        if tracing is not None:
            tracing.start(request)
        try:
            pipeline = self.pipeline
            self._process_headers(pipeline, request)  # before anything else, as on the body path
            for responder in pipeline.responders:
                try:
                    answer = responder.respond(request)
                except RequestError:
                    raise
                except Exception:  # as on the body path: a broken responder is skipped, not a 500
                    self._plugin_failed("Responder", responder, "Responder %s failed; skipped for the request")
                    continue
                if answer is not None:
                    if tracing is not None:
                        tracing.end(request, ResponseInfo(status=answer.status))
                    return answer
            endpoint = self._rng.choice(self._screened(pipeline, request, subset))
        except BaseException as e:
            if tracing is not None:
                tracing.fail(request, e)
            raise
        if tracing is not None:
            tracing.routed(request, endpoint.hostport)
        return RoutingDecision(targets=[endpoint], destination=endpoint.hostport, headers=request.upstream_headers)

    # -- response path -----------------------------------------------------------------
    def response_headers(
        self, request: InferenceRequest, response: ResponseInfo, headers: dict[str, str]
    ) -> dict[str, str] | None:
        extra: dict[str, str] | None = None
        if self.decision_header and request.scheduling is not None:
            extra = {DECISION_HEADER: decision_summary(request.scheduling)}
        timers = (
            self._timers
            if self.pipeline.response_header and self._timers.response_sampled("ResponseHeaderProcessor")
            else None
        )
        start = 0.0
        for plugin in self.pipeline.response_header:
            if timers is not None:
                start = time.perf_counter()
            try:
                out = plugin.response_headers(request, response, headers)
            except Exception:  # the other plugins still run, the response goes on
                self._plugin_failed("ResponseHeaderProcessor", plugin, "response-header plugin %s failed")
                continue
            if timers is not None:
                timers.observe("ResponseHeaderProcessor", plugin, time.perf_counter() - start)
            if out:
                extra = {**(extra or {}), **out}
        return extra

    def response_first_chunk(self, request: InferenceRequest, response: ResponseInfo) -> None:
        """Once, at the first response body bytes of a scheduled request."""
        timers = self._timers if self._timers.response_sampled("FirstResponseChunkProcessor") else None
        start = 0.0
        for plugin in self.pipeline.first_response_chunk:
            if timers is not None:
                start = time.perf_counter()
            try:
                plugin.first_response_chunk(request, response)
            except Exception:
                self._plugin_failed("FirstResponseChunkProcessor", plugin, "first-response-chunk plugin %s failed")
            if timers is not None:
                timers.observe("FirstResponseChunkProcessor", plugin, time.perf_counter() - start)

    @property
    def reports_metadata(self) -> bool:
        """Whether the stream must read a response's usage before answering its last message."""
        return bool(self.pipeline.response_metadata)

    def response_metadata(self, request: InferenceRequest, response: ResponseInfo) -> dict[str, dict[str, Any]]:
        """The dynamic metadata for the answer to a routed response's last message: every
        ResponseMetadataProcessor's, merged per namespace (empty: none)."""
        merged: dict[str, dict[str, Any]] = {}
        for plugin in self.pipeline.response_metadata:
            try:
                out = plugin.response_metadata(request, response)
            except Exception:
                self._plugin_failed("ResponseMetadataProcessor", plugin, "response-metadata plugin %s failed")
                continue
            for namespace, fields in (out or {}).items():
                merged.setdefault(namespace, {}).update(fields)
        return merged

    def response_complete(self, request: InferenceRequest, response: ResponseInfo, decision: RoutingDecision) -> None:
        """Exactly once per routed request, however the response ended: releases what it held."""
        if request.span is not None and self.tracing is not None:
            self.tracing.end(request, response)
        result = decision.result
        if result is None:
            return
        inflight = decision.targets[0].inflight
        inflight.requests -= 1
        inflight.tokens -= decision.inflight_tokens
        timers = self._timers if self._timers.response_sampled("ResponseCompleteProcessor") else None
        start = 0.0
        for plugin in self.pipeline.response_complete:
            if timers is not None:
                start = time.perf_counter()
            try:
                plugin.response_complete(request, response, result)
            except Exception:
                self._plugin_failed("ResponseCompleteProcessor", plugin, "response-complete plugin %s failed")
            if timers is not None:
                timers.observe("ResponseCompleteProcessor", plugin, time.perf_counter() - start)

    # -- helpers -----------------------------------------------------------------------
    def _screened(
        self, pipeline: Pipeline, request: InferenceRequest, subset: Sequence[str] | None
    ) -> Sequence[Endpoint]:
        """The candidates every screener keeps (in order); NoEndpoints naming the one that kept none.
        Screeners see body-less requests too (no payload, no model): they must not need a body."""
        candidates = self.candidates(subset)
        for screener in pipeline.screeners:
            try:
                candidates = screener.screen(request, candidates)
            except RequestError:
                raise
            except Exception:  # screens nothing out
                self._plugin_failed("Screener", screener, "Screener %s failed; skipped for the request")
                continue
            if not candidates:
                raise NoEndpoints(f"no endpoint passed screener {screener.name!r}")
        return candidates

    def _plugin_failed(self, kind: str, plugin: Plugin, message: str) -> None:
        """From the `except` block of a plugin's failed call (`kind`: its extension point; `message`: the line,
        "%s" the plugin's name): its traceback, once per 30 s per extension point and plugin."""
        self._failures.error(f"{kind}/{plugin.name}", message, plugin.name, exc_info=True)

    async def _await_producer(self, producer: DataProducer, produced: Awaitable[None]) -> None:
        # The producer runs in a task of its own, waited on with asyncio.wait: the routing step's first stretch
        # runs outside any task (Pending.step), where asyncio.timeout raises RuntimeError("Timeout should be used
        # inside a task") -- and so does wait_for from Python 3.12 on (it is asyncio.timeout there).
        task = asyncio.ensure_future(produced)
        try:
            done, _ = await asyncio.wait((task,), timeout=producer.produce_timeout or PRODUCER_TIMEOUT)
        except BaseException:  # the routing step was cancelled (the stream went away): so is the producer
            task.cancel()
            raise
        if not done:
            task.cancel()
            # Every request while e.g. a tokenizer sidecar is slow: one line per producer per 30 s.
            self._timeout_log.warning(producer.name, "data producer %s timed out", producer.name)
            return
        self._produced(producer, task)

    def _produced(self, producer: DataProducer, done: asyncio.Future[Any]) -> None:
        """A finished producer's outcome: its RequestError fails the request, another failure is logged."""
        try:
            done.result()
        except RequestError:
            raise
        except Exception:
            self._plugin_failed("DataProducer", producer, "data producer %s failed")

    @staticmethod
    def _rewritten_body(request: InferenceRequest) -> bytes | None:
        """Re-encode the body only when the model name must change on the way upstream."""
        if not request.target_model or request.target_model == request.model or request.payload is None:
            return None
        payload = dict(request.payload)
        payload["model"] = request.target_model
        try:
            body = msgspec.json.encode(payload)
        except (TypeError, msgspec.EncodeError, RecursionError) as e:
            raise BadRequest(f"cannot rewrite model name: {e or 'nested too deeply'}") from None
        return request.wrap_body(body) if request.wrap_body is not None else body

    @staticmethod
    def _scores(result: SchedulingResult) -> dict[str, float]:
        """Every candidate's total in the primary profile (the --emit-endpoint-scores metadata)."""
        res: ProfileResult | None = result.profiles.get(result.primary_profile)
        if res is None:
            return {}
        return {ep.hostport: s for ep, s in zip(res.candidates, res.totals)}

    @staticmethod
    def _log_decision(request: InferenceRequest, result: SchedulingResult) -> None:
        """Debug verbosity: why each profile chose what it chose, scorer by scorer."""
        for name, res in result.profiles.items():
            if res is None:
                continue
            breakdown = res.breakdown or {}
            top = [
                {"endpoint": ep.hostport, "total": round(total, 4),
                 **{scorer: round(col[res.candidates.index(ep)], 4) for scorer, col in breakdown.items()}}
                for ep, total in res.ranked(5)
            ]  # fmt: skip
            log.debug(
                "scheduling decision",
                extra={"request_id": request.request_id, "profile": name,
                       "targets": [ep.hostport for ep in res.targets], "top": top},
            )  # fmt: skip


def _pre_request_error(errors: list[tuple[PreRequest, Exception]]) -> RequestError:
    """The reference's joined PreRequest errors: a single typed error keeps its own code, else 500."""
    if len(errors) == 1 and isinstance(errors[0][1], RequestError):
        return errors[0][1]
    parts = [f"{plugin.name}: {e.message if isinstance(e, RequestError) else type(e).__name__}" for plugin, e in errors]
    return RequestError("pre-request plugins failed: " + "; ".join(parts))


DECISION_HEADER = "x-epp-decision"


def decision_summary(result: SchedulingResult, top: int = 3) -> str:
    """`x-epp-decision` value: the chosen endpoint(s) per profile and the top totals, e.g.
    `default: 10.0.0.2:8000; scores 10.0.0.2:8000=6.21 10.0.0.3:8000=5.87`."""
    parts = []
    for name, res in result.profiles.items():
        if res is None:
            parts.append(f"{name}: none")
            continue
        chosen = ",".join(ep.hostport for ep in res.targets)
        ranked = " ".join(f"{ep.hostport}={total:.3f}" for ep, total in res.ranked(top))
        parts.append(f"{name}: {chosen}; scores {ranked}")
    return " | ".join(parts)


def _join(targets: Sequence[Endpoint]) -> str:
    """Envoy's destination list: the primary, then fallbacks, each once (a picker's repeat would only retry the
    endpoint that just failed)."""
    if len(targets) == 1:
        return targets[0].hostport
    return ",".join(dict.fromkeys(ep.hostport for ep in targets))


def _if_available(request: InferenceRequest) -> bool:
    """`Prefer: if-available` (RFC 7240 preferences, comma-separated, each with optional parameters)."""
    return any(p.split(";", 1)[0].strip().lower() == "if-available" for p in request.headers["prefer"].split(","))


def _cached_blocks(request: InferenceRequest, endpoint: Endpoint) -> int:
    """The prompt blocks `endpoint` holds by any prefix producer's match (0 without one)."""
    infos = (v for v in request.data.values() if isinstance(v, PrefixMatchInfo))
    return max((info.cached_blocks(endpoint) for info in infos), default=0)


def _still_in_pool(candidates: Sequence[Endpoint]) -> Sequence[Endpoint]:
    """The candidates not removed while the async producers waited (a pod deleted meanwhile); NoEndpoints when
    none is left."""
    if not any(ep.removed for ep in candidates):
        return candidates
    live = tuple(ep for ep in candidates if not ep.removed)
    if not live:
        raise NoEndpoints()
    return live
