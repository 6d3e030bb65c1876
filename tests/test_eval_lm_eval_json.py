"""results_lm_eval.json: the report in the layout of an lm-evaluation-harness results file (key names as
lm_eval/evaluator.py writes them: results with "acc,none" / "acc_stderr,none" / alias, configs, versions, n-shot,
higher_is_better, n-samples {original, effective}, config, git_hash, date)."""

from __future__ import annotations

import json
import math

import pytest

from finemed_ray.eval.report import lm_eval_results, write_report


def _preds() -> list[dict]:
    preds = []
    for i in range(8):  # medqa: 6 of 8 right without TTT, 7 of 8 with
        preds.append({"benchmark": "medqa", "id": i, "gold": "A", "pred": "A" if i < 6 else "B", "raw": "",
                      "ttt": False, "n_options": 4})
        preds.append({"benchmark": "medqa", "id": i, "gold": "A", "pred": "A" if i < 7 else None, "raw": "",
                      "ttt": True, "n_options": 4})
    for i in range(5):  # pubmedqa: 2 of 5, without TTT only
        preds.append({"benchmark": "pubmedqa", "id": i, "gold": "B", "pred": "B" if i < 2 else "A", "raw": "",
                      "ttt": False, "n_options": 3})
    return preds


META = {
    "name": "run", "engine": {"backend": "vllm", "model": "s3://bucket/exports/dpo", "max_tokens": 512,
                              "temperature": 0.0, "batch_size": 16},
    "scoring": {"method": "generate"}, "paths": {"medqa": "s3://b/medqa/test.jsonl", "pubmedqa": "/data/p.jsonl"},
    "rows": {"medqa": 1273, "pubmedqa": 5},
    "few_shot": {"medqa": {"k": 3, "split_path": "s3://b/medqa/dev.jsonl", "seed": 4, "example_ids": ["1", "2", "3"]},
                 "pubmedqa": {"k": 0, "split_path": None, "seed": 4, "example_ids": []}},
    "date": 1735689600.5, "git_hash": "abc1234", "total_seconds": 12.5,
}


def test_results_file_parses_and_holds_the_lm_eval_keys_and_values(tmp_path):
    write_report(str(tmp_path), _preds(), meta=META)
    data = json.loads((tmp_path / "results_lm_eval.json").read_text())
    for key in ("results", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better", "n-samples",
                "config", "git_hash", "date"):
        assert key in data, key
    assert set(data["results"]) == {"medqa", "medqa_ttt", "pubmedqa"}
    med = data["results"]["medqa"]
    assert med["alias"] == "medqa" and med["acc,none"] == pytest.approx(6 / 8)
    # lm-eval's mean_stderr: sample standard deviation (n - 1) / sqrt(n) of the 0/1 scores
    scores = [1] * 6 + [0] * 2
    mu = sum(scores) / 8
    assert med["acc_stderr,none"] == pytest.approx(math.sqrt(sum((x - mu) ** 2 for x in scores) / 7) / math.sqrt(8))
    assert data["results"]["medqa_ttt"] == {"alias": "medqa (with TTT)", "acc,none": 7 / 8,
                                            "acc_stderr,none": pytest.approx(math.sqrt(7 / 8 * 1 / 8 / 7))}
    assert data["results"]["pubmedqa"]["acc,none"] == pytest.approx(0.4)
    assert data["n-samples"] == {"medqa": {"original": 1273, "effective": 8},
                                 "medqa_ttt": {"original": 1273, "effective": 8},
                                 "pubmedqa": {"original": 5, "effective": 5}}
    assert data["n-shot"] == {"medqa": 3, "medqa_ttt": 3, "pubmedqa": 0}
    assert data["versions"] == {"medqa": 1.0, "medqa_ttt": 1.0, "pubmedqa": 1.0}
    assert data["higher_is_better"]["pubmedqa"] == {"acc": True}
    cfg = data["configs"]["medqa"]
    assert (cfg["task"], cfg["dataset_path"], cfg["num_fewshot"], cfg["output_type"]) == (
        "medqa", "s3://b/medqa/test.jsonl", 3, "generate_until")
    assert cfg["fewshot_split"] == "s3://b/medqa/dev.jsonl" and cfg["fewshot_config"]["seed"] == 4
    assert cfg["metric_list"] == [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]
    assert data["configs"]["medqa_ttt"]["metadata"]["ttt"] is True
    model = data["config"]
    assert (model["model"], model["model_args"]) == ("vllm", "pretrained=s3://bucket/exports/dpo")
    assert model["gen_kwargs"] == {"max_gen_toks": 512, "temperature": 0.0, "do_sample": False}
    assert model["batch_size"] == 16 and model["fewshot_seed"] == 4
    assert (data["git_hash"], data["date"]) == ("abc1234", 1735689600.5)
    assert data["model_name"] == "s3://bucket/exports/dpo"
    assert data["model_name_sanitized"] == "s3__bucket__exports__dpo"
    assert data["total_evaluation_time_seconds"] == "12.5"


def test_loglik_runs_are_multiple_choice_and_tiny_sets_have_no_stderr():
    report = {"meta": {"scoring": {"method": "loglik"}, "engine": {"backend": "hf", "model": "m"}},
              "scores": {"one": {"no_ttt": {"n": 1, "correct": 1, "accuracy": 1.0}}}}
    data = lm_eval_results(report)
    assert data["configs"]["one"]["output_type"] == "multiple_choice"
    assert data["config"]["gen_kwargs"] is None
    assert data["results"]["one"]["acc_stderr,none"] == "N/A"  # lm-eval writes N/A below two samples
    assert data["n-samples"]["one"] == {"original": 1, "effective": 1}  # no row count given: what was scored
    assert isinstance(data["date"], float)


def test_evaluation_job_writes_the_file_with_counts_from_the_benchmark_files(tmp_path, monkeypatch):
    """The job's own meta feeds the file: valid rows before `limit` (original), items scored (effective), shots,
    the benchmark path, the model; inference is stubbed (no Ray), everything else is the job's code."""
    from pathlib import Path

    from finemed_ray.config import load_config
    from finemed_ray.eval.config import EvalJobConfig
    from finemed_ray.eval.runner import Evaluation, _prediction

    root = Path(__file__).resolve().parents[1]
    rows = [{"id": i, "question": f"Q{i}?", "options": {"A": "yes", "B": "no"}, "answer_idx": "A"} for i in range(5)]
    test = tmp_path / "medqa.jsonl"
    test.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json}\n")  # 5 valid rows + 1 bad one
    dev = tmp_path / "dev.jsonl"
    dev.write_text("\n".join(json.dumps({**r, "id": 10 + i, "question": f"D{i}?"}) for i, r in enumerate(rows)))
    benchmarks = [{"name": "medqa", "path": str(test), "kind": "mcq", "limit": 3,
                   "few_shot": {"k": 2, "split_path": str(dev), "seed": 3}}]
    cfg = load_config(EvalJobConfig, root / "configs/eval_tiny.yaml", [
        "engine.model=some/model", f"output.path={tmp_path / 'out'}", f"benchmarks={json.dumps(benchmarks)}",
        "scoring.method=generate", "prompt.mode=direct", "engine.max_tokens=8",
        f"baselines={root / 'configs/baselines/medical_8b.yaml'}"])
    seen: list[dict] = []

    def predict(self, item_rows, ttt):  # one reply used the whole 8-token budget
        seen.extend(item_rows)
        return [_prediction(r, "The answer is (A).", None, ttt, max_tokens=8, completion_tokens=8 if i == 0 else 3)
                for i, r in enumerate(item_rows)]

    monkeypatch.setattr(Evaluation, "predict", predict)
    report = Evaluation(cfg).run()
    assert len(seen) == 3 and all(len(r["messages"]) == 2 + 2 * 2 for r in seen)  # system, 2 examples, question
    data = json.loads((tmp_path / "out" / "results_lm_eval.json").read_text())
    assert data["n-samples"]["medqa"] == {"original": 5, "effective": 3}
    assert data["n-shot"]["medqa"] == 2 and data["configs"]["medqa"]["dataset_path"] == str(test)
    assert data["results"]["medqa"]["acc,none"] == 1.0 and data["config"]["model_args"] == "pretrained=some/model"
    assert isinstance(data["date"], float) and (data["git_hash"] is None or isinstance(data["git_hash"], str))
    assert report["scores"]["medqa"]["no_ttt"]["cut_off"] == 1
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| cut off at max tokens | 1 (33.3%) |" in md
    assert "## Published figures (quoted, not measured)" in md and "| medqa | 100.0% " in md
    shots = report["meta"]["few_shot"]["medqa"]["example_ids"]  # recorded, and all from the dev file
    assert len(shots) == 2 and set(shots) <= {"10", "11", "12", "13", "14"}
