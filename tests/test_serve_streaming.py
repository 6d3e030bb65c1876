"""What issue 18 item 2's serving comparison changed: streamed tokens sent in chunks (``engines.coalesce``), the prompt
rendered and tokenised once (in the ingress; the engine uses the ids), ``ignore_eos`` honoured (``vllm bench serve``
sends it), and Ray Serve's per-replica throughput settings on the deployments.

In-process (fake engine handles, scripted event sources) except the transformers-engine checks, which load the tiny
model: a few seconds, no Ray."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from fastapi.testclient import TestClient

from finemed_ray.serving.app import SERVE_THROUGHPUT_ENV, Ingress, build_app, create_app
from finemed_ray.serving.config import ServeConfig
from finemed_ray.serving.engines import GenRequest, GenResult, HFEngine, VLLMEngine, coalesce, merge_events, prompt_ids

MODEL = "finemed-tiny"


async def scripted(pieces: list[str], gaps: list[float], log: list[str] | None = None):
    """A token stream like VLLMEngine.stream: one delta per piece after its gap, then the finish event."""
    try:
        for piece, gap in zip(pieces, gaps):
            await asyncio.sleep(gap)
            yield {"delta": piece}
        yield {"finish_reason": "length", "prompt_tokens": 5, "completion_tokens": len(pieces)}
    finally:
        if log is not None:
            log.append("source closed")


async def collect(gen) -> list[tuple[float, dict]]:
    t0 = time.perf_counter()
    return [(time.perf_counter() - t0, e) async for e in gen]


PIECES = [f" tok{i}" for i in range(40)]


def test_chunked_stream_yields_the_same_text_and_counts_in_fewer_events():
    gaps = [0.02] + [0.002] * (len(PIECES) - 1)  # a slow first token, then fast decoding
    plain = asyncio.run(collect(coalesce(scripted(PIECES, gaps), 0.0)))
    chunked = asyncio.run(collect(coalesce(scripted(PIECES, gaps), 0.02)))
    held = asyncio.run(collect(coalesce(scripted(PIECES, gaps), 0.5)))  # a window longer than the whole stream
    assert [e for _, e in plain][:-1] == [{"delta": p} for p in PIECES]  # interval 0: one event per token, as is
    text = lambda evs: "".join(e.get("delta", "") for _, e in evs)  # noqa: E731
    assert text(chunked) == text(plain) == "".join(PIECES)
    finish = [e for _, e in chunked if "finish_reason" in e]
    assert len(finish) == 1 and finish[0] is chunked[-1][1]
    assert {k: finish[0][k] for k in ("finish_reason", "prompt_tokens", "completion_tokens")} == \
        {"finish_reason": "length", "prompt_tokens": 5, "completion_tokens": len(PIECES)}
    assert chunked[0][1] == {"delta": PIECES[0]}  # the first token alone, not held for a window
    # ~40 tokens over ~0.1 s in 20 ms windows: a handful of events, not 41
    assert 2 <= len(chunked) <= 15, [e for _, e in chunked]
    # With a 0.5 s window: the first token at once, the rest (the stream ends in ~0.1 s) with the finish, not
    # after the window: nothing is held back when the stream ends.
    assert [e.get("delta") for _, e in held] == [PIECES[0], "".join(PIECES[1:])]
    assert held[0][0] < 0.4 and held[-1][0] < 0.45, [t for t, _ in held]


def test_chunk_window_does_not_hold_tokens_of_a_slow_stream():
    """Tokens slower than the window go out one by one (a window starts with the token that opens it)."""
    gaps = [0.1] * 6
    chunked = asyncio.run(collect(coalesce(scripted(PIECES[:6], gaps), 0.01)))
    deltas = [(t, e["delta"]) for t, e in chunked if e.get("delta")]
    assert [d for _, d in deltas] == PIECES[:6]
    assert deltas[-1][0] < 0.6 + 0.3, [t for t, _ in deltas]  # not 6 tokens + 6 long waits


def test_consumer_leaving_mid_stream_closes_the_source():
    log: list[str] = []

    async def run():
        gen = coalesce(scripted(PIECES, [0.005] * len(PIECES), log), 0.01)
        got = [await gen.__anext__(), await gen.__anext__()]
        await gen.aclose()
        await asyncio.sleep(0.05)
        return got

    got = asyncio.run(run())
    assert got[0] == {"delta": PIECES[0]} and got[1]["delta"].startswith(PIECES[1])
    assert log == ["source closed"]


def test_source_error_reaches_the_consumer():
    async def broken():
        yield {"delta": "a"}
        yield {"delta": "b"}
        raise RuntimeError("engine died")

    async def run():
        out = []
        with pytest.raises(RuntimeError, match="engine died"):
            async for e in coalesce(broken(), 0.05):
                out.append(e)
        return out

    assert run and "".join(e["delta"] for e in asyncio.run(run())) in ("a", "ab")


def test_merge_events():
    assert merge_events(None, {"delta": "a"}) == {"delta": "a"}
    assert merge_events({"delta": "a"}, {"delta": "b"}) == {"delta": "ab"}
    assert merge_events({"delta": "a"}, {"finish_reason": "stop", "prompt_tokens": 1, "completion_tokens": 2}) == \
        {"delta": "a", "finish_reason": "stop", "prompt_tokens": 1, "completion_tokens": 2}


# ------------------------------------------------------------------------------------------------ the ingress
class _Method:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        return self.fn(*args)


class ChunkEngine:
    """An engine handle whose stream sends the text in two chunks, the second merged with the finish (what coalesce
    makes of a fast stream); records the requests."""

    def __init__(self):
        self.requests: list[GenRequest] = []

    def options(self, **_):
        return self

    async def _generate(self, req):
        self.requests.append(req)
        return GenResult("fine answer", len(req.prompt_token_ids or []), 2, "length")

    async def _stream(self, req):
        self.requests.append(req)
        yield {"delta": "fine"}
        yield {"delta": " answer", "finish_reason": "length", "prompt_tokens": 3, "completion_tokens": 2}

    @property
    def generate(self):
        return _Method(self._generate)

    @property
    def stream(self):
        return _Method(self._stream)


class CountingTokenizer:
    def __init__(self):
        self.renders = 0

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False):
        self.renders += 1
        return "".join(f"<{m['role']}> {m['content']} " for m in messages) + "<assistant>"

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [len(w) for w in text.split()]}


def make(plain_engine=None):
    cfg = ServeConfig.model_validate({"model": {"id": MODEL, "path": "/models/none", "max_model_len": 512},
                                      "limits": {"max_tokens": 64}})
    engine, tok = ChunkEngine(), CountingTokenizer()
    ingress = Ingress(cfg, engine, None, None, tok, plain_engine=plain_engine)
    return TestClient(create_app(ingress), raise_server_exceptions=False), engine, tok


def sse(text: str) -> list[dict]:
    return [json.loads(line[6:]) for line in text.split("\n") if line.startswith("data: {")]


def test_stream_with_merged_finish_event_sends_text_finish_and_usage():
    http, engine, _ = make()
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                                "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200, r.text
    events = sse(r.text)
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert text == "fine answer"
    finishes = [e["choices"][0]["finish_reason"] for e in events if e["choices"] and e["choices"][0]["finish_reason"]]
    assert finishes == ["length"]
    assert events[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert r.text.endswith("data: [DONE]\n\n")
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "Metformin is", "stream": True})
    assert "".join(e["choices"][0]["text"] for e in sse(r.text)) == "fine answer"


def test_prompt_is_tokenised_once_and_the_engine_gets_the_ids():
    http, engine, tok = make()
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is metformin?"}]
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": msgs, "max_tokens": 4})
    assert r.status_code == 200, r.text
    req = engine.requests[-1]
    expected = tok(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False))["input_ids"]
    assert req.prompt_token_ids == expected
    assert r.json()["usage"]["prompt_tokens"] == len(expected)
    assert tok.renders == 2  # once by the ingress, once above: none by the engine path

    class Refuses:  # an engine-side tokenizer that must not be used when the ids are there
        def apply_chat_template(self, *a, **k):
            raise AssertionError("rendered twice")

        __call__ = apply_chat_template

    assert prompt_ids(Refuses(), req) == expected
    with pytest.raises(AssertionError):
        prompt_ids(Refuses(), GenRequest(request_id="x", prompt="no ids"))


def test_plain_requests_use_the_plain_handle_and_ttt_ones_the_object_store_handle():
    plain = ChunkEngine()
    http, engine, _ = make(plain_engine=plain)
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200 and len(plain.requests) == 1 and not engine.requests
    list(http.post("/v1/chat/completions", json={"model": MODEL, "stream": True,
                                                 "messages": [{"role": "user", "content": "hi"}]}).iter_lines())
    assert len(plain.requests) == 2 and not engine.requests


@pytest.mark.parametrize("value,expected", [(True, True), (False, False), (None, False)])
def test_ignore_eos_reaches_the_engine_request(value, expected):
    http, engine, _ = make()
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "ignore_eos": value}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert engine.requests[-1].ignore_eos is expected


def test_vllm_sampling_params_carry_ignore_eos():
    eng = VLLMEngine.__new__(VLLMEngine)  # _sampling needs no engine
    assert eng._sampling(GenRequest(request_id="a", prompt="x", ignore_eos=True), delta=True).ignore_eos is True
    assert eng._sampling(GenRequest(request_id="b", prompt="x"), delta=False).ignore_eos is False


def test_hf_engine_honours_ignore_eos(tiny_model_dir):
    """The tiny model rarely says EOS within a few tokens: make its first greedy token the stop id, then an answer
    without ignore_eos ends there, and one with it runs to max_tokens."""
    eng = HFEngine(str(tiny_model_dir), dtype="float32", onednn_linear=False)
    q = [{"role": "user", "content": "What is metformin used for?"}]
    first = asyncio.run(eng.generate_batch([GenRequest(request_id="p", messages=q, max_tokens=1, temperature=0)]))[0]
    first_id = eng.tokenizer(first.text, add_special_tokens=False)["input_ids"][0] if first.text else None
    assert first_id is not None, f"the tiny model's first greedy token decodes to nothing ({first.text!r})"
    eng.stop_ids = {first_id}
    stop, run_on = asyncio.run(eng.generate_batch([
        GenRequest(request_id="s", messages=q, max_tokens=6, temperature=0),
        GenRequest(request_id="i", messages=q, max_tokens=6, temperature=0, ignore_eos=True)]))
    assert (stop.completion_tokens, stop.finish_reason) == (1, "stop")
    assert (run_on.completion_tokens, run_on.finish_reason) == (6, "length")


# ------------------------------------------------------------------------------------------------ deployments
def _deployments(app) -> dict[str, dict]:
    """name -> ray_actor_options of every deployment in a bound application."""
    out: dict[str, dict] = {}
    todo = [app]
    while todo:
        d = todo.pop()._bound_deployment
        out[d.name] = d.ray_actor_options or {}
        todo += [a for a in [*d.init_args, *d.init_kwargs.values()] if hasattr(a, "_bound_deployment")]
    return out


@pytest.mark.parametrize("tuned", [True, False])
def test_throughput_settings_go_to_every_deployment(tuned):
    cfg = ServeConfig.model_validate({"model": {"id": MODEL, "path": "/m"},
                                      "ttt": {"enabled": True, "index": "/index"},
                                      "tuning": {"throughput_optimized": tuned}})
    deps = _deployments(build_app(cfg))
    assert set(deps) == {"ingress", "engine", "ttt"}
    for name, opts in deps.items():
        env = (opts.get("runtime_env") or {}).get("env_vars") or {}
        assert (env == SERVE_THROUGHPUT_ENV) is tuned, (name, opts)
        assert opts.get("num_cpus") is not None
