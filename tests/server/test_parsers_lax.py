"""Scalar fields read as vLLM's pydantic request models read them (lax mode): `"stream": "true"`,
`"max_tokens": 10.0`, `"prompt": [1.0, 2.0]` are served by the model server, so the router must route
them (not answer 400); what pydantic refuses stays a 400 naming the field."""

from __future__ import annotations

import json
import math
import re
from typing import Annotated, Any

import pydantic
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from llmepp.errors import BadRequest
from llmepp.framework.plugin import registry
from llmepp.request.parsers import RequestParsers, lax_bool, lax_int, parse_request

TABLE = RequestParsers(
    [registry.build(t, t, None) for t in ("openai-parser", "anthropic-parser", "vllmhttp-parser", "sglanghttp-parser")]  # type: ignore[misc]
)
MSG = [{"role": "user", "content": "hi"}]
# (path, a minimal valid body) per API whose body has a `stream` flag.
STREAM_APIS = [
    ("/v1/completions", {"model": "m", "prompt": "x"}),
    ("/v1/chat/completions", {"model": "m", "messages": MSG}),
    ("/v1/responses", {"model": "m", "input": "x"}),
    ("/v1/messages", {"model": "m", "max_tokens": 5, "messages": MSG}),
    ("/inference/v1/generate", {"token_ids": [1]}),
    ("/generate", {"text": "x"}),  # SGLang: GenerateReqInput.stream is validated by pydantic too
]
# (path, base body, field as sent, path of the field in the message) per vLLM integer field the router reads.
INT_FIELDS = [
    ("/v1/completions", {"model": "m", "prompt": "x"}, ("max_tokens",)),
    ("/v1/chat/completions", {"model": "m", "messages": MSG}, ("max_tokens",)),
    ("/v1/chat/completions", {"model": "m", "messages": MSG}, ("max_completion_tokens",)),
    ("/v1/responses", {"model": "m", "input": "x"}, ("max_output_tokens",)),
    ("/v1/messages", {"model": "m", "messages": MSG}, ("max_tokens",)),
    ("/inference/v1/generate", {"token_ids": [1]}, ("sampling_params", "max_tokens")),
]


def parse(path: str, body: Any) -> Any:
    return TABLE.parse({":path": path}, json.dumps(body).encode(), request_id="r")


def bad(path: str, body: Any) -> str:
    with pytest.raises(BadRequest) as e:
        parse(path, body)
    assert e.value.status == 400
    return e.value.message


def with_field(body: dict[str, Any], where: tuple[str, ...], value: Any) -> dict[str, Any]:
    out = dict(body)
    if len(where) == 1:
        out[where[0]] = value
    else:
        out[where[0]] = {where[1]: value}
    return out


# -- stream ------------------------------------------------------------------------------------------
TRUE = ["true", "True", "TRUE", "yes", "YES", "y", "t", "on", "On", "1", 1, 1.0]
FALSE = ["false", "False", "no", "n", "f", "off", "OFF", "0", 0, 0.0, -0.0, None]


@pytest.mark.parametrize(("path", "body"), STREAM_APIS)
@pytest.mark.parametrize("value", TRUE)
def test_a_stream_flag_pydantic_reads_as_true_streams(path: str, body: dict[str, Any], value: Any) -> None:
    # Before: "stream": "true" (or 1) was a 400 ('"stream" must be a boolean, got string'); vLLM streams it,
    # so the router must treat the response as a stream too (usage from the SSE tail, streaming metrics).
    assert parse(path, {**body, "stream": value}).stream is True


@pytest.mark.parametrize(("path", "body"), STREAM_APIS)
@pytest.mark.parametrize("value", FALSE)
def test_a_stream_flag_pydantic_reads_as_false_does_not_stream(path: str, body: dict[str, Any], value: Any) -> None:
    assert parse(path, {**body, "stream": value}).stream is False


@pytest.mark.parametrize(("path", "body"), STREAM_APIS)
@pytest.mark.parametrize(
    ("value", "got"),
    [("maybe", "string"), ("", "string"), (" true", "string"), ("1.0", "string"), ("01", "string"),
     (2, "integer"), (-1, "integer"), (0.5, "number"), (2.0, "number"), ([], "array"), ({}, "object")],
)  # fmt: skip
def test_a_stream_flag_pydantic_refuses_is_a_400_naming_the_field(
    path: str, body: dict[str, Any], value: Any, got: str
) -> None:
    assert bad(path, {**body, "stream": value}) == f'"stream" must be a boolean, got {got}'


# -- max tokens --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("path", "body", "where"), INT_FIELDS)
@pytest.mark.parametrize(
    "value", [10, 10.0, 1e1, "10", " 10 ", "\t10\n", "+10", "10.0", "10.000", "1_0", "0010", "\u300010"]
)
def test_an_integer_field_takes_what_pydantic_reads_as_that_integer(
    path: str, body: dict[str, Any], where: tuple[str, ...], value: Any
) -> None:
    # Before: 10.0 and "10" were 400s ('"max_tokens" must be an integer, got number'); vLLM serves them.
    assert parse(path, with_field(body, where, value)).max_tokens == 10


@pytest.mark.parametrize(("path", "body", "where"), INT_FIELDS)
def test_a_boolean_integer_is_one_or_zero_as_in_pydantic(
    path: str, body: dict[str, Any], where: tuple[str, ...]
) -> None:
    assert parse(path, with_field(body, where, True)).max_tokens == 1
    # vLLM: `max_completion_tokens or max_tokens`: a zero max_completion_tokens defers to max_tokens (absent here).
    zero = None if where == ("max_completion_tokens",) else 0
    assert parse(path, with_field(body, where, False)).max_tokens == zero


@pytest.mark.parametrize(("path", "body", "where"), INT_FIELDS)
@pytest.mark.parametrize(
    ("value", "got"),
    [(10.5, "number"), (1e20, "number"), ("10.5", "string"), ("1e3", "string"), ("ten", "string"), ("", "string"),
     ("10.", "string"), ("_10", "string"), ("1__0", "string"), ("0x10", "string"), ("\x1c10", "string"),
     ("1" * 4301, "string"), ([], "array"), ({}, "object")],
)  # fmt: skip
def test_an_integer_field_pydantic_refuses_is_a_400_naming_the_field(
    path: str, body: dict[str, Any], where: tuple[str, ...], value: Any, got: str
) -> None:
    field = ".".join(where)
    assert bad(path, with_field(body, where, value)) == f'"{field}" must be an integer, got {got}'


@pytest.mark.parametrize(("path", "body", "where"), INT_FIELDS)
@pytest.mark.parametrize("value", [-1, -1.0, "-1", " -1 "])
def test_a_negative_coerced_integer_is_still_refused(
    path: str, body: dict[str, Any], where: tuple[str, ...], value: Any
) -> None:
    assert bad(path, with_field(body, where, value)) == f'"{".".join(where)}" must not be negative'


def test_a_null_integer_field_is_unset() -> None:
    assert parse("/v1/completions", {"model": "m", "prompt": "x", "max_tokens": None}).max_tokens is None


def test_sglang_max_new_tokens_stays_strict() -> None:
    # SGLang's sampling_params is a plain dict (no pydantic coercion); its SamplingParams declares an int.
    body = {"text": "x", "sampling_params": {"max_new_tokens": "10"}}
    assert bad("/generate", body) == '"sampling_params.max_new_tokens" must be an integer, got string'


# -- token ids ---------------------------------------------------------------------------------------
def packed(*ids: int) -> bytes:
    return b"".join(i.to_bytes(4, "little") for i in ids)


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ([1.0, 2.0], packed(1, 2)),
        ([1, "2"], packed(1, 2)),
        (["1", 2], packed(1, 2)),
        ([True, 2], packed(1, 2)),
        ([" 7 ", 8.0], packed(7, 8)),
        ([[1.0], ["2", 3]], packed(1, 2, 3)),
    ],
)
def test_a_token_id_prompt_takes_what_pydantic_reads_as_token_ids(prompt: list[Any], expected: bytes) -> None:
    # vLLM's prompt is list[int] | list[list[int]] | str | list[str] (smart union): a list that is not all
    # strings, but whose items pydantic reads as integers, is a token-id prompt.
    for path, field in (("/v1/completions", "prompt"), ("/v1/embeddings", "input")):
        r = parse(path, {"model": "m", field: prompt})
        assert (r.prompt, r.prompt_is_token_ids) == (expected, True)


def test_a_list_of_strings_stays_text_even_if_they_read_as_integers() -> None:
    r = parse("/v1/completions", {"model": "m", "prompt": ["1", "2"]})
    assert (r.prompt, r.prompt_is_token_ids) == (b"12", False)


def test_vllm_generate_token_ids_are_lax() -> None:
    r = parse("/inference/v1/generate", {"token_ids": ["5", 6.0, True]})
    assert r.prompt == packed(5, 6, 1)


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        (["a", 1], '"prompt" list must contain only strings'),
        ([1.5], '"prompt" must be a string, a list of strings or a list of token ids'),
        ([1, "x"], '"prompt" token ids must be integers in [0, 4294967295]'),
        (["-1", 2], '"prompt" token ids must be integers in [0, 4294967295]'),
        ([None], '"prompt" must be a string, a list of strings or a list of token ids'),
        ([{}], '"prompt" must be a string, a list of strings or a list of token ids'),
        ([[1], [1.5]], '"prompt" token ids must be integers in [0, 4294967295]'),
    ],
)
def test_a_token_id_prompt_pydantic_refuses_keeps_its_400(prompt: list[Any], message: str) -> None:
    assert bad("/v1/completions", {"model": "m", "prompt": prompt}).startswith(message)


def test_sglang_input_ids_stay_strict() -> None:
    # SGLang validates input_ids with its own C-loop validator (ints only), not pydantic's lax list[int].
    assert bad("/generate", {"input_ids": [1.0, 2.0]}).startswith('"input_ids" must be')
    assert bad("/generate", {"input_ids": ["1"]}).startswith('"input_ids" must be')


def test_a_stream_string_gives_a_streaming_usage_reader_on_vertex() -> None:
    from llmepp.protocols import vertexai_prediction_pb2 as pb
    from llmepp.request import grpcwire

    msg = pb.ChatCompletionsRequest()
    msg.http_body.data = json.dumps({"model": "m", "messages": MSG, "stream": "true"}).encode()
    headers = {
        ":path": "/google.cloud.aiplatform.v1.PredictionService/ChatCompletions",
        "content-type": "application/grpc",
    }
    table = RequestParsers([registry.build("vertexai-parser", "v", None)])  # type: ignore[list-item]
    r = table.parse(headers, grpcwire.frame(msg.SerializeToString()), request_id="r")
    assert r.stream is True and r.usage_reader is not None
    assert r.usage_reader({})._inner.streaming is True  # type: ignore[attr-defined]


# -- properties --------------------------------------------------------------------------------------
WHITESPACE = st.sampled_from(
    [" ", "\t", "\n", "\r", "\x0b", "\x0c", "\x85", "\xa0", "\u2003", "\u3000", "\x1c", "\u200b"]
)
numberish = st.builds(
    lambda pre, sign, digits, frac, post: pre + sign + digits + frac + post,
    st.lists(WHITESPACE, max_size=2).map("".join),
    st.sampled_from(["", "+", "-", "+-", "--"]),
    st.from_regex(r"[0-9_]{0,24}", fullmatch=True),
    st.sampled_from(["", ".", ".0", ".00", ".5", ".0_0", ".01", "e3"]),
    st.lists(WHITESPACE, max_size=2).map("".join),
)
ZEROS_THEN_MINUS = re.compile(r"\s*\+?0[0_]*-")
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(2**70), 2**70).map(float),
    numberish,
    st.text(max_size=8),
    st.sampled_from(["true", "tRuE", "yes", "On", "off", "N", "t", "F", "1", "0", "ı", "İ", "ｔｒｕｅ"]),
)


@given(n=st.integers(0, 2**64))
@example(n=0)
def test_every_spelling_of_an_integer_reads_as_it(n: int) -> None:
    spellings: list[Any] = [n, str(n), f" {n}\n", f"+{n}", f"{n}.0", f"{n:_}", f"\u3000{n:_}.000\t"]
    if n < 2**53:
        spellings.append(float(n))
    for s in spellings:
        assert lax_int(s) == n, s
    assert lax_int(f"-{n}") == -n and lax_int(n + 0.5 if n < 2**52 else "x") is None


@given(word=st.sampled_from(["true", "yes", "on", "t", "y", "false", "no", "off", "f", "n"]), data=st.data())
def test_every_casing_of_a_boolean_word_reads_as_it(word: str, data: st.DataObject) -> None:
    cased = "".join(c.upper() if data.draw(st.booleans()) else c for c in word)
    assert lax_bool(cased) is (word[0] in "tyo" and word != "off")
    assert lax_bool(" " + word) is None and lax_bool(word + "s") is None


@settings(max_examples=500, deadline=None)
@given(value=scalars)
def test_lax_coercions_match_pydantic(value: Any) -> None:
    expected: dict[str, Any] = {}
    for name, typ in (("int", int), ("bool", bool)):
        try:
            expected[name] = pydantic.TypeAdapter(typ).validate_python(value)
        except pydantic.ValidationError:
            expected[name] = None
    got_int = None if value is None else lax_int(value)
    got_bool = None if value is None else lax_bool(value)
    assert (got_int, got_bool) == (expected["int"], expected["bool"])


@settings(max_examples=300, deadline=None)
@given(value=scalars, api=st.sampled_from(STREAM_APIS))
def test_the_parsed_stream_flag_is_pydantics_reading(value: Any, api: tuple[str, dict[str, Any]]) -> None:
    assume(not (isinstance(value, float) and not math.isfinite(value)))  # not JSON
    path, body = api
    try:
        expected = pydantic.TypeAdapter(bool | None).validate_python(value)
    except pydantic.ValidationError:
        assert bad(path, {**body, "stream": value}).startswith('"stream" must be a boolean, got ')
    else:
        assert parse(path, {**body, "stream": value}).stream is bool(expected)


@settings(max_examples=300, deadline=None)
@given(value=scalars, spec=st.sampled_from(INT_FIELDS))
def test_the_parsed_max_tokens_is_pydantics_reading(
    value: Any, spec: tuple[str, dict[str, Any], tuple[str, ...]]
) -> None:
    assume(not (isinstance(value, float) and not math.isfinite(value)))
    # pydantic also reads a minus sign after leading zeros ("0-1" is -1, "0_-1" too): refused here, on purpose.
    assume(not (isinstance(value, str) and ZEROS_THEN_MINUS.match(value)))
    path, body, where = spec
    field = ".".join(where)
    try:
        expected = pydantic.TypeAdapter(int | None).validate_python(value)
    except pydantic.ValidationError:
        assert bad(path, with_field(body, where, value)).startswith(f'"{field}" must be an integer, got ')
        return
    if expected is not None and expected < 0:
        assert bad(path, with_field(body, where, value)) == f'"{field}" must not be negative'
    else:
        if expected == 0 and where == ("max_completion_tokens",):
            expected = None  # vLLM: `max_completion_tokens or max_tokens`
        assert parse(path, with_field(body, where, value)).max_tokens == expected


@settings(max_examples=300, deadline=None)
@given(
    prompt=st.lists(
        st.one_of(st.integers(0, 2**32 - 1), st.floats(0, 2**32 - 1), numberish, st.booleans(), st.none()),
        min_size=1,
        max_size=5,
    )
)
def test_a_list_prompt_is_pydantics_reading(prompt: list[Any]) -> None:
    from typing import Annotated

    nonneg = Annotated[int, pydantic.Field(ge=0)]
    adapter = pydantic.TypeAdapter(list[nonneg] | list[list[nonneg]] | str | list[str])
    try:
        expected: Any = adapter.validate_python(prompt)
    except pydantic.ValidationError:
        bad("/v1/completions", {"model": "m", "prompt": prompt})
        return
    if all(isinstance(t, str) for t in expected):
        want = "".join(expected).encode()
    elif any(t > 2**32 - 1 for t in expected):
        bad("/v1/completions", {"model": "m", "prompt": prompt})  # beyond any vocabulary: the router's 400
        return
    else:
        want = packed(*expected)
    assert parse("/v1/completions", {"model": "m", "prompt": prompt}).prompt == want


def test_sglang_fields_as_generate_req_input_types_them() -> None:
    # extra_key: Optional[Union[List[str], str]] (a batch may salt each prompt): the first prompt's is the salt.
    r = parse("/generate", {"text": ["a", "b"], "extra_key": ["k1", "k2"]})
    assert r.cache_salt == "k1"
    assert parse("/generate", {"text": "a", "extra_key": []}).cache_salt == ""
    assert bad("/generate", {"text": "a", "extra_key": [1]}) == '"extra_key[0]" must be a string, got integer'
    assert bad("/generate", {"text": "a", "extra_key": 5}).startswith('"extra_key" must be')
    # `model` is no GenerateReqInput field: SGLang ignores it, whatever it is; the router reads a string one.
    assert parse("/generate", {"text": "a", "model": 5}).model == ""
    assert parse("/generate", {"text": "a", "model": "m"}).model == "m"


@pytest.mark.parametrize("text", ["0__0", "0___1", "00__1", "0_0_0", "0__1_2", "0__0.0", "-0__1", "0__", "_0", "1__0"])
def test_leading_zeros_with_underscores_read_as_pydantic_reads_them(text: str) -> None:
    # pydantic strips a leading run of zeros with any underscores among them, then reads the rest strictly.
    try:
        expected: int | None = pydantic.TypeAdapter(int).validate_python(text)
    except pydantic.ValidationError:
        expected = None
    assert lax_int(text) == expected


def _parse(path: str, body: dict[str, Any]) -> Any:
    return parse_request({":path": path}, json.dumps(body).encode(), request_id="r")


# -- vLLM's tokenization fields: read as pydantic reads them, and on embeddings too ------------------------------
class _VllmTokenizeFields(pydantic.BaseModel):
    """The two fields as vLLM types them (CompletionRequest / ChatCompletionRequest / PoolingBasicRequestMixin +
    CompletionRequestMixin for embeddings): lax pydantic, as FastAPI validates the JSON body."""

    truncate_prompt_tokens: Annotated[int, pydantic.Field(ge=-1)] | None = None
    add_special_tokens: bool = True


@pytest.mark.parametrize(
    ("path", "extra"),
    [
        ("/v1/completions", {"prompt": "a long document"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ],
)
@pytest.mark.parametrize(("truncate", "special"), [("8", "false"), (8.0, 0), (" 8 ", "off")])
def test_lax_tokenization_fields_are_read_as_vllm_reads_them(
    path: str, extra: dict[str, Any], truncate: Any, special: Any
) -> None:
    fields = {"truncate_prompt_tokens": truncate, "add_special_tokens": special}
    vllm = _VllmTokenizeFields.model_validate(fields)
    assert (vllm.truncate_prompt_tokens, vllm.add_special_tokens) == (8, False)  # what vLLM tokenizes with
    req = _parse(path, {"model": "m", **extra, **fields})
    assert (req.truncate_prompt_tokens, req.add_special_tokens) == (8, False)


@pytest.mark.parametrize(
    "body",
    [
        {"input": "a long document"},
        {"input": ["doc one", "doc two"]},
        {"messages": [{"role": "user", "content": "a long document"}]},
    ],
)
def test_embeddings_read_add_special_tokens(body: dict[str, Any]) -> None:
    # vLLM's EmbeddingCompletionRequest (CompletionRequestMixin.add_special_tokens, default True) and
    # EmbeddingChatRequest (ChatRequestOptionsMixin, default False) tokenize with the request's value; the hf token
    # producer encodes with request.add_special_tokens (None: its config default, True). A `false` left unread
    # gives the EPP a BOS the engine does not have: every block hash of the request differs from the pod's.
    req = _parse("/v1/embeddings", {"model": "e5", **body, "add_special_tokens": False})
    assert req.add_special_tokens is False
