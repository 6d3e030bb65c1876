"""Typed configs of the training stages. The YAML files in ``configs/`` mirror these classes; each field's
``description`` is its documentation (``tests/test_config.py`` fails on a field without one)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from finemed_ray.config import StrictModel


class RunSection(StrictModel):
    name: str = Field(description="Run name; checkpoints, prepared data and logs live under <storage_path>/<name>.")
    storage_path: str = Field(
        description="Ray Train RunConfig storage: s3://bucket/prefix or a local directory shared by all nodes."
    )
    seed: int = Field(42, description="Seed for model init, data order and dropout.")
    max_failures: int = Field(
        2, ge=-1, description="Restarts from the last checkpoint after a worker dies (Ray FailureConfig); -1 = no limit."
    )

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not v or "/" in v or ".." in v or v.strip() != v:
            raise ValueError("must be a plain name without '/', '..' or surrounding spaces")
        return v


class ModelSection(StrictModel):
    path: str = Field(description="Base model: a local Hugging Face directory, an s3:// export, or a hub id.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Weights dtype during training; bfloat16 on GPUs, float32 on CPU."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations to save memory (paper: true).")


class DataSection(StrictModel):
    path: str = Field(description="SFT conversations: a .jsonl/.parquet file or a prefix of them, local or s3://.")
    max_length: int = Field(1024, ge=8, description="Tokens per conversation; longer ones are cut (paper: 1024).")
    system_prompt: str | None = Field(
        "You are a helpful professional doctor.",
        description="System message added to conversations that have none (paper's prompt); null for none.",
    )
    department: str | None = Field(
        None, description="Train only on rows of this primary department (curriculum stage 2); null keeps all."
    )
    subdepartment: str | None = Field(
        None, description="Train only on rows of this secondary department (curriculum stage 3); null keeps all."
    )
    eval_fraction: float = Field(
        0.0, ge=0, lt=1, description="Share of selected rows held out for eval loss, by a stable id hash (paper 0.1)."
    )
    overlong: Literal["truncate", "drop"] = Field(
        "truncate",
        description="Rows longer than max_length: cut them (counted as rows_truncated) or quarantine them (drop).",
    )
    shuffle_buffer: int = Field(
        10000, ge=0,
        description="Each epoch, every worker shuffles its rows in windows of this many (seeded by run.seed, rank "
                    "and epoch, so exact resume replays the same order); 0 trains in file order.",
    )


class TrainSection(StrictModel):
    learning_rate: float = Field(5e-6, gt=0, description="Peak learning rate (paper: 5e-6 for SFT).")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule after warm-up."
    )
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Fraction of steps spent warming up (paper: 0.1).")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (paper: 0.01).")
    epochs: int = Field(1, ge=1, description="Passes over the data (paper: 1).")
    per_device_batch_size: int = Field(1, ge=1, description="Conversations per worker per micro-batch.")
    gradient_accumulation_steps: int = Field(
        1, ge=1, description="Micro-batches per optimizer step; effective batch = this x batch x workers."
    )
    max_steps: int | None = Field(
        None, ge=1, description="Stop after this many optimizer steps; null = epochs x rows / effective batch."
    )
    logging_steps: int = Field(1, ge=1, description="Log loss and learning rate every N steps.")
    eval_steps: int | None = Field(
        None, ge=1, description="Eval loss every N steps (and always at the end); null = only at the end."
    )
    save_steps: int = Field(50, ge=1, description="Checkpoint to <storage_path>/<name> every N steps and at the end.")
    save_total_limit: int | None = Field(2, ge=1, description="Checkpoints kept in storage; null keeps all.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    packing: bool = Field(
        False,
        description="Padding-free packing: each micro-batch is one row of concatenated conversations, position "
        "ids restarting per conversation so they cannot attend to each other (no pad tokens).",
    )
    pack_length: int | Literal["auto", "single"] = Field(
        "auto",
        description="With packing: 'single' = one row per micro-batch; N = first-fit bins of <= N tokens per row; "
        "'auto' = single on flash attention kernels, else bins of data.max_length (eager/sdpa attention cost "
        "grows with the square of the row length).",
    )
    report_to: list[str] = Field(
        default_factory=lambda: ["tensorboard"], description="Trackers for loss/lr (tensorboard, wandb, mlflow...)."
    )


class LoraSection(StrictModel):
    enabled: bool = Field(False, description="Train LoRA adapters (peft) instead of all weights.")
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Modules that get adapters: a list of names (q_proj, v_proj...) or all-linear."
    )


class DeepSpeedSection(StrictModel):
    config: str | None = Field(
        "configs/deepspeed/zero3.json",
        description="DeepSpeed JSON (relative to the working dir); null trains with plain DDP.",
    )


class ScalingSection(StrictModel):
    num_workers: int = Field(2, ge=1, description="Ray Train workers (one process each; one GPU each with use_gpu).")
    use_gpu: bool = Field(False, description="Give each worker a GPU and use NCCL; false = CPU workers and gloo.")
    cpus_per_worker: float = Field(1.0, gt=0, description="Logical CPUs reserved per worker.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="How workers are placed on nodes; STRICT_SPREAD puts each worker on its own node."
    )


class RaySection(StrictModel):
    address: str | None = Field(
        None, description="Ray cluster to join; null = the job's cluster under `ray job submit`, else a local one."
    )
    local_num_cpus: int = Field(
        4, ge=2, description="Logical CPUs of a local cluster (>= workers + 2 so Ray Data read tasks can run)."
    )


class OutputSection(StrictModel):
    export_path: str = Field(description="Consolidated Hugging Face export (local or s3://), written when done.")


class SFTJobConfig(StrictModel):
    run: RunSection = Field(description="Run identity and where its state lives.")
    model: ModelSection = Field(description="The model being fine-tuned.")
    data: DataSection = Field(description="The SFT conversations.")
    train: TrainSection = Field(default_factory=TrainSection, description="Optimisation hyper-parameters.")
    lora: LoraSection = Field(
        default_factory=LoraSection,
        description="LoRA instead of full fine-tuning; the export is then the merged model plus <export>/adapter.",
    )
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection, description="DeepSpeed (ZeRO-3) settings.")
    scaling: ScalingSection = Field(default_factory=ScalingSection, description="Ray Train workers.")
    ray: RaySection = Field(default_factory=RaySection, description="Which Ray cluster runs the job.")
    output: OutputSection = Field(description="Where the final model goes.")

    @model_validator(mode="after")
    def _cpu_dtype(self) -> "SFTJobConfig":
        if not self.scaling.use_gpu and self.model.dtype == "float16":
            raise ValueError("model.dtype: float16 training needs a GPU (scaling.use_gpu=true)")
        return self


class DPOSection(StrictModel):
    beta: float = Field(0.1, gt=0, description="DPO temperature: how far the policy may move from the reference (paper 0.1).")
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = Field(
        "sigmoid", description="DPO loss variant (TRL loss_type); sigmoid is the original DPO loss."
    )
    max_prompt_length: int | None = Field(
        None, ge=1, description="Prompt tokens kept (cut from the left); null = only data.max_length applies."
    )
    sft_weight: float = Field(
        0.0, ge=0, description="Weight of an NLL (SFT) loss on the chosen answer added to the DPO loss (RPO, TRL "
        "loss_type [<loss_type>, sft]); keeps the chosen answers likely while the rejected are pushed down. "
        "0 = plain DPO (the paper)."
    )


class DPOJobConfig(SFTJobConfig):
    """A DPO stage: the SFT sections (data.path points at preference pairs) plus ``dpo``. The frozen reference
    is the starting model itself; under ZeRO-3 it is sharded like the policy (with LoRA: the adapter disabled)."""

    dpo: DPOSection = Field(default_factory=DPOSection, description="Preference-optimisation settings.")
