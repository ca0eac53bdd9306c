"""`agent-identity`: an agent's session as its flow-control fairness id."""

from __future__ import annotations

from llmepp.framework.plugin import PluginParams
from llmepp.framework.requestcontrol import RequestHeaderProcessor
from llmepp.request import parsers
from llmepp.request.types import InferenceRequest

# request.data key of the identity found (a str), for plugins that group requests by agent.
AGENT_IDENTITY = "agent-identity"
SESSION_HEADERS = ("x-claude-code-session-id", "x-session-affinity", "session-id", "session_id")
MAX_IDENTITY = 256  # characters; longer values are cut (they key per-flow state)


class AgentIdentity(RequestHeaderProcessor):
    """Agents (coding assistants, tool loops) send a session id on every call; without an explicit
    fairness header (`x-llm-d-inference-fairness-id`) that session becomes the request's fairness id,
    so flow control shares capacity between agent sessions instead of queueing them all in one
    `default-flow`, and program-aware fairness sees each session as a program.

        identity = the first non-empty of `additionalSessionHeaders` (in order), then
                   x-claude-code-session-id, x-session-affinity, session-id, session_id
    Written to `request.data["agent-identity"]`; an explicit fairness header always wins.
    Parameters: `additionalSessionHeaders` ([]): header names checked first.
    """

    type = "agent-identity"

    class Params(PluginParams):
        additional_session_headers: list[str] = []

    def __init__(self, name: str = "", params: Params | None = None) -> None:
        super().__init__(name, params)
        extra = [h.strip().lower() for h in self.params.additional_session_headers if h.strip()]
        self.headers = tuple(dict.fromkeys([*extra, *SESSION_HEADERS]))

    def process_headers(self, request: InferenceRequest) -> None:
        headers = request.headers
        for name in self.headers:
            value = headers.get(name, "").strip()
            if value:
                identity = value[:MAX_IDENTITY]
                request.data[AGENT_IDENTITY] = identity
                if not (headers.get(parsers.H_FAIRNESS) or headers.get(parsers.H_FAIRNESS_ALIAS)):
                    request.fairness_id = identity
                return
