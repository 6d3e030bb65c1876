"""LoRA (peft) for every training stage: the adapter config, a check that the saved adapter is real, and the
merged export that vLLM and transformers load like any model (and the next stage starts from).

Under ZeRO-3 the adapter is saved by gathering its partitions. transformers < 5 wrote an *empty*
``adapter_model.safetensors`` there unless ``stage3_gather_16bit_weights_on_model_save`` was set (TRL#4416);
``check_adapter`` refuses such an adapter instead of publishing a model that silently equals its base.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from finemed_ray.errors import FinemedError
from finemed_ray.train.configs import LoraSection

ADAPTER_DIR = "adapter"  # <export>/adapter holds the adapter next to the merged weights


def lora_config(section: LoraSection):
    from peft import LoraConfig

    return LoraConfig(
        r=section.r,
        lora_alpha=section.alpha,
        lora_dropout=section.dropout,
        target_modules=section.target_modules,
        task_type="CAUSAL_LM",
    )


def check_adapter(adapter_dir: Path) -> dict[str, Any]:
    """Fail unless the saved adapter has LoRA tensors and training moved them (``lora_B`` starts at zero)."""
    from safetensors.torch import load_file

    path = Path(adapter_dir) / "adapter_model.safetensors"
    if not path.is_file():
        raise FinemedError(f"LoRA training saved no adapter at {path}")
    tensors = load_file(str(path))
    lora_b = {k: v for k, v in tensors.items() if "lora_B" in k}
    if not tensors or not lora_b:
        raise FinemedError(
            f"the saved LoRA adapter {path} is empty ({path.stat().st_size} bytes, {len(tensors)} tensors): the "
            "ZeRO-3 save did not gather it (TRL#4416); set stage3_gather_16bit_weights_on_model_save=true"
        )
    nonzero_b = sum(int(v.abs().sum().item() > 0) for v in lora_b.values())
    if nonzero_b == 0:
        raise FinemedError(f"the saved LoRA adapter {path} has all lora_B weights at zero: training did not change it")
    return {
        "tensors": len(tensors),
        "parameters": int(sum(v.numel() for v in tensors.values())),
        "lora_B_nonzero": nonzero_b,
        "lora_B_total": len(lora_b),
        "config": json.loads((Path(adapter_dir) / "adapter_config.json").read_text()),
    }


def merge_adapter(base_dir: str, adapter_dir: Path, out_dir: Path, dtype: str) -> None:
    """Write base + adapter merged into plain weights at ``out_dir`` and the adapter itself under it.

    Runs on one process after training, with DeepSpeed's from_pretrained hook switched off: under ZeRO-3 a
    from_pretrained would otherwise partition the base model across ranks (a collective only rank 0 joins)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=getattr(torch, dtype))
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(str(out_dir))
    shutil.copytree(adapter_dir, Path(out_dir) / ADAPTER_DIR, dirs_exist_ok=True)
