"""Exact resume: the data position lives in every checkpoint, next to the model and optimizer state.

Why this works exactly:
- Each worker's shard is a deterministic split of the prepared dataset (``DeterministicSplitDataConfig``), so a
  restarted worker of rank r sees the same rows in the same order as before.
- At every checkpoint the position (epoch, rows trained in this epoch, per rank) is written into the checkpoint
  (``DataPositionCallback``), with a digest of those rows' ids and every id trained so far. The position is
  checked against what the optimizer steps imply, so a loader that read ahead could never be mistaken for
  trained rows.
- On resume each worker skips the rows its checkpoint says it trained on, verifying their digest (a changed
  dataset fails loudly instead of silently repeating or skipping rows), and the HF Trainer restores the model,
  optimizer, scheduler and RNG state with its own data skipping turned off (``ignore_data_skip``).

Resume on another number of workers (16 GPUs yesterday, 8 today): the order in which rows are trained is defined
globally (``DataOrder``), not per worker, so after K optimizer steps the rows left are the same whatever the
worker count. The position is a global step of that order; the global batch (rows per optimizer step) is the
run's and is kept on the new worker count by recomputing ``train.gradient_accumulation_steps``
(``DataOrder.fit``). Model and optimizer state cross the resize through DeepSpeed's universal checkpoint
(``convert_to_universal``, ``UniversalLoadFixCallback``).

Kept free of Ray imports: the callback gets a ``ShardSource`` and a gather function.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from transformers import TrainerCallback

from finemed_ray.errors import ConfigError, FinemedError

log = logging.getLogger(__name__)

POSITION_FILE = "finemed_data_position.json"
ORDER_FILE = "data_order.json"  # <storage>/<run>/data_order.json: the run's DataOrder, written at its first start


def ids_digest(ids: list[str]) -> str:
    """Order-sensitive digest of sample ids."""
    h = hashlib.sha256()
    for i in ids:
        h.update(i.encode())
        h.update(b"\n")
    return h.hexdigest()


def rows_trained_in_epoch(global_step: int, steps_per_epoch: int, micro_rows: int, rows_per_worker: int) -> tuple[int, int]:
    """(epoch, rows of it already trained) on one worker after ``global_step`` optimizer steps.

    Every epoch has ``steps_per_epoch`` steps of ``micro_rows`` rows; the last one may be short. A finished
    epoch is reported as (next epoch, 0): resuming into an empty epoch would make the HF Trainer stop early."""
    epoch, step_in_epoch = divmod(global_step, steps_per_epoch)
    return epoch, min(step_in_epoch * micro_rows, rows_per_worker)


@dataclass(frozen=True)
class DataOrder:
    """The run's global row order, fixed at its first start and the same whatever number of workers trains it.

    The prepared training rows are cut into ``splits`` equal contiguous splits (``splits`` = the first start's
    worker count; Ray's ``split(equal=True)``, so up to ``splits - 1`` rows are unused). Each split is shuffled per
    epoch in windows seeded by (run seed, split, epoch) (``ray_shard.windowed_shuffle``). Optimizer step k of an
    epoch trains, in this order, rows [k*m, (k+1)*m) of split 0, then of split 1, ... (m = ``split_micro_rows``;
    the last step of an epoch may be shorter): that sequence is the run's global order. A world of N workers gives
    worker r the r-th of N contiguous, near-equal slices of each step's rows (``worker_slice``). With N ==
    ``splits`` worker r trains exactly split r, as exact resume did before worker counts could change."""

    splits: int
    rows_per_split: int
    split_micro_rows: int

    @classmethod
    def first_start(cls, rows_train: int, workers: int, per_device_batch_size: int,
                    gradient_accumulation_steps: int) -> "DataOrder":
        per = rows_train // workers
        if per == 0:
            raise FinemedError(f"{rows_train} training rows is fewer than scaling.num_workers={workers}")
        return cls(workers, per, per_device_batch_size * gradient_accumulation_steps)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DataOrder":
        return cls(int(d["splits"]), int(d["rows_per_split"]), int(d["split_micro_rows"]))

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @property
    def global_batch(self) -> int:
        """Rows per optimizer step (all workers together), except the last step of an epoch if it is short."""
        return self.splits * self.split_micro_rows

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.rows_per_split / self.split_micro_rows)

    def split_step_rows(self, k: int) -> int:
        """Rows each split contributes to step ``k`` of an epoch."""
        return min(self.split_micro_rows, self.rows_per_split - k * self.split_micro_rows)

    def split_rows_before(self, k: int) -> int:
        """Rows of each split trained in an epoch's first ``k`` steps."""
        return min(k * self.split_micro_rows, self.rows_per_split)

    def worker_slice(self, k: int, world: int, rank: int) -> tuple[int, int]:
        """[start, stop) of step ``k``'s global rows that worker ``rank`` of ``world`` trains: contiguous slices in
        rank order, the first (rows % world) workers one row longer."""
        q, extra = divmod(self.splits * self.split_step_rows(k), world)
        start = rank * q + min(rank, extra)
        return start, start + q + (1 if rank < extra else 0)

    def split_ranges(self, k: int, world: int, rank: int) -> list[tuple[int, int, int]]:
        """(split, lo, hi): worker ``rank`` trains rows [lo, hi) of each listed split's chunk of step ``k``."""
        c = self.split_step_rows(k)
        a, b = self.worker_slice(k, world, rank)
        out = []
        for split in range(a // c, (b - 1) // c + 1) if b > a else ():
            lo, hi = max(a, split * c) - split * c, min(b, (split + 1) * c) - split * c
            out.append((split, lo, hi))
        return out

    def splits_read_by(self, world: int, rank: int) -> list[int]:
        """The splits worker ``rank`` must read (the short last step of an epoch may need others than the full ones)."""
        needed = {s for k in {0, self.steps_per_epoch - 1} for s, _, _ in self.split_ranges(k, world, rank)}
        return sorted(needed)

    def worker_rows_before(self, k: int, world: int, rank: int) -> int:
        """Rows worker ``rank`` trains in an epoch's first ``k`` steps."""
        return sum(b - a for a, b in (self.worker_slice(j, world, rank) for j in range(k)))

    def fit(self, world: int, per_device_batch_size: int) -> int:
        """The ``gradient_accumulation_steps`` that keeps this order's global batch on ``world`` workers of
        ``per_device_batch_size`` rows; a ConfigError naming the keys when there is none."""
        g = self.global_batch
        keys = "scaling.num_workers x train.per_device_batch_size x train.gradient_accumulation_steps"
        if g % (world * per_device_batch_size):
            raise ConfigError(
                f"this run's global batch is {g} rows per optimizer step ({keys} at its first start: "
                f"{self.splits} x {self.split_micro_rows} rows per worker), and resuming must keep it: "
                f"scaling.num_workers={world} x train.per_device_batch_size={per_device_batch_size} does not divide "
                f"{g}; choose num_workers and per_device_batch_size whose product divides {g} "
                f"(gradient_accumulation_steps is then set to the quotient), or start a new run (new run.name)"
            )
        ga = g // (world * per_device_batch_size)
        last = self.splits * self.split_step_rows(self.steps_per_epoch - 1)
        if last < g:  # the short last step of each epoch: every worker must run the same number of micro-batches
            q, extra = divmod(last, world)
            if q == 0 or (extra and math.ceil(q / per_device_batch_size) != math.ceil((q + 1) / per_device_batch_size)):
                raise ConfigError(
                    f"the last optimizer step of each epoch of this run has {last} rows, which "
                    f"scaling.num_workers={world} workers cannot share in the same number of micro-batches of "
                    f"train.per_device_batch_size={per_device_batch_size} rows (ZeRO-3 runs every micro-batch on "
                    f"all workers together); use {self.splits} workers or a count that divides {last}"
                )
        return ga


def global_sequence(order: DataOrder, world: int, per_rank: list[list[str]], first_step: int,
                    last_step: int) -> list[str]:
    """The ids that ``world`` workers trained in global steps [first_step, last_step), in the run's global order
    (per worker lists in, one list out)."""
    out: list[str] = []
    pos = [0] * world
    for step in range(first_step, last_step):
        k = step % order.steps_per_epoch
        for r in range(world):
            a, b = order.worker_slice(k, world, r)
            out.extend(per_rank[r][pos[r]:pos[r] + b - a])
            pos[r] += b - a
    if pos != [len(ids) for ids in per_rank]:
        raise FinemedError(
            f"the workers' trained rows ({[len(ids) for ids in per_rank]}) do not match steps {first_step}-"
            f"{last_step} of the data order ({pos} rows)"
        )
    return out


def convert_to_universal(checkpoint_dir: str | Path) -> Path:
    """DeepSpeed's universal checkpoint of the ZeRO checkpoint in ``checkpoint_dir`` (an HF ``checkpoint-N``),
    written beside it as ``global_stepN_universal`` with its ``latest_universal`` tag file, which DeepSpeed loads on
    any data-parallel world size when its config has ``"checkpoint": {"load_universal": true}``.

    Converted only when the world size changes, on resume, not at every save: the conversion reads every rank's
    optimizer shards (for an 8B model ~100 GB) and writes them again, minutes of work that a same-size restart (by
    far the common case) never needs; a plain ZeRO checkpoint restores exactly on the same world size. Each worker
    converts its own downloaded copy: there is no filesystem shared between nodes."""
    checkpoint_dir = Path(checkpoint_dir)
    latest = checkpoint_dir / "latest"
    if not latest.is_file():
        raise FinemedError(f"checkpoint {checkpoint_dir} has no DeepSpeed 'latest' tag file: it cannot be converted "
                           "to a universal checkpoint for a new number of workers")
    tag = latest.read_text().strip()
    out = checkpoint_dir / f"{tag}_universal"
    if (checkpoint_dir / "latest_universal").is_file() and out.is_dir():
        return out
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
           str(checkpoint_dir / tag), "--output_folder", str(out),
           "--num_extract_workers", str(max(1, min(4, os.cpu_count() or 1))), "--num_merge_workers", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not (checkpoint_dir / "latest_universal").is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise FinemedError(f"converting {checkpoint_dir / tag} to a universal checkpoint failed (exit "
                           f"{proc.returncode}): {' | '.join(tail)}")
    return out


class UniversalLoadFixCallback(TrainerCallback):
    """After DeepSpeed loaded a universal checkpoint, undo two slips of its ZeRO-3 loader (0.19.8, stage3.py
    ``load_hp_checkpoint_state_from_checkpoint_dir_stage3``). ``on_train_begin`` runs right after the load.

    - It copies param_groups[0]'s settings into every group: HF's no-decay group (biases, norms) would come back
      with the decay group's weight_decay. Each group gets its own saved settings back.
    - It gives every group's state the same ``step`` tensor object. Torch's AdamW increments ``step`` in place and
      ZeRO-3 steps the groups one after the other, so with two groups the shared counter advanced twice per
      optimizer step and Adam's bias correction ran ahead: the loss drifted from an uninterrupted run's by ~1e-2
      within 2 steps of the tiny test model (the "+1.6e-3, cause not found" drift noted in ENVIRONMENT.md,
      2 -> 2 included). Each state gets its own copy."""

    def __init__(self, universal_dir: str | Path):
        self.universal_dir = Path(universal_dir)
        self.fixed: list[dict[str, Any]] = []

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        import torch

        saved = torch.load(self.universal_dir / "zero" / "optimizer_state.pt", map_location="cpu",
                           weights_only=False)["param_groups"]
        target, opt = None, optimizer
        while opt is not None:  # accelerate wrapper -> DeepSpeed ZeRO optimizer -> the torch optimizer
            if isinstance(opt, torch.optim.Optimizer):
                target = opt
            opt = getattr(opt, "optimizer", None)
        if target is None or len(target.param_groups) != len(saved):
            raise FinemedError(
                f"universal checkpoint {self.universal_dir}: {len(saved)} optimizer param groups saved, "
                f"{len(target.param_groups) if target else 'no'} in this run's optimizer"
            )
        for group, was in zip(target.param_groups, saved):
            for key, value in was.items():
                if key != "params":
                    group[key] = value
        for param_state in target.state.values():
            if torch.is_tensor(param_state.get("step")):
                param_state["step"] = param_state["step"].clone()
        self.fixed = [{k: v for k, v in g.items() if k != "params"} for g in target.param_groups]


@dataclass
class DataPosition:
    global_step: int
    world_size: int
    epoch: int
    rows_in_epoch: list[int]  # per rank: rows of `epoch` already trained
    epoch_digest: list[str]  # per rank: ids_digest of those rows, in order
    seen_ids: list[list[str]]  # per rank: every id trained so far since world_start_step (audit trail)
    # Written since resume on another worker count (absent in older checkpoints):
    order: dict[str, int] | None = None  # the run's DataOrder
    split_rows: int = 0  # rows of `epoch` read from each split of the order
    split_digest: list[str] | None = None  # per split: ids_digest of those rows, in order
    world_start_step: int = 0  # the global step at which this worker count took over
    seen_before: list[str] = field(default_factory=list)  # ids trained before that step, in global order

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def load(cls, checkpoint_dir: str | Path) -> "DataPosition":
        path = Path(checkpoint_dir) / POSITION_FILE
        if not path.is_file():
            raise FinemedError(
                f"checkpoint {checkpoint_dir} has no {POSITION_FILE}: it is corrupted or was not written by "
                "finemed-ray, so the data position is unknown; start a new run (new run.name)"
            )
        try:
            return cls(**json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError) as e:
            raise FinemedError(f"checkpoint {checkpoint_dir}: corrupted {POSITION_FILE}: {e}") from None

    def check_compatible(self, world_size: int, plan: dict[str, Any]) -> None:
        """Same-worker-count check of positions that are per worker (GRPO, checkpoints from before DataOrder)."""
        if self.world_size != world_size:
            raise FinemedError(
                f"cannot resume exactly: the checkpoint was written by {self.world_size} workers and this run has "
                f"scaling.num_workers={world_size}, and its data position is per worker (written by a stage or a "
                "version without resume on another worker count); use the same number of workers"
            )
        epoch, rows = rows_trained_in_epoch(
            self.global_step, plan["steps_per_epoch"], plan["micro_rows"], plan["rows_per_worker"]
        )
        if (epoch, rows) != (self.epoch, self.rows_in_epoch[0]):
            raise FinemedError(
                f"cannot resume exactly: the checkpoint (step {self.global_step}, epoch {self.epoch}, "
                f"{self.rows_in_epoch[0]} rows) does not match this run's plan {plan}; the data or batch settings "
                "changed since it was written; start a new run (new run.name)"
            )


    def check_order(self, world_size: int, order: DataOrder, plan: dict[str, Any]) -> None:
        """Checks that this position can be resumed on ``world_size`` workers under ``order``."""
        if self.order is None:  # an older checkpoint: its per-rank position equals the splits' on the same world
            self.check_compatible(world_size, plan)
            if world_size != order.splits:
                raise FinemedError(f"cannot resume exactly: the checkpoint (step {self.global_step}) predates the "
                                   f"run's data order {order.to_dict()}; use the same number of workers")
            return
        if DataOrder.from_dict(self.order) != order:
            raise FinemedError(
                f"cannot resume exactly: the checkpoint (step {self.global_step}) follows the data order "
                f"{self.order}, this run {order.to_dict()}; the data or its split changed since it was written; "
                "start a new run (new run.name)"
            )
        epoch, k = divmod(self.global_step, order.steps_per_epoch)
        if (epoch, order.split_rows_before(k)) != (self.epoch, self.split_rows):
            raise FinemedError(
                f"cannot resume exactly: the checkpoint (step {self.global_step}, epoch {self.epoch}, "
                f"{self.split_rows} rows of each split) does not match the data order {order.to_dict()}"
            )

    def split_state(self) -> tuple[int, list[str]]:
        """(rows of the epoch read from each split, their digests), also for checkpoints written before DataOrder
        (then split r was rank r's shard)."""
        if self.order is None:
            return self.rows_in_epoch[0], list(self.epoch_digest)
        return self.split_rows, list(self.split_digest or [])

    def global_seen(self, order: DataOrder) -> list[str]:
        """Every id trained up to this checkpoint, in the run's global order."""
        return self.seen_before + global_sequence(order, self.world_size, self.seen_ids, self.world_start_step,
                                                  self.global_step)


class ResumeLoadedCallback(TrainerCallback):
    """Records that the Trainer got past loading its checkpoint (``on_train_begin`` runs right after
    DeepSpeed/optimizer/scheduler state is restored), so that a later failure is not blamed on the checkpoint."""

    def __init__(self) -> None:
        self.loaded = False

    def on_train_begin(self, args, state, control, **kwargs):
        self.loaded = True


class DataPositionCallback(TrainerCallback):
    """Writes the data position into each checkpoint before ``RayTrainReportCallback`` uploads it.

    Must be registered before that callback (callbacks run in registration order)."""

    def __init__(self, source: Any, plan: dict[str, Any], rank: int, world_size: int,
                 gather: Callable[[Any], list[Any]], order: DataOrder | None = None):
        self.source = source
        self.plan = plan
        self.rank = rank
        self.world_size = world_size
        self.gather = gather
        self.order = order  # with an ``OrderedSource``: positions in the run's global order (any worker count)

    def on_save(self, args, state, control, **kwargs):
        if self.order is not None:
            return self._save_ordered(args, state)
        epoch, rows = rows_trained_in_epoch(
            state.global_step, self.plan["steps_per_epoch"], self.plan["micro_rows"], self.plan["rows_per_worker"]
        )
        # What the shard handed out must be exactly what the optimizer steps consumed; anything else (a loader
        # reading ahead) would turn into skipped rows on resume.
        src_epoch, src_rows = self.source.position()
        if (src_epoch, src_rows) != (epoch, rows) and not (src_epoch == epoch - 1 and rows == 0 and
                                                          src_rows == self.plan["rows_per_worker"]):
            raise FinemedError(
                f"rank {self.rank}: data position mismatch at step {state.global_step}: the shard handed out "
                f"{src_rows} rows of epoch {src_epoch}, the optimizer steps imply {rows} rows of epoch {epoch}"
            )
        mine = {"epoch_ids": self.source.epoch_ids if rows else [], "seen": list(self.source.seen_ids)}
        everyone = self.gather(mine)
        if self.rank != 0:
            return
        position = DataPosition(
            global_step=state.global_step,
            world_size=self.world_size,
            epoch=epoch,
            rows_in_epoch=[len(e["epoch_ids"]) for e in everyone],
            epoch_digest=[ids_digest(e["epoch_ids"]) for e in everyone],
            seen_ids=[e["seen"] for e in everyone],
        )
        self._write(args, position)

    def _save_ordered(self, args, state) -> None:
        order, source = self.order, self.source
        epoch, k = divmod(state.global_step, order.steps_per_epoch)
        rows = order.worker_rows_before(k, self.world_size, self.rank)
        src_epoch, src_rows = source.position()
        full = order.worker_rows_before(order.steps_per_epoch, self.world_size, self.rank)
        if (src_epoch, src_rows) != (epoch, rows) and not (src_epoch == epoch - 1 and k == 0 and src_rows == full):
            raise FinemedError(
                f"rank {self.rank}: data position mismatch at step {state.global_step}: the shard handed out "
                f"{src_rows} rows of epoch {src_epoch}, the optimizer steps imply {rows} rows of epoch {epoch}"
            )
        split_rows = order.split_rows_before(k)
        prefixes = source.split_prefixes() if k else {}
        mine = {"epoch_ids": source.epoch_ids if k else [], "seen": list(source.seen_ids), "splits": prefixes}
        everyone = self.gather(mine)
        if self.rank != 0:
            return
        digests: list[str] = []
        for split in range(order.splits):
            found = {e["splits"][split] for e in everyone if split in e["splits"]}
            if k == 0:
                found = {(0, ids_digest([]))}
            if len(found) != 1 or next(iter(found))[0] != split_rows:
                raise FinemedError(f"data position at step {state.global_step}: split {split} was read as {found} "
                                   f"by the workers, the order implies {split_rows} rows")
            digests.append(next(iter(found))[1])
        position = DataPosition(
            global_step=state.global_step,
            world_size=self.world_size,
            epoch=epoch,
            rows_in_epoch=[len(e["epoch_ids"]) for e in everyone],
            epoch_digest=[ids_digest(e["epoch_ids"]) for e in everyone],
            seen_ids=[e["seen"] for e in everyone],
            order=order.to_dict(),
            split_rows=split_rows,
            split_digest=digests,
            world_start_step=source.world_start_step,
            seen_before=list(source.seen_before),
        )
        self._write(args, position)

    @staticmethod
    def _write(args, position: "DataPosition") -> None:
        from transformers.trainer_utils import get_last_checkpoint

        checkpoint = get_last_checkpoint(args.output_dir)
        if checkpoint is None:
            raise FinemedError(f"no checkpoint found under {args.output_dir} after a save")
        tmp = os.path.join(checkpoint, POSITION_FILE + ".tmp")
        with open(tmp, "w") as f:
            f.write(position.to_json())
        os.replace(tmp, os.path.join(checkpoint, POSITION_FILE))
