"""Paired significance for two evaluations of the same questions (with vs without TTT, stage N vs stage N-1).

McNemar's exact test: only the discordant questions carry information -- ``b`` answered right by A only, ``c`` by
B only. Under "no difference" each discordant question is a fair coin, so the two-sided p-value is the binomial
tail ``min(1, 2 * P[X <= min(b, c)])`` with ``X ~ Binomial(b + c, 1/2)``. Exact, so it stays valid for the small
n of a demo (the chi-square approximation does not)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from math import comb
from typing import Any


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts ``b`` and ``c``."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(comb(n, k) for k in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_comparison(before: Sequence[Mapping[str, Any]], after: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Compare two prediction lists (``id`` + ``correct``) on the same questions: accuracies, the delta, the
    discordant counts and McNemar's exact p-value. Raises ValueError when the question sets differ."""
    a = {p["id"]: bool(p["correct"]) for p in before}
    b = {p["id"]: bool(p["correct"]) for p in after}
    if set(a) != set(b) or len(a) != len(before) or len(b) != len(after):
        raise ValueError("paired comparison needs the same questions (unique ids) on both sides")
    gained = sum(1 for k in a if b[k] and not a[k])
    lost = sum(1 for k in a if a[k] and not b[k])
    n = len(a)
    return {"n": n, "before": sum(a.values()) / n, "after": sum(b.values()) / n,
            "delta": (sum(b.values()) - sum(a.values())) / n, "gained": gained, "lost": lost,
            "p_value": mcnemar_exact(gained, lost)}
