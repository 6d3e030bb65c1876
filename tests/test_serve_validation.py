"""Request validation of the OpenAI-compatible endpoint, without Ray Serve or a model: the FastAPI app of
``finemed_ray.serving.app.create_app`` over an :class:`Ingress` with a fake engine handle, a fake TTT handle and a
fake tokenizer, driven by FastAPI's TestClient (and by the unmodified ``openai`` client over it).

Every malformed body must get a 4xx with OpenAI's error JSON whose ``param`` names the field, never a 500; nothing is
coerced or silently ignored; valid shapes of the openai client still pass. Fast: no cluster, no model."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from finemed_ray.serving.app import Ingress, create_app
from finemed_ray.serving.config import ServeConfig
from finemed_ray.serving.engines import GenResult
from finemed_ray.serving.protocol import (
    MAX_JSON_DEPTH,
    MAX_SEED,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    parse_request,
)

KEY = "test-key-0123456789"
MODEL = "finemed-tiny"
AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
HI = [{"role": "user", "content": "hi"}]


# ================================================================================================ fakes
class _Method:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        return self.fn(*args)


class FakeEngine:
    """What the ingress uses of the engine's deployment handle."""

    def __init__(self):
        self.requests = []
        self.calls = 0
        self.gate: asyncio.Event | None = None  # generate waits for it when set
        self.fail = False

    async def _generate(self, req):
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise RuntimeError("CUDA out of memory at /secret/path.py")
        self.requests.append(req)
        return GenResult("fine answer", 3, 2, "stop")

    async def _stream(self, req):
        self.requests.append(req)
        for piece in ("fine", " answer"):
            yield {"delta": piece}
        yield {"finish_reason": "stop", "prompt_tokens": 3, "completion_tokens": 2}

    @property
    def generate(self):
        return _Method(self._generate)

    @property
    def stream(self):
        return _Method(self._stream)

    def options(self, **_):
        return self


class FakeTTT:
    def __init__(self):
        self.calls = []

        async def adapt(query):
            self.calls.append(query)
            return {"adapter": {"id": "a1"}, "info": {"applied": True, "k": query[1], "steps": query[2]}}

        self.adapt = _Method(adapt)


class FakeTokenizer:
    """Encodes to UTF-8 like a real tokenizer (a lone surrogate would raise here, i.e. a 500 if it got this far);
    its chat template refuses a conversation that starts with an assistant message (as some real ones do)."""

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False):
        from jinja2.exceptions import TemplateError

        if messages[0]["role"] == "assistant":
            raise TemplateError("Conversation roles must alternate user/assistant/user/assistant/...")
        return "".join(f"<{m['role']}> {m['content']} " for m in messages) + "<assistant>"

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(range(len(text.encode("utf-8").split())))}


def make(ttt: bool = True, api_key: str | None = KEY, **limits) -> tuple[TestClient, FakeEngine, Ingress]:
    cfg = ServeConfig.model_validate({
        "model": {"id": MODEL, "path": "/models/none", "max_model_len": 512},
        "ttt": {"enabled": ttt, "index": "/index/none" if ttt else None},
        "limits": {"max_tokens": 64, "max_body_bytes": 2_000_000, **limits},
    })
    engine = FakeEngine()
    ingress = Ingress(cfg, engine, FakeTTT(), api_key, FakeTokenizer())
    return TestClient(create_app(ingress), raise_server_exceptions=False), engine, ingress


@pytest.fixture(scope="module")
def client():
    return make()


def post(http: TestClient, body, path: str = "/v1/chat/completions"):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http.post(path, content=raw, headers=AUTH)


def chat(**kw):
    return {"model": MODEL, "messages": HI, **kw}


def comp(**kw):
    return {"model": MODEL, "prompt": "Metformin is used to treat", **kw}


# ================================================================================================ bad bodies
C, P = "/v1/chat/completions", "/v1/completions"
BAD = [
    # (name, path, body, status, param)
    # -- were HTTP 500
    ("seed 2**70", C, chat(seed=2**70), 400, "seed"),
    ("seed 2**63", C, chat(seed=2**63), 400, "seed"),
    ("seed negative", C, chat(seed=-1), 400, "seed"),
    ("empty stop string", C, chat(stop=""), 400, "stop"),
    ("empty string in stop list", C, chat(stop=["###", ""]), 400, "stop"),
    ("five stop strings", C, chat(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    ("stop not a string", C, chat(stop=5), 400, "stop"),
    ("stop list of numbers", C, chat(stop=[1]), 400, "stop"),
    ("100k nested arrays", C, b"[" * 100_000 + b"]" * 100_000, 400, None),
    ("50k nested objects", C, b'{"a":' * 50_000 + b"1" + b"}" * 50_000, 400, None),
    ("nested deeper than the limit inside a field", C,
     json.dumps(chat(ttt=json.loads('{"k":' * (MAX_JSON_DEPTH + 2) + "1" + "}" * (MAX_JSON_DEPTH + 2)))).encode(),
     400, "ttt"),
    ("lone surrogate in content", C,
     b'{"model": "finemed-tiny", "messages": [{"role": "user", "content": "abc \\ud800 def"}]}', 400,
     "messages.0.content"),
    ("lone low surrogate in a text part", C,
     b'{"model": "finemed-tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}',
     400, "messages.0.content.0.text"),
    ("lone surrogate in stop", C, b'{"model": "finemed-tiny", "stop": ["\\ud800"], "messages": [{"role": "user", '
     b'"content": "hi"}]}', 400, "stop.0"),
    ("lone surrogate in prompt", P, b'{"model": "finemed-tiny", "prompt": "\\ud83d"}', 400, "prompt"),
    ("lone surrogate in a key", C, b'{"model": "finemed-tiny", "messages": [{"role": "user", "content": "hi"}], '
     b'"\\ud800": 1}', 400, None),
    ("NaN temperature", C, b'{"model": "finemed-tiny", "temperature": NaN, "messages": [{"role": "user", '
     b'"content": "hi"}]}', 400, "temperature"),
    ("temperature overflowing to Infinity", C, b'{"model": "finemed-tiny", "temperature": 1e999, "messages": '
     b'[{"role": "user", "content": "hi"}]}', 400, "temperature"),
    ("integer with 5000 digits", C, b'{"model": "finemed-tiny", "max_tokens": ' + b"9" * 5000 + b"}", 400, None),
    ("duplicate key", C, b'{"model": "finemed-tiny", "model": "other", "messages": [{"role": "user", '
     b'"content": "hi"}]}', 400, "model"),
    ("invalid utf-8", C, b'{"model": "finemed-tiny\xff"}', 400, None),
    # -- were coerced
    ("stream 'yes'", C, chat(stream="yes"), 400, "stream"),
    ("stream 1", C, chat(stream=1), 400, "stream"),
    ("max_tokens true", C, chat(max_tokens=True), 400, "max_tokens"),
    ("max_tokens 3.0", C, chat(max_tokens=3.0), 400, "max_tokens"),
    ("max_completion_tokens '5'", C, chat(max_completion_tokens="5"), 400, "max_completion_tokens"),
    ("ttt k '3'", C, chat(ttt={"k": "3"}), 400, "ttt.k"),
    ("ttt steps true", C, chat(ttt={"steps": True}), 400, "ttt.steps"),
    ("temperature '0.5'", C, chat(temperature="0.5"), 400, "temperature"),
    ("temperature true", C, chat(temperature=True), 400, "temperature"),
    ("n true", C, chat(n=True), 400, "n"),
    ("seed '7'", C, chat(seed="7"), 400, "seed"),
    ("include_usage 'true'", C, chat(stream=True, stream_options={"include_usage": "true"}), 400,
     "stream_options.include_usage"),
    ("model as a number", C, {"model": 5, "messages": HI}, 400, "model"),
    # -- blank prompts
    ("whitespace-only prompt", P, comp(prompt=" \n\t "), 400, "prompt"),
    ("empty prompt", P, comp(prompt=""), 400, "prompt"),
    ("whitespace-only prompt in a list", P, comp(prompt=["  "]), 400, "prompt"),
    ("token-id prompt", P, comp(prompt=[1, 2, 3]), 400, "prompt"),
    ("two prompts", P, comp(prompt=["a", "b"]), 400, "prompt"),
    ("whitespace-only last user message", C,
     chat(messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "hello"}, {"role": "user", "content": "  \n"}]),
     400, "messages.3.content"),
    ("empty user message in the history", C,
     chat(messages=[{"role": "user", "content": ""}, {"role": "assistant", "content": "?"},
                    {"role": "user", "content": "hi"}]), 400, "messages.0.content"),
    ("empty list of parts", C, chat(messages=[{"role": "user", "content": []}]), 400, "messages.0.content"),
    ("blank text parts", C, chat(messages=[{"role": "user", "content": [{"type": "text", "text": " "}]}]), 400,
     "messages.0.content"),
    ("no user message", C, chat(messages=[{"role": "system", "content": "Be brief."}]), 400, "messages"),
    ("image part", C, chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     400, "messages.0.content"),
    ("text part with an extra key", C,
     chat(messages=[{"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {}}]}]), 400,
     "messages.0.content"),
    ("null content", C, chat(messages=[{"role": "user", "content": None}]), 400, "messages.0.content"),
    # -- unsupported OpenAI fields with a value that would change the answer
    ("tools", C, chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), 400, "tools"),
    ("tool_choice auto", C, chat(tool_choice="auto"), 400, "tool_choice"),
    ("tool_choice required", C, chat(tool_choice="required"), 400, "tool_choice"),
    ("functions", C, chat(functions=[{"name": "f"}]), 400, "functions"),
    ("function_call auto", C, chat(function_call="auto"), 400, "function_call"),
    ("logprobs true", C, chat(logprobs=True), 400, "logprobs"),
    ("logprobs 0 (not false)", C, chat(logprobs=0), 400, "logprobs"),
    ("top_logprobs 2", C, chat(top_logprobs=2), 400, "top_logprobs"),
    ("top_logprobs false (not 0)", C, chat(top_logprobs=False), 400, "top_logprobs"),
    ("completions logprobs 1", P, comp(logprobs=1), 400, "logprobs"),
    ("completions logprobs 0", P, comp(logprobs=0), 400, "logprobs"),
    ("echo true", P, comp(echo=True), 400, "echo"),
    ("best_of 2", P, comp(best_of=2), 400, "best_of"),
    ("best_of true", P, comp(best_of=True), 400, "best_of"),
    ("suffix", P, comp(suffix=" end"), 400, "suffix"),
    ("logit_bias", C, chat(logit_bias={"50256": -100}), 400, "logit_bias"),
    ("response_format json_object", C, chat(response_format={"type": "json_object"}), 400, "response_format"),
    ("response_format json_schema", C, chat(response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
     400, "response_format"),
    ("ignore_eos true", C, chat(ignore_eos=True), 400, "ignore_eos"),
    ("store true", C, chat(store=True), 400, "store"),
    ("metadata", C, chat(metadata={"a": "b"}), 400, "metadata"),
    ("service_tier flex", C, chat(service_tier="flex"), 400, "service_tier"),
    ("presence_penalty 3", C, chat(presence_penalty=3), 400, "presence_penalty"),
    ("frequency_penalty -2.5", C, chat(frequency_penalty=-2.5), 400, "frequency_penalty"),
    ("presence_penalty 0.5 (not applied by the engines)", C, chat(presence_penalty=0.5), 400, "presence_penalty"),
    ("frequency_penalty 1 (not applied by the engines)", P, comp(frequency_penalty=1), 400, "frequency_penalty"),
    ("n 2", C, chat(n=2), 400, "n"),
    ("n 0", C, chat(n=0), 400, "n"),
    ("user as a number", C, chat(user=5), 400, "user"),
    ("replayed refusal", C, chat(messages=[{"role": "user", "content": "hi"},
                                           {"role": "assistant", "content": "", "refusal": "no"},
                                           {"role": "user", "content": "why?"}]), 400, "messages.1.refusal"),
    ("replayed tool_calls", C, chat(messages=[{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": "", "tool_calls": [{"id": "c"}]},
                                              {"role": "user", "content": "go"}]), 400, "messages.1.tool_calls"),
    # -- unknown fields
    ("unknown top-level field", C, chat(foo=1), 400, "foo"),
    ("vLLM top_k", C, chat(top_k=5), 400, "top_k"),
    ("reasoning_effort", C, chat(reasoning_effort="high"), 400, "reasoning_effort"),
    ("message name", C, chat(messages=[{"role": "user", "content": "hi", "name": "bob"}]), 400, "messages.0.name"),
    ("tool role", C, chat(messages=[{"role": "tool", "content": "x", "tool_call_id": "c"}]), 400, "messages.0.role"),
    ("stream_options unknown key", C, chat(stream=True, stream_options={"continuous_usage_stats": True}), 400,
     "stream_options.continuous_usage_stats"),
    ("ttt unknown key", C, chat(ttt={"k": 1, "path": "/tmp"}), 400, "ttt.path"),
    # -- inconsistent
    ("stream_options without stream", C, chat(stream_options={"include_usage": True}), 400, "stream_options"),
    ("max_tokens and max_completion_tokens differ", C, chat(max_tokens=5, max_completion_tokens=7), 400,
     "max_completion_tokens"),
    ("max_completion_tokens above the limit", C, chat(max_completion_tokens=65), 400, "max_completion_tokens"),
    ("template refuses the conversation", C, chat(messages=[{"role": "assistant", "content": "Hello"},
                                                            {"role": "user", "content": "hi"}]), 400, "messages"),
    # -- the older hostile list (tests/test_serve.py) still holds
    ("bad json", C, b"{not json", 400, None),
    ("json array", C, b"[1, 2]", 400, None),
    ("no model", C, {"messages": HI}, 400, "model"),
    ("empty messages", C, {"model": MODEL, "messages": []}, 400, "messages"),
    ("bad role", C, chat(messages=[{"role": "robot", "content": "hi"}]), 400, "messages.0.role"),
    ("max_tokens huge", C, chat(max_tokens=10**9), 400, "max_tokens"),
    ("ttt k too large", C, chat(ttt={"k": 1000}), 400, "ttt.k"),
    ("unknown model", C, {"model": "gpt-9", "messages": HI}, 404, "model"),
    ("path-like model", C, {"model": "../../etc/passwd", "messages": HI}, 400, "model"),
    ("completions without prompt", P, {"model": MODEL}, 400, "prompt"),
]


@pytest.mark.parametrize("name,path,body,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_bodies_get_4xx_openai_errors_naming_the_field(client, name, path, body, status, param):
    http, engine, _ = client
    before = len(engine.requests)
    r = post(http, body, path)
    assert r.status_code == status, (name, r.status_code, r.text[:400])
    assert set(r.json()) == {"error"}
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] and isinstance(err["message"], str) and err["message"]
    assert err["param"] == param, (name, err)
    if param is not None:
        assert param in err["message"] or param.split(".")[-1] in err["message"], err
    assert "Traceback" not in r.text and 'File "' not in r.text
    assert len(engine.requests) == before  # nothing reached the engine
    assert http.get("/health").json() == {"status": "ok"}


def test_parse_request_is_a_pure_function():
    """The validation seam without HTTP: bytes -> model or APIError."""
    body = parse_request(json.dumps(chat(seed=MAX_SEED, stop="###")).encode(), ChatCompletionRequest)
    assert body.seed == MAX_SEED and body.stops() == ["###"]
    with pytest.raises(APIError) as e:
        parse_request(json.dumps(chat(seed=2**70)).encode(), ChatCompletionRequest)
    assert e.value.status == 400 and e.value.param == "seed"
    with pytest.raises(APIError) as e:
        parse_request(b"[" * 100_000 + b"]" * 100_000, CompletionRequest)
    assert e.value.status == 400 and "deeper" in e.value.message


def test_no_request_ever_gets_a_500(client):
    """Every bad body above, sent to both routes, plus mutations of a valid body: never 5xx."""
    http, _, _ = client
    valid = chat(max_tokens=5, temperature=0, stop=["x"], seed=1, stream=False)
    weird = [None, True, False, 0, -1, 2**64, 1.5, -1e308, "", " ", "\u0000", "x" * 300, [], [None], {}, {"a": None},
             [[[[]]]]]
    bodies = [b[2] for b in BAD]
    for key in [*valid, "messages.0.content", "messages.0.role", "ttt", "stream_options", "n", "top_p"]:
        for w in weird:
            b = json.loads(json.dumps(valid))
            if key.startswith("messages.0."):
                b["messages"][0][key.split(".")[-1]] = w
            else:
                b[key] = w
            bodies.append(b)
    for body in bodies:
        for path in (C, P):
            r = post(http, body, path)
            assert r.status_code < 500, (path, body if not isinstance(body, bytes) else body[:80], r.text[:300])
            if r.status_code != 200:
                assert set(r.json()["error"]) == {"message", "type", "param", "code"}


# ================================================================================================ valid requests
def test_valid_bodies_reach_the_engine_as_sent(client):
    http, engine, _ = client
    r = post(http, chat(messages=[{"role": "system", "content": "Be brief."},
                                  {"role": "user", "content": [{"type": "text", "text": "What is "},
                                                               {"type": "text", "text": "metformin?"}]}],
                        max_completion_tokens=7, temperature=0, top_p=0.5, stop="###", seed=MAX_SEED))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"] == {"role": "assistant", "content": "fine answer"}
    req = engine.requests[-1]
    assert req.messages == [{"role": "system", "content": "Be brief."},
                            {"role": "user", "content": "What is metformin?"}]
    assert (req.max_tokens, req.temperature, req.top_p, req.stop, req.seed) == (7, 0.0, 0.5, ["###"], MAX_SEED)
    # null = OpenAI's default; no-op values of fields we do not implement are accepted
    r = post(http, chat(temperature=None, top_p=None, n=1, stream=False, stop=None, seed=None, max_tokens=None,
                        logprobs=False, top_logprobs=0, tool_choice="none", tools=[], parallel_tool_calls=True,
                        functions=None, function_call="none", response_format={"type": "text"}, logit_bias={},
                        presence_penalty=0, frequency_penalty=0.0, user="alice", safety_identifier="h1", store=False,
                        metadata={}, ignore_eos=False, service_tier="auto"))
    assert r.status_code == 200, r.text
    req = engine.requests[-1]
    assert (req.temperature, req.top_p, req.stop, req.seed, req.max_tokens) == (1.0, 1.0, [], None, 64)
    r = post(http, comp(prompt=["Metformin is used to treat"], max_tokens=4, stop=["\n", "."], echo=False, best_of=1,
                        logprobs=None, suffix="", n=1), P)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == "fine answer"
    req = engine.requests[-1]
    assert (req.prompt, req.messages, req.max_tokens, req.stop) == ("Metformin is used to treat", None, 4, ["\n", "."])
    # a previous response message replayed as the openai client dumps it (null/empty extras)
    r = post(http, chat(messages=[
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello", "refusal": None, "tool_calls": None, "function_call": None,
         "audio": None, "annotations": []},
        {"role": "user", "content": "and?"}]))
    assert r.status_code == 200, r.text
    assert engine.requests[-1].messages[1] == {"role": "assistant", "content": "hello"}


def test_the_unmodified_openai_client_still_works():
    from openai import OpenAI

    http, engine, _ = make()
    c = OpenAI(base_url="http://testserver/v1", api_key=KEY, max_retries=0, http_client=http)
    assert {m.id for m in c.models.list().data} == {MODEL, MODEL + ":ttt"}
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=12,
                                  temperature=0)
    assert r.choices[0].message.content == "fine answer" and r.usage.total_tokens == 5
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                                  max_completion_tokens=9, stop=["###", "END"], seed=3, top_p=0.9)
    assert r.choices[0].message.content == "fine answer"
    assert (engine.requests[-1].max_tokens, engine.requests[-1].stop) == (9, ["###", "END"])
    parts, usage = [], None
    for chunk in c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True,
                                           stream_options={"include_usage": True}, stop="###"):
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
        if chunk.usage:
            usage = chunk.usage
    assert "".join(parts) == "fine answer" and usage.completion_tokens == 2
    t = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=12,
                                  temperature=0, extra_body={"ttt": {"k": 3, "steps": 8}})
    assert t.model_extra["ttt"] == {"applied": True, "k": 3, "steps": 8}
    t = c.chat.completions.create(model=MODEL + ":ttt", messages=[{"role": "user", "content": "hi"}], max_tokens=12)
    assert t.model_extra["ttt"]["applied"]
    comp_ = c.completions.create(model=MODEL, prompt="Metformin is used to treat", max_tokens=8, temperature=0)
    assert comp_.choices[0].text == "fine answer"
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model=MODEL, prompt="Metformin is used to treat", max_tokens=8, temperature=0, stream=True) if ch.choices)
    assert streamed == "fine answer"


def test_n_above_one_is_refused_even_when_the_limit_allows_it():
    http, _, _ = make(max_n=4)
    r = post(http, chat(n=2))
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    assert "not supported" in r.json()["error"]["message"]
    assert post(http, chat(n=1)).status_code == 200


def test_auth_comes_before_validation():
    http, _, _ = make()
    r = http.post(C, content=b"[" * 100_000, headers={"Content-Type": "application/json"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


# ================================================================================================ /ready
def test_ready_is_503_until_the_engine_answered_a_generation_then_cached():
    client, engine, ingress = make()
    ingress.READY_WAIT_S = 0.05
    engine.gate = asyncio.Event()  # the engine is still loading: generate does not return
    with client as http:  # one event loop for all requests, as in a replica
        _ready_sequence(http, engine, ingress)


def _ready_sequence(http, engine, ingress):
    r = http.get("/ready")
    assert r.status_code == 503 and r.headers["retry-after"] == "5"
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == "not_ready"
    assert http.get("/health").json() == {"status": "ok"}  # liveness is not readiness
    assert http.get("/ready").status_code == 503
    assert engine.calls == 1  # the pending warm-up is shared, not repeated per check
    http.portal.call(engine.gate.set)  # the engine finished loading (set on the app's event loop)
    ingress.READY_WAIT_S = 2.0
    assert http.get("/ready").json() == {"status": "ready"}
    assert engine.requests[-1].max_tokens == 1 and engine.requests[-1].prompt
    engine.fail = True  # cached once true: no more generations for readiness
    assert http.get("/ready").status_code == 200 and engine.calls == 1


def test_ready_reports_a_failed_warm_up_without_internals_and_retries():
    http, engine, ingress = make()
    engine.fail = True
    r = http.get("/ready")
    assert r.status_code == 503 and "warm-up" in r.json()["error"]["message"]
    assert "CUDA" not in r.text and "secret" not in r.text
    ingress.READY_RETRY_S = 0.0
    engine.fail = False
    assert http.get("/ready").status_code == 200 and engine.calls == 2


# ================================================================================================ /openapi.json
def test_openapi_describes_the_bodies_we_accept(client):
    http, _, _ = client
    doc = http.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]
    for path, name in ((C, "ChatCompletionRequest"), (P, "CompletionRequest")):
        body = doc["paths"][path]["post"]["requestBody"]
        assert body["required"] and body["content"]["application/json"]["schema"] == {
            "$ref": f"#/components/schemas/{name}"}
        s = schemas[name]
        assert s["additionalProperties"] is False  # unknown fields are refused
        assert {"model", "stop", "seed", "stream", "max_completion_tokens", "ttt", "user"} <= set(s["properties"])
        assert s["properties"]["seed"]["anyOf"][0]["maximum"] == MAX_SEED
    chat_s, comp_s = schemas["ChatCompletionRequest"], schemas["CompletionRequest"]
    assert set(chat_s["required"]) == {"model", "messages"} and set(comp_s["required"]) == {"model", "prompt"}
    stop_types = {a.get("type") for a in chat_s["properties"]["stop"]["anyOf"]}
    assert stop_types == {"string", "array", "null"}
    content = schemas["ChatMessage"]["properties"]["content"]
    assert {a.get("type") for a in content["anyOf"]} == {"string", "array"}
    refs = json.dumps(doc).count("#/components/schemas/")
    assert refs and all(ref.split("/")[-1] in schemas for ref in _refs(doc))
    assert "/ready" in doc["paths"] and "/health" in doc["paths"]


def _refs(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref":
                yield v
            else:
                yield from _refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _refs(v)


# ================================================================================================ Serve wiring
def test_the_serve_deployment_builds_its_app_from_the_replica_ingress():
    """The deployment class is built without a cluster and hands Serve this replica's app (late-bound ingress)."""
    from finemed_ray.serving.app import _ingress_deployment

    dep = _ingress_deployment()
    cls = dep.func_or_class
    assert cls.__init__ is not None and hasattr(cls, "__serve_build_asgi_app__")
    _, _, ingress = make()
    app = cls.__serve_build_asgi_app__(SimpleNamespace(ingress=ingress))  # what __init__ leaves on the replica
    assert TestClient(app).get("/health").json() == {"status": "ok"}
