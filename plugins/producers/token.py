"""`token-producer`: the prompt as tokens for prefix hashing and token-count signals.

One tokenization per request: it is stored unscoped under TOKENIZED_PROMPT.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aiohttp
import msgspec
from prometheus_client import CollectorRegistry

from llmepp.datalayer.endpoint import Endpoint
from llmepp.decoding import DECODE_ERRORS
from llmepp.framework.datakeys import TOKENIZED_PROMPT, TokenizedPrompt
from llmepp.framework.plugin import PluginContext, PluginParams
from llmepp.framework.requestcontrol import DataProducer
from llmepp.httpclient import upstream_connector
from llmepp.kvevents.keys import tokens_to_bytes
from llmepp.observability.fast import Counter
from llmepp.observability.logging import LogLimiter
from llmepp.observability.metrics import PREFIX, per_registry
from llmepp.request.types import InferenceRequest, RequestKind
from llmepp.tokenization.chat import (
    AUTO,
    JinjaTemplate,
    api_chat_messages,
    api_tools,
    embedding_chat_fields,
    load_chat_template,
    loop_handoff,
    template_fields,
)
from llmepp.tokenization.hf import HFTokenizer, WorkersBusy, in_worker
from llmepp.units import parse_duration

log = logging.getLogger(__name__)

BACKENDS = ("estimate", "hf")
# vLLM's render API (`vllm launch render`, or `vllm serve --enable-scale-out`): the body of a chat /
# completions request in, vLLM's GenerateRequest out (`token_ids`; completions: a list, one per prompt).
CHAT_RENDER = "/v1/chat/completions/render"
COMPLETIONS_RENDER = "/v1/completions/render"
_JSON = {"Content-Type": "application/json"}
# Chat template render budgets (seconds): on the event loop (a short chat, expected well under 1 ms) and in a
# worker thread (a long one; past the director's 400 ms producer budget its result is discarded anyway).
INLINE_RENDER_BUDGET = 0.02
WORKER_RENDER_BUDGET = 1.0
MAX_REPLY_BYTES = 64 << 20  # a vLLM render / tokenize answer larger than this is a miss, not read further
# The special tokens a template writes: those of a tokenizer_config.json must be tokens of the tokenizer.
_TEMPLATE_TOKENS = ("bos_token", "eos_token")


def _failures(registry: CollectorRegistry) -> Counter:
    return Counter(
        PREFIX + "tokenization_failures_total",
        "Requests a token-producer could not tokenize (routed without TokenizedPrompt), by reason: template, "
        "busy (tokenization threads saturated), encode, body, status, timeout, connection, reply.",
        ("plugin_name", "backend", "reason"),
        registry=registry,
    )


def estimate_tokens(prompt: bytes) -> bytes:
    """The reference's `estimate` backend: 4 prompt bytes per pseudo-token, zero-padded."""
    pad = -len(prompt) % 4
    return prompt + b"\0" * pad if pad else prompt


def _token_id_prompt(request: InferenceRequest, backend: str) -> TokenizedPrompt:
    """A prompt given as token ids, as it is; with `truncate_prompt_tokens` each prompt's last N tokens, as
    vLLM truncates token-id prompts too (TokenizeParams._token_truncation; a batch's prompts each)."""
    n = request.truncate_prompt_tokens
    prompts = request.prompts()
    return TokenizedPrompt.joined(prompts if n is None else [p[-4 * n :] for p in prompts], backend)


class TokenizerConfig(PluginParams):
    backend: str = "estimate"
    path: str = ""
    chat_template: str = AUTO
    add_special_tokens: bool = True  # completions, as vLLM's default (a request's own field wins)
    thread_threshold_chars: int = 4096


class VllmConfig(PluginParams):
    url: str = "http://localhost:8000"
    path: str = ""  # "": vLLM's render API (the reference's); a path (/tokenize): vLLM's tokenize API there
    timeout: str = "5s"
    mm_timeout: str = "30s"


# The reference's `estimate` block (multimodal placeholder-token estimation: images, video). Accepted and
# validated as the reference does; this build's estimate backend packs only the text of a prompt (media
# parts add nothing), so the tuning does not change its tokens (a warning says so).
class Resolution(PluginParams):
    width: int = 0
    height: int = 0


class StaticImageEstimate(PluginParams):
    static_token: int = 0


class FactorEstimate(PluginParams):
    factor: int = 0


class ImageEstimate(PluginParams):
    mode: str = ""
    default_resolution: Resolution | None = None
    static: StaticImageEstimate | None = None
    dynamic: FactorEstimate | None = None


class StaticFrameEstimate(PluginParams):
    num_tokens_per_frame: int = 0


class TokensPerFrameEstimate(PluginParams):
    mode: str = ""
    static: StaticFrameEstimate | None = None
    dynamic: FactorEstimate | None = None


class SampledFrames(PluginParams):
    sample_fps: float = msgspec.field(default=0.0, name="sampleFPS")
    temporal_patch_size: int = 0


class StridedFrames(PluginParams):
    default_source_fps: float = msgspec.field(default=0.0, name="defaultSourceFPS")
    frame_stride: int = 0


class FramesEstimate(PluginParams):
    mode: str = ""
    min_frames: int = 0
    max_frames: int = 0
    sampled: SampledFrames | None = None
    strided: StridedFrames | None = None


class VideoEstimate(PluginParams):
    default_resolution: Resolution | None = None
    default_duration: float = 0.0
    tokens_per_frame: TokensPerFrameEstimate | None = None
    frames: FramesEstimate | None = None
    max_video_tokens: int = 0


class EstimateConfig(PluginParams):
    image: ImageEstimate | None = None
    video: VideoEstimate | None = None

    def check(self) -> None:
        """The reference factory's checks (errors name the field)."""
        for field, mode, allowed in (
            ("estimate.image.mode", self.image.mode if self.image else "", ("dynamic", "static")),
            (
                "estimate.video.tokensPerFrame.mode",
                self.video.tokens_per_frame.mode if self.video and self.video.tokens_per_frame else "",
                ("dynamic", "static"),
            ),
            (
                "estimate.video.frames.mode",
                self.video.frames.mode if self.video and self.video.frames else "",
                ("sampled", "strided"),
            ),
        ):
            if mode and mode not in allowed:
                raise ValueError(f"{field} must be {allowed[0]!r} or {allowed[1]!r}, got {mode!r}")


class TokenProducer(DataProducer):
    """Writes TokenizedPrompt (LE uint32 token ids) for requests that carry a prompt.

    Backends:

    * `estimate` (default, no model needed): packs the UTF-8 prompt (chat: tools JSON, then role +
      content of each message) into uint32 pseudo-tokens, 4 bytes per token. Count = ceil(bytes / 4).
      Good for approximate prefix routing; never equal to an engine's tokens.
    * `hf` — `tokenizer: {backend: hf, path: /models/x/tokenizer.json}`: the model's real tokenizer
      from a local file (never downloaded). Completions: the prompt text encoded as is, with the
      tokenizer's special tokens (BOS) unless `addSpecialTokens: false` (vLLM's completions default). Chat:
      the request rendered with `chatTemplate`, then encoded without special tokens (the template writes
      them, as in vLLM). Either way a request's own `add_special_tokens` wins, and its
      `truncate_prompt_tokens` keeps the last N tokens as vLLM does (a completion's BOS counted in the N).
      `chatTemplate: auto` (default) = the model's Jinja template from `chat_template.jinja` or
      `tokenizer_config.json` next to the tokenizer (else the built-in `role-tags`, logged); a path to
      either file; or a built-in name (`role-tags`, the simulator's; `plain`). Semantics in
      llmepp.tokenization.chat. Needed by `precise-prefix-cache-producer`.
      Prompts of more than `threadThresholdChars` (4096) characters are encoded in a worker thread;
      a chat whose body has that many bytes is rendered there too (then encoded, in the same job);
      prompts of 256 Ki characters or more have a thread of their own (llmepp.tokenization.hf).
    * `vllm` — `vllm: {url: http://render:8000}` (the reference's parameters): vLLM renders, as the
      reference's backend asks it: a chat request's body as sent (the model set to `modelName`, else the
      request's) to `{url}/v1/chat/completions/render`, a completions request's to
      `{url}/v1/completions/render` (vLLM's render API: `vllm launch render <model>`, or `vllm serve`
      with `--enable-scale-out`); it prepares the prompt exactly as its inference endpoint would, every
      field included (`add_special_tokens`, `truncate_prompt_tokens`, `reasoning_effort`, `tool_choice`,
      a request's `chat_template`, media), and answers the `token_ids` (a completions batch: each
      prompt's, in order). A Responses, Conversations or Anthropic Messages request: its parsed role +
      text messages to the chat route; other prompts (embeddings...) as a completions `prompt`.
      `path` (this EPP's, e.g. `/tokenize`): vLLM's tokenize API at that path instead, for servers
      without the render routes; it gets the prompt, or the chat's messages, tools, documents,
      chat_template_kwargs, add_generation_prompt and continue_final_message (the fields vLLM's
      `/tokenize` reads). One call per request (a batch on the tokenize API: one per prompt, made
      together), bounded by `timeout`, or `mmTimeout` for a request with media (and by the director's
      400 ms producer budget).
      Used when `vllm` or `modelName` is set (the reference's selection: `modelName` alone means the
      render endpoint at the default URL) and `tokenizer` is not.

    Token-id prompts pass through unchanged with every backend. On a tokenizer failure the request
    gets no TokenizedPrompt (prefix producers then skip it) and the failure is logged, rate-limited.

    Parameters: `modelName` (selects the vllm backend and is sent to it; informational with
    `tokenizer`), `tokenizer` {`backend` estimate|hf, `path`, `chatTemplate` auto, `addSpecialTokens`
    true, `threadThresholdChars` 4096}, `vllm` {`url` http://localhost:8000, `timeout` 5s, `mmTimeout`
    30s, `path` (unset: the render API)}, `estimate` (the reference's multimodal placeholder tuning
    {`image`, `video`}: selects the estimate backend; validated, no effect on text-only estimation),
    `udsTokenizerConfig` (the reference's deprecated UDS sidecar backend: not supported, an error when
    enabled). As the reference: at most one of `estimate`, `vllm`/`modelName`, `udsTokenizerConfig`.
    """

    type = "token-producer"
    aliases = ("tokenizer",)  # the reference's deprecated name
    produces = frozenset({TOKENIZED_PROMPT})

    class Params(PluginParams):
        model_name: str = ""
        tokenizer: TokenizerConfig | None = None
        vllm: VllmConfig | None = None
        estimate: EstimateConfig | None = None
        uds_tokenizer_config: dict[str, Any] | None = msgspec.field(default=None, name="udsTokenizerConfig")

        def __post_init__(self) -> None:
            # The reference's backend selection (tokenizer.go PluginFactory).
            estimate = self.estimate is not None
            uds = bool(self.uds_tokenizer_config and self.uds_tokenizer_config.get("socketFile"))
            vllm = self.vllm is not None or bool(self.model_name)
            if (estimate and (uds or vllm)) or (uds and vllm):
                raise ValueError("only one of 'estimate', 'vllm', or 'udsTokenizerConfig' may be set")
            if uds:
                raise ValueError(
                    "udsTokenizerConfig: the reference's deprecated UDS tokenizer sidecar is not supported; "
                    "use `vllm: {url: ...}` (a vLLM render endpoint, `vllm launch render <model>`)"
                )
            if self.estimate is not None:
                self.estimate.check()
                if self.estimate.image is not None or self.estimate.video is not None:
                    log.warning(
                        "token-producer: estimate.image / estimate.video tune multimodal placeholder tokens; "
                        "this EPP's estimate backend packs the prompt text only, so they have no effect"
                    )
            t = self.tokenizer
            if t is not None:
                if t.backend not in BACKENDS:
                    raise ValueError(f"tokenizer.backend must be one of {', '.join(BACKENDS)}, got {t.backend!r}")
                if t.backend == "hf" and not t.path:
                    raise ValueError("tokenizer.path is required with backend hf (a local tokenizer.json)")
                if t.thread_threshold_chars < 0:
                    raise ValueError("tokenizer.threadThresholdChars must be >= 0")
            if self.vllm is not None:
                for key, value in (("timeout", self.vllm.timeout), ("mmTimeout", self.vllm.mm_timeout)):
                    try:
                        parse_duration(value)
                    except ValueError as e:
                        raise ValueError(f"vllm.{key}: {e}") from None

    def __new__(cls, name: str = "", params: Any = None) -> TokenProducer:
        # The backend decides the class: `estimate` stays synchronous (no task per request).
        target: builtins.type[TokenProducer] = cls
        if cls is TokenProducer and params is not None:
            if params.tokenizer is not None and params.tokenizer.backend == "hf":
                target = HFTokenProducer
            elif params.tokenizer is None and (params.vllm is not None or params.model_name):
                target = VllmTokenProducer
        return super().__new__(target)

    backend = "estimate"
    _failures: Counter | None = None
    _log: LogLimiter

    def setup(self, ctx: PluginContext) -> None:
        registry = getattr(ctx.metrics, "registry", None)
        if registry is not None:
            self._failures = per_registry(registry, "tokenization_failures", _failures)

    def _miss(self, reason: str, msg: str, *args: object) -> None:
        """A request left without TokenizedPrompt: counted, logged (rate-limited per reason)."""
        if self._failures is not None:
            self._failures.labels(self.name, self.backend, reason).inc()
        self._log.warning(reason, msg, *args)

    def produce(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> Any:
        if request.prompt is not None:
            # A batch's prompts padded each on its own, as the reference packs each string of a batch.
            prompts = [estimate_tokens(prompt) for prompt in request.prompts()]
            request.data[TOKENIZED_PROMPT] = TokenizedPrompt.joined(prompts, "estimate")


class HFTokenProducer(TokenProducer):
    backend = "hf"

    def __init__(self, name: str, params: TokenProducer.Params) -> None:
        super().__init__(name, params)
        cfg = params.tokenizer
        assert cfg is not None
        self.tokenizer = HFTokenizer(
            cfg.path, add_special_tokens=cfg.add_special_tokens, thread_threshold=cfg.thread_threshold_chars
        )
        try:
            self.template = load_chat_template(cfg.chat_template, cfg.path)
        except ValueError as e:
            raise ValueError(f"tokenizer.chatTemplate: {e}") from None
        self._check_special_tokens(cfg)
        self._log = LogLimiter(log)

    def _check_special_tokens(self, cfg: TokenizerConfig) -> None:
        """A tokenizer_config.json whose bos / eos tokens the tokenizer does not know is another model's: its
        template would write them as plain text, tokenized unlike the engine's. Found by `auto` next to
        tokenizer.json (the model's folder is mixed up): a ConfigError; with a template chatTemplate names (the
        operator's choice): a warning."""
        template = self.template
        if not isinstance(template, JinjaTemplate) or template.tokens_from is None:
            return
        special = template.special_tokens
        unknown = [
            f"{key} {special[key]!r} is not a token of {cfg.path}"
            for key in _TEMPLATE_TOKENS
            if special.get(key) and not self.tokenizer.has_token(special[key])
        ]
        if not unknown:
            return
        problem = f"{template.tokens_from}: {'; '.join(unknown)}"
        if cfg.chat_template == AUTO:
            raise ValueError(
                f"{problem}: this tokenizer_config.json belongs to another model; tokenizer.path must name the "
                "model's own tokenizer.json (or set tokenizer.chatTemplate)"
            )
        log.warning("%s: tokenizer.chatTemplate: %s: the template is probably another model's", self.name, problem)

    def produce(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> Awaitable[None]:
        """A short prompt is encoded here and answered with a done future (the request costs no task and no
        event-loop turn); a long one goes to a worker thread, and the coroutine waiting for it is returned."""
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        if request.prompt is None:
            return done
        if request.prompt_is_token_ids:
            request.data[TOKENIZED_PROMPT] = _token_id_prompt(request, self.backend)
            return done
        truncate = request.truncate_prompt_tokens
        try:
            if request.messages is None:
                # A batch's prompts each encoded (BOS and truncation each), as vLLM prepares each on its own; in a
                # worker when they add up to a long prompt (not prompt by prompt on the event loop).
                texts = [prompt.decode("utf-8", "replace") for prompt in request.prompts()]
                parts = self.tokenizer.encode_many(texts, request.add_special_tokens, truncate)
            elif len(request.prompt) >= self.tokenizer.thread_threshold:
                # A long conversation: rendered in the worker that encodes it (one hop). Inline, a Jinja
                # render stalls the loop for all of it: ~3 µs per message with a ChatML template, ~9 µs
                # with a Qwen3-style one (6 / 18 ms for 2,000 messages; llmepp.tokenization.chat). A conversation of
                # threadThresholdChars (4096) characters is ~40 short messages, ~0.1-0.4 ms to render, and
                # renders to a prompt about that long, whose encode went to a worker anyway: no extra hop.
                pause = loop_handoff(asyncio.get_running_loop())
                # Sized by the conversation's text (tools JSON, role + text per message), not by its body: an
                # inline base64 image makes a body long, not the prompt (and must not take the long lane).
                parts = in_worker(self._render_and_encode, request, pause, chars=len(request.prompt))
            else:
                # Short (< ~0.4 ms): a worker would hold the GIL as long (less than a RENDER_SLICE, so
                # unpaced), plus a thread hop (~50 µs, more than a one-message render's ~10 µs).
                text = self._render(request, None, INLINE_RENDER_BUDGET)
                parts = self.tokenizer.encode_many([text], request.add_special_tokens is True, truncate)
        except BaseException as e:
            self._failed(e)
            return done
        if not isinstance(parts, list):
            return self._encoded_later(request, parts)
        request.data[TOKENIZED_PROMPT] = TokenizedPrompt.joined(parts, self.backend)
        return done

    async def _encoded_later(self, request: InferenceRequest, work: asyncio.Future[list[bytes]]) -> None:
        try:
            parts = await work
        except BaseException as e:
            self._failed(e)
            return
        request.data[TOKENIZED_PROMPT] = TokenizedPrompt.joined(parts, self.backend)

    def _failed(self, e: BaseException) -> None:
        """A request's tokenization failed: counted and logged; anything else (a cancellation) is raised again."""
        if isinstance(e, _TemplateFailed):
            self._miss("template", "%s: tokenization failed: %s", self.name, e)
        elif isinstance(e, WorkersBusy):
            self._miss("busy", "%s: tokenization skipped: %s", self.name, e)
        elif isinstance(e, Exception):
            self._miss("encode", "%s: tokenization failed: %s", self.name, e)
        elif _is_rust_panic(e):
            self._miss("encode", "%s: tokenization failed (the tokenizer library panicked): %s", self.name, e)
        else:
            raise e

    def _render_and_encode(self, request: InferenceRequest, pause: Callable[[], None]) -> list[bytes]:
        """In a worker thread: the chat's prompt (rendered paced: `pause` lets the event loop run every
        RENDER_SLICE), encoded without the GIL (as a batch of one)."""
        text = self._render(request, pause, WORKER_RENDER_BUDGET)
        return [
            self.tokenizer.encode_released(
                text, special=request.add_special_tokens is True, truncate=request.truncate_prompt_tokens
            )
        ]

    def _render(self, request: InferenceRequest, pause: Callable[[], None] | None, budget: float) -> str:
        try:
            return self.template.render(request, pause=pause, budget=budget)
        except ValueError as e:
            raise _TemplateFailed(str(e)) from None


def _is_rust_panic(e: BaseException) -> bool:
    """A panic inside the Rust `tokenizers` library: pyo3 raises it as a BaseException (so that `except
    Exception` does not swallow it); for one request's encode it is that request's failure, not the EPP's."""
    return type(e).__name__ == "PanicException" and type(e).__module__ == "pyo3_runtime"


class _TemplateFailed(Exception):
    """The chat template failed on a request."""


class _ErrorStatus(Exception):
    """vLLM answered an error status."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(status, detail)
        self.status, self.detail = status, detail


class VllmTokenProducer(TokenProducer):
    backend = "vllm"

    def __init__(self, name: str, params: TokenProducer.Params) -> None:
        super().__init__(name, params)
        cfg = params.vllm or VllmConfig()  # `modelName` alone: the render endpoint at the default URL
        self.base_url = cfg.url.rstrip("/")
        self.tokenize_path = cfg.path  # "": the render API
        self.timeout = aiohttp.ClientTimeout(total=parse_duration(cfg.timeout))
        self.mm_timeout = aiohttp.ClientTimeout(total=parse_duration(cfg.mm_timeout))
        self.model = params.model_name
        self._session: aiohttp.ClientSession | None = None
        self._log = LogLimiter(log)

    async def produce(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> None:
        if request.prompt is None:
            return
        if request.prompt_is_token_ids:
            request.data[TOKENIZED_PROMPT] = _token_id_prompt(request, self.backend)
            return
        model = self.model or request.target_model or request.model
        try:
            if self.tokenize_path:
                # The tokenize API takes one prompt: a batch's prompts one call each.
                calls = [(self.tokenize_path, body) for body in self._tokenize_bodies(request, model)]
            else:
                calls = [self._render_request(request, model)]
        except ValueError as e:
            self._miss("body", "%s: %s", self.name, e)
            return
        if self._session is None:
            self._session = aiohttp.ClientSession(connector=upstream_connector(), timeout=self.timeout)
        limit = self.mm_timeout if request.multimodal else self.timeout
        prompts: list[bytes] = []
        if len(calls) == 1:
            replies: list[Any] = [await self._reply(*calls[0], limit)]
        else:
            # A batch on the tokenize API (one prompt a call): the calls at once, not N round trips in turn.
            replies = await asyncio.gather(*(self._reply(path, body, limit) for path, body in calls))
        for (path, _), reply in zip(calls, replies, strict=True):
            url = self.base_url + path
            try:
                if isinstance(reply, BaseException):
                    raise reply
                # Not a list of uint32: TypeError / OverflowError.
                prompts += map(tokens_to_bytes, [reply["tokens"]] if self.tokenize_path else _rendered_ids(reply))
            except _ErrorStatus as e:
                self._miss("status", "%s: %s answered %d: %s", self.name, url, e.status, e.detail)
                return
            except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError, OverflowError) as e:
                verb = "tokenizing" if self.tokenize_path else "rendering"
                reason = (
                    "timeout" if isinstance(e, TimeoutError)
                    else "connection" if isinstance(e, aiohttp.ClientError) else "reply"
                )  # fmt: skip
                self._miss(reason, "%s: %s via %s failed: %r", self.name, verb, url, e)
                return
        request.data[TOKENIZED_PROMPT] = TokenizedPrompt.joined(prompts, self.backend)

    async def _reply(self, path: str, body: dict[str, Any], limit: aiohttp.ClientTimeout) -> Any:
        """vLLM's decoded JSON answer, or the exception it failed with (counted and logged by the caller, once
        per request)."""
        try:
            return await self._post(self.base_url + path, body, limit)
        except Exception as e:
            return e

    async def _post(self, url: str, body: dict[str, Any], limit: aiohttp.ClientTimeout) -> Any:
        """vLLM's decoded JSON answer; _ErrorStatus when it answers an error status."""
        assert self._session is not None
        async with self._session.post(url, data=msgspec.json.encode(body), headers=_JSON, timeout=limit) as resp:
            if resp.status != 200:
                raise _ErrorStatus(resp.status, (await resp.content.read(512)).decode("utf-8", "replace"))
            raw = bytearray()
            async for chunk in resp.content.iter_chunked(1 << 16):
                raw += chunk
                if len(raw) > MAX_REPLY_BYTES:
                    raise ValueError(f"the answer is larger than {MAX_REPLY_BYTES} bytes")
        return msgspec.json.decode(raw)

    @staticmethod
    def _render_request(request: InferenceRequest, model: str) -> tuple[str, dict[str, Any]]:
        """The render route and body: a chat / completions body as sent (vLLM prepares the prompt from
        all of it, as its inference endpoint does), with the model to render for."""
        if request.kind in (RequestKind.CHAT_COMPLETIONS, RequestKind.COMPLETIONS):
            try:
                body = msgspec.json.decode(request.body)
            except DECODE_ERRORS as e:
                raise ValueError(f"request body cannot be decoded: {e}") from None
            if not isinstance(body, dict):
                raise ValueError("request body is not a JSON object")
            body["model"] = model
            return (CHAT_RENDER if request.kind is RequestKind.CHAT_COMPLETIONS else COMPLETIONS_RENDER), body
        if request.kind is RequestKind.EMBEDDINGS and request.messages is not None:
            return CHAT_RENDER, {"model": model, **embedding_chat_fields(request.body)}
        if request.messages is not None:
            # Responses, Conversations, Anthropic Messages: no chat body to forward; the chat vLLM builds.
            body = {"model": model, "messages": api_chat_messages(request)}
            tools = api_tools(request)
            if tools is not None:
                body["tools"] = tools
            return CHAT_RENDER, body
        prompts = [prompt.decode("utf-8", "replace") for prompt in request.prompts()]
        return COMPLETIONS_RENDER, {"model": model, "prompt": prompts[0] if len(prompts) == 1 else prompts}

    @staticmethod
    def _tokenize_bodies(request: InferenceRequest, model: str) -> list[dict[str, Any]]:
        """vLLM's tokenize API bodies: the prompt (a batch: one per prompt), or the fields of a chat it reads."""
        body: dict[str, Any] = {"model": model}
        if request.kind is RequestKind.EMBEDDINGS and request.messages is not None:
            body.update(embedding_chat_fields(request.body))
        elif request.kind is not RequestKind.CHAT_COMPLETIONS and request.messages is not None:
            # Responses, Conversations, Anthropic Messages: no chat body to forward; the chat vLLM builds.
            body["messages"] = api_chat_messages(request)
            tools = api_tools(request)
            if tools is not None:
                body["tools"] = tools
        elif request.messages is not None:
            # The server renders its own chat template: send what decides the rendering, verbatim.
            body.update(template_fields(request.body))
        if request.add_special_tokens is not None:  # the request's own (vLLM's defaults: completion true, chat false)
            body["add_special_tokens"] = request.add_special_tokens
        if request.messages is None:
            return [{**body, "prompt": prompt.decode("utf-8", "replace")} for prompt in request.prompts()]
        return [body]

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _rendered_ids(reply: Any) -> list[list[int]]:
    """Each prompt's token ids in a render answer: a GenerateRequest, or a list of them (one per prompt)."""
    items = reply if isinstance(reply, list) else [reply]
    if not items:
        raise ValueError("the render answer holds no prompt")
    prompts: list[list[int]] = []
    for item in items:
        ids = item["token_ids"] if isinstance(item, dict) else None
        if not isinstance(ids, list):
            raise TypeError(f"token_ids is not a list: {ids!r:.80}")
        prompts.append(ids)
    return prompts
