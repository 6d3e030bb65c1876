"""The per-epoch shuffle of a worker's shard: a seeded permutation per epoch, replayed exactly on resume."""

from __future__ import annotations

import pytest

from finemed_ray.errors import FinemedError
from finemed_ray.train.ray_shard import ShardSource


class ListShard:
    """A stand-in for a Ray DataIterator over an in-memory list (only ``iter_rows`` is used)."""

    def __init__(self, n: int):
        self.rows = [{"id": f"r{i:03d}", "input_ids": [i]} for i in range(n)]

    def iter_rows(self):
        yield from (dict(r) for r in self.rows)


def epoch_ids(source: ShardSource) -> list[str]:
    return [row["input_ids"][0] for row in source.rows()]


def armed(n: int, buffer: int, seed: str = "42:rank0") -> ShardSource:
    src = ShardSource(ListShard(n), {"input_ids": [0]}, ("input_ids",), shuffle_buffer=buffer, shuffle_seed=seed)
    src.arm()
    return src


def test_each_epoch_is_a_different_seeded_permutation() -> None:
    src = armed(50, buffer=1000)
    e0, e1 = epoch_ids(src), epoch_ids(src)
    assert sorted(e0) == sorted(e1) == list(range(50))
    assert e0 != list(range(50)) and e1 != e0
    again = armed(50, buffer=1000)
    assert (epoch_ids(again), epoch_ids(again)) == (e0, e1)  # same seed, same orders
    assert epoch_ids(armed(50, buffer=1000, seed="42:rank1")) != e0


def test_windows_keep_rows_near_their_file_position() -> None:
    got = epoch_ids(armed(30, buffer=10))
    assert [sorted(got[i:i + 10]) for i in (0, 10, 20)] == [list(range(i, i + 10)) for i in (0, 10, 20)]


def test_buffer_zero_is_file_order() -> None:
    assert epoch_ids(armed(20, buffer=0)) == list(range(20))


def test_resume_replays_the_shuffled_epoch_and_checks_it() -> None:
    from finemed_ray.train.resume import ids_digest

    ref = armed(40, buffer=1000)
    epoch_ids(ref)  # epoch 0
    epoch1 = list(ref.rows())
    done = ref.epoch_ids[:15]  # a checkpoint after 15 rows of epoch 1

    resumed = armed(40, buffer=1000)
    resumed.resume(1, 15, ids_digest(done), seen_ids=[])
    assert [r["input_ids"] for r in resumed.rows()] == [r["input_ids"] for r in epoch1[15:]]

    other_seed = armed(40, buffer=1000, seed="7:rank0")
    other_seed.resume(1, 15, ids_digest(done), seen_ids=[])
    with pytest.raises(FinemedError, match="no longer starts with"):
        list(other_seed.rows())


class _CountingIterator:
    """A DataIterator stand-in: the same rows every epoch, counting the reads (each a Ray Data execution)."""

    def __init__(self, n: int, width: int = 8):
        import numpy as np

        self.data = [{"id": f"r{i}", "input_ids": np.arange(width, dtype=np.int32) + i} for i in range(n)]
        self.reads = 0

    def iter_rows(self):
        self.reads += 1
        for row in self.data:
            yield dict(row)


def _ids(rows) -> list[str]:
    return [r["id"] for r in rows]


def test_replayed_rows_read_ray_data_once_and_replay_the_same_rows() -> None:
    from finemed_ray.train.ray_shard import ReplayedRows

    it = _CountingIterator(10)
    rows = ReplayedRows(it, budget_bytes=1 << 20)
    epochs = [list(rows.iter_rows()) for _ in range(5)]
    assert it.reads == 1 and rows.complete
    assert all(_ids(e) == [f"r{i}" for i in range(10)] for e in epochs)
    assert all((a["input_ids"] == b["input_ids"]).all() for e in epochs for a, b in zip(e, epochs[0]))
    # Through the real consumer: ShardSource's seeded windowed shuffle gives the same orders as without the cache.
    plain, cached = ShardSource(_CountingIterator(10), {"input_ids": [0]}, ("input_ids",), shuffle_buffer=4,
                                shuffle_seed="s"), \
        ShardSource(ReplayedRows(_CountingIterator(10), 1 << 20), {"input_ids": [0]}, ("input_ids",),
                    shuffle_buffer=4, shuffle_seed="s")
    plain.arm(), cached.arm()
    for _ in range(3):
        assert [r["input_ids"] for r in plain.rows()] == [r["input_ids"] for r in cached.rows()]
    assert plain.seen_ids == cached.seen_ids and cached.shard.iterator.reads == 1


def test_replayed_rows_continue_after_a_partial_read() -> None:
    """A consumer that stops early (OrderedSource takes rows_per_split rows of a split) keeps what it read; a later
    epoch needing more replays those and reads the rest from Ray Data, skipping the replayed ones."""
    from itertools import islice

    from finemed_ray.train.ray_shard import ReplayedRows

    it = _CountingIterator(10)
    rows = ReplayedRows(it, budget_bytes=1 << 20)
    assert _ids(islice(rows.iter_rows(), 6)) == [f"r{i}" for i in range(6)]
    assert _ids(islice(rows.iter_rows(), 6)) == [f"r{i}" for i in range(6)] and it.reads == 1  # replayed only
    assert _ids(rows.iter_rows()) == [f"r{i}" for i in range(10)] and it.reads == 2
    assert _ids(rows.iter_rows()) == [f"r{i}" for i in range(10)] and it.reads == 2 and rows.complete


def test_replayed_rows_past_the_budget_stream_every_epoch() -> None:
    from finemed_ray.train.ray_shard import ReplayedRows, SplitShards, replayed

    it = _CountingIterator(10, width=64)  # ~330 bytes a row
    rows = ReplayedRows(it, budget_bytes=1000)
    for _ in range(3):
        assert _ids(rows.iter_rows()) == [f"r{i}" for i in range(10)]
    assert it.reads == 3 and rows.rows is None
    off = ReplayedRows(_CountingIterator(3), budget_bytes=0)  # data.replay_cache_mb: 0
    for _ in range(2):
        list(off.iter_rows())
    assert off.iterator.reads == 2
    wrapped = replayed(SplitShards([_CountingIterator(2), _CountingIterator(3)]), 1 << 20)
    assert isinstance(wrapped, SplitShards) and [type(i).__name__ for i in wrapped.iterators] == ["ReplayedRows"] * 2
