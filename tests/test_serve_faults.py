"""Engine replicas that die under requests: retried, or a 503 with Retry-After, never a generic 500.

The fast tests drive the ingress (``finemed_ray.serving.app``) in-process with an engine handle that raises what Ray
Serve raises when a replica dies (``ActorDiedError``, ``ActorUnavailableError``) or refuses work
(``BackPressureError``). The slow test runs the real application with two transformers engine replicas on the tiny
model, SIGKILLs one replica's process in the middle of a concurrent load and counts what the clients got."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from finemed_ray.serving.app import Ingress, create_app
from finemed_ray.serving.config import ServeConfig
from finemed_ray.serving.engines import GenResult

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key-0123456789"
MODEL = "finemed-tiny"
AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
C = "/v1/chat/completions"


def died():
    from ray.exceptions import ActorDiedError

    return ActorDiedError()


def unreachable():
    from ray.exceptions import ActorUnavailableError

    return ActorUnavailableError("connection lost", None)


def backpressure():
    from ray.serve.exceptions import BackPressureError

    return BackPressureError(num_queued_requests=10, max_queued_requests=10)


# ================================================================================================ fakes
class _Method:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        return self.fn(*args)


class ScriptedEngine:
    """An engine handle whose calls fail as scripted: ``script`` holds, per call, an exception to raise (for a stream:
    ``(events before it, exception)``) or None to answer."""

    def __init__(self, *script):
        self.script = list(script)
        self.calls = 0

    def _next(self):
        self.calls += 1
        return self.script.pop(0) if self.script else None

    async def _generate(self, req):
        step = self._next()
        if step is not None:
            raise step
        return GenResult("fine answer", 3, 2, "stop")

    async def _stream(self, req):
        step = self._next()
        before, exc = step if isinstance(step, tuple) else (0, step)
        events = [{"delta": "fine"}, {"delta": " answer"},
                  {"finish_reason": "stop", "prompt_tokens": 3, "completion_tokens": 2}]
        for i, event in enumerate(events):
            if exc is not None and i == before:
                raise exc
            yield event

    @property
    def generate(self):
        return _Method(self._generate)

    @property
    def stream(self):
        return _Method(self._stream)

    def options(self, **_):
        return self


class ScriptedTTT:
    def __init__(self, *script):
        self.script = list(script)
        self.calls = 0

        async def adapt(query):
            self.calls += 1
            step = self.script.pop(0) if self.script else None
            if step is not None:
                raise step
            return {"adapter": {"id": "a1"}, "info": {"applied": True}}

        self.adapt = _Method(adapt)


class Tokenizer:
    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False):
        return " ".join(m["content"] for m in messages)

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": text.split()}


def make(engine, ttt=None) -> TestClient:
    cfg = ServeConfig.model_validate({"model": {"id": MODEL, "path": "/models/none", "max_model_len": 512},
                                      "ttt": {"enabled": True, "index": "/index/none"}})
    ingress = Ingress(cfg, engine, ttt or ScriptedTTT(), KEY, Tokenizer())
    ingress.RETRY_BACKOFF_S = (0.0,)
    return TestClient(create_app(ingress), raise_server_exceptions=False)


def body(**kw):
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **kw}).encode()


def assert_503(r):
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"] == "5"
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "service_unavailable_error" and err["code"] == "engine_unavailable"
    assert "Actor" not in err["message"] and "pid" not in err["message"]  # no internals


def sse_events(text: str) -> list:
    return [line[6:] for line in text.splitlines() if line.startswith("data: ")]


# ================================================================================================ fast
@pytest.mark.parametrize("fault", [died, unreachable], ids=["ActorDiedError", "ActorUnavailableError"])
def test_a_request_whose_replica_died_is_retried(fault):
    engine = ScriptedEngine(fault())
    r = make(engine).post(C, content=body(), headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "fine answer"
    assert r.headers["x-engine-retries"] == "1" and engine.calls == 2


def test_retries_are_bounded_then_503_with_retry_after():
    engine = ScriptedEngine(died(), unreachable(), died(), died())
    r = make(engine).post(C, content=body(), headers=AUTH)
    assert_503(r)
    assert engine.calls == 3  # the call and ENGINE_RETRIES = 2 retries


def test_backpressure_is_503_at_once_and_an_engine_bug_stays_a_500():
    engine = ScriptedEngine(backpressure())
    assert_503(make(engine).post(C, content=body(), headers=AUTH))
    assert engine.calls == 1
    engine = ScriptedEngine(RuntimeError("CUDA error at /secret/path.py"))
    r = make(engine).post(C, content=body(), headers=AUTH)
    assert r.status_code == 500 and "secret" not in r.text and "retry-after" not in r.headers
    assert engine.calls == 1  # not retried: another replica would fail the same way


def test_a_stream_lost_before_its_first_event_is_retried_or_503():
    engine = ScriptedEngine((0, died()))
    r = make(engine).post(C, content=body(stream=True), headers=AUTH)
    assert r.status_code == 200 and r.headers["x-engine-retries"] == "1"
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert text == "fine answer"
    engine = ScriptedEngine((0, died()), (0, died()), (0, died()))
    assert_503(make(engine).post(C, content=body(stream=True), headers=AUTH))


def test_a_stream_broken_after_its_first_event_ends_with_an_in_band_503_error():
    engine = ScriptedEngine((1, died()))
    r = make(engine).post(C, content=body(stream=True), headers=AUTH)
    assert r.status_code == 200  # the headers were sent with the first event
    events = sse_events(r.text)
    assert "[DONE]" not in events and engine.calls == 1
    err = json.loads(events[-1])["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "service_unavailable_error" and err["code"] == "engine_unavailable"
    assert "incomplete" in err["message"]
    assert json.loads(events[-2])["choices"][0]["delta"] == {"content": "fine"}


def test_a_ttt_adaptation_whose_replica_died_is_retried():
    ttt = ScriptedTTT(died())
    r = make(ScriptedEngine(), ttt).post(C, content=body(ttt={"k": 2}), headers=AUTH)
    assert r.status_code == 200, r.text
    assert ttt.calls == 2 and r.json()["ttt"] == {"applied": True}


# ================================================================================================ slow: a real kill
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _replica_pids(app: str, deployment: str) -> dict[str, int]:
    """actor id -> PID of the live replicas of one deployment, from the GCS (no dashboard needed)."""
    import ray

    actors = ray._private.state.actors(actor_state_name="ALIVE")
    return {a: info["Pid"] for a, info in actors.items()
            if info["ActorClassName"] == f"ServeReplica:{app}:{deployment}"}


@pytest.fixture
def two_engine_app(tiny_model_dir):
    """The application with the transformers engine, 2 engine replicas (fixed), on 127.0.0.1 at '/'. Every process it
    starts is killed at the end."""
    import psutil
    import ray
    from ray import serve

    from finemed_ray.config import load_config
    from finemed_ray.serving.app import build_app

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {k: v for k, v in os.environ.items() if k.startswith("HF_")}})
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        cfg = load_config(ServeConfig, ROOT / "configs/serve_tiny.yaml", [
            f"model.path={tiny_model_dir}", f"model.id={MODEL}", "model.engine=hf", "model.device=cpu",
            "model.max_model_len=512", f"security.api_key={KEY}", "autoscaling.min_replicas=2",
            "autoscaling.max_replicas=2", "batching.max_batch_size=4", "limits.max_tokens=32",
            "resources.engine_num_cpus=0.5", "resources.ingress_num_cpus=0.1", f"http.port={port}"])
        serve.run(build_app(cfg), name="faults", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        started = psutil.Process().children(recursive=True)
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            for p in started:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass


@pytest.mark.slow
def test_an_engine_replica_killed_under_load_costs_no_request(two_engine_app):
    """240 requests from 12 clients (one in four streaming); once 40 have finished, one engine replica's process is
    SIGKILLed. Every response must be a 200 or a 503 with Retry-After (no other 5xx); requests the dead replica held
    are retried on the other one; Serve replaces the replica and the service answers afterwards."""
    import httpx
    import psutil
    from ray import serve

    base = two_engine_app
    before = _replica_pids("faults", "engine")
    assert len(before) == 2
    mine = {p.pid for p in psutil.Process().children(recursive=True)}
    assert set(before.values()) <= mine  # only this test's own replicas are candidates
    victim = sorted(before.values())[0]

    total, clients, kill_after = 240, 12, 40
    done = threading.Event()
    started: list[int] = []
    finished: list[int] = []
    kill: dict[str, float] = {}

    def one(i: int) -> dict:
        started.append(i)
        streaming = i % 4 == 3
        req = {"model": MODEL, "max_tokens": 24, "temperature": 0,
               "messages": [{"role": "user", "content": f"Question {i}: what does metformin treat?"}]}
        with httpx.Client(base_url=base, timeout=120) as http:
            if streaming:
                with http.stream("POST", C, json={**req, "stream": True}, headers=AUTH) as r:
                    text = r.read().decode()
                events = sse_events(text) if r.status_code == 200 else []
                out = {"status": r.status_code, "stream": True, "complete": bool(events) and events[-1] == "[DONE]",
                       "in_band_error": any(e.startswith('{"error"') for e in events)}
            else:
                r = http.post(C, json=req, headers=AUTH)
                out = {"status": r.status_code, "stream": False, "complete": r.status_code == 200
                       and r.json()["choices"][0]["message"]["content"] is not None}
            out["retries"] = int(r.headers.get("x-engine-retries", "0"))
            out["retry_after"] = r.headers.get("retry-after")
            if r.status_code != 200:
                out["error"] = r.json().get("error") if not streaming else json.loads(text).get("error")
        finished.append(i)
        return out

    def killer() -> None:
        while len(finished) < kill_after and not done.is_set():
            time.sleep(0.01)
        kill["at"] = time.monotonic()
        kill["in_flight"] = len(started) - len(finished)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if psutil.Process(victim).status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.NoSuchProcess:
                break
            time.sleep(0.05)
        else:
            kill["still_alive"] = True
        kill["gone_after_s"] = time.monotonic() - kill["at"]

    t0 = time.monotonic()
    k = threading.Thread(target=killer, daemon=True)
    k.start()
    with cf.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(total)))
    done.set()
    k.join(30)
    load_s = time.monotonic() - t0
    assert "at" in kill and not kill.get("still_alive"), kill  # the kill happened and the process is gone
    assert not psutil.pid_exists(victim) or psutil.Process(victim).status() == psutil.STATUS_ZOMBIE

    # Serve replaces the replica: a new PID, two running replicas again.
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        now = _replica_pids("faults", "engine")
        dep = serve.status().applications["faults"].deployments["engine"]
        if len(now) == 2 and victim not in now.values() and dep.replica_states.get("RUNNING", 0) == 2:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"the killed replica was not replaced: {now}, {dep}")
    recovery_s = time.monotonic() - kill["at"]

    statuses = [r["status"] for r in results]
    bad = [r for r in results if r["status"] >= 500 and not (r["status"] == 503 and r["retry_after"])]
    unavailable = [r for r in results if r["status"] == 503]
    retried_ok = [r for r in results if r["retries"] and r["status"] == 200 and r["complete"]]
    broken_streams = [r for r in results if r["stream"] and r["status"] == 200 and not r["complete"]]
    figures = {"requests": total, "clients": clients, "ok": statuses.count(200), "retried_ok": len(retried_ok),
               "503": len(unavailable), "other_5xx": len(bad), "broken_streams": len(broken_streams),
               "in_flight_at_kill": kill["in_flight"],
               "load_s": round(load_s, 1), "pid_gone_after_s": round(kill["gone_after_s"], 2),
               "replaced_after_s": round(recovery_s, 1)}
    print("replica kill:", json.dumps(figures), flush=True)
    assert not bad, bad[:3]
    for r in unavailable:
        assert r["error"]["type"] == "service_unavailable_error" and r["error"]["code"] == "engine_unavailable"
    for r in broken_streams:
        assert r["in_band_error"], r
    assert all(r["status"] in (200, 503) for r in results), sorted(set(statuses))
    assert retried_ok, figures  # the dead replica held requests, and they were answered by the other one
    # the service answers afterwards, through both replicas
    with httpx.Client(base_url=base, timeout=120) as http:
        for i in range(8):
            r = http.post(C, json={"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]},
                          headers=AUTH)
            assert r.status_code == 200 and "x-engine-retries" not in r.headers, r.text
