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
        return windowed_shuffle(self.shard.iter_rows(), self.shuffle_buffer, f"{self.shuffle_seed}:epoch{self.epoch}")

    def seen_digest(self) -> str:
        return hashlib.sha256("\n".join(sorted(self.seen_ids)).encode()).hexdigest()


def windowed_shuffle(rows: Iterator[dict[str, Any]], buffer: int, seed: str) -> Iterator[dict[str, Any]]:
    """An epoch's rows: file order, or shuffled in consecutive windows of ``buffer`` rows. The shuffle is seeded
    (``seed`` names the run seed, the shard or split and the epoch), not drawn from Ray's local shuffle buffer, whose
    order also depends on block sizes: a restarted worker must replay exactly the order the checkpoint recorded."""
    if not buffer:
        yield from rows
        return
    rng = random.Random(seed)
    window: list[dict[str, Any]] = []
    for row in rows:
        window.append(row)
        if len(window) == buffer:
            rng.shuffle(window)
            yield from window
            window = []
    rng.shuffle(window)
    yield from window


class SplitShards:
    """What ``DeterministicSplitDataConfig(splits=...)`` gives every worker for a dataset: one Ray ``DataIterator``
    per split of the run's ``DataOrder``. Each worker reads only the splits its rows come from."""

    def __init__(self, iterators: list[Any]):
        self.iterators = iterators

    def __len__(self) -> int:
        return len(self.iterators)


class OrderedSource:
    """This worker's rows of the run's global order (``finemed_ray.train.resume.DataOrder``), on any number of
    workers: each step it reads the step's chunk of every split it needs (in lockstep, the same rows whoever
    reads them) and hands out its own slice. With as many workers as splits, worker r reads only split r: rows
    and order are exactly ``ShardSource``'s over that split.

    Same interface as ``ShardSource`` (``arm``, ``rows``, ``position``, ``seen_ids``, ``epoch_ids``), plus the
    per-split read positions a checkpoint records (``split_prefixes``) and ``resume`` from a ``DataPosition``
    written by any worker count."""

    def __init__(self, splits: SplitShards, order: Any, world: int, rank: int, probe_example: dict[str, list[int]],
                 columns: tuple[str, ...], shuffle_buffer: int = 0, seed: str = ""):
        if len(splits) != order.splits:
            raise ValueError(f"{len(splits)} split iterators for a data order of {order.splits} splits")
        self.splits = splits
        self.order = order
        self.world, self.rank = world, rank
        self.needed = order.splits_read_by(world, rank)
        self.probe_example = probe_example
        self.columns = columns
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.armed = False
        self.epoch = 0  # the epoch the next call of rows() runs
        self.seen_ids: list[str] = []  # ids this worker trained since world_start_step (all epochs, all attempts)
        self.seen_before: list[str] = []  # ids trained before world_start_step (by another worker count), in order
        self.world_start_step = 0
        self.epoch_ids: list[str] = []  # ids this worker handed out in epoch `_rows_epoch`
        self._split_ids: dict[int, list[str]] = {}  # ids read from each needed split in epoch `_rows_epoch`
        self._rows_epoch = 0
        self._skip_steps = 0
        self._skip_digests: list[str] = []

    def arm(self) -> None:
        self.armed = True

    def resume(self, position: Any) -> None:
        """Continue after ``position`` (a ``DataPosition`` already checked with ``check_order``)."""
        epoch, k = divmod(position.global_step, self.order.steps_per_epoch)
        self.epoch, self._skip_steps = epoch, k
        self._skip_digests = position.split_state()[1]
        if position.world_size == self.world:
            self.seen_ids = list(position.seen_ids[self.rank])
            self.seen_before = list(position.seen_before)
            self.world_start_step = position.world_start_step
        else:  # another worker count takes over here: what the old one trained becomes one global list
            self.seen_ids = []
            self.seen_before = position.global_seen(self.order)
            self.world_start_step = position.global_step

    def position(self) -> tuple[int, int]:
        """(epoch, rows of it this worker handed out so far)."""
        return self._rows_epoch, len(self.epoch_ids)

    def split_prefixes(self) -> dict[int, tuple[int, str]]:
        """split -> (rows read from it in the current epoch, their ids_digest)."""
        from finemed_ray.train.resume import ids_digest

        return {s: (len(ids), ids_digest(ids)) for s, ids in self._split_ids.items()}

    def rows(self) -> Iterator[dict[str, Any]]:
        if not self.armed:
            yield dict(self.probe_example)
            return
        from itertools import islice

        from finemed_ray.errors import FinemedError
        from finemed_ray.train.resume import ids_digest

        order, epoch = self.order, self.epoch
        self._rows_epoch, self.epoch_ids = epoch, []
        self._split_ids = {s: [] for s in self.needed}
        skip, self._skip_steps = self._skip_steps, 0
        streams = {s: windowed_shuffle(self.splits.iterators[s].iter_rows(), self.shuffle_buffer,
                                       f"{self.seed}:rank{s}:epoch{epoch}") for s in self.needed}
        for k in range(order.steps_per_epoch):
            want = order.split_step_rows(k)
            chunks = {}
            for s in self.needed:
                chunk = list(islice(streams[s], want))
                if len(chunk) < want:
                    raise FinemedError(
                        f"cannot resume exactly: split {s} of the prepared data ended after "
                        f"{len(self._split_ids[s]) + len(chunk)} rows of epoch {epoch}, the run's data order "
                        f"{order.to_dict()} needs {order.rows_per_split} (the prepared data changed)"
                    )
                self._split_ids[s].extend(row["id"] for row in chunk)
                chunks[s] = chunk
            mine = [row for s, lo, hi in order.split_ranges(k, self.world, self.rank) for row in chunks[s][lo:hi]]
            if k < skip:  # trained before the restart: already in seen_ids / seen_before
                self.epoch_ids.extend(row["id"] for row in mine)
                if k == skip - 1:
                    for s in self.needed:
                        if ids_digest(self._split_ids[s]) != self._skip_digests[s]:
                            raise FinemedError(
                                f"cannot resume exactly: epoch {epoch} of split {s} of the prepared data no longer "
                                f"starts with the {len(self._split_ids[s])} rows the checkpoint recorded (the "
                                "prepared data or its order changed)"
                            )
                continue
            for row in mine:
                self.epoch_ids.append(row["id"])
                self.seen_ids.append(row["id"])
                # Arrow list columns arrive as numpy arrays; the collator wants plain lists of ints.
                yield {c: row[c].tolist() if hasattr(row[c], "tolist") else row[c] for c in self.columns}
        self.epoch += 1


def _iter_source(source: ShardSource | OrderedSource) -> Iterator[dict[str, Any]]:
    yield from source.rows()


def shard_to_iterable_dataset(source: ShardSource | OrderedSource,
                              features: datasets.Features) -> datasets.IterableDataset:
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
    object store, not in the workers.

    ``splits={"train": n}``: that dataset is cut into the run's ``n`` order splits whatever the worker count, and
    every worker gets all of them as a ``SplitShards`` (for ``OrderedSource``); other datasets (eval) are split
    by worker as before."""

    def __init__(self, *args, splits: dict[str, int] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._order_splits = dict(splits or {})

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        from ray.data import Dataset

        output = [{} for _ in range(world_size)]
        for name, ds in datasets.items():
            if ds.name is None:
                ds.set_name(name)
            # Its own context object: a shallow copy (Ray's DataConfig does one) shares the caller's, which would
            # then keep our execution options.
            ds = Dataset.copy(ds, _deep_copy=True)
            options = self._resolve_execution_options(name)
            options.preserve_order = True  # read order = file order, so the splits are reproducible
            ds.context.execution_options = options
            # One execution: Dataset.split(equal=True) counts the rows (an execution of its own) and then reads
            # them (another); on a materialised dataset the count is metadata. Each execution costs seconds of
            # fixed Ray Data start-up, which dominated short stages (4 of them before step 1, ~20 s on 2 CPUs).
            ds = ds.materialize()
            if name in self._order_splits:
                shards = SplitShards([split.iterator() for split in ds.split(self._order_splits[name], equal=True)])
                for i in range(world_size):
                    output[i][name] = shards
                continue
            for i, split in enumerate(ds.split(world_size, equal=True)):
                output[i][name] = split.iterator()
        return output
