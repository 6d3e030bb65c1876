"""OpenAI-compatible request/response models, the request-body parser and the OpenAI error shape (what the unmodified
``openai`` client sends and parses).

:func:`parse_request` turns a raw body into a request model or raises :class:`APIError` (a 4xx with OpenAI's error
JSON ``{"error": {"message", "type", "param", "code"}}``, ``param`` naming the offending field as a dotted path such as
``messages.0.content``). The rules, all enforced before anything reaches the tokenizer or an engine:

* **The body** is one JSON object: UTF-8 JSON (not UTF-16/32), at most ``MAX_JSON_DEPTH`` levels of nested arrays/objects
  (deeper bodies are refused without recursing through them), no duplicate keys, no ``NaN``/``Infinity`` (nor numbers
  that overflow to them), no lone UTF-16 surrogate (``"\\ud800"``) in any string or key: tokenizers cannot encode them.
* **Types are strict**: nothing is coerced. ``"yes"`` is not a boolean, ``true`` is not an integer, ``"3"`` and ``3.0``
  are not integers; an integer is accepted where a number is expected (``temperature: 1``). ``null`` means "default"
  for every optional OpenAI field, as in OpenAI's API.
* **Unknown fields are refused** (400 naming the field), at the top level and inside every object (messages, content
  parts, ``stream_options``, ``ttt``). Fields we honour: ``model``, ``messages`` / ``prompt``, ``max_tokens``,
  ``max_completion_tokens`` (not both with different values), ``temperature`` [0, 2], ``top_p`` (0, 1], ``n`` (1 only:
  the engines return one choice; the ingress refuses larger n), ``stream``, ``stream_options`` (only with
  ``stream: true``; ``include_usage``; ``include_obfuscation`` false/null only), ``stop`` (a non-empty string or a
  list of at most ``MAX_STOP`` non-empty strings), ``ignore_eos`` (vLLM's extension: true generates ``max_tokens``
  tokens whatever EOS says; benchmark clients such as ``vllm bench serve`` send it), ``seed`` (0 <= seed < 2**63: vLLM keeps seeds in int64, ``torch.manual_seed`` rejects larger ones), and
  ours, ``ttt`` (``{"k", "steps"}``).
* **OpenAI fields we do not implement** are declared, so the error names them, and accepted only with a value that
  changes nothing (their default); any other value is a 400 naming the field (``NOOP`` of each model lists them):
  ``presence_penalty`` / ``frequency_penalty`` (range [-2, 2] is checked first; then only 0: the engines apply no
  penalties), ``logit_bias`` ({}), ``service_tier`` ("auto", "default"); chat: ``logprobs``
  (false), ``top_logprobs`` (0), ``response_format`` ({"type": "text"}), ``tools`` / ``functions`` ([]),
  ``tool_choice`` / ``function_call`` ("none"), ``parallel_tool_calls`` (either: without tools it has no effect),
  ``store`` (false), ``metadata`` ({}); completions: ``logprobs`` (null only), ``echo`` (false), ``best_of`` (1),
  ``suffix`` (""). In messages, the fields the openai client echoes back when a previous response message is
  replayed (``refusal``, ``tool_calls``, ``function_call``, ``audio``, ``annotations``) are accepted as null/empty.
  ``user`` and ``safety_identifier`` (strings) are accepted: they only identify the caller and are not used.
  Everything else (``top_k``, ``min_p``, ``modalities``, ``reasoning_effort``, message ``name``, ...) is unknown.
* **Content**: message roles are system, user, assistant; content is a string or a list of
  ``{"type": "text", "text": ...}`` parts (joined without separator). Every *user* message must have content with a
  non-whitespace character, and there must be one (an empty user turn is a client bug, not a question; system and
  assistant messages may be empty). A completions ``prompt`` is one string (or a list of exactly one string) with a
  non-whitespace character; token-id prompts are refused.

Limits that depend on the deployment (body size, prompt length, messages, max_tokens, n, the model id, the context
length, TTT k/steps) are checked by the ingress (``finemed_ray.serving.app``) with the same error shape, as are the
headers: the API key (401), then ``Content-Type`` (``application/json``, charset utf-8 if one is named; absent is
accepted) and ``Content-Encoding`` (identity only): 415 otherwise. ``tests/data/bad_requests.jsonl`` is the corpus of
bad requests and the status each must get.
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

MAX_JSON_DEPTH = 32  # nested arrays/objects in a body; a real request needs 5 (messages -> parts -> part)
MAX_STOP = 4  # stop sequences per request, as OpenAI
MAX_SEED = 2**63 - 1  # vLLM keeps seeds in an int64 array; torch.manual_seed overflows above 2**64 - 1
_SURROGATE = re.compile("[\ud800-\udfff]")
STRICT = ConfigDict(extra="forbid", strict=True)


class APIError(Exception):
    """An error for the client: HTTP status + OpenAI error JSON (never a stack trace)."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers  # extra response headers (Retry-After of a 503)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _same(v: Any, allowed: tuple) -> bool:
    """``v`` is one of ``allowed`` with the same type (``0 == False`` and ``1.0 == 1`` must not pass)."""
    return any(type(v) is type(a) and v == a for a in allowed)


class _NoOps(BaseModel):
    """Fields in ``NOOP`` (name -> (accepted values besides null, how to say them)) are OpenAI features we do not
    implement: accepted only with a value that changes nothing, refused otherwise with a message naming them."""

    NOOP: ClassVar[dict[str, tuple[tuple, str]]] = {}

    @field_validator("*", mode="before")
    @classmethod
    def _no_op_only(cls, v: Any, info: ValidationInfo) -> Any:
        spec = cls.NOOP.get(info.field_name or "")
        if spec is not None and v is not None and not _same(v, spec[0]):
            raise ValueError(f"not supported by this server; accepted only as {spec[1]} (no effect)")
        return v


# ================================================================================================ request models
class TTTOptions(BaseModel):
    """``extra_body={"ttt": {"k": 3, "steps": 1}}``: adapt to this request's neighbours before answering."""

    model_config = STRICT
    k: int | None = Field(None, ge=1, description="Neighbours to retrieve.")
    steps: int | None = Field(None, ge=0, description="Optimizer steps on them.")


class StreamOptions(_NoOps):
    model_config = STRICT
    NOOP: ClassVar[dict[str, tuple[tuple, str]]] = {"include_obfuscation": ((False,), "false or null")}
    include_usage: bool | None = Field(None, description="Send a last chunk with the token usage.")
    include_obfuscation: Literal[False] | None = None


class TextPart(BaseModel):
    model_config = STRICT
    type: Literal["text"]
    text: str


class ResponseFormatText(BaseModel):
    model_config = STRICT
    type: Literal["text"]


class ChatMessage(_NoOps):
    model_config = STRICT
    NOOP: ClassVar[dict[str, tuple[tuple, str]]] = {
        "refusal": ((), "null"), "tool_calls": (([],), "[] or null"), "function_call": ((), "null"),
        "audio": ((), "null"), "annotations": (([],), "[] or null")}
    role: Literal["system", "user", "assistant"]
    content: str = Field(description="A string or a list of text parts; user messages must not be blank.")
    # Echoed back by clients that replay a previous response message; only their empty values are accepted.
    refusal: None = None
    tool_calls: list[Any] | None = Field(None, max_length=0)
    function_call: None = None
    audio: None = None
    annotations: list[Any] | None = Field(None, max_length=0)

    @field_validator("content", mode="before", json_schema_input_type=str | list[TextPart])
    @classmethod
    def _text_parts(cls, v: Any) -> Any:
        # The OpenAI client may send content as a list of {"type": "text", "text": ...} parts.
        if isinstance(v, list):
            texts = []
            for j, part in enumerate(v):
                if not (type(part) is dict and set(part) == {"type", "text"} and part["type"] == "text"
                        and type(part["text"]) is str):
                    raise ValueError(f"part {j}: only text parts {{'type': 'text', 'text': <string>}} are supported")
                texts.append(part["text"])
            return "".join(texts)
        return v

    @field_validator("content")
    @classmethod
    def _user_not_blank(cls, v: str, info: ValidationInfo) -> str:
        if info.data.get("role") == "user" and not v.strip():
            raise ValueError("a user message must not be empty or whitespace only")
        return v


_NonEmpty = Annotated[str, Field(min_length=1)]
_StopInput = _NonEmpty | Annotated[list[_NonEmpty], Field(max_length=MAX_STOP)] | None  # what `stop` accepts


class _Sampling(_NoOps):
    model_config = STRICT
    NOOP: ClassVar[dict[str, tuple[tuple, str]]] = {
        "logit_bias": (({},), "{} or null"),
        "service_tier": (("auto", "default"), '"auto", "default" or null')}
    model: str = Field(min_length=1, description="The served model id, or '<id>:ttt' for test-time training.")
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="Default 1.")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="Default 1.")
    n: int | None = Field(None, ge=1, description="Only 1 (the default) is served.")
    stream: bool | None = None
    stream_options: StreamOptions | None = Field(None, description="Only with stream: true.")
    stop: list[str] | None = Field(None, description=f"A string or up to {MAX_STOP} strings, none empty.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, description="Only 0: no penalties are applied.")
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, description="Only 0: no penalties are applied.")
    logit_bias: dict[str, float] | None = Field(None, max_length=0, description="Not supported: {} or null only.")
    ignore_eos: bool | None = Field(None, description="vLLM's extension: true = generate max_tokens tokens, EOS "
                                    "does not end the answer (stop strings still do).")
    service_tier: Literal["auto", "default"] | None = None
    user: str | None = Field(None, max_length=512, description="Identifies the caller; not used.")
    safety_identifier: str | None = Field(None, max_length=512, description="Identifies the caller; not used.")
    ttt: TTTOptions | None = Field(None, description="Test-time training options (ours).")

    @field_validator("stop", mode="before", json_schema_input_type=_StopInput)
    @classmethod
    def _stops(cls, v: Any) -> Any:
        if v is None:
            return None
        stops = [v] if type(v) is str else v
        if type(stops) is not list:
            raise ValueError("must be a string or a list of strings")
        if len(stops) > MAX_STOP:
            raise ValueError(f"{len(stops)} stop sequences; at most {MAX_STOP} are supported")
        for s in stops:
            if type(s) is not str:
                raise ValueError("must be a string or a list of strings")
            if not s:
                raise ValueError("stop sequences must not be empty strings")
        return stops

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v: float | None) -> float | None:
        if v:
            raise ValueError("non-zero penalties are not supported by this server (the engines apply none)")
        return v

    @field_validator("max_completion_tokens")
    @classmethod
    def _one_max(cls, v: int | None, info: ValidationInfo) -> int | None:
        other = info.data.get("max_tokens")
        if v is not None and other is not None and other != v:
            raise ValueError(f"conflicts with max_tokens={other}; send one of them")
        return v

    @field_validator("stream_options")
    @classmethod
    def _only_streaming(cls, v: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if v is not None and info.data.get("stream") is not True:
            raise ValueError("only allowed when stream is true")
        return v

    # ---------------------------------------------------------------------------------------- resolved values
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def wanted_tokens(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default

    def stops(self) -> list[str]:
        return list(self.stop or [])

    def sampling(self) -> tuple[float, float]:
        """(temperature, top_p) with OpenAI's defaults for null/absent."""
        return (1.0 if self.temperature is None else self.temperature, 1.0 if self.top_p is None else self.top_p)

    def choices(self) -> int:
        return 1 if self.n is None else self.n

    def streaming(self) -> bool:
        return bool(self.stream)


class ChatCompletionRequest(_Sampling):
    NOOP: ClassVar[dict[str, tuple[tuple, str]]] = {
        **_Sampling.NOOP, "logprobs": ((False,), "false or null"), "top_logprobs": ((0,), "0 or null"),
        "response_format": (({"type": "text"},), '{"type": "text"} or null'),
        "tools": (([],), "[] or null"), "functions": (([],), "[] or null"),
        "tool_choice": (("none",), '"none" or null'), "function_call": (("none",), '"none" or null'),
        "parallel_tool_calls": ((True, False), "a boolean or null (there are no tools)"),
        "store": ((False,), "false or null"), "metadata": (({},), "{} or null")}
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: Literal[False] | None = None
    top_logprobs: Literal[0] | None = None
    response_format: ResponseFormatText | None = None
    tools: list[dict[str, Any]] | None = Field(None, max_length=0)
    tool_choice: Literal["none"] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = Field(None, max_length=0)
    function_call: Literal["none"] | None = None
    store: Literal[False] | None = None
    metadata: dict[str, str] | None = Field(None, max_length=0)

    @field_validator("messages")
    @classmethod
    def _has_user(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        if not any(m.role == "user" for m in v):
            raise ValueError("must contain a user message")
        return v


class CompletionRequest(_Sampling):
    NOOP: ClassVar[dict[str, tuple[tuple, str]]] = {
        **_Sampling.NOOP, "logprobs": ((), "null"), "echo": ((False,), "false or null"),
        "best_of": ((1,), "1 or null"), "suffix": (("",), '"" or null')}
    prompt: str = Field(description="One prompt: a string, or a list of exactly one string; not blank.")
    logprobs: None = None
    echo: Literal[False] | None = None
    best_of: Literal[1] | None = None
    suffix: Literal[""] | None = None

    @field_validator("prompt", mode="before", json_schema_input_type=str | list[str])
    @classmethod
    def _one_prompt(cls, v: Any) -> Any:
        if type(v) is list:
            if len(v) != 1:
                raise ValueError(f"exactly one prompt per request is supported, got {len(v)}")
            if type(v[0]) is not str:
                raise ValueError("only text prompts are supported (no token ids)")
            v = v[0]
        if type(v) is str and not v.strip():
            raise ValueError("prompt is empty or whitespace only")
        return v


# ================================================================================================ parsing
def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise APIError(400, f"duplicate key {dup!r} in the request body", param=dup if not _SURROGATE.search(dup)
                       else None)
    return out


def load_json(raw: bytes) -> Any:
    """Parse a body; every failure is a 400 (the stdlib raises RecursionError on deep nesting, ValueError on numbers
    with too many digits). The bytes must be UTF-8 (RFC 8259; one leading BOM is ignored): ``json.loads`` on bytes
    would guess UTF-16/32 as well."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"request body is not valid UTF-8: {e}") from None
    try:
        return json.loads(text.removeprefix("\ufeff"), object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise APIError(400, f"request body nests deeper than {MAX_JSON_DEPTH} levels") from None
    except json.JSONDecodeError as e:
        raise APIError(400, f"request body is not valid JSON: {e}") from None
    except ValueError:  # an integer of more than sys.get_int_max_str_digits() digits
        raise APIError(400, "request body is not valid JSON: a number has too many digits") from None


def check_json_values(data: Any) -> None:
    """Nesting depth, lone surrogates and non-finite numbers, iteratively (no recursion on hostile input)."""
    stack: list[tuple[Any, tuple, int]] = [(data, (), 0)]
    while stack:
        v, path, depth = stack.pop()
        if isinstance(v, (dict, list)):
            if depth >= MAX_JSON_DEPTH:
                field = _path(path[:1])
                raise APIError(400, f"{field + ': ' if field else ''}request body nests deeper than {MAX_JSON_DEPTH} "
                               "levels", param=field or None)
            items = v.items() if isinstance(v, dict) else enumerate(v)
            for k, x in items:
                if isinstance(k, str) and _SURROGATE.search(k):
                    raise APIError(400, f"{_path(path) or 'request body'}: a key contains a lone UTF-16 surrogate "
                                   "(not valid Unicode)", param=_path(path) or None)
                stack.append((x, (*path, k), depth + 1))
        elif isinstance(v, str):
            if _SURROGATE.search(v):
                raise APIError(400, f"{_path(path)}: contains a lone UTF-16 surrogate (\\ud800-\\udfff), which is "
                               "not valid Unicode", param=_path(path) or None)
        elif isinstance(v, float) and not math.isfinite(v):
            raise APIError(400, f"{_path(path)}: NaN and Infinity are not valid JSON numbers",
                           param=_path(path) or None)


def _path(loc: tuple | list) -> str:
    return ".".join(str(x) for x in loc)


def validation_error(e: ValidationError) -> APIError:
    """The first pydantic error as a 400 naming the field."""
    err = e.errors(include_url=False)[0]
    param = _path(err["loc"])
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown parameter (not supported by this server)"
    elif err["type"] == "value_error":
        msg = msg.removeprefix("Value error, ")
    return APIError(400, f"{param}: {msg}" if param else msg, param=param or None)


T = TypeVar("T", bound=BaseModel)


def parse_request(raw: bytes, model_cls: type[T]) -> T:
    """A raw request body -> ``model_cls``, or :class:`APIError` (400) naming the problem (module docstring)."""
    data = load_json(raw)
    check_json_values(data)
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object")
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None


def openapi_schemas() -> dict[str, Any]:
    """JSON schemas of the request bodies (and what they reference), keyed for ``#/components/schemas/<name>``."""
    from pydantic.json_schema import models_json_schema

    _, defs = models_json_schema([(ChatCompletionRequest, "validation"), (CompletionRequest, "validation")],
                                 ref_template="#/components/schemas/{model}")
    return defs.get("$defs", {})


# ================================================================================================ responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_response(model: str, text: str, finish: str, prompt_tokens: int, completion_tokens: int,
                  ttt: dict | None) -> dict[str, Any]:
    out = {"id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()), "model": model,
           "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
           "usage": usage(prompt_tokens, completion_tokens)}
    if ttt is not None:
        out["ttt"] = ttt
    return out


def completion_response(model: str, text: str, finish: str, prompt_tokens: int, completion_tokens: int,
                        ttt: dict | None) -> dict[str, Any]:
    out = {"id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": model,
           "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
           "usage": usage(prompt_tokens, completion_tokens)}
    if ttt is not None:
        out["ttt"] = ttt
    return out
