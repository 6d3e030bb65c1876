"""The Ray Train worker loop every training stage runs: TRL trainers under DeepSpeed ZeRO-3, fed by Ray Data.

:func:`train_loop` runs on each worker: it adopts Ray's process group for DeepSpeed, loads the tokenizer and model,
resumes from ``ray.train.get_checkpoint()`` (the data position; DeepSpeed's universal checkpoint when the worker
count changed), streams this worker's rows, trains with the resume/report callbacks, evaluates, saves (merging a
LoRA adapter), publishes the export with its metadata and reports. What differs between stages comes from a
:class:`StageWorker` named by the driver (``loop_cfg["worker"]``, ``"module:Class"``): the stage's config class,
columns, training arguments, TRL trainer, train dataset and extra export metadata
(``finemed_ray/train/stages/*.py``).

Data order: with a ``loop_cfg["order"]`` (the run's ``DataOrder``: SFT, DPO, GRPO) each worker reads its slice of
the global order (``OrderedSource``) and resumes on any worker count; without one (GRPO with
``grpo.num_iterations`` > 1) each worker reads its own shard (``ShardSource``) and resumes on the same worker count
only.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from finemed_ray import storage
from finemed_ray.errors import FinemedError

log = logging.getLogger(__name__)


class StageWorker:
    """A stage's part of the worker loop. One instance per worker, built after the config is validated."""

    config_class: type  # the stage's XJobConfig: validates loop_cfg["job"]
    columns: tuple[str, ...] = ()  # the prepared columns the trainer reads

    def __init__(self, cfg: Any, loop_cfg: dict[str, Any], rank: int, world: int):
        self.cfg, self.loop_cfg, self.rank, self.world = cfg, loop_cfg, rank, world

    def probe_example(self, tokenizer: Any) -> dict[str, Any]:
        """The row TRL peeks at in its constructor, before the shard is armed."""
        return {c: [tokenizer.eos_token_id] for c in self.columns}

    def features(self) -> Any:
        """``datasets.Features`` of the rows the trainer gets (train and eval)."""
        import datasets

        return datasets.Features({c: datasets.List(datasets.Value("int32")) for c in self.columns})

    def training_arguments(self, common: dict[str, Any]) -> Any:
        """The TRL config (``XConfig``) from the stages' common arguments (:func:`training_kwargs`)."""
        raise NotImplementedError

    def trainer_class(self) -> type:
        raise NotImplementedError

    def trainer_kwargs(self, model: Any, tokenizer: Any) -> dict[str, Any]:
        """Extra keyword arguments of the trainer (collators, reward functions)."""
        return {}

    def train_dataset(self, source: Any, features: Any) -> Any:
        from finemed_ray.train.ray_shard import shard_to_iterable_dataset

        return shard_to_iterable_dataset(source, features)

    def before_train(self, trainer: Any, tokenizer: Any) -> None:
        """After the trainer is built, before the shard is armed."""

    def after_train(self, trainer: Any) -> None:
        """On every rank, after training and before the final save (collectives allowed)."""

    def export_metadata(self, trainer: Any) -> dict[str, Any]:
        """Rank 0: the stage's keys of the export's metadata."""
        return {}


def load_class(path: str) -> type:
    """``"package.module:Class"`` -> the class."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def training_kwargs(cfg: Any, max_steps: int, ds_config: dict | None, output_dir: str, rank: int = 0
                    ) -> dict[str, Any]:
    """The Hugging Face training arguments every stage shares (its TRL config adds its own)."""
    import torch.distributed as dist

    t, use_gpu = cfg.train, cfg.scaling.use_gpu
    # The backend of the process group Ray Train created; none in a single process (a check of the arguments).
    backend = ("nccl" if use_gpu else "gloo") if dist.is_initialized() else None
    return dict(
        output_dir=output_dir,
        max_steps=max_steps,
        per_device_train_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # transformers 5: a float < 1 is a fraction of the steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        report_to=t.report_to,
        seed=cfg.run.seed,
        bf16=cfg.model.dtype == "bfloat16",
        fp16=cfg.model.dtype == "float16",
        use_cpu=not use_gpu,
        ddp_backend=backend,
        deepspeed=ds_config,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        remove_unused_columns=False,
        dataloader_num_workers=0,  # no read-ahead: rows handed out = rows trained (the data position relies on it)
        ignore_data_skip=True,  # on resume the shard skips trained rows itself (exactly, see train/resume.py)
        disable_tqdm=rank != 0,
    )


def train_loop(loop_cfg: dict[str, Any]) -> None:
    """Runs on every Ray Train worker; ``loop_cfg`` comes from ``finemed_ray.train.driver.StageJob.run``."""
    worker_class = load_class(loop_cfg["worker"])
    cfg = worker_class.config_class.model_validate(loop_cfg["job"])
    use_gpu = cfg.scaling.use_gpu
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported anywhere
    import ray.train
    import torch
    import torch.distributed as dist
    from ray.train.huggingface.transformers import RayTrainReportCallback
    from transformers import AutoModelForCausalLM

    from finemed_ray.models.loading import load_tokenizer, resolve_model_path
    from finemed_ray.train.export import finalize_export, loss_history
    from finemed_ray.train.lora import lora_config
    from finemed_ray.train.packing import check_packing_attention
    from finemed_ray.train.ray_shard import OrderedSource, ShardSource, shard_to_iterable_dataset
    from finemed_ray.train.resume import (
        DataOrder,
        DataPosition,
        DataPositionCallback,
        ResumeLoadedCallback,
        UniversalLoadFixCallback,
        convert_to_universal,
        global_sequence,
    )

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    stage = worker_class(cfg, loop_cfg, rank, world)
    plan = loop_cfg["plan"]
    ds_config = loop_cfg["deepspeed"]
    if ds_config is not None:
        import deepspeed

        # Ray already created the process group; this makes DeepSpeed adopt it (and see the real world size).
        deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")

    model_dir = resolve_model_path(cfg.model.path)
    tokenizer = load_tokenizer(model_dir)
    work = Path(tempfile.mkdtemp(prefix=f"finemed-{cfg.run.name}-r{rank}-"))
    order = DataOrder.from_dict(loop_cfg["order"]) if loop_cfg.get("order") else None

    # A restarted worker (FailureConfig) or a re-run with the same run name gets the last reported checkpoint.
    resume_dir, resumed_from, position, universal_dir = None, None, None, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        local = work / "resume"
        # The download goes through the run's RetryingS3FileSystem: a transient outage is waited out here.
        checkpoint.to_directory(str(local))
        resume_dir = local / RayTrainReportCallback.CHECKPOINT_NAME
        position = DataPosition.load(resume_dir)
        if order is None:
            position.check_compatible(world, plan)  # per-worker shards: the same worker count only
        else:
            position.check_order(world, order, plan)
        resumed_from = position.global_step
        if position.world_size != world and ds_config is not None:
            # ZeRO shards are per data-parallel rank: another worker count loads DeepSpeed's universal checkpoint.
            universal_dir = convert_to_universal(resume_dir)
            ds_config = {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}
        log.warning("rank %d: resuming from step %d (epoch %d) written by %d workers, on %d workers", rank,
                    position.global_step, position.epoch, position.world_size, world)
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(work / "tensorboard")
    args = stage.training_arguments(
        training_kwargs(cfg, plan["max_steps"], ds_config, str(work / "checkpoints"), rank))
    # Built after the arguments: with ZeRO-3 they register the DeepSpeed config, so from_pretrained
    # partitions the weights across ranks while loading instead of materialising a full copy per rank.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, cfg.model.dtype))
    if cfg.train.packing:
        check_packing_attention(model)  # an attention kernel without a mask function would let rows leak

    probe, columns = stage.probe_example(tokenizer), stage.columns
    shard = ray.train.get_dataset_shard("train")
    if order is not None:
        # This worker's rows of the run's global order (same rows and order as a per-worker shard when the worker
        # count is the order's; any other count gets the same global steps, sliced differently).
        source = OrderedSource(shard, order, world, rank, probe_example=probe, columns=columns,
                               shuffle_buffer=cfg.data.shuffle_buffer, seed=str(cfg.run.seed))
        if position is not None:
            source.resume(position)
    else:
        source = ShardSource(shard, probe_example=probe, columns=columns, shuffle_buffer=cfg.data.shuffle_buffer,
                             shuffle_seed=f"{cfg.run.seed}:rank{rank}")
        if position is not None:
            source.resume(position.epoch, position.rows_in_epoch[rank], position.epoch_digest[rank],
                          position.seen_ids[rank])
    features = stage.features()
    eval_source = None
    if loop_cfg.get("has_eval"):
        eval_source = ShardSource(ray.train.get_dataset_shard("eval"), source.probe_example, source.columns)

    def gather(obj: Any) -> list[Any]:
        out = [None] * world
        dist.all_gather_object(out, obj)
        return out

    resume_loaded = ResumeLoadedCallback()
    universal_fix = [UniversalLoadFixCallback(universal_dir)] if universal_dir else []
    trainer = stage.trainer_class()(
        model=model,
        args=args,
        train_dataset=stage.train_dataset(source, features),
        eval_dataset=shard_to_iterable_dataset(eval_source, features) if eval_source else None,
        processing_class=tokenizer,
        peft_config=lora_config(cfg.lora) if cfg.lora.enabled else None,
        **stage.trainer_kwargs(model, tokenizer),
        callbacks=[
            *universal_fix,  # first: per-group optimizer settings back before anything reads them
            DataPositionCallback(source, plan, rank, world, gather, order=order),  # before the upload
            RayTrainReportCallback(),
            resume_loaded,
        ],
    )
    stage.before_train(trainer, tokenizer)
    source.arm()
    if eval_source:
        eval_source.arm()
    t0 = time.time()
    try:
        train_output = trainer.train(resume_from_checkpoint=str(resume_dir) if resume_dir else None)
    except FinemedError:
        raise
    except Exception as e:
        # Only a failure while the checkpoint's state was being restored is the checkpoint's fault; anything
        # later (an S3 outage at the next upload, a killed peer) is reported as itself.
        if resume_dir is None or resume_loaded.loaded:
            raise
        where = checkpoint.path if checkpoint is not None else str(resume_dir)
        if storage.is_s3(cfg.run.storage_path) and not where.startswith("s3://"):
            where = f"s3://{where}"
        raise FinemedError(f"the checkpoint at {where} (step {resumed_from}) cannot be restored, it may be "
                           f"corrupt: {type(e).__name__}: {e}") from e
    train_seconds = time.time() - t0
    stage.after_train(trainer)
    # Final eval loss on the held-out split (paper: 10%), on every rank: ZeRO-3 forward passes are collective.
    eval_metrics = trainer.evaluate() if eval_source else {}

    sharding = sharding_info(trainer, ds_config, rank)
    sharding["node_id"] = ray.get_runtime_context().get_node_id()
    export_local = work / "export"
    adapter_local = work / "adapter"
    # Every rank: ZeRO-3 gathers the (small) adapter or the full weights onto rank 0.
    trainer.save_model(str(adapter_local if cfg.lora.enabled else export_local))
    seen = gather({"count": len(source.seen_ids), "ids": source.seen_ids, "sharding": sharding})
    if rank == 0:
        lora_info = None
        if cfg.lora.enabled:
            from finemed_ray.train.lora import check_adapter, merge_adapter

            lora_info = check_adapter(adapter_local)  # refuses an empty adapter (TRL#4416)
            merge_adapter(model_dir, adapter_local, export_local, cfg.model.dtype)
        tokenizer.save_pretrained(str(export_local))
        if order is not None:
            # Every id trained, all attempts and worker counts, in the run's global order.
            all_ids = source.seen_before + global_sequence(order, world, [s["ids"] for s in seen],
                                                           source.world_start_step, trainer.state.global_step)
            world_start_step = source.world_start_step
        else:
            all_ids, world_start_step = [i for s in seen for i in s["ids"]], 0
        finalize_export(
            export_local,
            cfg.output.export_path,
            {
                "stage": loop_cfg["stage"],
                "run": cfg.run.name,
                "parent_model": cfg.model.path,
                "data": cfg.data.path,
                "prepare": loop_cfg["prepare"],
                "plan": plan,
                "config": loop_cfg["job"],
                "world_size": world,
                "global_step": trainer.state.global_step,
                "resumed_from_step": resumed_from,
                "resumed_from_world_size": position.world_size if position is not None else None,
                "data_order": order.to_dict() if order is not None else None,
                "lora": lora_info,
                "train_seconds": round(train_seconds, 3),
                "train_loss": train_output.training_loss,
                "samples_seen": len(all_ids),
                "samples_seen_per_rank": [s["count"] for s in seen],
                "distinct_samples_seen": len(set(all_ids)),
                "loss_history": loss_history(trainer.state.log_history),
                "eval_loss": eval_metrics.get("eval_loss"),
                "eval_metrics": eval_metrics,
                "eval_history": [
                    {"step": e["step"], "eval_loss": e["eval_loss"]} for e in trainer.state.log_history if "eval_loss" in e
                ],
                **stage.export_metadata(trainer),
                "zero_stage": (ds_config or {}).get("zero_optimization", {}).get("stage"),
                "sharding_per_rank": [s["sharding"] for s in seen],
            },
        )
        # Which rows each rank trained on, for audits and for checking resume/filters (ids only, no text).
        # per_rank: since this worker count took over (world_start_step); global: everything, in order.
        storage.write_json(
            storage.join(cfg.run.storage_path, cfg.run.name, "samples_seen.json"),
            {"per_rank": [s["ids"] for s in seen], "world_start_step": world_start_step, "global": all_ids},
        )
        tb = work / "tensorboard"
        if tb.is_dir():
            storage.upload_dir(str(tb), storage.join(cfg.run.storage_path, cfg.run.name, "tensorboard"))
    dist.barrier()
    ray.train.report(
        {
            "global_step": trainer.state.global_step,
            "train_loss": train_output.training_loss,
            "samples_seen_rank": len(source.seen_ids),
            "done": True,
        }
    )
    shutil.rmtree(work, ignore_errors=True)


def sharding_info(trainer: Any, ds_config: dict | None, rank: int) -> dict[str, Any]:
    """What this rank holds: under ZeRO-3 each parameter's local partition is ``ds_tensor``."""
    params = list(trainer.model_wrapped.module.parameters() if ds_config else trainer.model.parameters())
    engine_optimizer = getattr(trainer.model_wrapped, "optimizer", None) if ds_config else trainer.optimizer
    return {
        "rank": rank,
        "local_numel": sum(getattr(p, "ds_tensor", p).numel() for p in params),
        "total_numel": sum(getattr(p, "ds_numel", p.numel()) for p in params),
        "optimizer": type(engine_optimizer).__name__,
    }


__all__ = ["StageWorker", "class_path", "load_class", "sharding_info", "train_loop", "training_kwargs"]
