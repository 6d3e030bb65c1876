"""Request validation of the OpenAI-compatible endpoint. Mostly without Ray Serve or a model: the FastAPI app of
``finemed_ray.serving.app.create_app`` over an :class:`Ingress` with a fake engine handle, a fake TTT handle and a
fake tokenizer, driven by FastAPI's TestClient (and by the unmodified ``openai`` client over it); then the corpus of
bad requests (tests/data/bad_requests.jsonl) once more through Ray Serve to the real app with the vLLM engine on the
tiny model (~60 s: the only test here that starts a cluster).

Every malformed request must get a 4xx with OpenAI's error JSON whose ``param`` names the field, never a 5xx;
nothing is coerced or silently ignored; valid shapes of the openai client still pass."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient

from finemed_ray.serving.app import Ingress, create_app
from finemed_ray.serving.config import ServeConfig
from finemed_ray.serving.engines import GenResult
from finemed_ray.serving.protocol import (
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


# ================================================================================================ bad requests
# The corpus: tests/data/bad_requests.jsonl, one case a line -- id, route (path, maybe with a query), method, the
# body (``json``: an object sent as JSON; ``body``: the raw text, UTF-8; ``gen``: parts ``{"text"|"hex", "times"}``
# joined, for the huge and the non-UTF-8 bodies), ``headers`` (over the defaults below; null removes one),
# ``chunked`` (sent without Content-Length), the expected ``status``, the ``param`` the error must name (null: none)
# and sometimes the ``code``. The same file is sent in-process here (fake engine) and through Ray Serve to the vLLM
# engine (test_corpus_through_serve_with_the_vllm_engine); both apps run with CORPUS_SETTINGS.
C, P = "/v1/chat/completions", "/v1/completions"
ROOT = Path(__file__).resolve().parents[1]
CORPUS_FILE = Path(__file__).parent / "data" / "bad_requests.jsonl"
CORPUS = [json.loads(line) for line in CORPUS_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]
CORPUS_SETTINGS = [  # over configs/serve_tiny.yaml: the limits the corpus's statuses assume (TTT off, API key on)
    "model.max_model_len=512", "ttt.enabled=false", f"security.api_key={KEY}", "limits.max_tokens=64",
    "limits.max_body_bytes=1000000", "limits.max_prompt_chars=4000", "limits.max_messages=64", "limits.max_n=1"]


def case_body(case: dict) -> bytes:
    if "json" in case:
        return json.dumps(case["json"]).encode()
    if "body" in case:
        return case["body"].encode("utf-8")
    if "gen" in case:
        return b"".join((bytes.fromhex(p["hex"]) if "hex" in p else p["text"].encode("utf-8")) * p.get("times", 1)
                        for p in case["gen"])
    return b""


def case_headers(case: dict) -> dict[str, str]:
    headers = {**AUTH, **case.get("headers", {})}
    return {k: v for k, v in headers.items() if v is not None}


def send_case(http, case: dict):
    """Send one corpus case with an httpx-style client (FastAPI's TestClient, or httpx.Client with a base_url)."""
    body = case_body(case)
    content: Any = body
    if case.get("chunked"):
        content = iter([body[i:i + 65536] for i in range(0, len(body), 65536)])
    return http.request(case["method"], case["route"], content=content if body or case.get("chunked") else None,
                        headers={k: v.encode("latin-1") for k, v in case_headers(case).items()})


def check_case(case: dict, r) -> None:
    """The status, OpenAI's error JSON naming the field (and the code where given), no internals."""
    name = case["id"]
    assert r.status_code < 500, (name, r.status_code, r.text[:400])
    assert r.status_code == case["status"], (name, r.status_code, r.text[:400])
    assert r.headers.get("content-type", "").startswith("application/json"), (name, r.headers)
    body = r.json()
    assert set(body) == {"error"}, (name, body)
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, (name, err)
    assert err["type"] and isinstance(err["message"], str) and err["message"], (name, err)
    param = case["param"]
    assert err["param"] == param, (name, err)
    if param is not None:
        assert param in err["message"] or param.split(".")[-1] in err["message"], (name, err)
    if "code" in case:
        assert err["code"] == case["code"], (name, err)
    assert "Traceback" not in r.text and 'File "' not in r.text, name


def corpus_config(*extra: str) -> ServeConfig:
    from finemed_ray.config import load_config

    return load_config(ServeConfig, ROOT / "configs/serve_tiny.yaml", [*CORPUS_SETTINGS, *extra])


@pytest.fixture(scope="module")
def corpus_client():
    cfg = corpus_config("model.path=/models/none", f"model.id={MODEL}")
    engine = FakeEngine()
    ingress = Ingress(cfg, engine, FakeTTT(), KEY, FakeTokenizer())
    return TestClient(create_app(ingress), raise_server_exceptions=False), engine


def test_the_corpus_is_big_distinct_and_covers_both_routes_and_the_old_500s():
    ids = [c["id"] for c in CORPUS]
    assert len(CORPUS) >= 150 and len(set(ids)) == len(ids)
    assert len({(c["route"], c["method"], case_body(c), json.dumps(c.get("headers"), sort_keys=True),
                 c.get("chunked", False)) for c in CORPUS}) == len(CORPUS)  # no two cases send the same request
    for c in CORPUS:
        assert set(c) <= {"id", "route", "method", "headers", "json", "body", "gen", "chunked", "status", "param",
                          "code"}, c["id"]
        assert 400 <= c["status"] < 500, c["id"]
    routes = {c["route"] for c in CORPUS}
    assert {C, P} <= routes and sum(c["route"] == P for c in CORPUS) >= 50
    assert {c["status"] for c in CORPUS} >= {400, 401, 404, 405, 413, 415}
    for old_500 in ("seed 2**70", "empty stop string", "100,000 nested arrays", "50,000 nested objects",
                    "lone surrogate in content"):
        assert f"chat: {old_500}" in ids, old_500
    for field in ("tools", "tool_choice", "logprobs", "top_logprobs", "echo", "best_of", "logit_bias",
                  "response_format", "ignore_eos", "presence_penalty", "frequency_penalty", "stream", "max_tokens",
                  "ttt.k"):
        assert any(c["param"] == field for c in CORPUS), field


@pytest.mark.parametrize("case", CORPUS, ids=[c["id"] for c in CORPUS])
def test_corpus_in_process(corpus_client, case):
    http, engine = corpus_client
    before = len(engine.requests)
    check_case(case, send_case(http, case))
    assert len(engine.requests) == before  # nothing reached the engine
    assert http.get("/health").json() == {"status": "ok"}


# Cases that need a deployment the corpus does not run (TTT on) or the fake tokenizer (whose chat template refuses a
# conversation that starts with an assistant message; the tiny model's template accepts it).
BAD_WITH_TTT = [
    ("ttt k above ttt.max_k", C, chat(ttt={"k": 1000}), 400, "ttt.k"),
    ("ttt steps above ttt.max_steps", C, chat(ttt={"steps": 100}), 400, "ttt.steps"),
    ("':ttt' model with ttt k above the limit", C, {"model": MODEL + ":ttt", "messages": HI, "ttt": {"k": 9}}, 400,
     "ttt.k"),
    ("ttt k '3' with TTT on", C, chat(ttt={"k": "3"}), 400, "ttt.k"),
    ("completions: ttt k above ttt.max_k", P, comp(ttt={"k": 1000}), 400, "ttt.k"),
    ("template refuses the conversation", C, chat(messages=[{"role": "assistant", "content": "Hello"},
                                                            {"role": "user", "content": "hi"}]), 400, "messages"),
]


@pytest.mark.parametrize("name,path,body,status,param", BAD_WITH_TTT, ids=[b[0] for b in BAD_WITH_TTT])
def test_bad_bodies_with_ttt_on_get_4xx_naming_the_field(client, name, path, body, status, param):
    http, engine, _ = client
    before = len(engine.requests)
    check_case({"id": name, "status": status, "param": param}, post(http, body, path))
    assert len(engine.requests) == before


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
    # UTF-8 only (a leading BOM is ignored); json.loads on bytes would have guessed UTF-16
    assert parse_request(b"\xef\xbb\xbf" + json.dumps(comp()).encode(), CompletionRequest).prompt
    with pytest.raises(APIError) as e:
        parse_request(json.dumps(comp()).encode("utf-16"), CompletionRequest)
    assert e.value.status == 400 and "UTF-8" in e.value.message


def test_no_request_ever_gets_a_500(client):
    """Every corpus body, sent to both routes, plus mutations of a valid body: never 5xx."""
    http, _, _ = client
    valid = chat(max_tokens=5, temperature=0, stop=["x"], seed=1, stream=False)
    weird = [None, True, False, 0, -1, 2**64, 1.5, -1e308, "", " ", "\u0000", "x" * 300, [], [None], {}, {"a": None},
             [[[[]]]]]
    bodies: list[Any] = [case_body(c) for c in CORPUS if c["method"] == "POST"] + [b[2] for b in BAD_WITH_TTT]
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


# ================================================================================================ corpus via Serve
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _replica_pids(app: str, deployment: str) -> dict[str, int]:
    """actor id -> PID of the live replicas of one deployment, from the GCS (no dashboard needed)."""
    import ray

    actors = ray._private.state.actors(actor_state_name="ALIVE")
    return {a: info["Pid"] for a, info in actors.items()
            if info["ActorClassName"] == f"ServeReplica:{app}:{deployment}"}


@pytest.fixture(scope="module")
def vllm_corpus_app(tiny_model_dir):
    """The real application (ingress + vLLM engine on the tiny model, CPU) on 127.0.0.1 at route prefix '/', with
    CORPUS_SETTINGS. Every process this fixture starts (Ray, replicas, vLLM's engine core) is killed at the end."""
    import os

    import psutil
    import ray
    from ray import serve

    from finemed_ray.serving.app import build_app

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {k: v for k, v in os.environ.items() if k.startswith("HF_")}})
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        cfg = corpus_config(f"model.path={tiny_model_dir}", f"model.id={MODEL}", "model.engine=vllm",
                            "model.device=cpu", "model.dtype=float32", "autoscaling.min_replicas=1",
                            "autoscaling.max_replicas=1", "resources.engine_num_cpus=1",
                            "resources.ingress_num_cpus=0.1", f"http.port={port}")
        serve.run(build_app(cfg), name="corpus", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        started = psutil.Process().children(recursive=True)
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            for p in started:  # vLLM's engine core outlives its replica otherwise
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass


@pytest.mark.slow  # ~60-100 s with vLLM start-up; CI runs it in `make test-slow`
def test_corpus_through_serve_with_the_vllm_engine(vllm_corpus_app):
    """Every corpus case through Serve's HTTP proxy to the real ingress in front of vLLM: the expected status and
    error JSON, never a 5xx; the engine replica is the same process afterwards and still answers."""
    import httpx

    engine_before = _replica_pids("corpus", "engine")
    assert len(engine_before) == 1
    with httpx.Client(base_url=vllm_corpus_app, timeout=60) as http:
        ok = {"model": MODEL, "messages": HI, "max_tokens": 4, "temperature": 0}
        assert http.post(C, json=ok, headers=AUTH).status_code == 200  # warm: every route works before
        failures = []
        for case in CORPUS:
            r = send_case(http, case)
            try:
                check_case(case, r)
            except AssertionError as e:
                failures.append(str(e)[:300])
        assert not failures, f"{len(failures)} of {len(CORPUS)} cases:\n" + "\n".join(failures)
        r = http.post(C, json=ok, headers=AUTH)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None, r.text
        r = http.post(P, json={"model": MODEL, "prompt": "Metformin is used to treat", "max_tokens": 4,
                               "temperature": 0, "seed": 2**63 - 1, "stop": ["###"]}, headers=AUTH)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0, r.text
        with http.stream("POST", C, json={**ok, "stream": True}, headers=AUTH) as s:
            assert s.status_code == 200 and "data: [DONE]" in s.read().decode()
        assert http.get("/ready").status_code == 200
    assert _replica_pids("corpus", "engine") == engine_before  # the engine was never restarted
