"""The driver of a training stage: ``StageJob``, which every stage of ``finemed_ray/train/stages/`` extends.

``setup`` checks every input before any compute -> ``run``: Ray Data prepares (validates, tokenises,
quarantines) the dataset into ``<storage>/<run>/prepared`` (or a resumed run reuses it), the run's data order and
step plan are fixed, a ``TorchTrainer`` runs ``finemed_ray.train.loop.train_loop`` on N workers -> rank 0
publishes a consolidated Hugging Face export -> ``save`` verifies it and writes the job summary. Nothing assumes a
filesystem shared between nodes: data, checkpoints and the export move through ``storage`` (S3 or a local path).

A stage overrides the hooks: ``prepare`` / ``read_prepared`` / ``summary_class`` (its data), ``worker`` (its
``StageWorker``), and where it differs ``fingerprint_extras``, ``data_order``, ``plan``, ``training_data`` and
``summary_extras``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finemed_ray import storage
from finemed_ray.cluster import ensure_ray_address
from finemed_ray.errors import ConfigError, FinemedError
from finemed_ray.train.configs import SFTJobConfig

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


class StageJob:
    """``setup`` checks every input before any compute; ``run`` prepares data and trains; ``save`` verifies the
    export and writes the job summary. Subclasses (one per stage) set ``stage``/``kind``/``worker`` and the data
    hooks."""

    stage = "?"
    kind = "?"
    worker = ""  # "module:Class" of the stage's finemed_ray.train.loop.StageWorker

    def __init__(self, cfg: SFTJobConfig):
        from finemed_ray.train.loop import load_class

        config_class = load_class(self.worker).config_class
        if not isinstance(cfg, config_class):
            raise ConfigError(f"{type(self).__name__} needs a {config_class.__name__} (configs/{self.kind}_*.yaml)")
        self.cfg = cfg
        self.run_uri = storage.join(cfg.run.storage_path, cfg.run.name)
        self.ds_config: dict | None = None
        self.prepare_summary: dict[str, Any] | None = None
        self.plan: StepPlan | None = None
        self.result = None
        self.t0 = time.time()

    def setup(self) -> "StageJob":
        from finemed_ray.data.sft_prepare import input_files
        from finemed_ray.models.loading import load_tokenizer, resolve_model_path

        self.ds_config = load_deepspeed_config(self.cfg.deepspeed.config, self.cfg.scaling.use_gpu)
        input_files(self.cfg.data.path)  # missing or empty data fails here, naming the path
        load_tokenizer(resolve_model_path(self.cfg.model.path))  # no chat template fails here, naming the model
        storage.check_writable(self.run_uri)  # a missing bucket or read-only path fails now, not after training
        storage.check_writable(self.cfg.output.export_path)
        ensure_ray(self.cfg)
        return self

    def run(self) -> "StageJob":
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train import TrainingFailedError
        from ray.train.torch import TorchConfig, TorchTrainer

        from finemed_ray.data.sft_prepare import RowSelection
        from finemed_ray.train.loop import train_loop
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
        order = self.data_order(summary.rows_train, resuming)
        cfg = self.cfg  # gradient_accumulation_steps may have been fitted to the run's global batch
        self.plan = self.make_plan(summary.rows_train, order)
        datasets = {"train": self.training_data(summary)}
        if summary.rows_eval:
            if summary.rows_eval < cfg.scaling.num_workers:
                raise FinemedError(
                    f"data.eval_fraction={cfg.data.eval_fraction} holds out {summary.rows_eval} rows, fewer than "
                    f"scaling.num_workers={cfg.scaling.num_workers}; raise it or set it to 0"
                )
            datasets["eval"] = self.read_prepared(summary.prepared_uri, "eval")

        fs, storage_path = storage.get_filesystem(cfg.run.storage_path)
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={
                "job": cfg.model_dump(mode="json"),
                "worker": self.worker,
                "deepspeed": self.ds_config,
                "plan": self.plan.to_dict(),
                "prepare": self.prepare_summary,
                "stage": self.stage,
                "has_eval": "eval" in datasets,
                "order": order.to_dict() if order is not None else None,
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
            dataset_config=DeterministicSplitDataConfig(splits={"train": order.splits} if order else None),
        )
        try:
            self.result = trainer.fit()
        except TrainingFailedError as e:
            raise FinemedError(f"run {cfg.run.name} failed after run.max_failures={cfg.run.max_failures} "
                               f"restarts: {_root_cause(e)}") from e
        return self

    # ------------------------------------------------------------------------------------------ stage hooks
    def prepare(self, selection):
        """Ray Data: the input under ``data.path`` -> ``<run>/prepared`` (+ quarantine); a prepare summary."""
        raise NotImplementedError

    def read_prepared(self, uri: str, split: str):
        """The prepared rows of one split as a Ray Dataset."""
        raise NotImplementedError

    def summary_class(self):
        """The class of ``prepare``'s summary (rebuilt from ``<run>/prepare.json`` on resume)."""
        raise NotImplementedError

    def fingerprint_extras(self) -> dict[str, Any]:
        """Settings besides ``data`` and the model that change the prepared rows (a resume must match them)."""
        return {}

    def training_data(self, summary):
        return self.read_prepared(summary.prepared_uri, "train")

    def make_plan(self, rows_train: int, order: Any) -> StepPlan:
        return plan_steps(rows_train, self.cfg, order)

    def summary_extras(self, meta: dict[str, Any]) -> dict[str, Any]:
        """The stage's keys of the job summary, from the export's metadata."""
        return {}

    def data_order(self, rows_train: int, resuming: bool):
        """The run's global row order (``finemed_ray.train.resume.DataOrder``): set at its first start
        (:meth:`first_order`) and kept in ``<run>/data_order.json``; a run resumed on another worker count keeps it
        and its global batch, with ``train.gradient_accumulation_steps`` recomputed (:meth:`fit_order`, logged)
        for the new count. A stage whose workers read per-worker shards returns None."""
        from finemed_ray.train.resume import ORDER_FILE, DataOrder

        cfg = self.cfg
        uri = storage.join(self.run_uri, ORDER_FILE)
        if resuming and storage.exists(uri):
            order = DataOrder.from_dict(storage.read_json(uri))
        else:  # a fresh run, or one whose checkpoints predate the order file: the order is today's split
            order = self.first_order(rows_train)
            storage.write_json(uri, order.to_dict())
        ga = self.fit_order(order)
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

    def first_order(self, rows_train: int):
        """The data order of a run's first start: ``scaling.num_workers`` splits, one micro-batch x accumulation
        of rows per split and optimizer step."""
        from finemed_ray.train.resume import DataOrder

        t = self.cfg.train
        try:
            return DataOrder.first_start(rows_train, self.cfg.scaling.num_workers, t.per_device_batch_size,
                                         t.gradient_accumulation_steps)
        except FinemedError as e:
            raise FinemedError(f"{self.cfg.data.path}: {e}") from None

    def fit_order(self, order) -> int:
        """The ``train.gradient_accumulation_steps`` that keeps ``order``'s global batch on this run's workers."""
        return order.fit(self.cfg.scaling.num_workers, self.cfg.train.per_device_batch_size)

    # Resume support: a run that already has checkpoints must train on exactly the rows it was prepared with.
    def _prepare_record_uri(self) -> str:
        return storage.join(self.run_uri, "prepare.json")

    def _data_fingerprint(self) -> dict[str, Any]:
        return {"data": self.cfg.data.model_dump(mode="json"), "model": self.cfg.model.path,
                **self.fingerprint_extras()}

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
            **self.summary_extras(meta),
        }
        storage.write_json(storage.join(self.run_uri, "summary.json"), summary)
        return summary


__all__ = ["RAY_CHECKPOINT_STATE_FILE", "StageJob", "StepPlan", "deepspeed_config_for_device", "ensure_ray",
           "load_deepspeed_config", "plan_steps"]
