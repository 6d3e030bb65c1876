"""Adapter from a Ray Data shard (one per Ray Train worker) to what TRL's trainers accept.

TRL 1.16 requires a ``datasets`` Dataset/IterableDataset, and the HF Trainer would hand it to
``accelerator.prepare``, which shards an iterable *again* across ranks (each rank would then train on half of
its own shard). So we give TRL a ``datasets.IterableDataset`` that streams our shard, and the trainer mixin below
builds the training DataLoader without re-sharding.

TRL's constructor also peeks at one example (``next(iter(train_dataset))``) to detect image datasets. Pulling
it from the shard would start a Ray epoch on every rank and throw it away, so until ``arm()`` is called the
source yields a single local example (built from the tokenizer, never trained on).
"""

from __future__ import annotations

import hashlib
import random
from typing import Any, Iterator

import datasets
from ray.train import DataConfig
from torch.utils.data import DataLoader


class ShardSource:
    """Iterates the rows of a Ray ``DataIterator`` and records which sample ids were handed to the trainer.

    One call of ``rows()`` is one epoch over this worker's shard. After ``resume()`` the first epoch skips the
    rows a checkpoint says were already trained, checking their ids against the checkpoint's digest."""

    def __init__(self, shard: Any, probe_example: dict[str, list[int]], columns: tuple[str, ...],
                 shuffle_buffer: int = 0, shuffle_seed: str = ""):
        self.shard = shard
        self.shuffle_buffer = shuffle_buffer
        self.shuffle_seed = shuffle_seed
        self.probe_example = probe_example
        self.columns = columns
        self.armed = False
        self.epoch = 0  # the epoch the next call of rows() runs
        self.seen_ids: list[str] = []  # every id handed out, all epochs (and, after resume, earlier attempts)
        self.epoch_ids: list[str] = []  # ids handed out in epoch `_rows_epoch`
        self._rows_epoch = 0
        self._skip = 0
        self._skip_digest: str | None = None

    def arm(self) -> None:
        self.armed = True

    def resume(self, epoch: int, skip_rows: int, skip_digest: str, seen_ids: list[str]) -> None:
        self.epoch = epoch
        self._skip, self._skip_digest = skip_rows, skip_digest
        self.seen_ids = list(seen_ids)

    def position(self) -> tuple[int, int]:
        """(epoch, rows of it handed out so far)."""
        return self._rows_epoch, len(self.epoch_ids)

    def rows(self) -> Iterator[dict[str, Any]]:
        if not self.armed:
            yield dict(self.probe_example)
            return
        from finemed_ray.errors import FinemedError
        from finemed_ray.train.resume import ids_digest

        self._rows_epoch, self.epoch_ids = self.epoch, []
        skip, self._skip = self._skip, 0
        for row in self._epoch_order():
            self.epoch_ids.append(row["id"])
            if len(self.epoch_ids) <= skip:  # trained before the restart: already in seen_ids
                if len(self.epoch_ids) == skip and ids_digest(self.epoch_ids) != self._skip_digest:
                    raise FinemedError(
                        f"cannot resume exactly: epoch {self.epoch} of this worker's shard no longer starts with "
                        f"the {skip} rows the checkpoint recorded (the prepared data or its order changed)"
                    )
                continue
            self.seen_ids.append(row["id"])
            # Arrow list columns arrive as numpy arrays; the collator wants plain lists of ints.
            yield {c: row[c].tolist() if hasattr(row[c], "tolist") else row[c] for c in self.columns}
        if len(self.epoch_ids) < skip:
            raise FinemedError(
                f"cannot resume exactly: the checkpoint skips {skip} rows but this worker's shard has only "
                f"{len(self.epoch_ids)}"
            )
        self.epoch += 1

    def _epoch_order(self) -> Iterator[dict[str, Any]]:
        """This epoch's rows: file order, or shuffled in consecutive windows of ``shuffle_buffer`` rows. The
        shuffle is seeded by (seed, epoch), not drawn from Ray's local shuffle buffer, whose order also depends
        on block sizes: a restarted worker must replay exactly the order the checkpoint recorded."""
        rows = self.shard.iter_rows()
        if not self.shuffle_buffer:
            yield from rows
            return
        rng = random.Random(f"{self.shuffle_seed}:epoch{self.epoch}")
        window: list[dict[str, Any]] = []
        for row in rows:
            window.append(row)
            if len(window) == self.shuffle_buffer:
                rng.shuffle(window)
                yield from window
                window = []
        rng.shuffle(window)
        yield from window

    def seen_digest(self) -> str:
        return hashlib.sha256("\n".join(sorted(self.seen_ids)).encode()).hexdigest()


def _iter_source(source: ShardSource) -> Iterator[dict[str, Any]]:
    yield from source.rows()


def shard_to_iterable_dataset(source: ShardSource, features: datasets.Features) -> datasets.IterableDataset:
    return datasets.IterableDataset.from_generator(_iter_source, gen_kwargs={"source": source}, features=features)


class RayShardDataLoaderMixin:
    """Put before a TRL/HF trainer class: the train DataLoader reads this rank's shard as is (no re-sharding).

    Batches are moved to the device by the Trainer's ``_prepare_inputs``; DeepSpeed does not need a prepared
    loader. The same holds for evaluation: each rank evaluates its own eval shard and the Trainer gathers the
    losses across ranks."""

    def get_train_dataloader(self) -> DataLoader:  # type: ignore[override]
        collator = self._get_collator_with_removed_columns(self.data_collator, description="training")
        return DataLoader(self.train_dataset, batch_size=self._train_batch_size, collate_fn=collator, num_workers=0)

    def get_eval_dataloader(self, eval_dataset=None) -> DataLoader:  # type: ignore[override]
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        collator = self._get_collator_with_removed_columns(self.data_collator, description="evaluation")
        return DataLoader(dataset, batch_size=self.args.eval_batch_size, collate_fn=collator, num_workers=0)


class DeterministicSplitDataConfig(DataConfig):
    """Gives every worker the same rows in the same order on every run and restart: ``Dataset.split(equal=True)``
    with order preserved, instead of Ray's default dynamic ``streaming_split``. Exact resume
    (``finemed_ray.train.resume``) relies on it. The split materialises the prepared (tokenised) rows in the
    object store, not in the workers."""

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        output = [{} for _ in range(world_size)]
        for name, ds in datasets.items():
            if ds.name is None:
                ds.set_name(name)
            ds = ds.copy(ds)
            options = self._resolve_execution_options(name)
            options.preserve_order = True  # read order = file order, so the splits are reproducible
            ds.context.execution_options = options
            for i, split in enumerate(ds.split(world_size, equal=True)):
                output[i][name] = split.iterator()
        return output
