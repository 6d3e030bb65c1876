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
