"""N-gram decontamination of synthesized questions and answers against evaluation benchmarks.

A generated text is *contaminated* if it shares a run of ``n`` consecutive words (default 13, as in GPT-3's and many
later decontamination passes) with a benchmark item. Words are the Unicode letter/digit runs of the NFKC-normalised,
lower-cased text, so case, punctuation, hyphens and spacing never matter (``"17-year-old"`` = ``"17 year old"``).

What is indexed, per benchmark item: one *segment* per configured field (default ``question`` and ``options``).
A field's value may be a string, a list (joined; ``{"key", "text"}`` option lists give their texts), or a mapping
(MedQA-style ``{"A": ..., "B": ...}`` options: values joined in order; a mapping with ``"text"`` gives that text).
PubMedQA-style rows index their ``question`` (which holds the abstract) or, for the original format,
``QUESTION``/``CONTEXTS`` (field names are matched case-insensitively when the exact name is missing).
N-grams never span two segments.

Short segments: a segment of fewer than ``n`` words is indexed as one whole-segment gram, so a generated text is
flagged if it contains that whole segment verbatim (after normalisation) - otherwise short MedMCQA/MMLU questions
could be copied undetected. Segments shorter than ``min_words`` (default 8) are not indexed at all: 1-7 word
questions ("Microangiopathic hemolytic anemia", "Which of the following statements is false") and option lists
such as PubMedQA's "yes no maybe" are ordinary medical phrases and would flag innocent text.

Memory: every gram is hashed to a 64-bit integer (a polynomial rolling hash over per-word BLAKE2b hashes, finished
with a splitmix64 mixer and the gram length); the index is a sorted ``uint64`` array plus an ``int32`` array naming
the first item (in load order) that holds each gram: 12 bytes per distinct gram, no Python objects per gram. With
2^64 hash values, a false hit needs a 64-bit collision (about 1e-19 per lookup and indexed gram). Hashes are
stable across processes (no ``hash()``), so a built index can be pickled and shipped to Ray workers.
"""

from __future__ import annotations

import hashlib
import re
import time
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from finemed_ray.errors import DataError
from finemed_ray.mcq import read_rows, row_id

__all__ = ["DEFAULT_FIELDS", "Decontaminator", "normalize_words"]

DEFAULT_FIELDS: tuple[str, ...] = ("question", "options")
_WORD = re.compile(r"[^\W_]+")

_P = np.uint64(0x100000001B3)  # odd multiplier of the rolling hash (FNV-64 prime)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1


def normalize_words(text: str) -> list[str]:
    """``"A 17-year-old  Boy's ECG."`` -> ``["a", "17", "year", "old", "boy", "s", "ecg"]``."""
    return _WORD.findall(unicodedata.normalize("NFKC", text).lower())


@lru_cache(maxsize=1 << 17)
def _word_hash(word: str) -> int:
    return int.from_bytes(hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(), "little")


def _word_hashes(words: Sequence[str]) -> np.ndarray:
    return np.fromiter((_word_hash(w) for w in words), dtype=np.uint64, count=len(words))


def _mix(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def _finish(acc: np.ndarray, k: int) -> np.ndarray:
    return _mix(acc + np.uint64((k * _GOLDEN) & _MASK64))


def _window_hashes(th: np.ndarray, k: int) -> np.ndarray:
    """Hash of every window of ``k`` consecutive word hashes (``len(th) - k + 1`` values; empty if too short)."""
    count = len(th) - k + 1
    if count <= 0:
        return np.empty(0, dtype=np.uint64)
    acc = th[:count].copy()
    for i in range(1, k):
        acc *= _P
        acc += th[i : i + count]
    return _finish(acc, k)


def _row_hashes(mat: np.ndarray) -> np.ndarray:
    """Hash of each row of an ``(m, k)`` matrix of word hashes - equal to ``_window_hashes(row, k)[0]``."""
    k = mat.shape[1]
    acc = mat[:, 0].copy()
    for i in range(1, k):
        acc *= _P
        acc += mat[:, i]
    return _finish(acc, k)


class _GramAccumulator:
    """Collects segments' word hashes and turns them into (gram hash, owner) pairs chunk by chunk, so peak memory
    stays ~ ``chunk_words`` x a few dozen bytes plus the distinct grams found so far."""

    def __init__(self, n: int, chunk_words: int = 1 << 20) -> None:
        self.n = n
        self.chunk_words = chunk_words
        self.pending: list[np.ndarray] = []
        self.pending_owner: list[int] = []
        self.pending_words = 0
        self.out_h: list[np.ndarray] = []
        self.out_o: list[np.ndarray] = []
        self.short_lengths: set[int] = set()
        self.segments = 0
        self.words = 0

    def add(self, hashes: np.ndarray, owner: int) -> None:
        self.pending.append(hashes)
        self.pending_owner.append(owner)
        self.pending_words += len(hashes)
        self.segments += 1
        self.words += len(hashes)
        if self.pending_words >= self.chunk_words:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        n = self.n
        lengths = np.fromiter((len(h) for h in self.pending), dtype=np.int64, count=len(self.pending))
        owners = np.asarray(self.pending_owner, dtype=np.int32)
        th = np.concatenate(self.pending)
        starts = np.zeros(len(lengths), dtype=np.int64)
        starts[1:] = np.cumsum(lengths)[:-1]
        self.pending, self.pending_owner, self.pending_words = [], [], 0
        # Full n-grams over the concatenation, keeping the windows that stay inside one segment.
        if len(th) >= n:
            seg_of_pos = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
            wh = _window_hashes(th, n)
            inside = seg_of_pos[: len(wh)] == seg_of_pos[n - 1 : n - 1 + len(wh)]
            self._keep(wh[inside], owners[seg_of_pos[: len(wh)][inside]])
            del seg_of_pos, wh, inside
        # One whole-segment gram per segment shorter than n.
        for k in np.unique(lengths[lengths < n]).tolist():
            sel = np.nonzero(lengths == k)[0]
            mat = th[starts[sel][:, None] + np.arange(k)]
            self._keep(_row_hashes(mat), owners[sel])
            self.short_lengths.add(int(k))

    def _keep(self, h: np.ndarray, o: np.ndarray) -> None:
        self.out_h.append(h)
        self.out_o.append(o)
        if len(self.out_h) >= 16:  # compact now and then: grams repeated across chunks are dropped early
            h, o = _dedup(self.out_h, self.out_o)
            self.out_h, self.out_o = [h], [o]

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        self.flush()
        return _dedup(self.out_h, self.out_o)


def _dedup(hs: list[np.ndarray], os_: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate, sort by (hash, owner) and keep the first owner of each distinct hash."""
    if not hs:
        return np.empty(0, dtype=np.uint64), np.empty(0, dtype=np.int32)
    h = np.concatenate(hs)
    o = np.concatenate(os_).astype(np.int32, copy=False)
    order = np.lexsort((o, h))
    h, o = h[order], o[order]
    first = np.ones(len(h), dtype=bool)
    first[1:] = h[1:] != h[:-1]
    return h[first], o[first]


# ------------------------------------------------------------------------------------------------- reading rows
def _flatten(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        if "text" in value:
            return _flatten(value["text"])
        return " ".join(_flatten(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return " ".join(_flatten(v) for v in value)
    return ""  # numbers, None, booleans: not text


def _get(row: Mapping[str, Any], name: str) -> Any:
    if name in row:
        return row[name]
    low = name.lower()
    for k, v in row.items():
        if isinstance(k, str) and k.lower() == low:
            return v
    return None


def _item_id(row: Mapping[str, Any], given: str | None, position: int) -> str:
    # In-memory rows without an id: their 0-based position. Files give every row its id as evaluation names it.
    return given if given is not None else row_id(row, fallback=f"#{position}")


# ------------------------------------------------------------------------------------------------- the index
@dataclass
class Decontaminator:
    """An n-gram index over benchmark items; :meth:`check` a generated text against it.

    Build with :meth:`from_files` (benchmark name -> local path or ``s3://`` URI) or :meth:`from_rows`. The object is
    plain data (numpy arrays and lists) and pickles cheaply."""

    n: int
    min_words: int
    hashes: np.ndarray  # sorted distinct gram hashes (uint64)
    owners: np.ndarray  # int32 index into ``items`` of the first item holding each gram
    items: list[tuple[str, str]]  # (benchmark, item id)
    short_lengths: tuple[int, ...]  # lengths (< n) of the whole-segment grams in the index
    stats: dict[str, Any] = field(default_factory=dict)

    # -------------------------------------------------------------------------------------------- building
    @classmethod
    def from_rows(
        cls,
        benchmarks: Mapping[str, Iterable[Mapping[str, Any]] | Iterable[tuple[str | None, Mapping[str, Any]]]],
        n: int = 13,
        fields: Sequence[str] | Mapping[str, Sequence[str]] = DEFAULT_FIELDS,
        min_words: int = 8,
        chunk_words: int = 1 << 20,
    ) -> Decontaminator:
        """Index in-memory rows: ``{benchmark: [row, ...]}`` (or ``[(id, row), ...]``). ``fields`` is one list for
        all benchmarks or a ``{benchmark: fields}`` mapping (benchmarks missing from it use :data:`DEFAULT_FIELDS`).
        ``chunk_words`` bounds the words turned into grams at once (peak memory, not the result)."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if min_words < 1:
            raise ValueError(f"min_words must be >= 1, got {min_words}")
        t0 = time.perf_counter()
        items: list[tuple[str, str]] = []
        acc = _GramAccumulator(n, chunk_words)
        per_bench: dict[str, dict[str, int]] = {}
        for bench, rows in benchmarks.items():
            bench_fields = fields.get(bench, DEFAULT_FIELDS) if isinstance(fields, Mapping) else fields
            if isinstance(bench_fields, str):
                bench_fields = (bench_fields,)
            counts = per_bench.setdefault(bench, {"items": 0, "empty_items": 0, "segments": 0, "skipped_short": 0})
            for pos, entry in enumerate(rows):
                given, row = entry if isinstance(entry, tuple) else (None, entry)
                owner = len(items)
                items.append((bench, _item_id(row, given, pos)))
                counts["items"] += 1
                kept = 0
                for name in bench_fields:
                    words = normalize_words(_flatten(_get(row, name)))
                    if not words:
                        continue
                    if len(words) < min(n, min_words):
                        counts["skipped_short"] += 1
                        continue
                    acc.add(_word_hashes(words), owner)
                    kept += 1
                counts["segments"] += kept
                counts["empty_items"] += kept == 0
        h, o = acc.result()
        stats = {
            "n": n,
            "min_words": min_words,
            "items": len(items),
            "segments": acc.segments,
            "words": acc.words,
            "grams": int(len(h)),
            "index_bytes": int(h.nbytes + o.nbytes),
        }
        index = cls(n, min_words, h, o, items, tuple(sorted(acc.short_lengths)), stats)
        index.stats.update(per_benchmark=per_bench, build_seconds=round(time.perf_counter() - t0, 3))
        return index

    @classmethod
    def from_files(
        cls,
        files: Mapping[str, str],
        n: int = 13,
        fields: Sequence[str] | Mapping[str, Sequence[str]] = DEFAULT_FIELDS,
        min_words: int = 8,
        chunk_words: int = 1 << 20,
    ) -> Decontaminator:
        """Index benchmark files: ``{"medqa": "path/or/s3://uri.jsonl", ...}`` read with
        :func:`finemed_ray.storage.read_text` (a missing file raises ``StorageError``) and
        :func:`finemed_ray.mcq.read_rows` (JSONL, JSON array or id -> row object, as evaluation reads them); items
        are named by :func:`finemed_ray.mcq.row_id` as evaluation names them (id field, else line number). Every
        JSON object is indexed, valid MCQ or not. A file with no usable item raises ``DataError``; undecodable or
        non-object lines are skipped and counted in ``stats["per_benchmark"]["bad_lines"]``."""
        from finemed_ray.storage import read_text

        t0 = time.perf_counter()
        loaded: dict[str, list[tuple[str | None, dict]]] = {}
        bad: dict[str, int] = {}
        for bench, uri in files.items():
            entries = read_rows(read_text(uri))
            rows = [(row_id(e.value, key=e.key, fallback=str(e.number)), e.value) for e in entries if e.error is None]
            bad_lines = len(entries) - len(rows)
            if not rows:
                raise DataError(f"benchmark {bench!r} ({uri}): no JSON objects found ({bad_lines} bad lines)")
            loaded[bench] = rows
            bad[bench] = bad_lines
        read_seconds = time.perf_counter() - t0
        index = cls.from_rows(loaded, n=n, fields=fields, min_words=min_words, chunk_words=chunk_words)
        for bench, counts in index.stats["per_benchmark"].items():
            counts["bad_lines"] = bad[bench]
            if counts["items"] == counts["empty_items"]:
                raise DataError(
                    f"benchmark {bench!r} ({files[bench]}): no item has indexable text in fields "
                    f"{list(fields.get(bench, DEFAULT_FIELDS) if isinstance(fields, Mapping) else fields)}"
                )
        index.stats.update(read_seconds=round(read_seconds, 3), build_seconds=round(time.perf_counter() - t0, 3))
        return index

    # -------------------------------------------------------------------------------------------- checking
    def _hits(self, text: str) -> list[tuple[int, int, int]]:
        """(start word, -gram length, owner) of every indexed gram in ``text``."""
        if not isinstance(text, str) or not len(self.hashes):
            return []
        words = normalize_words(text)
        if not words:
            return []
        th = _word_hashes(words)
        found: list[tuple[int, int, int]] = []
        for k in (self.n, *self.short_lengths):
            q = _window_hashes(th, k)
            if not len(q):
                continue
            idx = np.searchsorted(self.hashes, q)
            idx[idx == len(self.hashes)] = 0
            match = np.nonzero(self.hashes[idx] == q)[0]
            found.extend((int(p), -k, int(self.owners[idx[p]])) for p in match)
        return found

    def check(self, text: str) -> str | None:
        """``None`` if ``text`` is clean, else ``"contaminated:<benchmark>:<item id>"`` for the first hit in the
        text (earliest word position; a longer gram wins at the same position)."""
        hits = self._hits(text)
        if not hits:
            return None
        _, _, owner = min(hits)
        bench, item_id = self.items[owner]
        return f"contaminated:{bench}:{item_id}"

    def check_all(self, texts: Iterable[str]) -> str | None:
        """The first contamination reason among ``texts`` (e.g. a question and its answers), else ``None``."""
        for text in texts:
            reason = self.check(text)
            if reason is not None:
                return reason
        return None

    def matches(self, text: str) -> list[tuple[str, str]]:
        """Every distinct (benchmark, item id) whose grams occur in ``text``, in order of first occurrence. The index
        keeps one owner per gram - the first item in load order - so a gram shared by several items (duplicated
        questions across benchmarks) reports only that first item."""
        out: dict[tuple[str, str], None] = {}
        for _, _, owner in sorted(self._hits(text)):
            out.setdefault(self.items[owner], None)
        return list(out)

    def __len__(self) -> int:
        return int(len(self.hashes))
