"""Chat templates: a chat request → the prompt text the model server tokenizes.

Precise prefix routing needs the EPP's token ids to equal the engine's, so the template must be the
engine's. `load_chat_template(spec, tokenizer_path)` gives one of:

* **the model's Jinja template** (`spec` `auto`, or a path): `chat_template.jinja` next to `tokenizer.json`,
  else the `chat_template` of the `tokenizer_config.json` there, except that a multimodal model's processor
  template (`chat_template.json`) renders requests without tools, as vLLM's resolve_chat_template prefers
  it; or the file `spec` names (a `.json` tokenizer config or a Jinja source). Rendered as vLLM's
  `/v1/chat/completions` renders it (through transformers): a sandboxed Jinja environment with
  `trim_blocks`, `lstrip_blocks`, `loopcontrols`, `{% generation %}`, transformers' `tojson` (no HTML
  escaping), `raise_exception`, `strftime_now`; the
  context is the config's special tokens (`bos_token`, `eos_token`, ...), `messages`, `tools`, `documents`,
  `add_generation_prompt` (request, default true), then the request's `chat_template_kwargs` (e.g.
  Qwen3's `enable_thinking`); `continue_final_message` cuts after the final message as transformers does.
  Messages as vLLM passes them: text parts joined by "\\n" into a string, or kept as `[{type: text, text}]`
  when the template loops over `message.content` (vLLM's "openai" content format, detected from the
  template's syntax tree; a tool message's content is joined all the same); assistant `tool_calls` with
  arguments as objects (a JSON string parsed; empty, null, invalid or non-object arguments as {});
  `name`, `tool_call_id` passed through; an assistant's `reasoning` as both `reasoning` and
  `reasoning_content` (a client's `reasoning_content` is not read, as in vLLM). `tools` as sent, so
  an empty list stays a list. A config whose `chat_template` is a list of named templates uses
  `tool_use` for requests with a tools list (when present), else `default`. Embeddings requests of chat
  `messages` as vLLM renders them: without tools or documents, `add_generation_prompt` default false.
  Responses, Conversations and Anthropic Messages requests (no chat body) are rendered from their parsed
  role + text messages.
* **built-in renderers**: `role-tags` (alias `llmepp-sim`), the simulator's template, per message
  ``<|{role}|>\\n{text}\\n`` then the generation prompt ``<|assistant|>\\n``; `plain`, the texts joined by
  "\\n" (engines serving raw text). `auto` falls back to `role-tags`, with a warning, when the tokenizer's
  folder holds no template.

A template that fails on a request (its `raise_exception`, a malformed body) raises ValueError: the
token producer then skips the request (it routes without prefix data), as vLLM would reject it.

Renders are bounded (a template is code: a bug, or a hostile model folder, must not hang or exhaust the
EPP): each has a time `budget` (RENDER_BUDGET by default), checked every _PACE_LOOKUPS attribute / item
lookups and every `range` step; its output may not
exceed MAX_OUTPUT_FLOOR + OUTPUT_PER_BODY_BYTE characters per body byte; and what builds a huge value in
one step from small operands is refused beforehand: `*` / `**` results, a namespace attribute longer than
MAX_VALUE, and `lipsum`. Past a bound the render raises ValueError naming it, like any other failed render.
A template is the operator's code, as trusted as the engine that renders it too: calls and filters given
huge arguments (`center(10**8)`) are caught by the output bound, after they ran, not before.

`render(request, pause=loop_handoff(loop))` is for a worker thread (the token producer renders long
conversations there): Jinja holds the GIL throughout, so a worker alone still stalls the event loop for up
to the interpreter's switch interval (5 ms) at a time, far longer on a busy CPU; paced, the render lets the
loop run every RENDER_SLICE.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import jinja2
import jinja2.ext
import msgspec
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment, safe_range
from jinja2.utils import Namespace

from llmepp.decoding import DECODE_ERRORS
from llmepp.request.parsers import TEXT_PARTS
from llmepp.request.types import InferenceRequest, RequestKind

log = logging.getLogger(__name__)

Messages = Sequence[tuple[str, str]]
AUTO = "auto"
JINJA_FILE = "chat_template.jinja"
PROCESSOR_TEMPLATE = "chat_template.json"  # a processor's (multimodal models: llava-hf, Qwen-VL), older layout
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Context names a request's chat_template_kwargs may not override (they come from their own fields). `tools`
# and `documents` are set apart: vLLM takes them from chat_template_kwargs too (see JinjaTemplate.render).
_RESERVED = frozenset({"messages", "tools", "documents", "add_generation_prompt", "continue_final_message"})
# transformers' layout for a tokenizer's named templates: chat_template.jinja ("default") and, per other name,
# additional_chat_templates/<name>.jinja (loaded back as {"default": ..., "<name>": ...}).
ADDITIONAL_TEMPLATES = "additional_chat_templates"

# Paced rendering (in a worker thread) lets the event loop run every RENDER_SLICE seconds: the template,
# compiled a second time in an environment that counts its attribute / item lookups (every `message.role`,
# `loop.index0`, `ns.x`...), reads the clock every _PACE_LOOKUPS of them, and once a slice has passed calls
# `pause`: loop_handoff blocks the worker (GIL released) until the loop thread has run a callback. Measured
# on a 2-core EPYC (CPython 3.11, other work on the machine), the loop's worst lag while a 2,000-message
# conversation renders, median / max of 20 renders: a ChatML template (6 ms to render) inline 6 ms, in a
# plain worker 6 / 22 ms (Jinja holds the GIL: the loop gets it back at the 5 ms switch interval at best),
# paced 0.9 / 1.0 ms (0.9: the probe's floor); a Qwen3-style template (18 ms) inline 18 ms, plain worker
# 6 / 11 ms, paced 0.9 / 4 ms. With three CPU burners besides: ChatML plain worker 15 / 108 ms, paced
# 5 / 9 ms; Qwen3-style 20 / 136 ms, paced 5 / 9 ms. Rejected: pacing on the emitted chunks (a Qwen3-style
# template scans all the messages before it emits any: 6 ms left); time.sleep(0) / os.sched_yield as the
# pause (a release the loop thread is too late to take restarts its 5 ms wait for a forced switch: 42 ms
# stalls, 88 ms with the burners).
# Costs: the counting, now on every render (it also enforces the render's time budget, inline ones included),
# ~+11% render CPU (ChatML, 2-400 messages: 15.5 -> 17.5 us, 1,355 -> 1,500 us); paced renders ~+10% latency
# and, on the loop, one callback per slice.
RENDER_SLICE = 0.0005
HANDOFF_TIMEOUT = 0.1  # a loop that no longer runs (shutdown) must not hang the worker
_PACE_LOOKUPS = 256
_PACE_MESSAGES = 32  # messages converted for the template between clock reads
_paced_render = threading.local()  # .pacer: the _Pacer of the paced render running on this thread
# The bounds of a render (see the module docstring).
RENDER_BUDGET = 2.0  # seconds, unless the caller gives one
MAX_VALUE = 1 << 22  # int magnitude a step may pass on; characters / items too, or the output bound if larger
MAX_OUTPUT_FLOOR = 1 << 20  # characters of output any request may render to...
OUTPUT_PER_BODY_BYTE = 8  # ...plus this many per byte of its body
_MAX_POW_BITS = 1 << 16  # `a ** b`: results of at most this many bits
_render_state = threading.local()  # .deadline (perf_counter) and .budget of the render on this thread


class RenderLimitExceeded(jinja2.TemplateRuntimeError):
    """A render went past one of its bounds."""


def _checkpoint() -> None:
    """Past the render's deadline: RenderLimitExceeded. Paced: the pause, when due."""
    deadline: float | None = getattr(_render_state, "deadline", None)
    if deadline is not None and time.perf_counter() > deadline:
        raise RenderLimitExceeded(f"the render exceeded its {_render_state.budget * 1000:.0f} ms budget")
    _pace_this_thread()


def _max_len() -> int:
    """Characters / items a step may produce: MAX_VALUE, or the render's output bound (a huge prompt's)."""
    return max(MAX_VALUE, getattr(_render_state, "limit", None) or 0)


def _too_big(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return abs(value) > MAX_VALUE
    if isinstance(value, (str, list, tuple, dict)):
        return len(value) > _max_len()
    return False


class _Range(Sequence[int]):
    """The sandbox's `range` (at most MAX_RANGE items), at a checkpoint every step of an iteration."""

    def __init__(self, r: range) -> None:
        self._r = r

    def __len__(self) -> int:
        return len(self._r)

    def __getitem__(self, i: Any) -> Any:
        item = self._r[i]
        return _Range(item) if isinstance(item, range) else item

    def __iter__(self) -> Iterator[int]:
        for i in self._r:
            _checkpoint()
            yield i

    def __contains__(self, value: object) -> bool:
        return value in self._r

    def __repr__(self) -> str:
        return repr(self._r)


def _range(*args: int) -> _Range:
    return _Range(safe_range(*args))


class _BoundedNamespace(Namespace):
    """`namespace()`, refusing attributes larger than MAX_VALUE (`{% set ns.s = ns.s ~ ns.s %}` doubles)."""

    def __setitem__(self, name: str, value: Any) -> None:
        if _too_big(value):
            raise RenderLimitExceeded(f"namespace attribute {name!r} is longer than {_max_len()}")
        super().__setitem__(name, value)


def _no_lipsum(*args: Any, **kwargs: Any) -> str:
    raise RenderLimitExceeded("lipsum is not available in chat templates")


def loop_handoff(loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
    """A `pause` for a render in a worker thread: returns once `loop`'s thread has run a callback (it took
    the GIL and ran what was ready), or after HANDOFF_TIMEOUT."""

    def pause() -> None:
        ran = threading.Event()
        try:
            loop.call_soon_threadsafe(ran.set)
        except RuntimeError:  # the loop is closed
            return
        ran.wait(HANDOFF_TIMEOUT)

    return pause


class _Pacer:
    """Calls `pause` once RENDER_SLICE has passed since the last pause (or the start)."""

    def __init__(self, pause: Callable[[], None]) -> None:
        self._pause = pause
        self._due = time.perf_counter() + RENDER_SLICE

    def pace(self) -> None:
        if time.perf_counter() >= self._due:
            self._pause()
            self._due = time.perf_counter() + RENDER_SLICE


def _pace_this_thread() -> None:
    pacer: _Pacer | None = getattr(_paced_render, "pacer", None)
    if pacer is not None:
        pacer.pace()


_SANDBOX_GETATTR = ImmutableSandboxedEnvironment.getattr
_SANDBOX_GETITEM = ImmutableSandboxedEnvironment.getitem


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox, bounded (see the module docstring), at a checkpoint (pacing its thread's render, checking
    its deadline) every _PACE_LOOKUPS attribute / item lookups (the count is shared by the threads rendering
    with it: a race only shifts when a thread next reads the clock)."""

    _countdown = _PACE_LOOKUPS
    # Only the operators that can build a huge value in one step from small operands (`'x' * 10**8`,
    # `7 ** 10**7`): `+` and `%` are everywhere in chat templates, and intercepting them cost ~20% of a render.
    intercepted_binops = frozenset({"*", "**"})

    def getattr(self, obj: Any, attribute: str) -> Any:
        self._countdown -= 1
        if self._countdown <= 0:
            self._countdown = _PACE_LOOKUPS
            _checkpoint()
        return _SANDBOX_GETATTR(self, obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        self._countdown -= 1
        if self._countdown <= 0:
            self._countdown = _PACE_LOOKUPS
            _checkpoint()
        return _SANDBOX_GETITEM(self, obj, argument)

    def call_binop(self, context: Any, op: str, left: Any, right: Any) -> Any:
        if op == "**":
            ints = isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1
            if ints and abs(left).bit_length() * right > _MAX_POW_BITS:
                raise RenderLimitExceeded(f"{op}: the result would have more than {_MAX_POW_BITS} bits")
            return self.binop_table[op](left, right)
        limit = _max_len()
        for seq, n in ((left, right), (right, left)):  # `*`
            if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > limit:
                raise RenderLimitExceeded(f"{op}: the result would be longer than {limit}")
        return self.binop_table[op](left, right)


class ChatTemplate(Protocol):
    name: str

    def render(
        self, request: InferenceRequest, *, pause: Callable[[], None] | None = None, budget: float | None = None
    ) -> str: ...


# -- built-in renderers ----------------------------------------------------------------------
def role_tags(messages: Messages) -> str:
    return "".join(f"<|{role}|>\n{text}\n" for role, text in messages) + "<|assistant|>\n"


def plain(messages: Messages) -> str:
    return "\n".join(text for _, text in messages)


BUILTIN: dict[str, Callable[[Messages], str]] = {
    "role-tags": role_tags,
    "llmepp-sim": role_tags,
    "plain": plain,
}


def chat_messages(messages: Messages) -> list[dict[str, Any]]:
    """Parsed (role, text) messages as chat messages (string content)."""
    return [{"role": role, "content": text} for role, text in messages]


class BuiltinTemplate:
    """A built-in renderer over the parsed (role, text) messages."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._fn = BUILTIN[name]

    def render(
        self, request: InferenceRequest, *, pause: Callable[[], None] | None = None, budget: float | None = None
    ) -> str:
        # ~0.05 µs per message (0.1 ms for 2,000): nothing to pace.
        return self._fn(request.messages or ())


# -- Jinja ------------------------------------------------------------------------------------
class _ChatInputs(msgspec.Struct):
    """The fields of a chat request a template sees (everything else in the body is skipped)."""

    messages: list[dict[str, Any]] = []
    tools: list[dict[str, Any]] | None = None
    documents: list[dict[str, Any]] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    reasoning_effort: Any = None


# strict=False: "false" / 0 read as booleans, as vLLM's (lax) pydantic request model reads them.
_INPUTS = msgspec.json.Decoder(_ChatInputs, strict=False)
# What vLLM's /tokenize (TokenizeChatRequest) takes: no reasoning_effort.
_TEMPLATE_FIELDS = tuple(f for f in _ChatInputs.__struct_fields__ if f != "reasoning_effort")


def template_fields(body: bytes) -> dict[str, Any]:
    """The chat body's fields that decide its rendering, verbatim (for a model server's /tokenize)."""
    try:
        data = msgspec.json.decode(body)
    except DECODE_ERRORS as e:
        raise ValueError(f"chat request cannot be decoded: {e}") from None
    if not isinstance(data, dict):
        raise ValueError("chat request body is not a JSON object")
    return {k: data[k] for k in _TEMPLATE_FIELDS if k in data}


def embedding_chat_fields(body: bytes) -> dict[str, Any]:
    """An embeddings body of chat messages: the fields that decide its rendering as vLLM's
    EmbeddingChatRequest renders it (no tools or documents; no generation prompt unless asked for)."""
    fields = template_fields(body)
    fields.pop("tools", None)
    fields.pop("documents", None)
    fields.setdefault("add_generation_prompt", False)
    return fields


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker): renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:  # fmt: skip
    # transformers' filter: plain json.dumps (Jinja's own escapes <, >, & and ' for HTML).
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> _BoundedEnvironment:
    env = _BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(
        raise_exception=_raise_exception,
        strftime_now=_strftime_now,
        range=_range,
        namespace=_BoundedNamespace,
        lipsum=_no_lipsum,
    )
    return env


def _loops_over_content(ast: nodes.Template) -> bool:
    """vLLM's content-format detection (`_detect_content_format`): does the template loop over the `content`
    of a variable that loops over `messages` (or a variable assigned from it)? Then it takes content as a
    list of parts ("openai"), else as a string. Filters, tests and slices around a variable are seen
    through; a variable assigned from `content` is not followed, as vLLM does not follow it."""

    def unwrap(node: nodes.Node) -> nodes.Node:
        while True:
            wrapped = isinstance(node, nodes.Filter | nodes.Test) and node.node is not None
            if not (wrapped or (isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Slice))):
                return node
            node = node.node  # type: ignore[attr-defined]

    def is_var(node: nodes.Node, names: set[str]) -> bool:
        node = unwrap(node)
        return isinstance(node, nodes.Name) and node.ctx == "load" and node.name in names

    def is_field(node: nodes.Node, names: set[str], key: str) -> bool:
        node = unwrap(node)
        if isinstance(node, nodes.Getattr):
            return node.attr == key and is_var(node.node, names)
        if isinstance(node, nodes.Getitem):
            return isinstance(node.arg, nodes.Const) and node.arg.value == key and is_var(node.node, names)
        return False

    # `messages` and the variables assigned from it, transitively.
    lists = {"messages"}
    assigns = [a for a in ast.find_all(nodes.Assign) if isinstance(a.target, nodes.Name)]
    grew = True
    while grew:
        grew = False
        for a in assigns:
            name = a.target.name  # type: ignore[attr-defined]
            if name not in lists and is_var(a.node, lists):
                lists.add(name)
                grew = True
    loops = list(ast.find_all(nodes.For))
    messages = {loop.target.name for loop in loops if isinstance(loop.target, nodes.Name) and is_var(loop.iter, lists)}
    return any(is_field(loop.iter, messages, "content") for loop in loops)


def _text_parts(content: Any, keep_empty: bool) -> list[str]:
    """The texts of a message's content. An empty text part is skipped in the string format, as vLLM skips
    it (`if parse_res`: ""), but kept in the parts format (`keep_empty`), where vLLM's parse result is the
    part itself, {"type": "text", "text": ""}, which is truthy."""
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        raise ValueError("message content must be a string, a list of parts or null")
    return [text for p in content if (text := _part_text(p)) is not None and (keep_empty or text)]


def _part_text(part: Any) -> str | None:
    """A plain string part is a text part (vLLM's chat_utils: ChatCompletionContentPartParam includes str),
    as is a TEXT_PARTS part (input_text, refusal, ...: its text field). None: no text part (or a null text)."""
    if isinstance(part, str):
        return part
    kind = part.get("type") if isinstance(part, dict) else None
    text = part.get(TEXT_PARTS[kind]) if isinstance(kind, str) and kind in TEXT_PARTS else None
    return text if isinstance(text, str) else None


def _tool_call(call: Any) -> Any:
    """vLLM hands a tool call's `arguments` to the template decoded (chat_utils._postprocess_messages): a
    JSON string parsed, whatever JSON value it holds; empty, null or invalid JSON (nested too deeply too) as {}."""
    if isinstance(call, dict) and isinstance(call.get("function"), dict):
        fn = call["function"]
        args = fn.get("arguments")
        if not args:
            args = {}
        elif isinstance(args, str):
            try:
                args = json.loads(args)
            except (ValueError, RecursionError):
                args = {}
        return {**call, "function": {**fn, "arguments": args}}
    return call


def _tool(tool: dict[str, Any]) -> dict[str, Any]:
    """A tool as vLLM hands it to the template (its request model dumped: absent fields are null, but
    `strict` and `defer_loading` appear only when set, as vLLM's FunctionDefinition serializes them)."""
    fn = tool.get("function")
    if not isinstance(fn, dict):
        return tool
    function = {"name": fn.get("name"), "description": fn.get("description"), "parameters": fn.get("parameters")}
    for optional in ("strict", "defer_loading"):
        if fn.get(optional) is not None:
            function[optional] = fn[optional]
    return {"type": tool.get("type", "function"), "function": function}


class JinjaTemplate:
    """A model's Jinja chat template, compiled once (see the module docstring for the semantics)."""

    def __init__(
        self,
        source: str | dict[str, str],
        *,
        special_tokens: dict[str, str],
        origin: str,
        tokens_from: Path | None = None,
    ) -> None:
        # One bounded environment (which also paces renders given a `pause`): compiled once.
        env = _environment()
        sources = {"default": source} if isinstance(source, str) else dict(source)
        if "default" not in sources:
            raise ValueError(f"{origin}: the chat_template list has no template named 'default'")
        self.name = origin
        self._templates: dict[str, jinja2.Template] = {}
        self._lists: dict[str, bool] = {}
        for name, text in sources.items():
            try:
                ast = env.parse(text)
                self._templates[name] = env.from_string(ast)
                self._lists[name] = _loops_over_content(ast)
            except jinja2.TemplateSyntaxError as e:
                raise ValueError(f"{origin}: chat template {name!r}, line {e.lineno}: {e.message}") from None
            except RecursionError:
                raise ValueError(f"{origin}: chat template {name!r} is nested too deeply") from None
        # The tokenizer_config.json the special tokens were read from (None: no such file).
        self.special_tokens = special_tokens
        self.tokens_from = tokens_from

    def content_as_parts(self, name: str = "default") -> bool:
        return self._lists[name]

    def render(
        self, request: InferenceRequest, *, pause: Callable[[], None] | None = None, budget: float | None = None
    ) -> str:
        """The prompt text. `pause`: called every RENDER_SLICE of the render (a worker thread's
        loop_handoff). `budget`: seconds the render may take (RENDER_BUDGET by default)."""
        budget = RENDER_BUDGET if budget is None else budget
        deadline = time.perf_counter() + budget
        pacer = _Pacer(pause) if pause is not None else None
        inputs = _inputs(request)
        kwargs = inputs.chat_template_kwargs or {}
        # vLLM merges the request's fields over its chat_template_kwargs leaving out those that are None
        # (renderers.params.merge_kwargs): without a `documents` field, chat_template_kwargs' documents reach the
        # template. The request's tools are a default its chat_template_kwargs override (_preprocess_chat).
        tools = kwargs.get("tools")
        if tools is None and inputs.tools is not None:
            tools = [_tool(t) for t in inputs.tools]
        documents = inputs.documents if inputs.documents is not None else kwargs.get("documents")
        # As transformers picks: any tools list, even an empty one (vLLM passes [] as sent).
        name = "tool_use" if tools is not None and "tool_use" in self._templates else "default"
        as_parts = self._lists[name]
        if pacer is None:
            messages = [self._message(m, as_parts) for m in inputs.messages]
        else:
            messages = []
            for i, m in enumerate(inputs.messages):
                messages.append(self._message(m, as_parts))
                if i % _PACE_MESSAGES == 0:
                    pacer.pace()
        if inputs.add_generation_prompt and inputs.continue_final_message:
            raise ValueError("add_generation_prompt and continue_final_message cannot both be true")
        context: dict[str, Any] = dict(self.special_tokens)
        effort = inputs.reasoning_effort
        if isinstance(effort, str):
            # vLLM's build_chat_params: the effort is a template variable, and turns thinking on or off
            # unless the request's chat_template_kwargs say.
            context["reasoning_effort"] = effort
            if "enable_thinking" not in kwargs:
                context["enable_thinking"] = effort != "none"
        context.update((k, v) for k, v in kwargs.items() if k not in _RESERVED)
        context.update(
            messages=messages,
            tools=tools,
            documents=documents,
            add_generation_prompt=inputs.add_generation_prompt,
        )
        _paced_render.pacer = pacer
        limit = MAX_OUTPUT_FLOOR + OUTPUT_PER_BODY_BYTE * len(request.body)
        _render_state.deadline, _render_state.budget, _render_state.limit = deadline, budget, limit
        try:
            chunks, size = [], 0
            for chunk in self._templates[name].generate(context):
                size += len(chunk)
                if size > limit:
                    raise RenderLimitExceeded(f"the output exceeds {limit} characters")
                chunks.append(chunk)
            text = "".join(chunks)
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template: {e}") from None
        except RecursionError:
            raise ValueError("chat template failed on this request: it recursed too deeply") from None
        except (TypeError, ValueError, KeyError, AttributeError, IndexError, ArithmeticError, MemoryError) as e:
            # A template's own Python errors.
            raise ValueError(f"chat template failed on this request: {e!r}") from None
        finally:
            _paced_render.pacer = None
            _render_state.deadline = _render_state.limit = None
        if inputs.continue_final_message and messages:
            text = _continue_final(text, messages[-1])
        return text

    @staticmethod
    def _message(m: dict[str, Any], as_parts: bool) -> dict[str, Any]:
        texts = _text_parts(m.get("content"), keep_empty=as_parts)
        role = m.get("role", "")
        out: dict[str, Any] = {"role": role}
        # vLLM joins a tool result's text parts whatever the content format.
        parts = as_parts and role != "tool"
        out["content"] = [{"type": "text", "text": t} for t in texts] if parts else "\n".join(texts)
        # As vLLM's _parse_chat_message_content: an assistant's tool_calls whenever present and not null (an
        # empty list too: vLLM's own answers carry `"tool_calls": []`, and clients send them back), a tool
        # message's tool_call_id, a string name.
        calls = m.get("tool_calls")
        if role == "assistant" and isinstance(calls, list):
            out["tool_calls"] = [_tool_call(c) for c in calls]
        if role == "tool" and "tool_call_id" in m:
            out["tool_call_id"] = m["tool_call_id"]
        if isinstance(m.get("name"), str):
            out["name"] = m["name"]
        # vLLM reads an assistant's `reasoning` (not `reasoning_content`) and passes it under both names.
        reasoning = m.get("reasoning")
        if role == "assistant" and reasoning is not None:
            out["reasoning"] = out["reasoning_content"] = reasoning
        return out


class _ApiTools(msgspec.Struct):
    tools: list[Any] | None = None


_API_TOOLS = msgspec.json.Decoder(_ApiTools)


def api_tools(request: InferenceRequest) -> list[dict[str, Any]] | None:
    """The tools of a Responses or Anthropic Messages request as vLLM hands them to the chat template: a Responses
    function tool {type, name, description, parameters, strict} as {type: function, function: {the rest}}
    (responses utils' convert_tool_responses_to_completions_format); an Anthropic tool {name, description,
    input_schema} as a function whose parameters are its input_schema (its Anthropic endpoint's conversion).
    None for other kinds, or without tools."""
    kind = request.kind
    if kind is not RequestKind.RESPONSES and kind is not RequestKind.MESSAGES:
        return None
    try:
        tools = _API_TOOLS.decode(request.body).tools
    except DECODE_ERRORS:
        return None
    out: list[dict[str, Any]] = []
    for tool in tools or ():
        if not isinstance(tool, dict):
            continue
        if kind is RequestKind.RESPONSES:
            if tool.get("type") == "function":
                out.append({"type": "function", "function": {k: v for k, v in tool.items() if k != "type"}})
        elif isinstance(tool.get("name"), str):
            function = {"name": tool["name"], "description": tool.get("description"),
                        "parameters": tool.get("input_schema")}  # fmt: skip
            out.append({"type": "function", "function": function})
    return out or None


def _inputs(request: InferenceRequest) -> _ChatInputs:
    """What the template renders: the chat body's fields, an embeddings body's chat fields, or (Responses,
    Conversations, Anthropic Messages: their body is no chat body) the parsed messages."""
    try:
        if request.kind is RequestKind.CHAT_COMPLETIONS:
            return _INPUTS.decode(request.body)
        if request.kind is RequestKind.EMBEDDINGS:
            # The fields vLLM's EmbeddingChatRequest renders with, as the vllm token backend sends them.
            return msgspec.convert(embedding_chat_fields(request.body), _ChatInputs)
    except DECODE_ERRORS as e:
        raise ValueError(f"chat request cannot be rendered: {e}") from None
    # Responses, Conversations, Anthropic Messages: the chat vLLM builds from them, and its tools.
    return _ChatInputs(messages=api_chat_messages(request), tools=api_tools(request))


class _AnthropicBlock(msgspec.Struct):
    type: str = ""
    text: Any = None
    thinking: Any = None
    id: Any = None  # tool_use
    name: Any = None
    input: Any = None
    tool_use_id: Any = None  # tool_result
    content: Any = None
    source: Any = None  # image


class _AnthropicMessage(msgspec.Struct):
    role: str = ""
    content: str | list[_AnthropicBlock] | None = None


class _AnthropicBody(msgspec.Struct):
    messages: list[_AnthropicMessage] = []


class _ResponsesBody(msgspec.Struct):
    input: Any = None
    items: Any = None  # Conversations


def api_chat_messages(request: InferenceRequest) -> list[dict[str, Any]]:
    """The chat messages vLLM renders for a Responses, Conversations or Anthropic Messages request: tool calls
    as the assistant's `tool_calls`, tool results as `tool` messages, thinking / reasoning items as the
    assistant's `reasoning`. Other kinds: the parsed (role, text) messages."""
    try:
        if request.kind is RequestKind.MESSAGES:
            return _anthropic_chat(request)
        if request.kind is RequestKind.RESPONSES or request.kind is RequestKind.CONVERSATIONS:
            return _responses_chat(request)
    except DECODE_ERRORS as e:
        raise ValueError(f"request cannot be rendered: {e}") from None
    return chat_messages(request.messages or ())


def _anthropic_chat(request: InferenceRequest) -> list[dict[str, Any]]:
    """As vLLM's AnthropicServingMessages converts messages (_convert_messages, _convert_block). System messages
    are the parser's, where it placed them (the "preserve" placement of vLLM's inline_system.py); each other
    parsed message is the next non-system message of the body, converted. Not converted: `tool_reference` items
    inside a tool result."""
    body = msgspec.json.decode(request.body, type=_AnthropicBody)
    messages = iter([m for m in body.messages if m.role != "system"])
    out: list[dict[str, Any]] = []
    for role, text in request.messages or ():
        if role == "system":
            out.append({"role": "system", "content": text})
        else:  # the parser's role: ctx / msg already read as user
            _anthropic_message(role, next(messages).content, out)
    return out


def _anthropic_message(role: str, content: str | list[_AnthropicBlock] | None, out: list[dict[str, Any]]) -> None:
    message: dict[str, Any] = {"role": role}
    if isinstance(content, str):
        message["content"] = content
    else:
        parts: list[dict[str, Any]] = []
        calls: list[dict[str, Any]] = []
        reasoning: list[str] = []
        for block in content or ():
            kind = block.type
            if kind == "text" and block.text:
                parts.append({"type": "text", "text": block.text})
            elif kind == "image" and block.source:
                parts.append({"type": "image_url", "image_url": {"url": _anthropic_image_url(block.source)}})
            elif kind == "thinking" and block.thinking is not None:
                reasoning.append(str(block.thinking))
            elif kind == "tool_use":
                arguments = json.dumps(block.input or {})
                calls.append({"id": block.id or "call", "type": "function",
                              "function": {"name": block.name or "", "arguments": arguments}})  # fmt: skip
            elif kind == "tool_result" and role == "user":
                out += _anthropic_tool_result(block)  # before the user's own message, as vLLM
            elif kind == "tool_result":
                parts.append({"type": "text", "text": f"Tool result: {block.content if block.content else ''}"})
        if reasoning:
            message["reasoning"] = "".join(reasoning)
        if calls:
            message["tool_calls"] = calls
        if len(parts) == 1 and parts[0]["type"] == "text":
            message["content"] = parts[0]["text"]
        elif parts:
            message["content"] = parts
    if not (role == "user" and "content" not in message):
        out.append(message)


def _anthropic_image_url(source: Any) -> str:
    if not isinstance(source, dict):
        return ""
    if source.get("type") == "url":
        return str(source.get("url", ""))
    return f"data:{source.get('media_type', 'image/jpeg')};base64,{source.get('data', '')}"


def _anthropic_tool_result(block: _AnthropicBlock) -> list[dict[str, Any]]:
    """A user's tool_result as vLLM's _convert_user_tool_result makes it: a `tool` message with its text, then
    a user message with its images, if any."""
    inner = block.content
    texts: list[str] = []
    images: list[dict[str, Any]] = []
    if isinstance(inner, list):
        for item in inner:
            if not isinstance(item, dict):
                continue
            if item.get("type") == "text":
                texts.append(str(item.get("text", "")))
            elif item.get("type") == "image" and (url := _anthropic_image_url(item.get("source", {}))):
                images.append({"type": "image_url", "image_url": {"url": url}})
    text = inner if isinstance(inner, str) else "\n".join(texts)
    out: list[dict[str, Any]] = [{"role": "tool", "tool_call_id": block.tool_use_id or "", "content": text}]
    if images:
        out.append({"role": "user", "content": images})
    return out


def _responses_chat(request: InferenceRequest) -> list[dict[str, Any]]:
    """As vLLM's construct_chat_messages_with_tool_call (responses/utils.py): a function_call joins the
    preceding assistant message's `tool_calls` (or starts one), a reasoning item its `reasoning`, an assistant
    message's text (its first part) its `content`; a function_call_output is a `tool` message. Messages of
    other roles: the parser's (role, text), one per item after the instructions."""
    body = msgspec.json.decode(request.body, type=_ResponsesBody)
    items = body.items if request.kind is RequestKind.CONVERSATIONS else body.input
    parsed = list(request.messages or ())
    skip = len(parsed) - (len(items) if isinstance(items, list) else 1)  # the instructions' system message
    out: list[dict[str, Any]] = [{"role": role, "content": text} for role, text in parsed[:skip]]
    if not isinstance(items, list):
        return out + [{"role": role, "content": text} for role, text in parsed[skip:]]
    first = len(out)
    for item, (role, text) in zip(items, parsed[skip:]):
        prev = out[-1] if len(out) > first and out[-1].get("role") == "assistant" else None
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments")}}  # fmt: skip
            if prev is not None and isinstance(prev.get("tool_calls", []), list):
                prev.setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "tool_calls": [call]})
        elif kind == "reasoning":
            if prev is not None and prev.get("reasoning") is None:
                prev["reasoning"] = _reasoning_text(item)
            else:
                out.append({"role": "assistant", "reasoning": _reasoning_text(item)})
        elif kind == "function_call_output":
            out.append({"role": "tool", "content": text, "tool_call_id": item.get("call_id")})
        elif role == "assistant":
            content = item.get("content") if isinstance(item, dict) else None
            if isinstance(content, list) and content and isinstance(content[0], dict):
                content = content[0].get("text")
            first_text = content if isinstance(content, str) else text
            if prev is not None and prev.get("content") is None:
                prev["content"] = first_text
            else:
                out.append({"role": "assistant", "content": first_text})
        else:
            out.append({"role": role, "content": text})
    return out


def _reasoning_text(item: dict[str, Any]) -> str:
    """A reasoning item's first content text, else its first summary text (vLLM's order)."""
    for key in ("content", "summary"):
        parts = item.get(key)
        if isinstance(parts, list) and parts and isinstance(parts[0], dict):
            return str(parts[0].get("text", ""))
    return ""


def _continue_final(text: str, final: dict[str, Any]) -> str:
    """transformers' continue_final_message: cut the rendering right after the final message."""
    content = final["content"]
    if isinstance(content, list):
        if not content:
            raise ValueError("continue_final_message: the final message has no text to continue")
        content = content[-1]["text"]
    if content.strip() not in text:
        raise ValueError("continue_final_message: the final message does not appear in the rendered prompt")
    end = text.rindex(content.strip())
    if text[end : end + len(content.lstrip())] == content:
        return text[: end + len(content.lstrip())]
    return text[: end + len(content.strip())]


# -- loading ----------------------------------------------------------------------------------
def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])  # an AddedToken record
    return None


def _read_tokenizer_config(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot be read as JSON: {e}") from None
    except RecursionError:
        raise ValueError(f"{path}: cannot be read as JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _special_tokens(config: dict[str, Any]) -> dict[str, str]:
    out = {}
    for key in SPECIAL_TOKENS:
        text = _token_text(config.get(key))
        if text is not None:
            out[key] = text
    return out


def _config_template(config: dict[str, Any], path: Path) -> str | dict[str, str] | None:
    raw = config.get("chat_template")
    if raw is None or isinstance(raw, str):
        return raw
    if isinstance(raw, list) and all(isinstance(t, dict) and "name" in t and "template" in t for t in raw):
        return {str(t["name"]): str(t["template"]) for t in raw}
    raise ValueError(f"{path}: chat_template must be a string or a list of {{name, template}}")


def load_chat_template(spec: str, tokenizer_path: str) -> ChatTemplate:
    """The template `spec` names: a built-in, `auto` (the model's, found next to the tokenizer), or a file."""
    if spec in BUILTIN:
        return BuiltinTemplate(spec)
    folder = Path(tokenizer_path).parent
    config_path = folder / TOKENIZER_CONFIG
    has_config = config_path.is_file()
    config = _read_tokenizer_config(config_path) if has_config else {}
    tokens, tokens_from = _special_tokens(config), (config_path if has_config else None)
    map_path = folder / SPECIAL_TOKENS_MAP
    if map_path.is_file():  # as transformers loads a tokenizer: its entries override tokenizer_config.json's
        tokens.update(_special_tokens(_read_tokenizer_config(map_path)))
    if spec == AUTO:
        jinja_path = folder / JINJA_FILE
        named = _additional_templates(folder)
        if jinja_path.is_file():
            text = _read_text(jinja_path)
            return JinjaTemplate(
                {"default": text, **named} if named else text,
                origin=str(jinja_path), special_tokens=tokens, tokens_from=tokens_from,
            )  # fmt: skip
        # As transformers loads them: template files, when there are any, replace the config's chat_template.
        source = named or _config_template(config, config_path)
        processor_path = folder / PROCESSOR_TEMPLATE
        if processor_path.is_file():
            # vLLM: the processor's template unless the request has tools, then the tokenizer's (its
            # tool_use one if named); the named-template choice does exactly that.
            processor = _config_template(_read_tokenizer_config(processor_path), processor_path)
            if not isinstance(processor, str):
                raise ValueError(f"{processor_path}: chat_template must be a string")
            tokenizer_tools = source.get("tool_use", source.get("default")) if isinstance(source, dict) else source
            sources = {"default": processor, "tool_use": tokenizer_tools or processor}
            return JinjaTemplate(sources, origin=str(processor_path), special_tokens=tokens, tokens_from=tokens_from)
        if source is not None:
            return JinjaTemplate(source, origin=str(config_path), special_tokens=tokens, tokens_from=tokens_from)
        log.warning(
            "no chat template next to %s (%s or a chat_template in %s): chat requests are rendered with the "
            "built-in role-tags template; set tokenizer.chatTemplate to the model's template",
            tokenizer_path, JINJA_FILE, TOKENIZER_CONFIG,
        )  # fmt: skip
        return BuiltinTemplate("role-tags")
    path = Path(spec)
    if not path.is_file():
        raise ValueError(
            f"{spec!r} is neither a built-in template ({', '.join(sorted(BUILTIN))}), {AUTO!r}, nor a file"
        )
    if path.suffix == ".json":
        config = _read_tokenizer_config(path)
        source = _config_template(config, path)
        if source is None:
            raise ValueError(f"{path}: has no chat_template")
        return JinjaTemplate(source, special_tokens=_special_tokens(config), origin=str(path), tokens_from=path)
    return JinjaTemplate(_read_text(path), origin=str(path), special_tokens=tokens, tokens_from=tokens_from)


def _additional_templates(folder: Path) -> dict[str, str]:
    """The named templates of `folder`'s additional_chat_templates/ ({} without any)."""
    extra = folder / ADDITIONAL_TEMPLATES
    if not extra.is_dir():
        return {}
    return {p.name.removesuffix(".jinja"): _read_text(p) for p in sorted(extra.glob("*.jinja")) if p.is_file()}


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot be read: {e}") from None
