"""The HTTP face of one simulated pod: vLLM's OpenAI server routes on an aiohttp application.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``POST /v1/messages`` (Anthropic),
``POST /inference/v1/generate`` (vLLM's tokens in / tokens out), ``GET /v1/models``, ``GET /health``,
``GET /metrics``, ``POST /tokenize``, ``POST /v1/chat/completions/render`` and ``POST /v1/completions/render``
(vLLM's render API: the request's prompt ids, as served, in vLLM's GenerateRequest shape, which
``/inference/v1/generate`` takes), ``POST /v1/load_lora_adapter``, ``POST /v1/unload_lora_adapter``,
``POST /reset_prefix_cache``, and the simulator's admin API: ``GET|POST /admin/config`` (runtime knobs, see
``config.RUNTIME_FIELDS``), ``POST /admin/kill`` (``{"duration": seconds}``; omitted/null = stay down
until ``SimPod.revive()``) and ``POST /admin/evict`` (``{"fraction": 0.2, "order": "lru"|"random", "seed": n}``:
evict that share of the KV capacity from the prefix cache, publishing ``BlockRemoved``, as traffic the router
never saw would; answers ``{"evicted": blocks}``).

Every response carries ``x-inference-pod: <pod name>`` and ``x-inference-port: <port>``.

``submit`` (validation, tokenisation, engine submission) and the OpenAI renderers (``complete_body``,
``stream_events``) are shared with the gRPC face (``grpc_server.py``), so both faces answer alike.

P/D roles: a ``prefill`` pod refuses ``do_remote_prefill`` requests and a ``decode`` pod refuses
``do_remote_decode`` requests (400); plain requests are served by every role, as a vLLM with a KV
connector in producer/consumer mode still serves them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from llmepp_sim import anthropic, generate
from llmepp_sim.config import pod_config_to_dict
from llmepp_sim.engine import Engine, RequestKind, RequestTooLarge, SimRequest
from llmepp_sim.errors import ApiError, bad_request, context_length_exceeded, model_not_found
from llmepp_sim.faults import FORCE_ERROR_HEADER
from llmepp_sim.lora import LoraAdapter
from llmepp_sim.protocol import (
    DEFAULT_MAX_TOKENS,
    InferenceRequest,
    StreamRenderer,
    decode_json_body,
    encode_json,
    full_response,
    new_request_id,
    parse_inference_request,
    usage,
)
from llmepp_sim.textgen import FillerStream

if TYPE_CHECKING:
    from llmepp_sim.pod import SimPod

# Which API a request body and its answer speak (they share the engine and the prompt handling).
Api = Literal["openai", "anthropic", "vllm-generate"]
POD_KEY: web.AppKey[SimPod] = web.AppKey("pod")
log = logging.getLogger(__name__)
MAX_BODY_BYTES = 16 * 1024 * 1024
HANG_POLL_SECONDS = 0.2


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=encode_json(body), status=status, content_type="application/json")


def error_response(error: ApiError) -> web.Response:
    return json_response(error.body(), status=error.status)


def build_app(pod: SimPod) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_errors_middleware])
    app[POD_KEY] = pod
    app.on_response_prepare.append(_identity_headers)
    app.router.add_post("/v1/completions", _completions)
    app.router.add_post("/v1/chat/completions", _chat_completions)
    app.router.add_post("/v1/messages", _messages)
    app.router.add_post("/inference/v1/generate", _generate)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/health", _health)
    app.router.add_get("/metrics", _metrics)
    app.router.add_post("/tokenize", _tokenize)
    app.router.add_post("/v1/chat/completions/render", _render_chat)
    app.router.add_post("/v1/completions/render", _render_completion)
    app.router.add_post("/v1/load_lora_adapter", _load_lora)
    app.router.add_post("/v1/unload_lora_adapter", _unload_lora)
    app.router.add_post("/reset_prefix_cache", _reset_prefix_cache)
    app.router.add_get("/admin/config", _get_config)
    app.router.add_post("/admin/config", _post_config)
    app.router.add_post("/admin/kill", _kill)
    app.router.add_post("/admin/evict", _evict)
    return app


async def _identity_headers(request: web.Request, response: web.StreamResponse) -> None:
    pod = request.app[POD_KEY]
    response.headers["x-inference-pod"] = pod.name
    response.headers["x-inference-port"] = str(pod.port)


@web.middleware
async def _errors_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every refusal is a JSON error in the OpenAI shape: the handlers' ``ApiError``, aiohttp's own (413 body
    too large, 404 unknown route, 405 wrong method) and, as a 500, any unexpected failure."""
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except ApiError as error:
        return error_response(error)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        text = exc.text or ""
        message = text if text and not text.startswith(f"{exc.status}: ") else exc.reason
        answer = error_response(ApiError(exc.status, message))
        if "Allow" in exc.headers:
            answer.headers["Allow"] = exc.headers["Allow"]
        return answer
    except Exception:
        if request.writer.output_size > 0:  # a stream already started: no second response can follow
            raise
        log.exception("unexpected error serving %s %s", request.method, request.path)
        return error_response(ApiError(500, "Internal server error."))


def require_ready(pod: SimPod) -> None:
    if not pod.ready:
        raise ApiError(503, "The server is starting up.", err_type="ServiceUnavailableError")


# ---------------------------------------------------------------------------- inference
async def _completions(request: web.Request) -> web.StreamResponse:
    return await _inference(request, chat=False)


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    return await _inference(request, chat=True)


async def _messages(request: web.Request) -> web.StreamResponse:
    return await _inference(request, chat=True, api="anthropic")


async def _generate(request: web.Request) -> web.StreamResponse:
    return await _inference(request, chat=False, api="vllm-generate")


def _resolve_model(pod: SimPod, name: str | None) -> tuple[str, LoraAdapter | None]:
    if not name or name in pod.config.base_model_names:  # vLLM: an empty name is the served model
        return name or pod.config.model_name, None
    adapter = pod.lora.get(name)
    if adapter is None:
        raise model_not_found(name)
    return name, adapter


def _request_kind(pod: SimPod, params: dict[str, Any] | None) -> RequestKind:
    if not params:
        return RequestKind.NORMAL
    if params.get("do_remote_decode"):
        if pod.config.role == "decode":
            raise bad_request("This is a decode pod: it cannot serve do_remote_decode (prefill) requests.",
                              param="kv_transfer_params")  # fmt: skip
        return RequestKind.PREFILL_ONLY
    if params.get("do_remote_prefill"):
        if pod.config.role == "prefill":
            raise bad_request("This is a prefill pod: it cannot serve do_remote_prefill (decode) requests.",
                              param="kv_transfer_params")  # fmt: skip
        return RequestKind.REMOTE_PREFILL
    return RequestKind.NORMAL


def _checked_max_tokens(pod: SimPod, prompt: int, parsed: InferenceRequest) -> int:
    limit = pod.config.max_model_len
    if parsed.max_tokens is None:
        if prompt >= limit:
            raise context_length_exceeded(limit, prompt, None)
        return min(DEFAULT_MAX_TOKENS, limit - prompt)
    if prompt + parsed.max_tokens > limit:
        raise context_length_exceeded(limit, prompt, parsed.max_tokens)
    return parsed.max_tokens


@dataclass
class Submission:
    """An inference request the engine has accepted: what the answer renderers need. Whoever submitted
    it calls ``abort()`` once done with it (a no-op when finished; frees the seat when the client left)."""

    pod: SimPod
    engine: Engine
    parsed: InferenceRequest
    model: str
    sim_request: SimRequest

    def abort(self) -> None:
        self.engine.abort(self.sim_request)


def check_admission(pod: SimPod, force_error: str | None) -> None:
    """What is refused before the body is read: a pod that is not ready, a forced error status."""
    require_ready(pod)
    forced = pod.faults.forced(force_error)
    if forced is not None:
        raise forced


async def submit(
    pod: SimPod,
    body: dict[str, Any],
    chat: bool,
    api: Api = "openai",
    request_id: str | None = None,
    arrival: float | None = None,
) -> Submission:
    """Validate a decoded request body of ``api``, tokenise its prompt and hand it to the pod's engine (the
    code path every face shares: HTTP routes and the gRPC face). Raises ``ApiError``.

    ``arrival`` is the simulated time the request reached the pod (default: now, before validation and
    tokenisation); the engine schedules the prefill from it, so this host work is not added to the TTFT."""
    if arrival is None:
        arrival = pod.clock.now()
    if api == "anthropic":
        body = anthropic.to_chat_body(body)
    elif api == "vllm-generate":
        body = generate.to_completions_body(body)
    parsed = parse_inference_request(body, chat, pod.tokenizer.vocab_size, pod.render_chat)
    model, adapter = _resolve_model(pod, parsed.model)
    injected = pod.faults.maybe_fail(pod.config, model)
    if injected is not None:
        raise injected
    kind = _request_kind(pod, parsed.kv_transfer_params)
    prompt_ids = await pod.tokenizer.encode_prompt(parsed.prompt)
    max_tokens = 1 if kind is RequestKind.PREFILL_ONLY else _checked_max_tokens(pod, len(prompt_ids), parsed)
    if kind is RequestKind.PREFILL_ONLY and len(prompt_ids) + 1 > pod.config.max_model_len:
        raise context_length_exceeded(pod.config.max_model_len, len(prompt_ids), 1)
    engine = pod.engine
    sim_request = SimRequest(
        request_id=request_id or new_request_id(chat),
        prompt_ids=prompt_ids,
        max_tokens=max_tokens,
        filler=FillerStream(pod.fillers, pod.config.seed, prompt_ids),
        kind=kind,
        lora=adapter,
    )
    try:
        engine.submit(sim_request, arrival)
    except RequestTooLarge as exc:
        raise bad_request(str(exc), param="max_tokens") from exc
    return Submission(pod, engine, parsed, model, sim_request)


async def _inference(request: web.Request, chat: bool, api: Api = "openai") -> web.StreamResponse:
    pod = request.app[POD_KEY]
    arrival = pod.clock.now()  # before the body is read and parsed: that host work is part of the overhead
    check_admission(pod, request.headers.get(FORCE_ERROR_HEADER))
    body = decode_json_body(await request.read())
    request_id = request.headers.get("X-Request-Id")
    if request_id is not None and api != "vllm-generate":
        # vLLM's OpenAI serving layer names the engine request (and the response id) with the API's prefix.
        request_id = ("chatcmpl-" if chat else "cmpl-") + request_id
    if api == "anthropic":
        # vLLM: the request model's validation answers in the OpenAI shape, the handler in Anthropic's.
        body = anthropic.to_chat_body(body)
        parse_inference_request(body, chat, pod.tokenizer.vocab_size, anthropic.no_render)
        try:
            sub = await submit(pod, body, chat, "openai", request_id, arrival)
        except ApiError as error:
            raise anthropic.AnthropicError(error) from None
    else:
        sub = await submit(pod, body, chat, api, request_id, arrival)
    sim_request, parsed, model = sub.sim_request, sub.parsed, sub.model
    try:
        if api == "anthropic":
            if parsed.stream:
                return await _stream_messages(request, sim_request, model)
            return await _complete_messages(sim_request, model)
        if api == "vllm-generate":
            if parsed.stream:
                return await _stream_generate(request, sim_request, parsed)
            return await _complete_generate(sim_request)
        if parsed.stream:
            return await _stream(request, sub)
        return web.Response(body=await complete_body(sub), content_type="application/json")
    finally:
        sub.abort()  # no-op when finished; frees the seat when the client went away


def _kv_params_out(pod: SimPod, sim_request: SimRequest) -> dict[str, Any] | None:
    if sim_request.kind is not RequestKind.PREFILL_ONLY:
        return None
    return {
        "do_remote_prefill": True,
        "do_remote_decode": False,
        "remote_engine_id": pod.name,
        "remote_block_ids": sim_request.remote_block_ids,
        "remote_host": pod.host,
        "remote_port": pod.port,
        "tp_size": 1,
    }


def _usage(sim_request: SimRequest) -> dict[str, Any]:
    return usage(len(sim_request.prompt_ids), len(sim_request.output_ids), sim_request.num_cached_tokens or 0)


def _running_usage(sim_request: SimRequest) -> Callable[[int], dict[str, int]]:
    """vLLM's continuous usage stats: the usage after `n` output tokens (prompt tokens throughout)."""
    prompt = len(sim_request.prompt_ids)
    return lambda n: {"prompt_tokens": prompt, "total_tokens": prompt + n, "completion_tokens": n}


def aborted_error() -> ApiError:
    """The answer to a request the engine aborted (the pod is going down)."""
    return ApiError(503, "The request was aborted: the engine is shutting down.", err_type="ServiceUnavailableError")


def _sse_error(body: dict[str, Any]) -> bytes:
    """A stream the engine cut short ends with its error as an event (then `[DONE]`), as vLLM's stream
    generators do: the status line went out with the first byte, so only the body can tell the client."""
    return b"data: " + encode_json(body) + b"\n\n"


def _shut_down(sim_request: SimRequest) -> bool:
    """Aborted because the engine is going down (an error), not through the abort API: a request aborted
    that way is answered as vLLM answers it, finished with finish_reason "abort" (its output so far)."""
    return sim_request.finish_reason == "abort" and not sim_request.aborted_by_request


async def complete_body(sub: Submission) -> bytes:
    """The OpenAI (completions or chat) JSON answer, once the request has finished."""
    sim_request = sub.sim_request
    await sim_request.wait_finished()
    if _shut_down(sim_request):
        raise aborted_error()
    return full_response(
        sub.parsed.chat,
        sim_request.request_id,
        sub.model,
        "".join(sim_request.output_text),
        sim_request.finish_reason or "length",
        _usage(sim_request),
        _kv_params_out(sub.pod, sim_request),
    )


async def stream_events(sub: Submission) -> AsyncGenerator[tuple[list[bytes], bool], None]:
    """The OpenAI SSE answer: (events ready now, finished) each time the output grows; every event is one
    complete ``data: ...\n\n``. Ends without ``finished`` when the engine aborts the request as the pod goes down."""
    sim_request, parsed, pod = sub.sim_request, sub.parsed, sub.pod
    renderer = StreamRenderer(parsed.chat, sim_request.request_id, sub.model)
    async for sent, available, finished in output_growth(sim_request):
        texts = sim_request.output_text
        # An abort's final output adds no token (vLLM: new_token_ids=[]): its chunk has empty content.
        last = available - 1 if finished and sim_request.finish_reason != "abort" else available
        # A chat's role chunk goes out with the first output, after the prefill (vLLM sends it on the
        # generator's first iteration): a client or gateway timing the first byte measures the TTFT.
        so_far = _running_usage(sim_request) if parsed.continuous_usage else None
        parts = [renderer.role_chunk(so_far and so_far(0))] if parsed.chat and sent == 0 else []
        # Tokens that piled up while the consumer was busy go out together.
        parts += [renderer.token_chunk(texts[i], so_far and so_far(i + 1)) for i in range(sent, last)]
        if finished:
            parts.append(
                renderer.final_token_chunk(
                    texts[last] if last < available else "",
                    sim_request.finish_reason or "length",
                    _kv_params_out(pod, sim_request),
                    so_far and so_far(available),
                )
            )
            if parsed.include_usage:
                parts.append(renderer.usage_chunk(_usage(sim_request)))
            parts.append(renderer.done())
        yield parts, finished


async def _stream(request: web.Request, sub: Submission) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    with contextlib.suppress(ConnectionError):
        await response.prepare(request)
        async with contextlib.aclosing(stream_events(sub)) as events:
            async for parts, finished in events:
                if parts:
                    await response.write(b"".join(parts))
                if finished:
                    await response.write_eof()
        if _shut_down(sub.sim_request):
            await response.write(_sse_error(aborted_error().body()) + StreamRenderer.done())
            await response.write_eof()
    return response


async def output_growth(sim_request: SimRequest) -> AsyncIterator[tuple[int, int, bool]]:
    """(first token not sent yet, tokens available, finished) each time the output grows. Ends after
    the last tokens, or at once when the engine aborts the request (a failed step, or the pod going down): the
    caller ends its stream with the error. A request aborted through the abort API finishes like any other."""
    sent = 0
    while True:
        await sim_request.wait(sent)
        available = len(sim_request.output_text)
        finished = sim_request.finished
        if finished and _shut_down(sim_request):
            return
        yield sent, available, finished
        if finished:
            return
        sent = available


async def _complete_messages(sim_request: SimRequest, model: str) -> web.Response:
    await sim_request.wait_finished()
    if _shut_down(sim_request):
        raise anthropic.AnthropicError(aborted_error())
    u = _anthropic_usage(sim_request)
    body = anthropic.full_response(
        anthropic.new_message_id(), model, "".join(sim_request.output_text), sim_request.finish_reason or "length", u
    )
    return web.Response(body=body, content_type="application/json")


def _anthropic_usage(sim_request: SimRequest) -> dict[str, int]:
    return anthropic.usage(len(sim_request.prompt_ids), len(sim_request.output_ids), sim_request.num_cached_tokens or 0)


async def _stream_messages(request: web.Request, sim_request: SimRequest, model: str) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    events = anthropic.MessagesStream(anthropic.new_message_id(), model)
    with contextlib.suppress(ConnectionError):
        await response.prepare(request)
        async for sent, available, finished in output_growth(sim_request):
            texts = sim_request.output_text
            parts = [events.start({**_anthropic_usage(sim_request), "output_tokens": 0})] if sent == 0 else []
            parts += [events.token(texts[i]) for i in range(sent, available)]
            if finished:
                parts.append(events.end(sim_request.finish_reason or "length", len(sim_request.output_ids)))
            await response.write(b"".join(parts))
            if finished:
                await response.write_eof()
        if _shut_down(sim_request):
            await response.write(anthropic.error_event(anthropic.AnthropicError(aborted_error())))
            await response.write_eof()
    return response


async def _complete_generate(sim_request: SimRequest) -> web.Response:
    await sim_request.wait_finished()
    if _shut_down(sim_request):
        raise aborted_error()
    body = generate.full_response(
        sim_request.request_id, sim_request.output_ids, sim_request.finish_reason or "length", _usage(sim_request)
    )
    return web.Response(body=body, content_type="application/json")


async def _stream_generate(
    request: web.Request, sim_request: SimRequest, parsed: InferenceRequest
) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    rid = sim_request.request_id
    with contextlib.suppress(ConnectionError):
        await response.prepare(request)
        async for sent, available, finished in output_growth(sim_request):
            ids = sim_request.output_ids[sent:available]
            parts = [generate.stream_event(rid, ids, sim_request.finish_reason or "length" if finished else None)]
            if finished:
                if parsed.include_usage:
                    parts.append(generate.usage_event(rid, _usage(sim_request)))
                parts.append(generate.DONE)
            await response.write(b"".join(parts))
            if finished:
                await response.write_eof()
        if _shut_down(sim_request):
            await response.write(_sse_error(aborted_error().body()) + generate.DONE)
            await response.write_eof()
    return response


# ---------------------------------------------------------------------------- model server endpoints
async def _models(request: web.Request) -> web.Response:
    pod = request.app[POD_KEY]
    cfg = pod.config
    created = int(pod.started_wall)
    data = [
        {"id": name, "object": "model", "created": created, "owned_by": "vllm", "root": cfg.model,
         "parent": None, "max_model_len": cfg.max_model_len}
        for name in cfg.base_model_names
    ]  # fmt: skip
    data += [
        {"id": a.name, "object": "model", "created": created, "owned_by": "vllm", "root": a.path,
         "parent": cfg.model_name, "max_model_len": cfg.max_model_len}
        for a in pod.lora.adapters()
    ]  # fmt: skip
    return json_response({"object": "list", "data": data})


async def _health(request: web.Request) -> web.Response:
    require_ready(request.app[POD_KEY])
    return web.Response(status=200)


async def _metrics(request: web.Request) -> web.Response:
    pod = request.app[POD_KEY]
    # A hung endpoint never answers while the fault is on; polling (instead of awaiting forever) lets the
    # handler end once the client gives up or the fault is switched off, so hung scrapes do not pile up.
    while pod.config.metrics_hang and pod.alive:
        transport = request.transport
        if transport is None or transport.is_closing():
            raise web.HTTPServiceUnavailable()
        await asyncio.sleep(HANG_POLL_SECONDS)
    if pod.config.metrics_delay > 0:
        await asyncio.sleep(pod.config.metrics_delay)
    return web.Response(body=pod.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _tokenize(request: web.Request) -> web.Response:
    pod = request.app[POD_KEY]
    body = decode_json_body(await request.read())
    chat = "messages" in body
    if not chat and "prompt" not in body:
        raise bad_request("`prompt` or `messages` is required.", param="prompt")
    fields = ("model", "prompt", "messages", "tools", "chat_template_kwargs", "add_generation_prompt")
    parsed = parse_inference_request(
        {k: v for k, v in body.items() if k in fields}, chat, pod.tokenizer.vocab_size, pod.render_chat
    )
    _resolve_model(pod, parsed.model)
    tokens = await pod.tokenizer.encode_prompt(parsed.prompt)
    return json_response({"count": len(tokens), "max_model_len": pod.config.max_model_len, "tokens": tokens})


async def _render(request: web.Request, chat: bool) -> dict[str, Any]:
    """vLLM's render: the body validated as the inference route validates it (model served, prompt plus
    max_tokens within max_model_len), then its prompt ids as a GenerateRequest for /inference/v1/generate."""
    pod = request.app[POD_KEY]
    body = decode_json_body(await request.read())
    parsed = parse_inference_request(body, chat, pod.tokenizer.vocab_size, pod.render_chat)
    model, _ = _resolve_model(pod, parsed.model)
    prompt_ids = await pod.tokenizer.encode_prompt(parsed.prompt)
    max_tokens = _checked_max_tokens(pod, len(prompt_ids), parsed)
    return {
        "request_id": new_request_id(chat),
        "token_ids": prompt_ids,
        "features": None,
        "sampling_params": {"max_tokens": max_tokens},
        "model": model,
        "stream": parsed.stream,
        "stream_options": body.get("stream_options"),
        "cache_salt": body.get("cache_salt"),
        "priority": 0,
        "kv_transfer_params": parsed.kv_transfer_params,
    }


async def _render_chat(request: web.Request) -> web.Response:
    return json_response(await _render(request, chat=True))


async def _render_completion(request: web.Request) -> web.Response:
    return json_response([await _render(request, chat=False)])  # one per prompt (the simulator takes one)


async def _lora_body(request: web.Request) -> tuple[str, str]:
    body = decode_json_body(await request.read())
    name = body.get("lora_name")
    if not isinstance(name, str) or not name:
        raise bad_request("`lora_name` is required.", param="lora_name")
    path = body.get("lora_path") or ""
    return name, str(path)


async def _load_lora(request: web.Request) -> web.Response:
    pod = request.app[POD_KEY]
    name, path = await _lora_body(request)
    if pod.lora.get(name) is not None:
        raise bad_request(f"The lora adapter '{name}' has already been loaded.", param="lora_name")
    pod.lora.register(name, path)
    return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")


async def _unload_lora(request: web.Request) -> web.Response:
    pod = request.app[POD_KEY]
    name, _ = await _lora_body(request)
    if not pod.lora.unregister(name):
        raise ApiError(404, f"The lora adapter '{name}' cannot be found.", param="lora_name")
    return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")


async def _reset_prefix_cache(request: web.Request) -> web.Response:
    pod = request.app[POD_KEY]
    if not pod.engine.reset_prefix_cache():
        raise ApiError(409, "Cannot reset the prefix cache while requests are running.")
    return web.Response(status=200)


# ---------------------------------------------------------------------------- admin
async def _get_config(request: web.Request) -> web.Response:
    return json_response(request.app[POD_KEY].describe())


async def _post_config(request: web.Request) -> web.Response:
    pod = request.app[POD_KEY]
    patch = decode_json_body(await request.read())
    try:
        pod.update_config(patch)
    except ValueError as exc:
        raise bad_request(str(exc)) from exc
    return json_response(pod_config_to_dict(pod.config))


async def _kill(request: web.Request) -> web.Response:
    pod = request.app[POD_KEY]
    body = decode_json_body(await request.read() or b"{}")
    duration = body.get("duration")
    if duration is not None and (isinstance(duration, bool) or not isinstance(duration, int | float) or duration < 0):
        raise bad_request("`duration` must be a non-negative number of seconds or null.", param="duration")
    pod.schedule_kill(None if duration is None else float(duration))
    return json_response({"killed": pod.name, "duration": duration}, status=202)


async def _evict(request: web.Request) -> web.Response:
    pod = request.app[POD_KEY]
    body = decode_json_body(await request.read() or b"{}")
    fraction, order, seed = body.get("fraction"), body.get("order", "lru"), body.get("seed")
    if not isinstance(fraction, int | float) or isinstance(fraction, bool) or not 0 <= fraction <= 1:
        raise bad_request("`fraction` must be a number within [0, 1].", param="fraction")
    if order not in ("lru", "random"):
        raise bad_request("`order` must be `lru` or `random`.", param="order")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise bad_request("`seed` must be an integer or null.", param="seed")
    evicted = pod.engine.evict_cached(float(fraction), order, seed)
    return json_response({"evicted": evicted, "cached": pod.engine.pool.num_cached})
