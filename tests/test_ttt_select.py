"""SIFT selection of TTT training rows (finemed_ray/ttt/select.py): the greedy rule, its limits, the index and config.

Numpy only (no model, no Ray): the index is built in memory from hand-made embeddings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from finemed_ray.config import load_config
from finemed_ray.errors import ConfigError
from finemed_ray.ttt.index import POOL_SCHEMA, RetrievalIndex
from finemed_ray.ttt.select import posterior_variance, sift_select

ROOT = Path(__file__).resolve().parents[1]


def unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def random_unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    return unit(rng.normal(size=(n, d)))


def memory_index(vectors: np.ndarray, ids: list[str]) -> RetrievalIndex:
    x = np.asarray(vectors, dtype=np.float32)
    pool = pa.Table.from_pylist([{"id": i, "text": i} for i in ids], schema=POOL_SCHEMA)
    return RetrievalIndex(x, pool, {"count": x.shape[0], "dim": x.shape[1]})


# A question and a pool where its nearest rows are three copies of one text (A, A, A), while two farther rows
# (B, C) each carry a part of the question that A lacks. F is farther still.
Q = unit([1, 1, 1, 0, 0])
A = unit([1, 1, 0.3, 0, 0])  # cos 0.919
B = unit([1, 0, 1, 0.6, 0])  # cos 0.752
C = unit([0, 1, 1, 0, 0.6])  # cos 0.752
F = unit([1, 0.5, 0, 0, 1.5])  # cos 0.463
DUP_POOL = np.array([A, A, A, B, C, F])
DUP_IDS = ["a1", "a2", "a3", "b", "c", "f"]


# ---------------------------------------------------------------------------------------------- (a)
def test_nearest_picks_the_duplicates_sift_the_non_redundant_rows():
    index = memory_index(DUP_POOL, DUP_IDS)
    nearest, _ = index.neighbours(Q[None].astype(np.float32), k=3)
    sift, dist = index.neighbours(Q[None].astype(np.float32), k=3, selection="sift")
    assert [r["id"] for r in nearest[0]] == ["a1", "a2", "a3"]
    assert [r["id"] for r in sift[0]] == ["a1", "b", "c"]  # one copy of A, then what A does not say
    # the reported distances are the picked rows' own distances to the question
    np.testing.assert_allclose(dist[0], np.linalg.norm(DUP_POOL[[0, 3, 4]] - Q, axis=1), atol=1e-6)
    # and SIFT's picks leave far less uncertainty about the question than three copies of A
    v_sift = posterior_variance(Q, DUP_POOL[[0, 3, 4]])
    v_nearest = posterior_variance(Q, DUP_POOL[[0, 1, 2]])
    assert v_sift < 0.3 * v_nearest, (v_sift, v_nearest)


def test_lambda_trades_diversity_for_reselection():
    # Copies of A are interchangeable: after one pick of A a copy is worth exactly a re-selection of A. With a
    # large lambda (noisy observations) observing A again beats B; with the default small one it does not.
    picks, _ = sift_select(Q, DUP_POOL, 3, lam=1.0)
    assert list(picks) == [0, 0, 3]  # re-selection (activeft never masks a picked point out)
    picks, _ = sift_select(Q, DUP_POOL, 3, lam=0.01)
    assert list(picks) == [0, 3, 4]


# ---------------------------------------------------------------------------------------------- (b)
def test_k1_picks_the_nearest_neighbour_and_large_lambda_repeats_it():
    rng = np.random.default_rng(0)
    for trial in range(50):
        pool = random_unit(rng, 300, 16)
        q = random_unit(rng, 1, 16)[0]
        index = memory_index(pool, [str(i) for i in range(300)])
        _, nn = index.search(q[None], k=5)
        # k = 1: the pick maximises k(x, q)^2 = cos^2; the candidates are the nearest rows (positive cosine),
        # so that is the nearest neighbour.
        _, s1 = index.select(q[None], 1, selection="sift")
        assert s1[0, 0] == nn[0, 0]
        # lambda -> infinity: every pick's gain tends to cos(x, q)^2 / lambda, the same at every step, so SIFT
        # takes the nearest neighbour k times -- it does not turn into the k nearest neighbours.
        _, big = index.select(q[None], 5, selection="sift", sift_lambda=1e9)
        assert list(big[0]) == [nn[0, 0]] * 5, trial
    # the rule itself: with a candidate of larger |cosine| but negative sign, k = 1 takes that one
    cand = np.array([unit([1, 1, 0]), unit([-1, -0.1, 0])])  # cos 0.707 and -0.995 with q = e1
    assert sift_select(np.array([1.0, 0, 0]), cand, 1)[0][0] == 1


# ---------------------------------------------------------------------------------------------- (c)
def test_each_pick_is_the_greedy_minimiser_of_the_posterior_variance():
    rng = np.random.default_rng(1)
    for trial in range(40):
        d = int(rng.integers(3, 24))
        n = int(rng.integers(2, 40))
        k = int(rng.integers(1, 8))
        lam = float(10 ** rng.uniform(-3, 1))
        cand = rng.normal(size=(n, d)) * rng.uniform(0.5, 2.0, size=(n, 1))  # unnormalised: SIFT normalises
        q = rng.normal(size=d)
        picks, variances = sift_select(q, cand, k, lam)
        assert picks.shape == variances.shape == (k,)
        for step in range(k):
            # the rank-one conditioning equals the closed form sigma^2_X(x*) = k** - k_X^T (K_X + lam I)^-1 k_X
            assert variances[step] == pytest.approx(posterior_variance(q, cand[picks[: step + 1]], lam), abs=1e-9)
            # and the pick minimises it over every candidate (re-selection included), given the earlier picks
            every = [posterior_variance(q, cand[np.append(picks[:step], j)], lam) for j in range(n)]
            assert variances[step] <= min(every) + 1e-9, (trial, step)
        assert np.all(np.diff(variances) <= 1e-12)  # more observations never add uncertainty
        # guaranteed for every k: SIFT's k picks <= its first pick alone <= the nearest neighbour alone
        nearest = int(np.argmax(unit(cand) @ unit(q)))
        assert variances[-1] <= variances[0] + 1e-12 <= posterior_variance(q, cand[[nearest]], lam) + 2e-12


def test_greedy_is_not_guaranteed_to_beat_the_k_nearest():
    # Greedy is myopic: here the 3 nearest rows together span the question better than SIFT's 3 picks (SIFT's
    # second pick cancels the first one's off-question component and then A is taken again). So "SIFT's k picks
    # leave less variance than the k nearest" holds typically, not always; the tests above check what is exact.
    q = np.array([1.0, 0, 0])
    cand = np.array([[0.697, -0.011, 0.717], [0.593, -0.705, -0.388], [0.582, 0.549, -0.6],
                     [0.389, 0.002, 0.921], [0.273, 0.94, 0.204]])  # sorted by cosine, nearest first
    picks, variances = sift_select(q, cand, 3)
    assert list(picks) == [0, 3, 0]
    assert variances[-1] > 5 * posterior_variance(q, cand[:3])


def test_prefix_stable_and_limited_to_the_candidates():
    rng = np.random.default_rng(2)
    pool = random_unit(rng, 500, 12)
    q = random_unit(rng, 4, 12).astype(np.float32)
    index = memory_index(pool, [str(i) for i in range(500)])
    _, six = index.select(q, 6, selection="sift", sift_candidates=40)
    _, two = index.select(q, 2, selection="sift", sift_candidates=40)
    np.testing.assert_array_equal(six[:, :2], two)  # serving selects once for the largest k and cuts
    _, top = index.search(q, 40)
    assert all(set(six[r]) <= set(top[r]) for r in range(4))  # only among the sift_candidates nearest rows
    # fewer candidates than k: SIFT still returns k picks (re-selection); nearest returns what there is
    d, i = index.select(q[:1], 3, selection="sift", sift_candidates=1)
    assert list(i[0]) == [top[0, 0]] * 3 and d.shape == (1, 3)
    assert index.select(q[:1], 3)[1].shape == (1, 3)


def test_nearest_is_the_default_and_unchanged():
    rng = np.random.default_rng(3)
    pool = random_unit(rng, 200, 8)
    index = memory_index(pool, [str(i) for i in range(200)])
    q = random_unit(rng, 3, 8).astype(np.float32)
    d0, i0 = index.search(q, 4)
    for d, i in (index.select(q, 4), index.select(q, 4, selection="nearest", sift_lambda=5.0)):
        np.testing.assert_array_equal(i, i0)
        np.testing.assert_array_equal(d, d0)
    rows, dist = index.neighbours(q, 4)
    assert [[r["index"] for r in rs] for rs in rows] == i0.tolist()


# ---------------------------------------------------------------------------------------------- (d)
@pytest.mark.parametrize("override, key", [
    ("ttt.adapt.selection=mmr", r"ttt\.adapt\.selection"),
    ("ttt.adapt.sift_lambda=0", r"ttt\.adapt\.sift_lambda"),
    ("ttt.adapt.sift_lambda=-1.0", r"ttt\.adapt\.sift_lambda"),
    ("ttt.adapt.sift_lambda=.inf", r"ttt\.adapt\.sift_lambda"),
    ("ttt.adapt.sift_candidates=0", r"ttt\.adapt\.sift_candidates"),
    ("ttt.adapt.sift_candidate=10", r"ttt\.adapt\.sift_candidate: unknown key"),
])
def test_config_errors_name_the_key(override, key):
    from finemed_ray.eval.config import EvalJobConfig
    from finemed_ray.serving.config import ServeConfig

    with pytest.raises(ConfigError, match=key):
        load_config(EvalJobConfig, ROOT / "configs/eval_tiny.yaml", [override])
    with pytest.raises(ConfigError, match=key):
        load_config(ServeConfig, ROOT / "configs/serve_tiny.yaml", [override])


def test_config_defaults_and_direct_calls():
    from finemed_ray.eval.config import EvalJobConfig
    from finemed_ray.ttt.adapt import TTTConfig

    assert TTTConfig().retrieval_kwargs() == {"selection": "nearest", "sift_lambda": 0.01, "sift_candidates": 200}
    cfg = load_config(EvalJobConfig, ROOT / "configs/eval_tiny.yaml",
                      ["ttt.adapt.selection=sift", "ttt.adapt.sift_lambda=0.1", "ttt.adapt.sift_candidates=50"])
    assert cfg.ttt.adapt.retrieval_kwargs() == {"selection": "sift", "sift_lambda": 0.1, "sift_candidates": 50}
    index = memory_index(DUP_POOL, DUP_IDS)
    with pytest.raises(ConfigError, match="selection='mmr'"):
        index.neighbours(Q[None].astype(np.float32), 2, selection="mmr")
    with pytest.raises(ConfigError, match="sift_lambda=0.0"):
        index.select(Q[None], 2, selection="sift", sift_lambda=0.0)
    with pytest.raises(ConfigError, match="sift_candidates=0"):
        index.select(Q[None], 2, selection="sift", sift_candidates=0)
