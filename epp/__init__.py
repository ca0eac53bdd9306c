"""llmepp: an Endpoint Picker for LLM inference pools behind Envoy (ext_proc).

The public API for plugin authors is re-exported here; everything else is internal.

    from llmepp import Scorer, PluginParams, InferenceRequest, Endpoint

    class PreferLabel(Scorer):
        \"\"\"1.0 for endpoints carrying `label=value`, else 0.\"\"\"
        type = "prefer-label-scorer"

        class Params(PluginParams):
            label: str
            value: str = "true"

        def score(self, request, endpoints):
            key, value = self.params.label, self.params.value
            return [1.0 if ep.labels.get(key) == value else 0.0 for ep in endpoints]

Register it in your package's pyproject.toml:

    [project.entry-points."epp.plugins"]
    prefer-label = "mypackage:PreferLabel"
"""

from llmepp.datalayer.endpoint import Endpoint, EndpointMetrics, EndpointSpec, InFlight
from llmepp.errors import BadRequest, RequestError
from llmepp.framework.datakeys import PREFIX_CACHE_MATCH_INFO, TOKENIZED_PROMPT, PrefixMatchInfo, TokenizedPrompt
from llmepp.framework.datalayer import (
    EndpointDiscovery,
    GroupVersionKind,
    NotificationEvent,
    NotificationEventType,
    NotificationExtractor,
)
from llmepp.framework.plugin import (
    ConfigError,
    Plugin,
    PluginContext,
    PluginParams,
    PluginRegistry,
    reference_default,
    registry,
)
from llmepp.framework.requestcontrol import (
    Admitter,
    DataProducer,
    DirectResponse,
    FirstResponseChunkProcessor,
    Parser,
    PreRequest,
    RequestHeaderProcessor,
    Responder,
    ResponseCompleteProcessor,
    ResponseHeaderProcessor,
    ResponseMetadataProcessor,
    Screener,
)
from llmepp.framework.scheduling import (
    Decider,
    Filter,
    Picker,
    PickerParams,
    ProfileHandler,
    ProfileResult,
    SchedulingResult,
    Scorer,
    ScorerCategory,
)
from llmepp.request.types import InferenceRequest, RequestKind, ResponseInfo, Usage

__all__ = [
    "PREFIX_CACHE_MATCH_INFO",
    "TOKENIZED_PROMPT",
    "Admitter",
    "BadRequest",
    "ConfigError",
    "DataProducer",
    "Decider",
    "DirectResponse",
    "Endpoint",
    "EndpointDiscovery",
    "EndpointMetrics",
    "EndpointSpec",
    "Filter",
    "FirstResponseChunkProcessor",
    "GroupVersionKind",
    "InFlight",
    "InferenceRequest",
    "NotificationEvent",
    "NotificationEventType",
    "NotificationExtractor",
    "Parser",
    "Picker",
    "PickerParams",
    "Plugin",
    "PluginContext",
    "PluginParams",
    "PluginRegistry",
    "PreRequest",
    "PrefixMatchInfo",
    "ProfileHandler",
    "ProfileResult",
    "RequestError",
    "RequestHeaderProcessor",
    "RequestKind",
    "Responder",
    "ResponseCompleteProcessor",
    "ResponseHeaderProcessor",
    "ResponseInfo",
    "ResponseMetadataProcessor",
    "SchedulingResult",
    "Scorer",
    "ScorerCategory",
    "Screener",
    "TokenizedPrompt",
    "Usage",
    "reference_default",
    "registry",
]
