"""Supervised fine-tuning on Ray Train: TRL's SFTTrainer under DeepSpeed ZeRO-3, fed by Ray Data shards.

Driver (``SFTJob``): validate inputs -> Ray Data prepares (validates, tokenises, quarantines) the dataset into
``<storage>/<run>/prepared`` -> ``TorchTrainer`` runs ``sft_train_loop`` on N workers -> rank 0 publishes a
consolidated Hugging Face export. Nothing assumes a filesystem shared between nodes: data, checkpoints and the
export move through ``storage`` (S3 or a local path).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finemed_ray import storage
from finemed_ray.errors import ConfigError, FinemedError
from finemed_ray.cluster import ensure_ray_address
from finemed_ray.train.configs import DPOJobConfig, SFTJobConfig

log = logging.getLogger(__name__)



def load_deepspeed_config(path: str | None, use_gpu: bool = True) -> dict | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"deepspeed.config: file not found: {path}")
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed.config: {path} is not valid JSON: {e}") from None
    return deepspeed_config_for_device(cfg, use_gpu)


def deepspeed_config_for_device(cfg: dict, use_gpu: bool) -> dict:
    """The DeepSpeed config as it should run on this device kind.

    On CPU workers (gloo) ``overlap_comm`` is turned off: it overlaps gradient reduction with backward on a
    separate CUDA stream, and without one it only adds bucket copies and synchronisation (bench.train_overhead,
    13M model, ZeRO-3 step 3512 -> 3342 ms with it off)."""
    zero = cfg.get("zero_optimization")
    if not use_gpu and isinstance(zero, dict) and zero.get("overlap_comm", False) is not False:
        cfg = {**cfg, "zero_optimization": {**zero, "overlap_comm": False}}
    return cfg


@dataclass
class StepPlan:
    rows_valid: int
    rows_per_worker: int
    rows_unused: int  # Ray's equal split gives every worker the same count; the remainder (< workers) is unused
    micro_rows: int  # rows per worker per optimizer step (batch x gradient accumulation)
    steps_per_epoch: int
    max_steps: int

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def plan_steps(rows_valid: int, cfg: SFTJobConfig, order: Any = None) -> StepPlan:
    """``rows_valid``: the training rows (valid, selected, not held out for eval). With the run's ``DataOrder``
    (``finemed_ray.train.resume``) the plan follows it on ``cfg.scaling.num_workers`` workers, which may differ from
    the order's split count; ``rows_per_worker`` is then rank 0's rows per epoch."""
    workers = cfg.scaling.num_workers
    if order is not None:
        return StepPlan(
            rows_valid,
            order.worker_rows_before(order.steps_per_epoch, workers, 0),
            rows_valid - order.splits * order.rows_per_split,
            order.global_batch // workers,
            order.steps_per_epoch,
            cfg.train.max_steps or order.steps_per_epoch * cfg.train.epochs,
        )
    per_worker = rows_valid // workers
    if per_worker == 0:
        raise FinemedError(
            f"{cfg.data.path}: {rows_valid} training rows is fewer than scaling.num_workers={workers}"
        )
    micro = cfg.train.per_device_batch_size * cfg.train.gradient_accumulation_steps
    steps_per_epoch = math.ceil(per_worker / micro)
    max_steps = cfg.train.max_steps or steps_per_epoch * cfg.train.epochs
    return StepPlan(rows_valid, per_worker, rows_valid - per_worker * workers, micro, steps_per_epoch, max_steps)


def ensure_ray(cfg: SFTJobConfig) -> None:
    ensure_ray_address(cfg.ray.address, cfg.ray.local_num_cpus)


# Ray Train (v2) keeps its checkpoint bookkeeping here; re-running a run name with it present resumes.
RAY_CHECKPOINT_STATE_FILE = "checkpoint_manager_snapshot.json"


def _root_cause(e: BaseException) -> str:
    """The innermost error of a Ray Train failure chain, as 'Type: message'."""
    failures = getattr(e, "worker_failures", None)  # WorkerGroupError: rank -> exception
    if failures:
        rank, e = sorted(failures.items())[0]
    seen = set()
    while True:
        nxt = e.__cause__ or getattr(e, "cause", None) or e.__context__
        if nxt is None or id(nxt) in seen:
            break
        seen.add(id(e))
        e = nxt
    return f"{type(e).__name__}: {e}"


# ----------------------------------------------------------------------------------------------- worker side
def sft_train_loop(loop_cfg: dict[str, Any]) -> None:
    """Runs on every Ray Train worker. ``loop_cfg["kind"]``: "sft" (TRL SFTTrainer) or "dpo" (TRL DPOTrainer)."""
    kind = loop_cfg.get("kind", "sft")
    cfg = (DPOJobConfig if kind == "dpo" else SFTJobConfig).model_validate(loop_cfg["job"])
    use_gpu = cfg.scaling.use_gpu
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported anywhere
    import datasets
    import ray.train
    import torch
    import torch.distributed as dist
    from ray.train.huggingface.transformers import RayTrainReportCallback
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from finemed_ray.models.loading import load_tokenizer, resolve_model_path
    from finemed_ray.train.export import finalize_export, loss_history
    from finemed_ray.train.ray_shard import (
        OrderedSource,
        RayShardDataLoaderMixin,
        ShardSource,
        shard_to_iterable_dataset,
    )
    from finemed_ray.train.lora import lora_config
    from finemed_ray.train.packing import (
        check_packing_attention,
        packing_collator,
        packing_sft_config_kwargs,
        resolve_pack_length,
    )
    from finemed_ray.train.resume import (
        DataOrder,
        DataPosition,
        DataPositionCallback,
        ResumeLoadedCallback,
        UniversalLoadFixCallback,
        convert_to_universal,
        global_sequence,
    )

    class RaySFTTrainer(RayShardDataLoaderMixin, SFTTrainer):
        pass

    from finemed_ray.train.dpo_packing import DPOPackingMixin

    class RayDPOTrainer(RayShardDataLoaderMixin, DPOPackingMixin, DPOTrainer):  # packing: train/dpo_packing.py
        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset  # rows arrive tokenised by finemed_ray.data.dpo_prepare exactly as TRL would

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    ds_config = loop_cfg["deepspeed"]
    if ds_config is not None:
        import deepspeed

        # Ray already created the process group; this makes DeepSpeed adopt it (and see the real world size).
        deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")

    model_dir = resolve_model_path(cfg.model.path)
    tokenizer = load_tokenizer(model_dir)
    work = Path(tempfile.mkdtemp(prefix=f"finemed-{cfg.run.name}-r{rank}-"))
    order = DataOrder.from_dict(loop_cfg["order"])

    # A restarted worker (FailureConfig) or a re-run with the same run name gets the last reported checkpoint.
    resume_dir, resumed_from, position, universal_dir = None, None, None, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        local = work / "resume"
        # The download goes through the run's RetryingS3FileSystem: a transient outage is waited out here.
        checkpoint.to_directory(str(local))
        resume_dir = local / RayTrainReportCallback.CHECKPOINT_NAME
        position = DataPosition.load(resume_dir)
        position.check_order(world, order, loop_cfg["plan"])
        resumed_from = position.global_step
        if position.world_size != world and ds_config is not None:
            # ZeRO shards are per data-parallel rank: another worker count loads DeepSpeed's universal checkpoint.
            universal_dir = convert_to_universal(resume_dir)
            ds_config = {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}
        log.warning("rank %d: resuming from step %d (epoch %d) written by %d workers, on %d workers", rank,
                    position.global_step, position.epoch, position.world_size, world)
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(work / "tensorboard")
    t = cfg.train
    bf16 = cfg.model.dtype == "bfloat16"
    common = dict(
        output_dir=str(work / "checkpoints"),
        max_steps=loop_cfg["plan"]["max_steps"],
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
        bf16=bf16,
        fp16=cfg.model.dtype == "float16",
        use_cpu=not use_gpu,
        ddp_backend="nccl" if use_gpu else "gloo",
        deepspeed=ds_config,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        max_length=cfg.data.max_length,
        remove_unused_columns=False,
        dataloader_num_workers=0,  # no read-ahead: rows handed out = rows trained (the data position relies on it)
        ignore_data_skip=True,  # on resume the shard skips trained rows itself (exactly, see train/resume.py)
        disable_tqdm=rank != 0,
        eval_strategy="steps" if loop_cfg["has_eval"] and t.eval_steps else "no",
        eval_steps=t.eval_steps,
        per_device_eval_batch_size=t.per_device_batch_size,
    )
    if kind == "dpo":
        args = DPOConfig(
            **common,
            beta=cfg.dpo.beta,
            # RPO: DPO's loss plus a weighted NLL on the chosen answer (TRL sums the listed losses with these weights)
            loss_type=[cfg.dpo.loss_type] + (["sft"] if cfg.dpo.sft_weight > 0 else []),
            loss_weights=[1.0, cfg.dpo.sft_weight] if cfg.dpo.sft_weight > 0 else None,
            truncation_mode="keep_start",  # prepare already fitted every pair into max_length
        )
    else:
        args = SFTConfig(
            **common,
            dataset_kwargs={"skip_prepare_dataset": True},  # rows arrive tokenised, labelled and truncated
            **(packing_sft_config_kwargs() if t.packing else {}),
        )
    # Built after the arguments: with ZeRO-3 they register the DeepSpeed config, so from_pretrained
    # partitions the weights across ranks while loading instead of materialising a full copy per rank.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, cfg.model.dtype))
    if t.packing:
        check_packing_attention(model)  # an attention kernel without a mask function would let rows leak

    eos = tokenizer.eos_token_id
    columns = ("prompt_ids", "chosen_ids", "rejected_ids") if kind == "dpo" else ("input_ids", "labels")
    # This worker's rows of the run's global order (same rows and order as a per-worker shard when the worker
    # count is the order's; any other count gets the same global steps, sliced differently).
    source = OrderedSource(
        ray.train.get_dataset_shard("train"), order, world, rank, probe_example={c: [eos] for c in columns},
        columns=columns, shuffle_buffer=cfg.data.shuffle_buffer, seed=str(cfg.run.seed),
    )
    features = datasets.Features({c: datasets.List(datasets.Value("int32")) for c in columns})
    eval_source = None
    if loop_cfg["has_eval"]:
        eval_source = ShardSource(ray.train.get_dataset_shard("eval"), source.probe_example, source.columns)
    def gather(obj: Any) -> list[Any]:
        out = [None] * world
        dist.all_gather_object(out, obj)
        return out

    if position is not None:
        source.resume(position)
    resume_loaded = ResumeLoadedCallback()
    universal_fix = [UniversalLoadFixCallback(universal_dir)] if universal_dir else []
    trainer_kwargs: dict[str, Any] = {}
    if kind == "sft" and t.packing:
        pack_length = resolve_pack_length(t.pack_length, cfg.data.max_length,
                                          getattr(model.config, "_attn_implementation", None))
        trainer_kwargs["data_collator"] = packing_collator(tokenizer, pack_length=pack_length)
    if kind == "dpo" and t.packing:
        # chosen and rejected sequences flat, position ids restarting per sequence (finemed_ray/train/dpo_packing.py)
        trainer_kwargs["dpo_packing"] = True
        trainer_kwargs["dpo_pack_length"] = resolve_pack_length(t.pack_length, cfg.data.max_length,
                                                                getattr(model.config, "_attn_implementation", None))
    # DPO: no ref_model given -> TRL loads a frozen copy of the starting weights and, under DeepSpeed, wraps it
    # in its own ZeRO-3 inference engine (sharded like the policy); with LoRA the adapter is disabled instead.
    trainer = (RayDPOTrainer if kind == "dpo" else RaySFTTrainer)(
        model=model,
        args=args,
        train_dataset=shard_to_iterable_dataset(source, features),
        eval_dataset=shard_to_iterable_dataset(eval_source, features) if eval_source else None,
        processing_class=tokenizer,
        peft_config=lora_config(cfg.lora) if cfg.lora.enabled else None,
        **trainer_kwargs,
        callbacks=[
            *universal_fix,  # first: per-group optimizer settings back before anything reads them
            DataPositionCallback(source, loop_cfg["plan"], rank, world, gather, order=order),  # before the upload
            RayTrainReportCallback(),
            resume_loaded,
        ],
    )
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
    # Final eval loss on the held-out split (paper: 10%), on every rank: ZeRO-3 forward passes are collective.
    eval_metrics = trainer.evaluate() if eval_source else {}

    # What this rank actually holds: under ZeRO-3 each parameter's local partition is `ds_tensor`.
    params = list(trainer.model_wrapped.module.parameters() if ds_config else trainer.model.parameters())
    engine_optimizer = getattr(trainer.model_wrapped, "optimizer", None) if ds_config else trainer.optimizer
    sharding = {
        "rank": rank,
        "local_numel": sum(getattr(p, "ds_tensor", p).numel() for p in params),
        "total_numel": sum(getattr(p, "ds_numel", p.numel()) for p in params),
        "optimizer": type(engine_optimizer).__name__,
        "node_id": ray.get_runtime_context().get_node_id(),
    }

    export_local = work / "export"
    lora_info = None
    if cfg.lora.enabled:
        adapter_local = work / "adapter"
        trainer.save_model(str(adapter_local))  # every rank: ZeRO-3 gathers the (small) adapter onto rank 0
    else:
        trainer.save_model(str(export_local))  # every rank: ZeRO-3 gathers the full weights onto rank 0
    seen = gather({"count": len(source.seen_ids), "ids": source.seen_ids, "sharding": sharding})
    if rank == 0:
        if cfg.lora.enabled:
            from finemed_ray.train.lora import check_adapter, merge_adapter

            lora_info = check_adapter(adapter_local)  # refuses an empty adapter (TRL#4416)
            merge_adapter(model_dir, adapter_local, export_local, cfg.model.dtype)
        tokenizer.save_pretrained(str(export_local))
        # Every id trained, all attempts and worker counts, in the run's global order.
        all_ids = source.seen_before + global_sequence(order, world, [s["ids"] for s in seen],
                                                       source.world_start_step, trainer.state.global_step)
        history = loss_history(trainer.state.log_history)
        finalize_export(
            export_local,
            cfg.output.export_path,
            {
                "stage": loop_cfg.get("stage", "sft"),
                "run": cfg.run.name,
                "parent_model": cfg.model.path,
                "data": cfg.data.path,
                "prepare": loop_cfg["prepare"],
                "plan": loop_cfg["plan"],
                "config": loop_cfg["job"],
                "world_size": world,
                "global_step": trainer.state.global_step,
                "resumed_from_step": resumed_from,
                "resumed_from_world_size": position.world_size if position is not None else None,
                "data_order": order.to_dict(),
                "lora": lora_info,
                "train_seconds": round(train_seconds, 3),
                "train_loss": train_output.training_loss,
                "samples_seen": len(all_ids),
                "samples_seen_per_rank": [s["count"] for s in seen],
                "distinct_samples_seen": len(set(all_ids)),
                "loss_history": history,
                "eval_loss": eval_metrics.get("eval_loss"),
                "eval_metrics": eval_metrics,
                "eval_history": [
                    {"step": e["step"], "eval_loss": e["eval_loss"]} for e in trainer.state.log_history if "eval_loss" in e
                ],
                "zero_stage": (ds_config or {}).get("zero_optimization", {}).get("stage"),
                "sharding_per_rank": [s["sharding"] for s in seen],
            },
        )
        # Which rows each rank trained on, for audits and for checking resume/filters (ids only, no text).
        # per_rank: since this worker count took over (world_start_step); global: everything, in order.
        storage.write_json(
            storage.join(cfg.run.storage_path, cfg.run.name, "samples_seen.json"),
            {"per_rank": [s["ids"] for s in seen], "world_start_step": source.world_start_step, "global": all_ids},
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


# ----------------------------------------------------------------------------------------------- driver side
class SFTJob:
    """``setup`` checks every input before any compute; ``run`` prepares data and trains; ``save`` verifies the
    export and writes the job summary."""

    stage = "sft"
    kind = "sft"

    def __init__(self, cfg: SFTJobConfig):
        self.cfg = cfg
        self.run_uri = storage.join(cfg.run.storage_path, cfg.run.name)
        self.ds_config: dict | None = None
        self.prepare_summary: dict[str, Any] | None = None
        self.plan: StepPlan | None = None
        self.result = None
        self.t0 = time.time()

    def setup(self) -> "SFTJob":
        from finemed_ray.data.sft_prepare import input_files
        from finemed_ray.models.loading import load_tokenizer, resolve_model_path

        self.ds_config = load_deepspeed_config(self.cfg.deepspeed.config, self.cfg.scaling.use_gpu)
        input_files(self.cfg.data.path)  # missing or empty data fails here, naming the path
        load_tokenizer(resolve_model_path(self.cfg.model.path))  # no chat template fails here, naming the model
        storage.check_writable(self.run_uri)  # a missing bucket or read-only path fails now, not after training
        storage.check_writable(self.cfg.output.export_path)
        ensure_ray(self.cfg)
        return self

    def run(self) -> "SFTJob":
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train import TrainingFailedError
        from ray.train.torch import TorchConfig, TorchTrainer

        from finemed_ray.data.sft_prepare import RowSelection
        from finemed_ray.train.ray_shard import DeterministicSplitDataConfig

        cfg = self.cfg
        selection = RowSelection(cfg.data.department, cfg.data.subdepartment, cfg.data.eval_fraction)
        summary = self._reusable_prepared_data()
        resuming = summary is not None
        if summary is None:
            summary = self.prepare(selection)
            storage.write_json(self._prepare_record_uri(), {"fingerprint": self._data_fingerprint(),
                                                            "summary": summary.to_dict()})
        self.prepare_summary = summary.to_dict()
        log.info("prepared data: %s", json.dumps(self.prepare_summary))
        order = self._data_order(summary.rows_train, resuming)
        cfg = self.cfg  # gradient_accumulation_steps may have been fitted to the run's global batch
        self.plan = plan_steps(summary.rows_train, cfg, order)
        datasets = {"train": self.read_prepared(summary.prepared_uri, "train")}
        if summary.rows_eval:
            if summary.rows_eval < cfg.scaling.num_workers:
                raise FinemedError(
                    f"data.eval_fraction={cfg.data.eval_fraction} holds out {summary.rows_eval} rows, fewer than "
                    f"scaling.num_workers={cfg.scaling.num_workers}; raise it or set it to 0"
                )
            datasets["eval"] = self.read_prepared(summary.prepared_uri, "eval")

        fs, storage_path = storage.get_filesystem(cfg.run.storage_path)
        trainer = TorchTrainer(
            sft_train_loop,
            train_loop_config={
                "job": cfg.model_dump(mode="json"),
                "deepspeed": self.ds_config,
                "plan": self.plan.to_dict(),
                "prepare": self.prepare_summary,
                "stage": self.stage,
                "kind": self.kind,
                "has_eval": "eval" in datasets,
                "order": order.to_dict(),
            },
            scaling_config=ScalingConfig(
                num_workers=cfg.scaling.num_workers,
                use_gpu=cfg.scaling.use_gpu,
                resources_per_worker={"CPU": cfg.scaling.cpus_per_worker},
                placement_strategy=cfg.scaling.placement_strategy,
            ),
            run_config=RunConfig(
                name=cfg.run.name,
                storage_path=storage_path,
                storage_filesystem=fs,
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.save_total_limit),
                failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            ),
            torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
            datasets=datasets,
            # The run's order splits, whatever the worker count: exact resume on the same or another count.
            dataset_config=DeterministicSplitDataConfig(splits={"train": order.splits}),
        )
        try:
            self.result = trainer.fit()
        except TrainingFailedError as e:
            raise FinemedError(f"run {cfg.run.name} failed after run.max_failures={cfg.run.max_failures} "
                               f"restarts: {_root_cause(e)}") from e
        return self

    # What differs between stage kinds: how rows are prepared and read back.
    def prepare(self, selection):
        from finemed_ray.data.sft_prepare import prepare_sft

        cfg = self.cfg
        return prepare_sft(cfg.data.path, cfg.model.path, self.run_uri, cfg.data.max_length, cfg.data.system_prompt,
                           selection, overlong=cfg.data.overlong)

    def read_prepared(self, uri: str, split: str):
        from finemed_ray.data.sft_prepare import read_prepared

        return read_prepared(uri, split)

    def summary_class(self):
        from finemed_ray.data.sft_prepare import PrepareSummary

        return PrepareSummary

    def _data_order(self, rows_train: int, resuming: bool):
        """The run's global row order (``finemed_ray.train.resume.DataOrder``): set at its first start and kept in
        ``<run>/data_order.json``; a run resumed on another worker count keeps it and its global batch, with
        ``train.gradient_accumulation_steps`` recomputed (and logged) for the new count."""
        from finemed_ray.train.resume import ORDER_FILE, DataOrder

        cfg = self.cfg
        uri = storage.join(self.run_uri, ORDER_FILE)
        if resuming and storage.exists(uri):
            order = DataOrder.from_dict(storage.read_json(uri))
        else:  # a fresh run, or one whose checkpoints predate the order file: the order is today's split
            t = cfg.train
            try:
                order = DataOrder.first_start(rows_train, cfg.scaling.num_workers, t.per_device_batch_size,
                                              t.gradient_accumulation_steps)
            except FinemedError as e:
                raise FinemedError(f"{cfg.data.path}: {e}") from None
            storage.write_json(uri, order.to_dict())
        ga = order.fit(cfg.scaling.num_workers, cfg.train.per_device_batch_size)
        if ga != cfg.train.gradient_accumulation_steps:
            log.warning(
                "run %s keeps its global batch of %d rows per optimizer step on %d workers: "
                "train.gradient_accumulation_steps %d -> %d (train.per_device_batch_size=%d)", cfg.run.name,
                order.global_batch, cfg.scaling.num_workers, cfg.train.gradient_accumulation_steps, ga,
                cfg.train.per_device_batch_size,
            )
            cfg = cfg.model_copy(deep=True)
            cfg.train.gradient_accumulation_steps = ga
            self.cfg = cfg
        return order

    # Resume support: a run that already has checkpoints must train on exactly the rows it was prepared with.
    def _prepare_record_uri(self) -> str:
        return storage.join(self.run_uri, "prepare.json")

    def _data_fingerprint(self) -> dict[str, Any]:
        fingerprint = {"data": self.cfg.data.model_dump(mode="json"), "model": self.cfg.model.path}
        if self.kind == "dpo":
            fingerprint["dpo_max_prompt_length"] = self.cfg.dpo.max_prompt_length
        return fingerprint

    def _reusable_prepared_data(self):
        if not storage.exists(storage.join(self.run_uri, RAY_CHECKPOINT_STATE_FILE)):
            return None  # a fresh run: (re)prepare
        if not storage.exists(self._prepare_record_uri()):
            raise FinemedError(f"{self.run_uri} has checkpoints but no {self._prepare_record_uri()}; "
                               "it cannot be resumed exactly: use a new run.name")
        record = storage.read_json(self._prepare_record_uri())
        if record["fingerprint"] != self._data_fingerprint():
            raise FinemedError(
                f"run {self.cfg.run.name} has checkpoints from different data settings "
                f"({record['fingerprint']} vs {self._data_fingerprint()}); resuming would not be exact: use a new "
                "run.name (or the original settings)"
            )
        log.warning("run %s has checkpoints: resuming with its prepared data", self.cfg.run.name)
        return self.summary_class()(**record["summary"])

    def save(self) -> dict[str, Any]:
        from finemed_ray.train.export import METADATA_FILE

        export = self.cfg.output.export_path
        if not storage.is_complete(export):
            raise FinemedError(f"training finished but the export at {export} is incomplete")
        meta = storage.read_json(storage.join(export, METADATA_FILE))
        checkpoint = getattr(self.result, "checkpoint", None)
        checkpoint_uri = None
        if checkpoint is not None:  # Ray gives the path inside its filesystem; users want a full URI
            checkpoint_uri = f"s3://{checkpoint.path}" if storage.is_s3(self.cfg.run.storage_path) else checkpoint.path
        summary = {
            "stage": self.stage,
            "run": self.cfg.run.name,
            "export_path": export,
            "checkpoint": checkpoint_uri,
            "data": self.prepare_summary,
            "plan": self.plan.to_dict() if self.plan else None,
            "global_step": meta["global_step"],
            "train_loss": meta["train_loss"],
            "eval_loss": meta.get("eval_loss"),
            "first_loss": meta["loss_history"][0]["loss"] if meta["loss_history"] else None,
            "last_loss": meta["loss_history"][-1]["loss"] if meta["loss_history"] else None,
            "samples_seen": meta["samples_seen"],
            "seconds": round(time.time() - self.t0, 3),
            "resumed_from_step": meta.get("resumed_from_step"),  # set when a worker fault made Ray Train restart
        }
        storage.write_json(storage.join(self.run_uri, "summary.json"), summary)
        return summary


class DPOJob(SFTJob):
    """DPO from the previous stage's weights against a frozen copy of them (TRL DPOTrainer), same Ray Train,
    ZeRO-3, resume, LoRA and export machinery as SFT. ``data.path`` holds preference pairs (prompt/chosen/rejected)."""

    stage = "dpo"
    kind = "dpo"

    def __init__(self, cfg: DPOJobConfig):
        if not isinstance(cfg, DPOJobConfig):
            raise ConfigError("DPOJob needs a DPOJobConfig (configs/dpo_*.yaml)")
        # train.packing is supported (finemed_ray/train/dpo_packing.py); the worker refuses an attention
        # implementation that would let packed sequences attend to each other (check_packing_attention).
        super().__init__(cfg)

    def prepare(self, selection):
        from finemed_ray.data.dpo_prepare import prepare_dpo

        cfg = self.cfg
        return prepare_dpo(cfg.data.path, cfg.model.path, self.run_uri, cfg.data.max_length,
                           max_prompt_length=cfg.dpo.max_prompt_length, overlong=cfg.data.overlong,
                           system_prompt=cfg.data.system_prompt, selection=selection)

    def read_prepared(self, uri: str, split: str):
        from finemed_ray.data.dpo_prepare import read_prepared_dpo

        return read_prepared_dpo(uri, split)

    def summary_class(self):
        from finemed_ray.data.dpo_prepare import DPOPrepareSummary

        return DPOPrepareSummary
