"""LoRA under ZeRO-3 on 2 Ray Train workers: the saved adapter is real (non-zero, changes outputs; TRL#4416),
and the merged export computes exactly what base + adapter compute."""

from __future__ import annotations

import pytest
import torch

from finemed_ray import storage
from finemed_ray.toy.sample import sample_sft_rows, write_jsonl
from finemed_ray.errors import FinemedError
from finemed_ray.train.lora import ADAPTER_DIR, check_adapter
from finemed_ray.train.stages.sft import SFTJob

from test_sft import sft_config


@pytest.fixture(scope="module")
def lora_run(tiny_model_s3, ray_cluster, s3):
    prefix = f"s3://finemed-test/lora-{id(ray_cluster):x}"
    data_uri = f"{prefix}/data/sft.jsonl"
    write_jsonl(sample_sft_rows(n=40, seed=2, paraphrases="train", system_prompt=None), data_uri)
    cfg = sft_config(prefix, tiny_model_s3, data_uri, "run.name=lora", "lora.enabled=true", "lora.r=8",
                     "train.epochs=4", "train.per_device_batch_size=4", "train.learning_rate=5e-3")
    job = SFTJob(cfg).setup()
    job.run()
    summary = job.save()
    export = storage.materialize_local(cfg.output.export_path)
    base = storage.materialize_local(tiny_model_s3)
    return {"cfg": cfg, "summary": summary, "export": export, "base": base,
            "meta": storage.read_json(storage.join(cfg.output.export_path, "finemed_export.json"))}


def _logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is metformin used for?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        return model(input_ids=ids["input_ids"]).logits


def test_adapter_is_saved_non_empty_and_changes_outputs(lora_run):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = lora_run["meta"]["lora"]
    assert info["lora_B_total"] > 0 and info["lora_B_nonzero"] == info["lora_B_total"]
    tensors = load_file(f"{lora_run['export']}/{ADAPTER_DIR}/adapter_model.safetensors")
    assert tensors and all(v.abs().sum() > 0 for k, v in tensors.items() if "lora_B" in k)

    tokenizer = AutoTokenizer.from_pretrained(lora_run["export"])
    base = AutoModelForCausalLM.from_pretrained(lora_run["base"], dtype=torch.float32).eval()
    base_logits = _logits(base, tokenizer)
    adapted = PeftModel.from_pretrained(base, f"{lora_run['export']}/{ADAPTER_DIR}").eval()
    adapted_logits = _logits(adapted, tokenizer)
    assert (adapted_logits - base_logits).abs().max() > 1e-2  # the adapter really changes the model

    merged = AutoModelForCausalLM.from_pretrained(lora_run["export"], dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(merged, tokenizer), adapted_logits, atol=1e-4, rtol=1e-4)


def test_lora_trains_few_parameters_and_loss_falls(lora_run):
    meta = lora_run["meta"]
    total = meta["sharding_per_rank"][0]["total_numel"]
    assert 0 < meta["lora"]["parameters"] < 0.2 * total
    assert lora_run["summary"]["last_loss"] < lora_run["summary"]["first_loss"] - 0.5  # nats


def test_empty_adapter_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({}, str(tmp_path / "adapter_model.safetensors"))  # what the ZeRO-3 bug wrote: 0 tensors
    with pytest.raises(FinemedError, match="empty.*TRL#4416"):
        check_adapter(tmp_path)
    save_file({"m.lora_A.weight": torch.ones(2, 2), "m.lora_B.weight": torch.zeros(2, 2)},
              str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(FinemedError, match="lora_B weights at zero"):
        check_adapter(tmp_path)
