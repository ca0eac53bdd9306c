"""`models-responder`: the pool's `GET /v1/models`, and requests kept on pods serving their model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote

import msgspec

from llmepp.datalayer.endpoint import Endpoint
from llmepp.errors import NotFound, ServiceUnavailable
from llmepp.framework.plugin import ConfigError, PluginContext
from llmepp.framework.requestcontrol import DirectResponse, Responder, Screener
from llmepp.request.types import InferenceRequest

MODELS_PATH = "/v1/models"


class _Model(msgspec.Struct, omit_defaults=True):
    # id, object, created and owned_by are always written (OpenAI's Model; typed clients require them); vLLM's
    # root, parent and max_model_len when the pod gave them.
    id: str
    object: str
    created: int
    owned_by: str
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class _ModelList(msgspec.Struct):
    data: list[_Model]
    object: str = "list"


_encode = msgspec.json.Encoder().encode


class ModelsResponder(Responder, Screener):
    """A model server knows only its own models; the EPP knows every pod's (models-data-source).

    respond: `GET /v1/models` (a trailing slash and the query are ignored) is answered by the EPP:
        200 {"object": "list", "data": [{id, object, created, owned_by, root?, parent?, max_model_len?}]}, the
        union of every pod's list, one entry per id (the pod first by namespace/name gives it), sorted
        by id. While no pod's list has been fetched: 503, so a client retries instead of caching an
        empty list.
        `GET /v1/models/{id}`: that entry, or 404 when no pod lists it.
    screen: the candidates for a request of model m (after rewrite):
        m is an adapter (listed with a parent) on some pods → those pods only
        m is a base model listed by some pods             → those, plus pods not fetched yet
        nobody lists m                                     → pods not fetched yet, else all (a list
                                                            can lag a hot-loaded adapter by a poll)
    No parameters; lists the models source and extractor for itself when the config has none.
    """

    type = "models-responder"
    data_sources = (("models-data-source", "models-data-extractor"),)

    def __init__(self, name: str = "", params: Any = None) -> None:
        super().__init__(name, params)
        self._endpoints: Any = None  # the datastore, whose `.endpoints` is the current pool

    def setup(self, ctx: PluginContext) -> None:
        if ctx.datastore is None:
            raise ConfigError("needs the endpoint datastore")
        self._endpoints = ctx.datastore

    # -- Responder -------------------------------------------------------------------------------
    def respond(self, request: InferenceRequest) -> DirectResponse | None:
        if request.headers.get(":method") != "GET":
            return None
        path = request.path.rstrip("/")
        if path == MODELS_PATH:
            union = self._union()
            return DirectResponse(200, _encode(_ModelList([union[k] for k in sorted(union)])))
        if path.startswith(MODELS_PATH + "/"):
            model_id = unquote(path[len(MODELS_PATH) + 1 :])  # ids may contain '/' (org/model)
            model = self._union().get(model_id)
            if model is None:
                raise NotFound(f"The model `{model_id}` does not exist.")
            return DirectResponse(200, _encode(model))
        return None

    def _union(self) -> dict[str, _Model]:
        """Every pod's models by id; the pod first by namespace/name gives a duplicated id's entry."""
        fetched = sorted(
            (ep for ep in self._endpoints.endpoints if ep.models is not None), key=lambda e: (e.namespace, e.name)
        )
        if not fetched:
            raise ServiceUnavailable("no model server's model list has been fetched yet")
        union: dict[str, _Model] = {}
        for ep in fetched:
            for m in ep.models:
                if m.id not in union:
                    union[m.id] = _Model(m.id, m.object, m.created, m.owned_by, m.root, m.parent, m.max_model_len)
        return union

    # -- Screener --------------------------------------------------------------------------------
    def screen(self, request: InferenceRequest, candidates: Sequence[Endpoint]) -> Sequence[Endpoint]:
        model = request.target_model or request.model
        if not model:
            return candidates
        adapter_on: list[Endpoint] = []
        base_on: list[Endpoint] = []
        unknown: list[Endpoint] = []
        for ep in candidates:
            models = ep.models
            if models is None:
                unknown.append(ep)
                continue
            for m in models:
                if m.id == model:
                    (adapter_on if m.parent else base_on).append(ep)
                    break
        if adapter_on:
            return adapter_on
        if base_on and unknown:
            keep = {*base_on, *unknown}
            return [ep for ep in candidates if ep in keep]  # candidate order, as filters keep it
        return base_on or unknown or candidates
