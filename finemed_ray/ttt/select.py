"""SIFT: choose TTT training examples that minimise the uncertainty about the question, not just the closest ones.

Hübotter, Bongni, Hakimi, Krause. "Efficiently Learning at Test-Time: Active Fine-Tuning of LLMs". ICLR 2025
(arXiv:2410.08020); reference implementation: the ``activeft`` package (github.com/jonhue/activeft),
``activeft.sift.Retriever`` with the ``VTL`` acquisition function (``activeft/acquisition_functions/vtl.py``,
``bace.py``, ``gaussian.py``).

Nearest-neighbour retrieval takes the k rows closest to the question. When the pool holds near-duplicates (the
same fact in several rows), those k rows say the same thing k times. SIFT instead models the question's embedding
response as a Gaussian process with the kernel ``k(x, x') = <x/|x|, x'/|x'|>`` (inner product of L2-normalised
embeddings) and observation noise ``λ``, and picks the rows that most reduce its posterior variance. For the
question ``x*`` and a multiset of selected rows ``X = (x_1 .. x_n)``::

    σ²_X(x*) = k(x*, x*) - k_X(x*)ᵀ (K_X + λ I)⁻¹ k_X(x*)

with ``k_X(x*) = [k(x_i, x*)]_i`` and ``K_X = [k(x_i, x_j)]_ij``. SIFT is greedy::

    x_{n+1} = argmin_{x in candidates} σ²_{X ∪ {x}}(x*)

where the candidates are the question's ``K`` nearest rows of the index (activeft pre-selects them with Faiss,
``Retriever.search(..., K)``; here :meth:`finemed_ray.ttt.index.RetrievalIndex.search`).

How the greedy step is computed (as activeft's VTL): condition the kernel on each pick ``x_i`` (rank one)::

    k_{i}(a, b) = k_{i-1}(a, b) - k_{i-1}(a, x_i) k_{i-1}(x_i, b) / (k_{i-1}(x_i, x_i) + λ)

so that ``σ²_{X_n ∪ {x}}(x*) = k_n(x*, x*) - k_n(x*, x)² / (k_n(x, x) + λ)``, and the next pick maximises
``k_n(x*, x)² / (k_n(x, x) + λ)``. The conditioned kernel is kept as ``k_n = k_0 - U Uᵀ`` with one column
``u_i = k_{i-1}(·, x_i) / sqrt(k_{i-1}(x_i, x_i) + λ)`` per pick: ``O(K d)`` per pick, no ``K x K`` matrix.

Properties (tested in ``tests/test_ttt_select.py``):

* **Re-selection.** A row already picked stays a candidate (activeft's sequential selection never masks a pick
  out): picking it again is worth it when it still explains the question better than any other row after its
  first pick. In TTT a row listed twice weighs twice in the question's mean loss.
  Exact duplicates in the pool are handled the same way: after one of them is picked, the others are worth no
  more than a re-selection.
* **k = 1** picks the row with the largest ``k(x, x*)²``, i.e. the largest |cosine|: among candidates with a
  positive cosine (the question's nearest rows of a normalising encoder) that is the nearest neighbour.
* **Large λ** (``λ → ∞``): every pick's gain tends to ``k_0(x*, x)² / λ``, the same at each step, so SIFT picks the
  nearest neighbour *k times* (it does not become k-nearest-neighbours). **Small λ** favours diversity: once a row
  is picked, similar rows explain little more.
* **Greedy, not optimal.** Each pick is the best one given the earlier picks, and the posterior variance never
  grows. The k picks together are *not* guaranteed to leave less variance than the k nearest neighbours: on
  random embeddings a few cases in a thousand go the other way. What holds for every k: SIFT's variance after k
  picks is at most its variance after its first pick, which is at most the variance after the nearest neighbour.
* **Prefix-stable.** The first ``j`` of ``k`` picks are the ``j`` picks (same candidates, same λ), so a caller may
  select once for the largest k and cut (the serving path does).

Not implemented: activeft's adaptive stopping (``alpha``), SIFT-Fast (lazy evaluation), and querying ``-x*``
for rows with a large negative cosine (the index ranks by L2 distance).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from finemed_ray.errors import ConfigError

Selection = Literal["nearest", "sift"]
SELECTIONS = ("nearest", "sift")
SIFT_LAMBDA = 0.01  # activeft.sift.Retriever's default lambda_
SIFT_CANDIDATES = 200  # the question's nearest rows SIFT chooses from


def _unit(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` (float64) scaled to unit L2 norm; an all-zero row stays zero (kernel 0 with everything)."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def _check_lambda(lam: float) -> float:
    lam = float(lam)
    if not np.isfinite(lam) or lam <= 0:
        raise ConfigError(f"sift_lambda={lam}: must be a finite number > 0")
    return lam


def posterior_variance(query: np.ndarray, selected: np.ndarray, lam: float = SIFT_LAMBDA) -> float:
    """``σ²_X(x*)``: the query's posterior variance after observing the rows of ``selected`` (a multiset, ``[n, d]``;
    ``n = 0`` gives the prior, 1 for a non-zero query), computed directly from the formula in the module
    docstring with a linear solve: the reference that :func:`sift_select` is checked against."""
    lam = _check_lambda(lam)
    q = _unit(np.asarray(query).reshape(-1))
    x = _unit(np.asarray(selected).reshape(-1, q.shape[0]))
    if x.shape[0] == 0:
        return float(q @ q)
    kx = x @ q
    gram = x @ x.T + lam * np.eye(x.shape[0])
    return float(q @ q - kx @ np.linalg.solve(gram, kx))


def sift_select(query: np.ndarray, candidates: np.ndarray, k: int, lam: float = SIFT_LAMBDA
                ) -> tuple[np.ndarray, np.ndarray]:
    """Greedy SIFT: ``k`` picks among the rows of ``candidates`` (``[K, d]``) for ``query`` (``[d]``).

    Returns ``(picks, variances)``: ``picks`` int64 ``[k]``, positions in ``candidates`` in the order picked (a
    position may repeat: re-selection), ``variances`` float64 ``[k]``, the query's posterior variance after each
    pick (non-increasing). Ties go to the lower position, so with candidates sorted nearest first the nearer row
    wins. Embeddings are L2-normalised here, whatever the encoder did."""
    lam = _check_lambda(lam)
    if k < 1:
        raise ConfigError(f"k={k}: must be >= 1")
    q = _unit(np.asarray(query).reshape(-1))
    x = _unit(candidates)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] != q.shape[0]:
        raise ConfigError(f"SIFT: candidates of shape {np.shape(candidates)} for a query of dim {q.shape[0]}")
    n_cand = x.shape[0]
    cov_q = x @ q  # k_n(x, x*) for every candidate, conditioned as picks are made
    var_x = np.einsum("ij,ij->i", x, x)  # k_n(x, x)
    var_q = float(q @ q)  # k_n(x*, x*)
    u = np.zeros((n_cand, k))  # conditioning columns u_i over the candidates
    picks = np.empty(k, np.int64)
    variances = np.empty(k)
    for n in range(k):
        gain = cov_q ** 2 / (np.maximum(var_x, 0.0) + lam)  # variance removed by picking each candidate next
        i = int(np.argmax(gain))
        scale = np.sqrt(max(var_x[i], 0.0) + lam)
        col = (x @ x[i] - u[:, :n] @ u[i, :n]) / scale  # k_n(·, x_i) / sqrt(k_n(x_i, x_i) + λ)
        u_q = cov_q[i] / scale
        u[:, n] = col
        cov_q = cov_q - col * u_q
        var_x = var_x - col ** 2
        var_q -= u_q ** 2
        picks[n], variances[n] = i, max(var_q, 0.0)
    return picks, variances


def check_selection(selection: str, sift_lambda: float, sift_candidates: int) -> None:
    """Raise :class:`ConfigError` naming the bad argument (for callers that bypass the typed config)."""
    if selection not in SELECTIONS:
        raise ConfigError(f"selection={selection!r}: expected one of {', '.join(SELECTIONS)}")
    _check_lambda(sift_lambda)
    if int(sift_candidates) < 1:
        raise ConfigError(f"sift_candidates={sift_candidates}: must be >= 1")


__all__ = ["SELECTIONS", "SIFT_CANDIDATES", "SIFT_LAMBDA", "Selection", "check_selection", "posterior_variance",
           "sift_select"]
