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

Kept free of Ray imports: the callback gets a ``ShardSource`` and a gather function.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from transformers import TrainerCallback

from finemed_ray.errors import FinemedError

POSITION_FILE = "finemed_data_position.json"


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


@dataclass
class DataPosition:
    global_step: int
    world_size: int
    epoch: int
    rows_in_epoch: list[int]  # per rank: rows of `epoch` already trained
    epoch_digest: list[str]  # per rank: ids_digest of those rows, in order
    seen_ids: list[list[str]]  # per rank: every id trained so far, all epochs (audit trail across restarts)

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
        if self.world_size != world_size:
            raise FinemedError(
                f"cannot resume exactly: the checkpoint was written by {self.world_size} workers and this run has "
                f"scaling.num_workers={world_size} (data positions are per worker); use the same number of workers"
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
                 gather: Callable[[Any], list[Any]]):
        self.source = source
        self.plan = plan
        self.rank = rank
        self.world_size = world_size
        self.gather = gather

    def on_save(self, args, state, control, **kwargs):
        from transformers.trainer_utils import get_last_checkpoint

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
        checkpoint = get_last_checkpoint(args.output_dir)
        if checkpoint is None:
            raise FinemedError(f"no checkpoint found under {args.output_dir} after a save")
        tmp = os.path.join(checkpoint, POSITION_FILE + ".tmp")
        with open(tmp, "w") as f:
            f.write(position.to_json())
        os.replace(tmp, os.path.join(checkpoint, POSITION_FILE))
